"""The ceilings every benchmark is read against: copy GB/s and GEMM TFLOP/s, measured once per
process and device, with the versions, commit and cache sizes recorded beside them."""
from __future__ import annotations

import os
import platform
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any, Callable, Dict, Optional

import torch

from .env import COMMIT_ENV, default_device, is_quick

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
