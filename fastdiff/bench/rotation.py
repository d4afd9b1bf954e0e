"""Input rotation, so that caches do not flatter a benchmark: `Rotating` and per-set CUDA graphs."""
from __future__ import annotations

import math
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch

from .hw import _cache_bytes


def graph_per_arg_set(fn, arg_sets) -> list:
    """One CUDA graph of `fn(*args)` per argument set (a graph bakes in its pointers), after a
    warm-up of every set on a side stream; replay them through `Rotating(graphs)`."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for args in arg_sets:
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    graphs = []
    for args in arg_sets:
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            fn(*args)
        graphs.append(g)
    return graphs


class Rotating:
    """Cycle through several argument tuples so that consecutive calls touch different memory.

    ``Rotating([(x0, y0), (x1, y1), ...])``; `next()` returns the next tuple (round robin),
    `bind(fn)` returns the zero-argument callable ``lambda: fn(*rot.next())`` that
    `run_benchmark` wants. `count(bytes_per_set, device)` says how many sets are needed for the
    working set to be `cache_factor` (3) times the cache (the L2 read off a GPU; the CPU's
    last-level cache), within `max_sets` and a memory cap; `build(make_args, bytes_per_set,
    device)` makes that many sets by calling ``make_args(i)``.

    Sets that do not fit several to the cache (large sizes) need only 2: the cache cannot hold
    the previous call's data anyway. Tiny sets are capped at `max_sets`: such calls are launch
    bound, and no rotation would beat the cache for them.
    """

    def __init__(self, arg_sets: Sequence[Any]):
        sets = [a if isinstance(a, tuple) else (a,) for a in arg_sets]
        if not sets:
            raise ValueError("Rotating needs at least one argument set")
        self.arg_sets: List[Tuple[Any, ...]] = sets
        self._i = 0

    def __len__(self) -> int:
        return len(self.arg_sets)

    def next(self) -> Tuple[Any, ...]:
        args = self.arg_sets[self._i]
        self._i = (self._i + 1) % len(self.arg_sets)
        return args

    __next__ = next

    def __iter__(self) -> "Rotating":
        return self

    def bind(self, fn: Callable[..., Any]) -> Callable[[], Any]:
        """A zero-argument callable calling `fn` on the next argument set each time."""

        def call() -> Any:
            return fn(*self.next())

        call.__name__ = getattr(fn, "__name__", "rotating_call")
        return call

    @staticmethod
    def count(
        bytes_per_set: int,
        device: Any = "cpu",
        *,
        cache_factor: float = 3.0,
        min_sets: int = 2,
        max_sets: Optional[int] = None,
        max_bytes: Optional[int] = None,
    ) -> int:
        """Number of sets so that ``count * bytes_per_set >= cache_factor * cache``.

        Capped at `max_sets` (default 64 on a GPU, 16 on the CPU, where benchmarks are smoke
        runs) and at `max_bytes` in all (default a quarter of the GPU's memory; 1 GiB on the CPU).
        """
        if bytes_per_set <= 0:
            raise ValueError(f"bytes_per_set must be positive, got {bytes_per_set}")
        if max_sets is None:
            max_sets = 64 if torch.device(device).type == "cuda" else 16
        cache = _cache_bytes(device)
        n = max(min_sets, math.ceil(cache_factor * cache / bytes_per_set))
        n = min(n, max_sets)
        if max_bytes is None:
            dev = torch.device(device)
            if dev.type == "cuda":
                max_bytes = torch.cuda.get_device_properties(dev).total_memory // 4
            else:
                max_bytes = 1 << 30
        n = min(n, max(1, max_bytes // bytes_per_set))
        return max(1, int(n))

    @classmethod
    def build(
        cls,
        make_args: Callable[[int], Any],
        bytes_per_set: int,
        device: Any = "cpu",
        **count_kwargs: Any,
    ) -> "Rotating":
        """`Rotating([make_args(i) for i in range(Rotating.count(bytes_per_set, device))])`."""
        n = cls.count(bytes_per_set, device, **count_kwargs)
        return cls([make_args(i) for i in range(n)])
