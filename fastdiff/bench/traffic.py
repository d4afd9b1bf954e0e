"""Counting what a piece of eager code launches and moves: a TorchDispatchMode that records
every op that is neither a view nor an allocation (a kernel launch, on a GPU) with the bytes it
reads and writes. Device-independent: it runs on CPU and meta tensors alike, so it can count a
GPU workload (an SD-1.5 U-Net call on meta tensors) without a GPU.

    with OpTraffic() as traffic:
        ...
    traffic.ops    # [(op name, bytes)]

Bytes are the distinct bytes each tensor argument addresses (a stride-0, broadcast dimension
reads once) plus each new output's; an in-place op's written argument counts once.
`fastdiff::solver_step` is counted by its contract (x, the model output(s), the read history
slots and the noise read; out and the write slot written), not its whole history buffer.
`pause()` leaves a region out (the model call, when counting the loop around it).
"""
from __future__ import annotations

import contextlib
from typing import List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

_NO_KERNEL = ("aten::empty", "aten::empty_strided", "aten::new_empty", "aten::_unsafe_view")  # allocations, a reshape


def span(t: torch.Tensor) -> int:
    """Distinct bytes a dense-or-broadcast tensor addresses."""
    n = 1
    for size, stride in zip(t.shape, t.stride()):
        if stride != 0:
            n *= size
    return n * t.element_size()


def _solver_step_bytes(args) -> int:
    x, model_out, uncond, history, noise, _coef, slots = args[:7]
    slot = span(x)
    read = span(x) + span(model_out) + (0 if uncond is None else span(uncond))
    read += (0 if noise is None else span(noise)) + slot * sum(s >= 0 for s in slots[1:])
    return read + span(args[10]) + slot * (slots[0] >= 0)


def op_bytes(func, args, kwargs, out) -> int:
    if func.name() == "fastdiff::solver_step":
        return _solver_step_bytes(args)
    tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
    outs = [o for o in tree_leaves(out) if isinstance(o, torch.Tensor)]
    return sum(map(span, tensors)) + sum(span(o) for o in outs if not any(o is t for t in tensors))


class OpTraffic(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops: List[Tuple[str, int]] = []
        self._paused = False

    def record(self, name: str, nbytes: int) -> None:
        if not self._paused:
            self.ops.append((name, nbytes))

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not (func.is_view or func.name() in _NO_KERNEL):
            self.record(str(func), op_bytes(func, args, kwargs, out))
        return out

    @contextlib.contextmanager
    def pause(self):
        self._paused = True
        try:
            yield
        finally:
            self._paused = False

    @property
    def launches(self) -> int:
        return len(self.ops)

    @property
    def bytes(self) -> int:
        return sum(b for _, b in self.ops)
