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

Environment:
  FASTDIFF_BENCH_QUICK=1        `bench_sizes` returns the quick list (always so without a GPU)
  FASTDIFF_BENCH_SIZES=largest  `bench_sizes` returns only the largest full size (profilers)
  FASTDIFF_BENCH_ROUNDS=N       rounds per benchmark
  FASTDIFF_BENCH_PROVIDERS=a,b  run only these providers; others are skipped
  FASTDIFF_BENCH_SKIP_PROVIDERS=a,b  skip these providers (e.g. `compile`: its compile time
                                dwarfs a short GPU run; gpu_check.sh runs it in a phase of its own)
  FASTDIFF_BENCH_PROFILE=1      no timing: 1 warm-up call, then 2 calls inside the NVTX range
                                `fastdiff_profile` (for `ncu --nvtx --nvtx-include fastdiff_profile/`)
  FASTDIFF_BENCH_DEVICE=cpu     force the device fixture
  FASTDIFF_COMMIT=<sha>         commit recorded when the tree carries no .git (device machines)
"""
from __future__ import annotations

import math
import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

QUICK_ENV = "FASTDIFF_BENCH_QUICK"
SIZES_ENV = "FASTDIFF_BENCH_SIZES"
ROUNDS_ENV = "FASTDIFF_BENCH_ROUNDS"
PROVIDERS_ENV = "FASTDIFF_BENCH_PROVIDERS"
SKIP_PROVIDERS_ENV = "FASTDIFF_BENCH_SKIP_PROVIDERS"
PROFILE_ENV = "FASTDIFF_BENCH_PROFILE"
DEVICE_ENV = "FASTDIFF_BENCH_DEVICE"
COMMIT_ENV = "FASTDIFF_COMMIT"

PROFILE_RANGE = "fastdiff_profile"

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
]


# --------------------------------------------------------------------------- environment


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def gpu_available() -> bool:
    return torch.cuda.is_available()


def default_device() -> str:
    """"cuda" when a GPU is available, else "cpu" (`FASTDIFF_BENCH_DEVICE` overrides)."""
    forced = os.environ.get(DEVICE_ENV, "").strip()
    if forced:
        if forced.startswith("cuda") and not gpu_available():
            raise RuntimeError(f"{DEVICE_ENV}={forced!r} but torch sees no CUDA device")
        return forced
    return "cuda" if gpu_available() else "cpu"


def is_quick() -> bool:
    """True when `FASTDIFF_BENCH_QUICK=1` or when there is no GPU."""
    return _env_flag(QUICK_ENV) or not gpu_available()


def bench_sizes(full: Sequence[Any], quick: Sequence[Any]) -> List[Any]:
    """The sizes a benchmark file parametrises over.

    `quick` when `FASTDIFF_BENCH_QUICK=1` or no GPU is present, else `full`.
    `FASTDIFF_BENCH_SIZES=quick|full|largest` overrides ("largest": the last of `full`, for a
    profiler run of one representative size).
    """
    full, quick = list(full), list(quick)
    if not full or not quick:
        raise ValueError("bench_sizes: both `full` and `quick` must be non-empty")
    mode = os.environ.get(SIZES_ENV, "").strip().lower()
    if mode == "full":
        return full
    if mode == "quick":
        return quick
    if mode == "largest":
        return [full[-1]] if gpu_available() else [quick[-1]]
    if mode:
        raise ValueError(f"{SIZES_ENV}={mode!r}: expected quick, full or largest")
    return quick if is_quick() else full


def size_label(size: Any) -> Any:
    """A JSON-friendly label for a size: ints and strings unchanged, tuples joined with 'x'."""
    if isinstance(size, bool):
        return str(size)
    if isinstance(size, (int, str)):
        return size
    if isinstance(size, float) and size.is_integer():
        return int(size)
    if isinstance(size, (tuple, list, torch.Size)):
        return "x".join(str(size_label(s)) for s in size)
    return str(size)


# --------------------------------------------------------------------------- ceilings


_HW_CACHE: Dict[str, Dict[str, Any]] = {}


def cached_hw(device: Optional[str] = None) -> Optional[Dict[str, Any]]:
    """The hardware dict already measured in this process (for `device`, or any), or None."""
    if device is not None:
        return _HW_CACHE.get(_device_key(device))
    return next(iter(_HW_CACHE.values()), None)


def _device_key(device: str) -> str:
    d = torch.device(device)
    if d.type == "cuda":
        return f"cuda:{d.index if d.index is not None else torch.cuda.current_device()}"
    return d.type


def _median_time(fn: Callable[[], Any], reps: int, device: torch.device) -> float:
    """Median seconds of `reps` single calls (events on GPU, perf_counter on CPU)."""
    times = []
    if device.type == "cuda":
        for _ in range(reps):
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) * 1e-3)
    else:
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _commit() -> Dict[str, Any]:
    env = os.environ.get(COMMIT_ENV, "").strip()
    if env:
        return {"commit": env, "commit_source": COMMIT_ENV}
    root = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10
        )
        if sha.returncode == 0:
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=root, capture_output=True, text=True, timeout=10,
            )
            return {
                "commit": sha.stdout.strip(),
                "dirty": bool(dirty.stdout.strip()) if dirty.returncode == 0 else None,
                "commit_source": "git",
            }
    except (OSError, subprocess.SubprocessError):
        pass
    return {"commit": "unknown", "commit_source": "none"}


def _versions() -> Dict[str, Any]:
    try:
        import triton  # noqa: PLC0415

        triton_version = triton.__version__
    except Exception:  # triton absent or broken: report, never fail
        triton_version = None
    return {
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }


def measure_hw(device: Optional[str] = None, quick: Optional[bool] = None) -> Dict[str, Any]:
    """Measure the two ceilings of `device` once per process (cached) and return them.

    * copy bandwidth: a large device-to-device `copy_` (on the CPU, a memcpy-like `copy_`),
      counting bytes read plus bytes written, median of several copies of random data;
    * GEMM rate: an n x n x n matrix product on random data, bf16 (fp16 where bf16 is not
      supported) on a GPU, fp32 on the CPU; median of several products.

    Returns ``{device, device_name, copy_gbps, gemm_tflops, torch, triton, cuda, ...}`` plus
    details (gemm_dtype, copy_bytes, gemm_n, capability, sm_count, l2_bytes, mem_bytes, commit).
    """
    device = device or default_device()
    key = _device_key(device)
    if key in _HW_CACHE:
        return _HW_CACHE[key]
    quick = is_quick() if quick is None else quick
    dev = torch.device(key)
    info: Dict[str, Any] = {"device": dev.type}
    gen = torch.Generator(device=dev).manual_seed(1234)

    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        l2 = int(getattr(props, "L2_cache_size", 0) or 0)
        info.update(
            device_name=props.name,
            capability=f"{props.major}.{props.minor}",
            sm_count=props.multi_processor_count,
            l2_bytes=l2,
            mem_bytes=int(props.total_memory),
            driver=_nvidia_driver(),
        )
        # Copy: several times the L2 and at least 1 GiB (256 MiB quick), never more than an
        # eighth of the card.
        nbytes = max(8 * l2, (256 << 20) if quick else (1 << 30))
        nbytes = min(nbytes, int(props.total_memory) // 8)
        copy_reps, gemm_reps = 20, 10
        gemm_n = 4096 if quick else 8192
        gemm_dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    else:
        info.update(device_name=_cpu_name(), l2_bytes=_cpu_cache_bytes(), cpu_threads=torch.get_num_threads())
        nbytes = 64 << 20
        copy_reps, gemm_reps = 5, 3
        gemm_n = 512 if quick else 1024
        gemm_dtype = torch.float32

    n = nbytes // 4
    src = torch.randn(n, device=dev, generator=gen)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    t_copy = _median_time(lambda: dst.copy_(src), copy_reps, dev)
    info["copy_bytes"] = 2 * src.numel() * src.element_size()
    info["copy_gbps"] = info["copy_bytes"] / t_copy / 1e9
    del src, dst

    a = torch.randn(gemm_n, gemm_n, device=dev, generator=gen).to(gemm_dtype)
    b = torch.randn(gemm_n, gemm_n, device=dev, generator=gen).to(gemm_dtype)
    for _ in range(3):
        torch.mm(a, b)
    t_gemm = _median_time(lambda: torch.mm(a, b), gemm_reps, dev)
    info["gemm_n"] = gemm_n
    info["gemm_dtype"] = str(gemm_dtype).replace("torch.", "")
    info["gemm_tflops"] = 2.0 * gemm_n**3 / t_gemm / 1e12
    del a, b
    if dev.type == "cuda":
        torch.cuda.empty_cache()

    info.update(_versions())
    info.update(_commit())
    info["quick"] = bool(quick)
    _HW_CACHE[key] = info
    return info


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _nvidia_driver() -> Optional[str]:
    try:
        r = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20,
        )
        return r.stdout.strip().splitlines()[0] if r.returncode == 0 and r.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _cpu_cache_bytes() -> int:
    """Last-level cache of this CPU (bytes); 32 MiB when the OS does not say."""
    for name in ("SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE"):
        try:
            v = os.sysconf(name)
        except (ValueError, OSError, AttributeError):
            continue
        if v and v > 0:
            return int(v)
    return 32 << 20


def _cache_bytes(device: Any) -> int:
    dev = torch.device(device)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        return int(getattr(props, "L2_cache_size", 0) or (50 << 20))
    return _cpu_cache_bytes()


# --------------------------------------------------------------------------- rotation


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


def _rounds_from_env(default: int) -> Optional[int]:
    v = os.environ.get(ROUNDS_ENV, "").strip()
    if not v:
        return None
    n = int(v)
    if n < 1:
        raise ValueError(f"{ROUNDS_ENV} must be >= 1, got {v!r}")
    return n


def _env_list(name: str) -> List[str]:
    return [p.strip() for p in os.environ.get(name, "").split(",") if p.strip()]


def provider_skip_reason(provider: str) -> Optional[str]:
    """Why `FASTDIFF_BENCH_PROVIDERS` / `FASTDIFF_BENCH_SKIP_PROVIDERS` rule `provider` out, or
    None. benchmarks/conftest.py applies it at collection (before a provider's setup, e.g. a
    torch.compile, runs); `run_benchmark` applies it again for callers outside that conftest."""
    selected = _env_list(PROVIDERS_ENV)
    if selected and provider not in selected:
        return f"provider {provider!r} not in {PROVIDERS_ENV}={','.join(selected)}"
    if provider in _env_list(SKIP_PROVIDERS_ENV):
        return f"provider {provider!r} in {SKIP_PROVIDERS_ENV}"
    return None


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
