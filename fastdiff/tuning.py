"""Grids tuned to the model: `tune_grid` searches the N-step grid that brings a solver closest
to its own many-step answer on a calibration batch.

The grid's end points are the plan's: its first noise level (if that is zero SNR, also its second,
the first finite lambda = log(alpha / sigma)) and its last. With a clean end (sigma = 0) the
finite range runs to the smallest training noise level, the point a spacing puts last before
`final="zero"` moves it to the clean limit, so the last model level moves with the others. The
N' intervals in lambda across the finite range are softmax(z) of N' free numbers z (times the
range): every candidate is a strictly decreasing grid with the same ends, and z = 0 is the
logsnr spacing. The search starts from the best of the fixed spacings in `STARTS`, each laid
out between the plan's ends (its relative positions in lambda kept), and runs a coordinate
search: each z_j, in a seeded random order, moves by +-step while that brings the solver closer
to the reference; a sweep without progress halves the step. Objective: the RMS distance between the N-step run and a `reference_steps` run of
the same solver (logsnr spacing between the same ends) from the same noise.
"""
from __future__ import annotations

import sys
from typing import Callable, List

import numpy as np
import torch

from fastdiff.grid import _sigma_spaced
from fastdiff.sampler import Sampler, _progress

# the plan's options that describe its grid (the tuned grid replaces them) or its schedule
_GRID_OPTIONS = ("steps", "spacing", "final", "round_timesteps", "zero_terminal_snr", "shift", "steps_offset", "rho",
                 "sigma_min", "sigma_max", "schedule")
_Z_BOUND = 8.0  # |z| <= 8: no interval shrinks below e^-16 of another (no coinciding points)
# The search starts from the best of these: at few steps on a real model the time-uniform ones can
# lead (the digits model: trailing at 4-6 calls, benchmarks/NOTES.md), on smooth data logsnr/karras.
STARTS = ("logsnr", "karras", "trailing", "linspace")


def tune_grid(model: Callable, plan: Sampler, steps: int, noise: torch.Tensor, *, reference_steps: int = 100,
              max_model_calls: int = 2000, seed: int = 0, progress: bool = True, cond=None, uncond=None,
              guidance_scale: float = 1.0, model_dtype=None, dtype: torch.dtype = torch.float32,
              min_step: float = 1 / 64) -> List[float]:
    """The N + 1 noise levels (`steps` = N) of the grid found for `plan`'s solver and `model`.

    Returns a plain list of floats in `Sampler(sigmas=...)`'s convention (sigma/alpha for VP
    schedules, t for flow): `Sampler(sigmas=levels, solver=..., <the plan's other options>)`
    samples on it (save it as JSON and reuse it).

    Args:
        model: `model(x, t, **cond)`, as for `Sampler.sample`.
        plan: a `Sampler` with a deterministic solver: its solver options, schedule and the end
            points of its grid are kept (its steps and spacing are not). The search starts from
            the best of the `STARTS` spacings laid out between those ends (one run each).
        steps: N, the steps of the tuned grid.
        noise: the calibration batch of initial noise.
        reference_steps: steps of the reference run (more than `steps`).
        max_model_calls: the budget: every model call counts, the reference run's included; the
            search stops before a run that would exceed it and returns the best grid so far.
        seed: seeds the order in which the search tries the free parameters.
        progress: a progress bar (model calls used of the budget) on stderr.
        cond, uncond, guidance_scale, model_dtype, dtype: passed to `Sampler.sample`.
        min_step: the search stops when its step in the free parameters falls below this.
    """
    search = _Search(plan, steps, reference_steps, min_step)
    if not callable(model):
        raise TypeError(f"model: expected a callable model(x, t, **cond), got {type(model).__name__}")
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point() or noise.dim() < 1:
        raise TypeError(f"noise: expected a floating-point tensor with a batch dimension, got "
                        f"{type(noise).__name__}")
    for name, value in (("max_model_calls", max_model_calls), ("seed", seed)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{name}: expected an integer >= 0, got {value!r}")
    if not isinstance(progress, bool):
        raise ValueError(f"progress: expected True or False, got {progress!r}")
    reference, start = search.sampler(search.reference_lam), search.sampler(search.lam(np.zeros(search.free)))
    starts = search.starts(plan, steps)
    least = reference.model_calls + len(starts) * start.model_calls
    if max_model_calls < least:
        raise ValueError(f"max_model_calls: {max_model_calls} cannot pay for the reference run and the "
                         f"{len(starts)} starting grids ({reference.model_calls} + {len(starts)} x "
                         f"{start.model_calls} = {least} calls)")

    used = 0

    def run(sampler: Sampler) -> torch.Tensor:
        nonlocal used
        x = sampler.sample(model, noise, cond=cond, uncond=uncond, guidance_scale=guidance_scale,
                           model_dtype=model_dtype, dtype=dtype)
        used += sampler.model_calls
        if progress:
            _progress(used, max_model_calls)
        return x.to(torch.float64)

    target = run(reference)

    def distance(z: np.ndarray) -> float:
        return float((run(search.sampler(search.lam(z))) - target).pow(2).mean().sqrt())

    errors = [distance(z) for z in starts]
    best = int(np.argmin(errors))
    z, err = starts[best], errors[best]
    rng, step = np.random.default_rng(seed), 0.5
    while step >= min_step and used + start.model_calls <= max_model_calls:
        moved = False
        for j in rng.permutation(search.free):
            for sign in (1.0, -1.0):
                trial = z.copy()
                trial[j] = np.clip(trial[j] + sign * step, -_Z_BOUND, _Z_BOUND)
                if trial[j] == z[j] or used + start.model_calls > max_model_calls:
                    continue
                e = distance(trial)
                if e < err:
                    z, err, moved = trial, e, True
                    break
        if not moved:
            step /= 2
    if progress and used != max_model_calls:
        sys.stderr.write("\n")
    return search.levels(search.lam(z))


class _Search:
    """The plan's fixed ends and options, and the map from free parameters z to grids."""

    def __init__(self, plan, steps, reference_steps, min_step):
        if not isinstance(plan, Sampler):
            raise TypeError(f"plan: expected a fastdiff.Sampler, got {type(plan).__name__}")
        if plan.options["round_timesteps"]:
            raise ValueError("plan: round_timesteps=True; a tuned grid's levels are not integer timesteps")
        grid = plan.grid
        self.flow = plan.schedule.kind == "flow"
        levels = grid.sigma.copy() if self.flow else grid.karras_sigma
        self.infinite_start, self.clean_end = bool(grid.alpha[0] == 0), bool(grid.sigma[-1] == 0)
        lam = grid.lam
        start, end = int(self.infinite_start), len(lam) - 1 - int(self.clean_end)  # first and last finite
        self.top, self.first, self.bottom = levels[0], levels[start], levels[-1]
        # a clean end replaces the last point of a spacing (the smallest training noise level): the
        # intervals run up to that level, and the last model level moves with the others -- unless
        # that level is itself clean (flow schedules): then the last model level stays the plan's
        alpha_min, sigma_min = plan.schedule.alpha_sigma(np.array([plan.schedule.tau_min]))
        with np.errstate(divide="ignore"):
            lam_min = float(np.log(alpha_min[0]) - np.log(sigma_min[0]))
        self.virtual_end = self.clean_end and np.isfinite(lam_min) and lam_min > lam[end]
        self.last = 0.0 if self.virtual_end else levels[end]
        self.lam_lo, self.lam_hi = float(lam[start]), lam_min if self.virtual_end else float(lam[end])
        fixed = int(self.infinite_start) + int(self.clean_end and not self.virtual_end)
        least = fixed + 2
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < least:
            raise ValueError(f"steps: expected an integer >= {least} (this plan's grid leaves a point to move only "
                             f"from {least} steps), got {steps!r}")
        if isinstance(reference_steps, bool) or not isinstance(reference_steps, (int, np.integer)) or \
                reference_steps <= steps:
            raise ValueError(f"reference_steps: expected an integer > steps ({steps}), got {reference_steps!r}")
        if isinstance(min_step, bool) or not isinstance(min_step, (int, float)) or not 0 < min_step <= 0.5:
            raise ValueError(f"min_step: expected a number in (0, 0.5], got {min_step!r}")
        self.free = steps - fixed  # intervals across the finite range, one free number each
        self.reference_lam = self.lam(np.zeros(reference_steps - fixed))
        # "variance" is ddpm's, a solver that draws noise: the others refuse to be given it
        self.options = {k: v for k, v in plan.options.items() if k not in _GRID_OPTIONS + ("variance",)}
        self.schedule = plan.schedule
        self.rho = plan.options["rho"]
        if plan.table.noise_draws or self.sampler(self.lam(np.zeros(self.free))).table.noise_draws:
            raise ValueError(f"plan: {plan.solver!r} with these options draws fresh noise; tune_grid needs a "
                             "deterministic solver (the distance to the reference must depend on the grid only)")

    def lam(self, z: np.ndarray) -> np.ndarray:
        """The finite points' lambda, increasing, from the free numbers (softmax: positive steps)."""
        w = np.exp(z - z.max())
        lam = self.lam_lo + (self.lam_hi - self.lam_lo) * np.concatenate([[0.0], np.cumsum(w / w.sum())])
        lam[-1] = self.lam_hi
        return lam

    def starts(self, plan: Sampler, steps: int) -> List[np.ndarray]:
        """z of each spacing in STARTS: logsnr (z = 0) and karras across the finite range;
        trailing and linspace as the schedule lays them out in `steps` steps, their finite points'
        relative positions in lambda mapped onto the plan's ends (left out where the schedule
        cannot lay them out, e.g. trailing on a flow schedule)."""
        ks = _sigma_spaced("karras", self.free, np.exp(-self.lam_hi), np.exp(-self.lam_lo), self.rho)
        out = [np.zeros(self.free), self._z(-np.log(ks))]
        o = plan.options
        for name in STARTS[2:]:
            try:
                grid = Sampler(schedule=self.schedule, steps=steps, spacing=name, final=o["final"],
                               prediction=o["prediction"], shift=o["shift"], steps_offset=o["steps_offset"]).grid
            except ValueError:
                continue
            lam = grid.lam
            points = lam[int(grid.alpha[0] == 0):len(lam) - int(grid.sigma[-1] == 0)]
            if self.virtual_end:  # the plan's range runs on to the smallest training noise level
                points = np.append(points, self.lam_hi)
            if len(points) == self.free + 1 and np.isfinite(points).all():
                out.append(self._z(points))
        return out

    @staticmethod
    def _z(points: np.ndarray) -> np.ndarray:
        """The free numbers whose softmax is the intervals between increasing `points`."""
        with np.errstate(divide="ignore"):
            return np.clip(np.log(np.diff(points) / (points[-1] - points[0])), -_Z_BOUND, _Z_BOUND)

    def levels(self, lam: np.ndarray) -> List[float]:
        """The grid's noise levels (diffusers' sigmas) for the finite points' lambda, with the plan's
        exact ends."""
        ks = np.exp(-lam)
        inner = ks / (1.0 + ks) if self.flow else ks
        inner[0], inner[-1] = self.first, self.last  # exactly the plan's
        fixed_end = [[self.bottom]] * (self.clean_end and not self.virtual_end)
        return [float(v) for v in np.concatenate([[self.top]] * self.infinite_start + [inner] + fixed_end)]

    def sampler(self, lam: np.ndarray) -> Sampler:
        return Sampler(schedule=self.schedule, sigmas=self.levels(lam), **self.options)
