"""NVTX ranges: off by default (a shared no-op), on by switch, visible to the torch profiler."""
import torch
from torch.profiler import profile

import fastdiff
from fastdiff import profiling


def _names(fn):
    with profile() as prof:
        fn()
    return {e.key for e in prof.key_averages()}


def _run():
    fastdiff.sample(lambda x, t: 0.5 * x, torch.randn(2, 3, 4, 4), steps=3, solver="dpmpp_2m")


def test_ranges_are_off_by_default_and_cost_one_shared_object():
    assert not profiling.enabled()
    assert profiling.nvtx_range("a") is profiling.nvtx_range("b")
    assert not any(n.startswith("fastdiff/") for n in _names(_run))


def test_enabled_ranges_name_sample_step_model_and_solver_step():
    profiling.enable(True, record_functions=True)
    try:
        names = _names(_run)
    finally:
        profiling.enable(False)
    assert {"fastdiff/sample", "fastdiff/step", "fastdiff/model", "fastdiff/solver_step"} <= names
