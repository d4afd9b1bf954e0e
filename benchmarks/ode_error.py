"""RMS error against the exact probability-flow ODE, per solver at a given number of model calls.

    python benchmarks/ode_error.py heun:9 dpmpp_2m:9 heun:19 dpmpp_2m:19 [--spacing karras]

`solver:calls` takes the most grid steps whose model calls fit in `calls` (Heun: 2N - 1 calls
for N steps). The model is the exact denoiser of a Gaussian mixture (`fastdiff.testing`), so
the error is the solver's alone; the reference is the ODE integrated to high accuracy from the
same noise to the clean limit.
"""
import argparse

import torch

import fastdiff
from fastdiff.testing import GaussianMixture


def _plan(solver: str, calls: int, spacing: str) -> fastdiff.Sampler:
    steps = calls
    while fastdiff.Sampler(solver=solver, steps=steps, spacing=spacing).model_calls > calls:
        steps -= 1
    return fastdiff.Sampler(solver=solver, steps=steps, spacing=spacing)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("configs", nargs="+", help="solver:model_calls")
    parser.add_argument("--spacing", default="karras")
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    mix = GaussianMixture.random(shape=(2, 4, 4), seed=0)
    model = mix.model(fastdiff.get_schedule("linear"), "epsilon")
    noise = torch.randn(args.batch, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    exact = {}
    for config in args.configs:
        solver, calls = config.split(":")
        plan = _plan(solver, int(calls), args.spacing)
        g = plan.grid
        start = (float(g.alpha[0]), float(g.sigma[0]))
        if start not in exact:
            exact[start] = mix.ode_solution(noise, *start, 1.0, 0.0)
        out = plan.sample(model, noise).double()
        rms = float((out - exact[start]).pow(2).mean().sqrt())
        print(f"{solver:10s} steps {plan.steps:3d}  model calls {plan.model_calls:3d}  RMS error {rms:.2e}")


if __name__ == "__main__":
    main()
