"""What the benchmark environment variables select: device, sizes, rounds, providers.

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

import os
from typing import Any, List, Optional, Sequence

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
