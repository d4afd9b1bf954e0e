"""A faithful stand-in for a CUDA graph, for testing the whole-loop graph logic on the CPU.

What a real CUDA graph does, and so what this fake does:
* capture records the work (here: every ATen/custom op `run` dispatches, via a
  TorchDispatchMode) and keeps no Python reference to `run`, its closure or its tensors;
* replay re-executes that work on the same memory: the same storages, offsets, sizes and
  strides, whatever Python objects exist now. Memory allocated during capture belongs to the
  graph (its private pool), so the fake keeps those storages. Memory that existed before the
  capture (static inputs, state, buffers) does not: the fake holds it only weakly, and a replay
  raises `FreedBufferError` if any of it has been freed since, where a real replay would
  silently read and write freed (possibly reused) memory;
* a host synchronisation during capture (`.item()`, printing a tensor) fails, as it does on
  CUDA ("operation not permitted when stream is capturing").
"""
from __future__ import annotations

import weakref

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map


class FreedBufferError(RuntimeError):
    """A replay would touch memory that was freed after the capture."""


_HOST_SYNC = {torch.ops.aten._local_scalar_dense.default, torch.ops.aten.is_nonzero.default}


class _Ref:
    """Where a tensor lived at capture: its storage (strongly or weakly held) and its view."""

    def __init__(self, t: torch.Tensor, owned: dict, seen: dict):
        st = t.untyped_storage()
        key = st.data_ptr(), st.nbytes()
        if key not in seen:  # first sight: created during the capture only if an op made it
            seen[key] = st if key in owned else weakref.ref(st)
        self.storage, self.key = seen[key], key
        self.view = (t.dtype, t.device, t.storage_offset(), tuple(t.shape), t.stride())

    def tensor(self) -> torch.Tensor:
        st = self.storage() if isinstance(self.storage, weakref.ref) else self.storage
        if st is None:
            raise FreedBufferError(f"replay touches a buffer freed after capture (storage at {self.key[0]:#x}, "
                                   f"{self.key[1]} bytes): nothing owns it any more")
        dtype, device, offset, shape, stride = self.view
        return torch.empty(0, dtype=dtype, device=device).set_(st, offset, shape, stride)


class _Recorder(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.tape, self.owned, self.seen = [], {}, {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _HOST_SYNC:
            raise RuntimeError(f"{func}: operation not permitted when stream is capturing")
        refs_in = tree_map(self._ref, (args, kwargs))  # inputs first: pre-existing memory is weak
        out = func(*args, **kwargs)
        for t in _tensors(out):
            st = t.untyped_storage()
            key = st.data_ptr(), st.nbytes()
            if key not in self.seen:  # a fresh allocation: the graph's pool owns it
                self.owned[key] = st
        self.tape.append((func, refs_in, tree_map(self._ref, out)))
        return out

    def _ref(self, v):
        return _Ref(v, self.owned, self.seen) if isinstance(v, torch.Tensor) else v


def _tensors(tree):
    found = []
    tree_map(lambda v: found.append(v) if isinstance(v, torch.Tensor) else None, tree)
    return found


class FakeCUDAGraph:
    def capture(self, run) -> "FakeCUDAGraph":
        rec = _Recorder()
        with rec:
            run()
        self.tape = rec.tape
        return self

    def replay(self) -> None:
        materialise = lambda v: v.tensor() if isinstance(v, _Ref) else v  # noqa: E731
        for func, refs_in, refs_out in self.tape:
            args, kwargs = tree_map(materialise, refs_in)
            out = func(*args, **kwargs)
            # results land where the capture put them (later ops read them there)
            for got, ref in zip(_tensors(out), _tensors(tree_map(materialise, refs_out))):
                if got.data_ptr() != ref.data_ptr() or got.stride() != ref.stride():
                    ref.copy_(got)


@pytest.fixture
def fake_graphs(monkeypatch):
    """Capture records into a FakeCUDAGraph, which, like a CUDA graph, owns only what was
    allocated during capture and fails if a replay would touch freed memory. -> fastdiff.graphs
    (import this fixture into a test module to use it)."""
    import fastdiff.graphs as G

    monkeypatch.setattr(G, "_warm_up", lambda run, device: run())
    monkeypatch.setattr(G, "_capture", lambda run, device: FakeCUDAGraph().capture(run))
    G.CACHE.clear()
    yield G
    G.CACHE.clear()


def graphed(G, sampler, model, noise, **kw):
    """`fastdiff.graphs.sample_graphed` with sample()'s defaults, for the fake graph on CPU tensors."""
    kw.setdefault("generator", None)
    return G.sample_graphed(sampler, model, noise, guidance_scale=kw.pop("guidance_scale", 1.0),
                            cond=kw.pop("cond", None), uncond=kw.pop("uncond", None), cfg=kw.pop("cfg", "batched"),
                            model_dtype=None, mode=kw.pop("mode", True), **kw)
