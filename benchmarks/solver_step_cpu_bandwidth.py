"""In-cache bandwidth of the CPU solver_step kernel vs a copy of as many bytes, one thread.

    PYTHONPATH=. python benchmarks/solver_step_cpu_bandwidth.py          # the variant the CPU picks
    FASTDIFF_CPU_ISA=baseline PYTHONPATH=. python benchmarks/solver_step_cpu_bandwidth.py

(PYTHONPATH=.: a script's own folder, not the working directory, goes first on sys.path.)

One DPM-Solver++(2M) step with CFG (reads x, model, uncond, D_{i-1}; writes x', D_i), state
fp32, model output fp32/fp16/bf16, through the raw op (torch.ops.fastdiff_C.solver_step: the
Python wrapper's checks are not timed). Each call also pays a fixed cost (the dispatcher and
the binding's checks: microseconds, a copy's is smaller), which at in-cache sizes is as large
as the work, so the kernel is measured by its slope: GB/s = the bytes the step must move more
at SMALL than at BIG elements / the extra median time, both sizes in the L2; "% copy" = that
over the same slope of `dst.copy_(src)` moving as many bytes (read + write). "fixed" = a call on
16 elements. Not a pytest-benchmark suite: a quick before/after check of the kernel loop.
"""
from __future__ import annotations

import statistics
import time

import torch

import fastdiff  # noqa: F401  (loads fastdiff._C: registers torch.ops.fastdiff_C)
from fastdiff import _ext

SMALL, BIG = 4096, 16384  # 0.1 and 0.4 MB per fp32 step: in the L2
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
COEF = [0.9, -0.4, 0.7, 0.2, -0.1, 0.0, 0.0, 0.0, 0.0]
SLOTS = [0, 1, -1, -1]


def median_s(fn, calls: int = 300, reps: int = 31) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - t0) / calls)
    return statistics.median(times)


def step_and_copy(n: int, dt: torch.dtype):
    """(bytes the step moves, median s of the step, median s of a copy of as many bytes)."""
    x, hist, out = torch.randn(n), torch.randn(2, n), torch.empty(n)
    m, u = torch.randn(n).to(dt), torch.randn(n).to(dt)
    nbytes = 4 * n * 4 + 2 * n * m.element_size()  # x, D_{i-1}, x', D_i + model, uncond
    t = median_s(lambda: torch.ops.fastdiff_C.solver_step(x, m, u, hist, None, COEF, SLOTS, 7.5, None, 0.0, out))
    src = torch.randn(nbytes // 8)
    dst = torch.empty_like(src)
    return nbytes, t, median_s(lambda: dst.copy_(src))


def main() -> None:
    torch.set_num_threads(1)
    print(f"solver_step CPU kernel, 1 thread, variant {_ext.build_info().get('cpu_isa', 'baseline (the only one)')}")
    print(f"{'model':>5} {'fixed us':>8} {f'{BIG} us':>9} {'GB/s':>6} {'copy GB/s':>9} {'% copy':>7}")
    for name, dt in DTYPES.items():
        _, t_fixed, _ = step_and_copy(16, dt)
        b0, t0, c0 = step_and_copy(SMALL, dt)
        b1, t1, c1 = step_and_copy(BIG, dt)
        gbps, copy = (b1 - b0) / (t1 - t0) / 1e9, (b1 - b0) / (c1 - c0) / 1e9
        print(f"{name:>5} {t_fixed * 1e6:>8.2f} {t1 * 1e6:>9.2f} {gbps:>6.1f} {copy:>9.1f} {100 * gbps / copy:>6.0f}%")


if __name__ == "__main__":
    main()
