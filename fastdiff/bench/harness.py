"""The benchmark harness every `benchmarks/bench_*.py` uses.

API (keep these names and signatures; benchmark files are written against them)::

    from fastdiff.bench.harness import run_benchmark, bench_sizes, Rotating

    SIZES = bench_sizes(full=[...], quick=[...])

    @pytest.mark.parametrize("size", SIZES)
    @pytest.mark.parametrize("provider", ["eager", "compile", "triton", "cuda"])
    def test_my_op(benchmark, hw, device, size, provider):
        rot = Rotating.build(lambda i: make_inputs(size, device), bytes_per_set, device)
        fn = rot.bind(lambda x, y: my_op(x, y, backend=provider))
        run_benchmark(benchmark, fn, hw=hw, op="my_op", provider=provider, size=size,
                      bytes_moved=bytes_per_set)

Fixtures `hw` (the measured ceilings, once per session) and `device` come from
`benchmarks/conftest.py`.

How time is measured
--------------------
On a GPU the numbers pytest-benchmark stores (its median, its JSON, its table) ARE CUDA-event
times: `run_benchmark` hands the fixture a timer, `cuda_event_timer`, whose readings are CUDA
events recorded on the current stream, and whose difference synchronises on the later event and
returns `elapsed_time` in seconds. pytest-benchmark's pedantic runner does
``start = timer(); fn() x iterations; end = timer(); end - start``, so each round is the device
time between two events around `iterations` back-to-back calls, divided by `iterations`; its
statistics (median, quartiles, the raw `data` in the JSON) are computed over those rounds. We
chose this over the alternatives because:

* a wrapper that synchronises after every call would put the host's synchronisation and launch
  latency (several microseconds) into every sample: wrong for kernels of a few microseconds;
* timing with our own events and feeding the values to pytest-benchmark needs its private
  statistics objects, and its table would then disagree with what it measured itself;
* a synchronising host timer (`synchronize(); perf_counter()`) would also work, but counts the
  launch latency of the first call of each round; events count device time only.

Back-to-back calls within a round are what a sampling loop does: if a call is cheaper on the
device than launching it on the host, the round measures the launch rate -- which is then the
truth about that provider (CUDA graphs exist to fix exactly that).

Per benchmark on a GPU: one untimed first call (lazy init, `torch.compile`, Triton autotune);
an estimate of one call's time from 3 event-timed calls; `iterations` so that one round lasts
about `TARGET_ROUND_S` (2 ms); warm-up rounds for about 50 ms; then `DEFAULT_ROUNDS` (30)
rounds, fewer for slow calls so that a benchmark stays under about `MAX_TIME_S` (but at least
`MIN_ROUNDS`). Median, p20 and p80 are over rounds.

On the CPU: pytest-benchmark's own host timer (`perf_counter`) in pedantic mode, a few rounds
(`FASTDIFF_BENCH_ROUNDS`, default 5) of enough iterations for about 1 ms each.

Caches must not flatter us: `Rotating` cycles through several input sets so that the working set
of consecutive calls is several times the L2 (read from the device); the caller passes
`bytes_moved` (the fewest bytes the op must move: each input read once, each output written
once), from which GB/s and the fraction of the copy bandwidth measured in the same run follow.

Environment variables: see `fastdiff.bench.env`.
"""
from __future__ import annotations

import math
import statistics
import time
from typing import Any, Callable, Dict, Optional, Sequence

import torch

from .env import (  # noqa: F401  (re-exported: benchmarks import them from here)
    PROFILE_ENV,
    PROFILE_RANGE,
    _env_flag,
    _rounds_from_env,
    bench_sizes,
    default_device,
    gpu_available,
    is_quick,
    provider_skip_reason,
    size_label,
)
from .hw import cached_hw, measure_hw  # noqa: F401  (re-exported)
from .rotation import Rotating, graph_per_arg_set  # noqa: F401  (re-exported)

# GPU timing plan (see the module docstring).
TARGET_ROUND_S = 2e-3
WARMUP_S = 0.05
DEFAULT_ROUNDS = 30
MIN_ROUNDS = 5
MAX_TIME_S = 1.5
MAX_ITERATIONS = 10_000
# CPU timing plan.
CPU_DEFAULT_ROUNDS = 5
CPU_TARGET_ROUND_S = 1e-3

# Keys run_benchmark owns in extra_info; `**extra` may not override them.
RESERVED_KEYS = frozenset(
    {
        "op", "provider", "size", "device", "bytes_moved", "flops", "images", "median_ms",
        "p20_ms", "p80_ms", "gbps", "frac_copy", "copy_gbps", "tflops", "images_per_s",
        "ms_per_image", "timer", "rounds", "iterations", "warmup_rounds", "profile",
    }
)

__all__ = [
    "run_benchmark",
    "bench_sizes",
    "Rotating",
    "measure_hw",
    "cached_hw",
    "default_device",
    "gpu_available",
    "is_quick",
    "cuda_event_timer",
    "size_label",
    "provider_skip_reason",
    "graph_per_arg_set",
]


# --------------------------------------------------------------------------- timing


class _EventStamp:
    """A CUDA event recorded on the current stream; `later - earlier` is seconds between them."""

    __slots__ = ("event",)

    def __init__(self) -> None:
        self.event = torch.cuda.Event(enable_timing=True)
        self.event.record()

    def __sub__(self, earlier: "_EventStamp") -> float:
        self.event.synchronize()
        return earlier.event.elapsed_time(self.event) * 1e-3


def cuda_event_timer() -> _EventStamp:
    """pytest-benchmark timer whose readings are CUDA events (see the module docstring)."""
    return _EventStamp()


def _estimate_call_s(fn: Callable[[], Any], on_cuda: bool, calls: int = 3) -> float:
    if on_cuda:
        torch.cuda.synchronize()
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            fn()
        end.record()
        end.synchronize()
        t = start.elapsed_time(end) * 1e-3 / calls
    else:
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        t = (time.perf_counter() - t0) / calls
    return max(t, 1e-7)


def _quantile(sorted_data: Sequence[float], q: float) -> float:
    """Linear-interpolation quantile (q in [0, 1]) of already sorted data."""
    if not sorted_data:
        return float("nan")
    pos = q * (len(sorted_data) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_data) - 1)
    return sorted_data[lo] + (sorted_data[hi] - sorted_data[lo]) * (pos - lo)


def rel_err(out, ref) -> float:
    """Relative L2 error of `out` against `ref`, in float64 (each suite's correctness check of
    the provider it times)."""
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def run_benchmark(
    benchmark: Any,
    fn: Callable[[], Any],
    *,
    hw: Dict[str, Any],
    op: str,
    provider: str,
    size: Any,
    bytes_moved: Optional[float] = None,
    flops: Optional[float] = None,
    images: Optional[float] = None,
    rounds: Optional[int] = None,
    **extra: Any,
) -> Any:
    """Time `fn` (zero arguments, one iteration) with the pytest-benchmark fixture `benchmark`.

    Sets ``benchmark.group = f"{op}:{size}"`` and fills ``benchmark.extra_info`` with op,
    provider, size, device, median_ms, p20_ms, p80_ms and, when given, bytes_moved -> gbps and
    frac_copy (of ``hw["copy_gbps"]``), flops -> tflops, images -> images_per_s and ms_per_image.
    Extra keyword arguments (e.g. ``solver="dpmpp_2m", steps=8`` for op "sample", or
    ``variant="bf16"`` to split rows of one size in the report) are stored in extra_info as
    they are. `rounds` overrides the number of timed rounds. Returns `fn`'s last result.

    See the module docstring for how GPU time is measured.
    """
    clash = RESERVED_KEYS.intersection(extra)
    if clash:
        raise TypeError(f"run_benchmark: {sorted(clash)} are set by the harness, not by callers")
    label = size_label(size)
    device_type = hw.get("device", "cpu")
    on_cuda = device_type == "cuda"
    benchmark.group = f"{op}:{label}"
    info = benchmark.extra_info
    info.update(extra)
    info.update(op=op, provider=provider, size=label, device=device_type, copy_gbps=hw.get("copy_gbps"))
    for key, value in (("bytes_moved", bytes_moved), ("flops", flops), ("images", images)):
        if value is not None:
            info[key] = value

    skip = provider_skip_reason(provider)
    if skip is not None:
        import pytest  # noqa: PLC0415

        pytest.skip(skip)

    if _env_flag(PROFILE_ENV):
        return _run_profile(benchmark, fn, on_cuda, f"{op}:{provider}:{label}")

    if rounds is None:
        rounds = _rounds_from_env(DEFAULT_ROUNDS if on_cuda else CPU_DEFAULT_ROUNDS)

    # First call outside any timing: lazy init, torch.compile, Triton autotuning.
    fn()
    if on_cuda:
        torch.cuda.synchronize()
    if getattr(benchmark, "disabled", False):  # --benchmark-disable: pedantic runs fn once
        info["timer"] = "disabled"
        return benchmark.pedantic(fn, rounds=1, iterations=1)

    t_call = _estimate_call_s(fn, on_cuda)
    target = TARGET_ROUND_S if on_cuda else CPU_TARGET_ROUND_S
    iterations = int(min(MAX_ITERATIONS, max(1, math.ceil(target / t_call))))
    t_round = iterations * t_call
    if on_cuda:
        warmup_rounds = int(min(100, max(1, math.ceil(WARMUP_S / t_round))))
        if rounds is None:
            rounds = int(min(DEFAULT_ROUNDS, max(MIN_ROUNDS, MAX_TIME_S // t_round)))
        if hasattr(benchmark, "_timer"):
            benchmark._timer = cuda_event_timer
            info["timer"] = "cuda_event"
            target_fn = fn
        else:  # a pytest-benchmark without the attribute: synchronise inside the call instead
            info["timer"] = "host+synchronize"

            def target_fn() -> Any:
                out = fn()
                torch.cuda.synchronize()
                return out

            iterations = 1
    else:
        warmup_rounds = 1
        rounds = rounds or CPU_DEFAULT_ROUNDS
        info["timer"] = "perf_counter"
        target_fn = fn
    info.update(rounds=rounds, iterations=iterations, warmup_rounds=warmup_rounds)

    result = benchmark.pedantic(target_fn, rounds=rounds, iterations=iterations, warmup_rounds=warmup_rounds)
    if on_cuda:
        torch.cuda.synchronize()
    _fill_derived(info, benchmark, hw, bytes_moved, flops, images)
    return result


def _run_profile(benchmark: Any, fn: Callable[[], Any], on_cuda: bool, name: str) -> Any:
    """Profiler mode: one warm-up call, then two calls inside NVTX ranges, no timing."""
    benchmark.extra_info["profile"] = True
    fn()  # warm-up (compile, autotune) outside the profiled range
    if on_cuda:
        torch.cuda.synchronize()

    def profiled() -> Any:
        out = None
        if on_cuda:
            torch.cuda.nvtx.range_push(PROFILE_RANGE)
            torch.cuda.nvtx.range_push(name)
        try:
            for _ in range(2):
                out = fn()
        finally:
            if on_cuda:
                torch.cuda.synchronize()
                torch.cuda.nvtx.range_pop()
                torch.cuda.nvtx.range_pop()
        return out

    return benchmark.pedantic(profiled, rounds=1, iterations=1)


def _fill_derived(
    info: Dict[str, Any],
    benchmark: Any,
    hw: Dict[str, Any],
    bytes_moved: Optional[float],
    flops: Optional[float],
    images: Optional[float],
) -> None:
    meta = getattr(benchmark, "stats", None)
    data = list(getattr(getattr(meta, "stats", None), "data", None) or [])
    if not data:
        return
    data.sort()
    median = statistics.median(data)
    info["median_ms"] = median * 1e3
    info["p20_ms"] = _quantile(data, 0.2) * 1e3
    info["p80_ms"] = _quantile(data, 0.8) * 1e3
    if median <= 0:
        return
    if bytes_moved:
        info["gbps"] = bytes_moved / median / 1e9
        copy = hw.get("copy_gbps")
        if copy:
            info["frac_copy"] = info["gbps"] / copy
    if flops:
        info["tflops"] = flops / median / 1e12
    if images:
        info["images_per_s"] = images / median
        info["ms_per_image"] = median * 1e3 / images
