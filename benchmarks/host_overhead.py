"""Per-call host overhead of `solver_step()` (the Python wrapper: argument checks, the overlap
check, backend choice) over the raw compiled op, on a tensor so small that the kernel costs
nothing, and the wrapper's parts alone (indented). One thread, medians of repeated loops; a
script, not a pytest-benchmark suite (so not named bench_*.py, which gpu_check runs as suites).

    PYTHONPATH=. python benchmarks/host_overhead.py
"""
from __future__ import annotations

import torch

from fastdiff.ops import solver_step as ss
from fastdiff.ops.solver_step import check_solver_step_args, solver_step
from solver_step_cpu_bandwidth import median_s  # benchmarks/, the script's folder

COEF = [0.9, -0.4, 0.7, 0.2, -0.1, 0.0, 0.0, 0.0]
SLOTS = [0, 1, -1, -1]


def main() -> None:
    torch.set_num_threads(1)
    x, m, u, out = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4), torch.empty(1, 4, 4, 4)
    hist = torch.randn(2, 1, 4, 4, 4)
    args = ss.SolverStepArgs(x, m, u, hist, None, COEF, SLOTS, 7.5, 0.0, out)
    rows = {
        "raw op (torch.ops.fastdiff_C)": lambda: torch.ops.fastdiff_C.solver_step(
            x, m, u, hist, None, COEF, SLOTS, 7.5, None, 0.0, out),
        "registered op (torch.ops.fastdiff)": lambda: torch.ops.fastdiff.solver_step(
            x, m, u, hist, None, COEF, SLOTS, 7.5, None, 0.0, out, "cpu"),
        "solver_step()": lambda: solver_step(x, m, u, hist, coef=COEF, slots=SLOTS, guidance=7.5, out=out,
                                             backend="cpu"),
        "  check_solver_step_args (uncached)": lambda: check_solver_step_args(
            x, m, u, hist, None, COEF, SLOTS, 7.5, 0.0, out),
        "  its tensor checks, cached": lambda: ss._check_tensors_cached(x, m, u, hist, None, out, None),
        "  its value checks": lambda: ss._check_values(u, hist, None, COEF, SLOTS, 7.5, 0.0, None),
        "  overlap check": lambda: ss._check_overlaps(x, m, u, hist, None, SLOTS, out),
        "  backend choice": lambda: ss.DISPATCH.select(args, "cpu"),
    }
    for name, fn in rows.items():
        print(f"{name:<38} {median_s(fn, calls=2000) * 1e6:8.2f} us")


if __name__ == "__main__":
    main()
