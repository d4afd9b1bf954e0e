"""DPM-Solver++ 3M on diffusers' Karras grids: fastdiff's third-order weight (d2_weight=2) vs
diffusers' own DPMSolverMultistepScheduler loop, relative error to the exact probability-flow
ODE limit on the analytic Gaussian mixture (64 samples, the final jump to sigma = 0 included).
The table in benchmarks/NOTES.md ("DPM-Solver++ 3M on Karras grids") comes from this script; an
accuracy measurement, not a timing (needs the diffusers extra).

    PYTHONPATH=. python benchmarks/dpmpp3m_d2_weight.py [STEPS ...]      (default 6 10 15 20 40 80 160)
"""
from __future__ import annotations

import sys
import warnings

import torch

import fastdiff
from fastdiff.testing import GaussianMixture

SCALED_LINEAR = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def main(steps) -> None:
    import diffusers

    warnings.simplefilter("ignore")  # diffusers' numpy deprecation notes
    gm = GaussianMixture.random(shape=(2, 3, 3), seed=1)
    noise = torch.randn(64, 2, 3, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    print("schedule       steps  fastdiff (d2_weight=2)  diffusers")
    for name, betas in (("scaled_linear", SCALED_LINEAR), ("linear", {})):
        for n in steps:
            sch = diffusers.DPMSolverMultistepScheduler(solver_order=3, use_karras_sigmas=True, **betas)
            plan = fastdiff.Sampler.from_scheduler(sch, n, backend="reference")
            model = gm.model(plan.schedule, prediction="epsilon", dtype=torch.float64)
            g = plan.grid
            exact = gm.ode_solution(noise, g.alpha[0], g.sigma[0], 1.0, 0.0, step=5e-3)
            ours = plan.sample(model, noise, dtype=torch.float64)
            sch.set_timesteps(n)
            x = noise.float()
            for t in sch.timesteps:
                x = sch.step(model(x.double(), t.float().expand(x.shape[0])).float(), t, x).prev_sample
            rel = [float((y.double() - exact).norm() / exact.norm()) for y in (ours, x)]
            print(f"{name:14s} {n:5d}  {rel[0]:22.2e}  {rel[1]:9.2e}")


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [6, 10, 15, 20, 40, 80, 160])
