"""Timestep spacings: where a sampler evaluates the model.

A grid is N + 1 decreasing points tau_0 > ... > tau_N on the schedule's time axis. The
model runs at tau_0 .. tau_{N-1}; step i goes from tau_i to tau_{i+1}. Every spacing ends
at the schedule's smallest training noise level tau_min; with `final="zero"` that last
point is moved to the clean limit (alpha = 1, sigma = 0), so the last step is the usual
first-order jump to zero, and with `final="min"` the sampler stops at tau_min (no jump; the
result keeps the tiny noise of tau_min).

Spacings (T training timesteps, N steps, exact definitions):

* `leading`  (DDIM paper / diffusers "leading"): model times (N-1-i) * (T // N) + offset,
  i = 0..N-1, then tau_min.
* `trailing` (Lin et al. 2024): model times round(T - i * T / N) - 1, then tau_min; the
  first step starts at the last training timestep.
* `linspace`: N + 1 points evenly spaced from tau_max to tau_min inclusive. (Not DDIM's
  linspace, which evaluates the model at tau_min too.) For flow schedules: evenly spaced
  in t, then the resolution shift.
* `karras`: N + 1 points evenly spaced in sigma_k^(1/rho) (EDM, Karras et al. 2022),
  sigma_k = sigma / alpha, from the schedule's (or the given) sigma_max to sigma_min.
* `logsnr`: N + 1 points evenly spaced in lambda = log(alpha / sigma).

`round_timesteps=True` rounds model times to integer training timesteps (what a discrete
model was trained on) and recomputes alpha/sigma there. Points that coincide (after
rounding, or `leading` with offset 0 and `final="min"`, whose last model time is tau_min)
are dropped with a warning: a zero-size step would divide by zero in a multistep formula.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np

from fastdiff.schedules import Schedule

SPACINGS = ("leading", "trailing", "linspace", "karras", "logsnr")
FINALS = ("zero", "min")


@dataclass(frozen=True)
class Grid:
    """Per-point float64 quantities of a sampling grid (length N + 1; index N is the end)."""

    tau: np.ndarray
    alpha: np.ndarray
    sigma: np.ndarray
    model_time: np.ndarray  # length N: what the model is called with at tau_0..tau_{N-1}

    @property
    def steps(self) -> int:
        return len(self.tau) - 1

    @property
    def lam(self) -> np.ndarray:
        """lambda = log(alpha / sigma): -inf where alpha = 0, +inf where sigma = 0."""
        with np.errstate(divide="ignore"):
            return np.log(self.alpha) - np.log(self.sigma)

    @property
    def karras_sigma(self) -> np.ndarray:
        with np.errstate(divide="ignore"):
            return self.sigma / self.alpha

    @property
    def ends_clean(self) -> bool:
        return self.sigma[-1] == 0.0


def _karras(lo: float, hi: float, n: int, rho: float) -> np.ndarray:
    ramp = np.linspace(0.0, 1.0, n)
    return (hi ** (1 / rho) + ramp * (lo ** (1 / rho) - hi ** (1 / rho))) ** rho


def _sigma_range(schedule: Schedule, sigma_min, sigma_max, spacing: str):
    ks = schedule.model_time(np.array([schedule.tau_min, schedule.tau_max]), "karras_sigma")
    lo = ks[0] if sigma_min is None else float(sigma_min)
    hi = ks[1] if sigma_max is None else float(sigma_max)
    if not np.isfinite(hi):
        raise ValueError(
            f"spacing: {spacing!r} needs a finite sigma_max, but this schedule reaches zero SNR at "
            "tau_max; pass sigma_max= or use linspace/trailing"
        )
    if not (0 <= lo < hi):
        raise ValueError(f"sigma_min/sigma_max: expected 0 <= sigma_min < sigma_max, got {lo}, {hi}")
    return lo, hi


def spacing_points(schedule: Schedule, spacing: str, steps: int, *, steps_offset: int = 0, rho: float = 7.0,
                   sigma_min=None, sigma_max=None) -> np.ndarray:
    """The N + 1 grid points (tau, decreasing) of a spacing, ending at tau_min."""
    if spacing not in SPACINGS:
        raise ValueError(f"spacing: expected one of {list(SPACINGS)}, got {spacing!r}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps: expected an integer >= 1, got {steps!r}")
    n = int(steps)
    t_min, t_max = schedule.tau_min, schedule.tau_max
    if schedule.kind == "flow":
        if spacing in ("leading", "trailing"):
            raise ValueError(f"spacing: {spacing!r} is for discrete VP schedules; flow schedules take "
                             "'linspace' (with shift), 'karras' or 'logsnr'")
        if spacing == "linspace":
            return schedule.apply_shift(np.linspace(t_max, t_min, n + 1))
    else:
        T = schedule.num_train_timesteps
        if n > T:
            raise ValueError(f"steps: expected at most {T} (the schedule's training timesteps), got {n}")
        if spacing == "leading":
            k = T // n
            model = np.arange(n - 1, -1, -1, dtype=np.float64) * k + steps_offset
            if model[0] > t_max or steps_offset < 0:
                raise ValueError(f"steps_offset: {steps_offset} pushes leading timesteps outside [0, {T - 1}]")
            return np.append(model, t_min)
        if steps_offset:
            raise ValueError("steps_offset: only the 'leading' spacing takes an offset")
        if spacing == "trailing":
            model = np.round(T - np.arange(n, dtype=np.float64) * T / n) - 1
            return np.append(model, t_min)
        if spacing == "linspace":
            return np.linspace(t_max, t_min, n + 1)
    lo, hi = _sigma_range(schedule, sigma_min, sigma_max, spacing)
    if spacing == "karras":
        ks = _karras(lo, hi, n + 1, rho)
    else:  # logsnr
        if lo == 0:
            raise ValueError("spacing: 'logsnr' needs sigma_min > 0 (lambda is infinite at sigma = 0)")
        ks = np.exp(np.linspace(np.log(hi), np.log(lo), n + 1))
    return schedule.tau_from_karras_sigma(ks)


def make_grid(schedule: Schedule, spacing: str, steps: int, *, final: str = "zero", model_time: str = "timestep",
              round_timesteps: bool = False, **spacing_kw) -> Grid:
    if final not in FINALS:
        raise ValueError(f"final: expected one of {list(FINALS)}, got {final!r}")
    tau = np.asarray(spacing_points(schedule, spacing, steps, **spacing_kw), dtype=np.float64)
    if round_timesteps:
        if schedule.kind != "vp":
            raise ValueError("round_timesteps: only discrete VP schedules have integer timesteps")
        tau = np.round(tau)
    keep = np.concatenate([[True], np.diff(tau) < 0])
    if final == "zero":
        keep[-1] = True  # the end point moves to the clean limit: it never coincides
    if not keep.all():
        warnings.warn(f"{int((~keep).sum())} grid point(s) coincide after rounding and were dropped: "
                      f"{int(keep.sum()) - 1} steps remain (asked for {steps})", stacklevel=3)
        tau = tau[keep]
    if len(tau) < 2:
        raise ValueError("steps: the grid collapsed to a single point")
    alpha, sigma = schedule.alpha_sigma(tau)
    if final == "zero":
        alpha, sigma = alpha.copy(), sigma.copy()
        alpha[-1], sigma[-1] = 1.0, 0.0
    return Grid(tau=tau, alpha=alpha, sigma=sigma, model_time=schedule.model_time(tau[:-1], model_time))
