"""NVTX ranges for Nsight Systems / Nsight Compute, off by default and free when off.

Ranges: `fastdiff/sample` (a whole sampling call), `fastdiff/step` (one model call and its
solver step: a grid step for every solver but Heun, which takes two),
`fastdiff/model` (the denoiser call), `fastdiff/solver_step` (the fused update), and the block
ops' own. Turn them on with `fastdiff.profiling.enable()` or `FASTDIFF_NVTX=1` in the
environment. They go through the `nvtx` package when it is installed, else
`torch.cuda.nvtx`; with `record_functions=True` (what `python -m fastdiff profile` uses) each
range is also a `torch.profiler.record_function`, so the torch profiler's trace and summary
show the same names.

Inside a CUDA graph the ranges are recorded once, at capture: a replay shows up as one
`fastdiff/graph_replay` range (Nsight Systems can trace the graph's kernels one by one with
`--cuda-graph-trace=node`).
"""
from __future__ import annotations

import contextlib
import os

import torch

_state = {"on": os.environ.get("FASTDIFF_NVTX", "") not in ("", "0"), "record_functions": False}
_OFF = contextlib.nullcontext()

try:  # the nvtx package: domain-aware and cheaper than torch's wrapper
    import nvtx as _nvtx
except ImportError:  # pragma: no cover - depends on the environment
    _nvtx = None


def enable(on: bool = True, *, record_functions: bool = False) -> None:
    """Turn NVTX ranges on (or off). `record_functions` also opens torch.profiler ranges."""
    _state["on"] = bool(on)
    _state["record_functions"] = bool(on and record_functions)


def enabled() -> bool:
    return _state["on"]


@contextlib.contextmanager
def _range(name: str):
    rf = torch.profiler.record_function(name) if _state["record_functions"] else _OFF
    with rf:
        if _nvtx is not None:
            with _nvtx.annotate(name, domain="fastdiff"):
                yield
        elif torch.cuda.is_available():
            torch.cuda.nvtx.range_push(name)
            try:
                yield
            finally:
                torch.cuda.nvtx.range_pop()
        else:
            yield


def nvtx_range(name: str):
    """A context manager: an NVTX range when enabled, a shared no-op otherwise."""
    return _range(name) if _state["on"] else _OFF
