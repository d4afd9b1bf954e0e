"""Few-step accuracy of the multistep solvers against the exact probability-flow ODE.

RMS error of the final sample (sigma = 0, the default jump) vs the exact ODE solution from the
same noise, on the analytic Gaussian-mixture model (`fastdiff.testing`), float64 textbook
loops (the fused tables equal them to ~1e-7). Not a pytest suite: run it and read the table.

    python benchmarks/solver_accuracy.py
"""
from __future__ import annotations

import torch

import fastdiff
from fastdiff.testing import GaussianMixture

SOLVERS = {"dpmpp_2m": dict(solver="dpmpp_2m"), "dpmpp_3m": dict(solver="dpmpp_3m"),
           "unipc bh2 order 2": dict(solver="unipc", order=2, variant="bh2"),
           "unipc bh1 order 2": dict(solver="unipc", order=2, variant="bh1"),
           "unipc bh2 order 3": dict(solver="unipc", order=3, variant="bh2")}
STEPS = (5, 8, 10)


def main() -> None:
    gm = GaussianMixture.random(shape=(2, 4, 4), components=4, seed=0)
    noise = torch.randn(64, 2, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    print(f"| schedule | spacing | solver | {' | '.join(f'{n} steps' for n in STEPS)} |")
    print("|---|---|---|" + "---|" * len(STEPS))
    for schedule in ("linear", "scaled_linear"):
        model = gm.model(fastdiff.get_schedule(schedule), "epsilon", dtype=torch.float64)
        for spacing in ("karras", "trailing"):
            g = fastdiff.Sampler(schedule=schedule, spacing=spacing, steps=STEPS[0]).grid
            exact = gm.ode_solution(noise, g.alpha[0], g.sigma[0], 1.0, 0.0, step=5e-3)  # every N starts here
            for name, kw in SOLVERS.items():
                errs = []
                for n in STEPS:
                    x = fastdiff.sample(model, noise, schedule=schedule, spacing=spacing, steps=n, dtype=torch.float64,
                                        backend="reference", **kw)
                    errs.append(float((x - exact).pow(2).mean().sqrt()))
                print(f"| {schedule} | {spacing} | {name} | {' | '.join(f'{e:.4f}' for e in errs)} |")


if __name__ == "__main__":
    main()
