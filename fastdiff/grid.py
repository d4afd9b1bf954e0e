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
  sigma_k = sigma / alpha, from the schedule's (or the given) sigma_max = hi to sigma_min = lo:
  sigma_k,i = (hi^(1/rho) + (i / N) (lo^(1/rho) - hi^(1/rho)))^rho, i = 0..N.
* `logsnr`: N + 1 points evenly spaced in lambda = log(alpha / sigma), same range:
  sigma_k,i = hi (lo / hi)^(i / N).

Like every spacing, these evaluate the model at i = 0..N-1 only: with `final="zero"` the last
model level is one step above sigma_min (karras, scaled_linear, 10 steps: 0.0744) and sigma_min
itself becomes the clean limit. diffusers' (and k-diffusion's) Karras grid differs: the model
runs at N levels down to sigma_min inclusive (fastdiff's `karras` levels of N - 1 steps with
`final="min"`), then jumps to 0. Measured on the analytic model (benchmarks/NOTES.md, "karras
and logsnr: where the last model call goes"), that placement is less accurate at up to 11 model
calls (every solver, both schedules) and for Heun at every budget; it wins only from 15-20 calls
on scaled_linear (up to ~2x for the multistep solvers), and on linear it is worse or within 10%
up to 50 calls. So fastdiff keeps its own; `Sampler.from_scheduler` or `sigmas=` give diffusers'.

Two stages (coarse-to-fine, "progressive latent stepping"): `TwoStage(coarse, split_sigma,
coarse_spacing, fine_spacing)` in place of a spacing name. With N steps, `coarse` steps go from
the start to the split noise level sigma/alpha = split_sigma with `coarse_spacing`, then
N - coarse steps from there to tau_min with `fine_spacing`; each stage's spacing is one of
linspace (even in tau), karras (even in sigma^(1/rho)) or logsnr (even in lambda) over its
own range (the definitions above with that range and step count: the fine stage, too, never
evaluates the model at sigma_min), and the split point is a grid point of both. The solver runs
across the split as across any other point (multistep history carries over).

`round_timesteps=True` rounds model times to integer training timesteps (what a discrete
model was trained on) and recomputes alpha/sigma there. Points that coincide (after
rounding, or `leading` with offset 0 and `final="min"`, whose last model time is tau_min)
are an error naming the cause: a zero-size step would divide by zero in a multistep formula,
and dropping points would return fewer steps than asked.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional, Tuple

import numpy as np

from fastdiff.schedules import Schedule
from fastdiff._names import did_you_mean

SPACINGS = ("leading", "trailing", "linspace", "karras", "logsnr")
STAGE_SPACINGS = ("linspace", "karras", "logsnr")
FINALS = ("zero", "min")


@dataclass(frozen=True)
class TwoStage:
    """A coarse-to-fine spacing (see the module doc): `coarse` steps down to sigma/alpha =
    `split_sigma`, the rest of the steps below it."""

    coarse: int
    split_sigma: float
    coarse_spacing: str = "logsnr"
    fine_spacing: str = "karras"

    def __post_init__(self):
        if isinstance(self.coarse, bool) or not isinstance(self.coarse, (int, np.integer)) or self.coarse < 1:
            raise ValueError(f"TwoStage.coarse: expected an integer >= 1, got {self.coarse!r}")
        v = self.split_sigma
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v) or v <= 0:
            raise ValueError(f"TwoStage.split_sigma: expected a finite sigma/alpha > 0, got {v!r}")
        for name in ("coarse_spacing", "fine_spacing"):
            value = getattr(self, name)
            if value not in STAGE_SPACINGS:
                raise ValueError(f"TwoStage.{name}: expected one of {list(STAGE_SPACINGS)}, got {value!r}"
                                 f"{did_you_mean(value, STAGE_SPACINGS)}")

    def as_dict(self) -> dict:
        return dict(kind="two_stage", coarse=int(self.coarse), split_sigma=float(self.split_sigma),
                    coarse_spacing=self.coarse_spacing, fine_spacing=self.fine_spacing)


@dataclass(frozen=True)
class Grid:
    """Per-point float64 quantities of a sampling grid (length N + 1; index N is the end)."""

    tau: np.ndarray
    alpha: np.ndarray
    sigma: np.ndarray
    model_time: np.ndarray  # length N: what the model is called with at tau_0..tau_{N-1}
    # (tau, alpha, sigma), length N each: where step i ends when that is not point i + 1
    # (`with_step_ends`: diffusers' DDIM and PNDM step to t - T // N); None: the next point
    ends: Optional[Tuple[np.ndarray, np.ndarray, np.ndarray]] = None

    @property
    def steps(self) -> int:
        return len(self.tau) - 1

    def step_end(self, i: int) -> Tuple[float, float, float]:
        """(tau, alpha, sigma) where step i ends: point i + 1 unless `ends` says otherwise."""
        if self.ends is None:
            return self.tau[i + 1], self.alpha[i + 1], self.sigma[i + 1]
        return tuple(float(v[i]) for v in self.ends)

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


def _sigma_range(schedule: Schedule, sigma_min, sigma_max, spacing: str, infinite_top: bool = False):
    ks = schedule.model_time(np.array([schedule.tau_min, schedule.tau_max]), "karras_sigma")
    for name, v in (("sigma_min", sigma_min), ("sigma_max", sigma_max)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not np.isfinite(v)):
            raise ValueError(f"{name}: expected a finite number or None, got {v!r}")
    lo = ks[0] if sigma_min is None else float(sigma_min)
    hi = ks[1] if sigma_max is None else float(sigma_max)
    if not np.isfinite(hi) and not infinite_top:
        raise ValueError(
            f"spacing: {spacing!r} needs a finite sigma_max, but this schedule reaches zero SNR at "
            "tau_max; pass sigma_max= or use linspace/trailing"
        )
    if not (0 <= lo < hi):
        raise ValueError(f"sigma_min/sigma_max: expected 0 <= sigma_min < sigma_max, got {lo}, {hi}")
    # the schedule has no times outside [tau_min, tau_max]: points there would be clipped onto
    # its ends and coincide
    if sigma_max is not None and np.isfinite(ks[1]) and hi > ks[1] * (1 + 1e-9):
        raise ValueError(f"sigma_max: {hi:g} is above this schedule's largest sigma/alpha ({ks[1]:g})")
    if sigma_min is not None and lo < ks[0] * (1 - 1e-9):
        raise ValueError(f"sigma_min: {lo:g} is below this schedule's smallest sigma/alpha ({ks[0]:g})")
    return lo, hi


def _sigma_spaced(spacing: str, n: int, lo: float, hi: float, rho: float) -> np.ndarray:
    """n + 1 values of sigma/alpha from hi down to lo: "karras" or "logsnr"."""
    if spacing == "karras":
        return _karras(lo, hi, n + 1, rho)
    if lo == 0:
        raise ValueError("spacing: 'logsnr' needs sigma_min > 0 (lambda is infinite at sigma = 0)")
    return np.exp(np.linspace(np.log(hi), np.log(lo), n + 1))


def _stage(schedule: Schedule, spacing: str, n: int, ks_hi: float, ks_lo: float, rho: float) -> np.ndarray:
    """n + 1 points (tau, decreasing) from sigma/alpha = ks_hi down to ks_lo."""
    tau_hi = schedule.tau_max if np.isinf(ks_hi) else float(schedule.tau_from_karras_sigma(ks_hi))
    tau_lo = float(schedule.tau_from_karras_sigma(ks_lo))
    if spacing == "linspace":
        return np.linspace(tau_hi, tau_lo, n + 1)
    if np.isinf(ks_hi):
        raise ValueError(f"spacing: a {spacing!r} stage needs a finite sigma_max, but this schedule reaches zero "
                         "SNR at tau_max; pass sigma_max= or make that stage 'linspace'")
    tau = schedule.tau_from_karras_sigma(_sigma_spaced(spacing, n, ks_lo, ks_hi, rho))
    tau[0], tau[-1] = tau_hi, tau_lo  # the stage ends exactly where the neighbouring stage starts
    return tau


def _two_stage_points(schedule: Schedule, plan: TwoStage, steps: int, rho: float, sigma_min, sigma_max) -> np.ndarray:
    if plan.coarse >= steps:
        raise ValueError(f"TwoStage.coarse: {plan.coarse} coarse steps leave none of the {steps} steps for the "
                         "fine stage; expected coarse < steps")
    # an infinite top (zero terminal SNR) is for a linspace coarse stage only (checked in _stage)
    lo, hi = _sigma_range(schedule, sigma_min, sigma_max, "two-stage", infinite_top=True)
    if not lo < plan.split_sigma < hi:
        raise ValueError(f"TwoStage.split_sigma: {plan.split_sigma:g} is not inside this grid's sigma/alpha range "
                         f"({lo:g}, {hi:g})")
    coarse = _stage(schedule, plan.coarse_spacing, plan.coarse, hi, plan.split_sigma, rho)
    fine = _stage(schedule, plan.fine_spacing, steps - plan.coarse, plan.split_sigma, lo, rho)
    return np.concatenate([coarse, fine[1:]])


def spacing_points(schedule: Schedule, spacing, steps: int, *, steps_offset: int = 0, rho: float = 7.0,
                   sigma_min=None, sigma_max=None) -> np.ndarray:
    """The N + 1 grid points (tau, decreasing) of a spacing (a name or a `TwoStage`), ending at tau_min."""
    if isinstance(spacing, TwoStage):
        if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 2:
            raise ValueError(f"steps: a two-stage spacing needs an integer >= 2, got {steps!r}")
        if steps_offset:
            raise ValueError("steps_offset: only the 'leading' spacing takes an offset")
        return _two_stage_points(schedule, spacing, int(steps), rho, sigma_min, sigma_max)
    if spacing not in SPACINGS:
        raise ValueError(f"spacing: expected one of {list(SPACINGS)}, got {spacing!r}{did_you_mean(spacing, SPACINGS)}")
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps: expected an integer >= 1, got {steps!r}")
    if isinstance(steps_offset, bool) or not isinstance(steps_offset, (int, np.integer)):
        raise ValueError(f"steps_offset: expected an integer, got {steps_offset!r}")
    if isinstance(rho, bool) or not isinstance(rho, (int, float)) or not np.isfinite(rho) or rho <= 0:
        raise ValueError(f"rho: expected a finite number > 0, got {rho!r}")
    if spacing not in ("karras", "logsnr") and (sigma_min is not None or sigma_max is not None):
        raise ValueError(f"sigma_min/sigma_max: only the 'karras' and 'logsnr' spacings take them, not {spacing!r}")
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
    return schedule.tau_from_karras_sigma(_sigma_spaced(spacing, n, lo, hi, rho))


def make_grid(schedule: Schedule, spacing: str, steps: int, *, final: str = "zero", model_time: str = "timestep",
              round_timesteps: bool = False, **spacing_kw) -> Grid:
    if final not in FINALS:
        raise ValueError(f"final: expected one of {list(FINALS)}, got {final!r}")
    tau = np.asarray(spacing_points(schedule, spacing, steps, **spacing_kw), dtype=np.float64)
    if round_timesteps:
        if schedule.kind != "vp":
            raise ValueError("round_timesteps: only discrete VP schedules have integer timesteps")
        tau = np.round(tau)
    same = np.flatnonzero(np.diff(tau) >= 0) + 1  # points on (or behind) the previous one
    if final == "zero":
        same = same[same != len(tau) - 1]  # the end point moves to the clean limit: it never coincides
    if len(same):
        # a zero-size step divides by zero in multistep formulas; never return fewer steps than asked
        i = int(same[0])
        if round_timesteps:
            why, fix = "after rounding to integer timesteps", "use fewer steps or round_timesteps=False"
        elif i == len(tau) - 1:
            why = f"with final='min' (the end point tau_min={tau[i]:g} is also the last model time)"
            fix = "use final='zero'" + (" or steps_offset >= 1" if spacing == "leading" else "")
        else:
            why, fix = f"with spacing={spacing!r}", "use fewer steps or another spacing"
        raise ValueError(f"steps: {steps} steps {why} put {len(same)} grid point(s) on the time of the point "
                         f"before (tau={tau[i]:g}): a step of size zero; {fix}")
    alpha, sigma = schedule.alpha_sigma(tau)
    if final == "zero":
        alpha, sigma = alpha.copy(), sigma.copy()
        alpha[-1], sigma[-1] = 1.0, 0.0
    return Grid(tau=tau, alpha=alpha, sigma=sigma, model_time=schedule.model_time(tau[:-1], model_time))


def explicit_grid(schedule: Schedule, *, sigmas=None, timesteps=None, final: str = "zero",
                  model_time: str = "timestep") -> Grid:
    """A grid given point by point (diffusers' `sigmas=` / `timesteps=`, `Sampler.from_scheduler`).

    * `sigmas`: the N + 1 decreasing noise levels in diffusers' convention -- sigma/alpha for VP
      schedules, t for flow schedules; the last may be 0 (the clean end). alpha and sigma are
      computed from them exactly; `timesteps` (N values) are then what the model is called
      with, which may differ from the model time of the level (diffusers rounds Karras
      timesteps), default: the schedule's model time at each level.
    * `timesteps` alone: the N model times; the grid ends at tau_min, moved to the clean limit
      with `final="zero"`.

    Only the last step may have size zero (diffusers' Karras sigmas with final sigma_min evaluate
    the model at sigma_min and then step to sigma_min): every solver takes it as the identity.
    """
    if final not in FINALS:
        raise ValueError(f"final: expected one of {list(FINALS)}, got {final!r}")
    if sigmas is None and timesteps is None:
        raise ValueError("sigmas/timesteps: an explicit grid needs sigmas= or timesteps=")
    times = None if timesteps is None else _explicit_values("timesteps", timesteps, 1)
    if sigmas is None:
        tau = np.append(schedule.time_to_tau(times, model_time), schedule.tau_min)
        _check_decreasing("timesteps", tau)
        alpha, sigma = schedule.alpha_sigma(tau)
        if final == "zero":
            alpha, sigma = alpha.copy(), sigma.copy()
            alpha[-1], sigma[-1] = 1.0, 0.0
        return Grid(tau=tau, alpha=alpha, sigma=sigma, model_time=times)
    if final != "zero":
        raise ValueError("final: with sigmas= the last sigma is the end point itself (0 for the clean end)")
    levels = _explicit_values("sigmas", sigmas, 2)
    if np.any(levels < 0) or not np.all(np.isfinite(levels[1:])):
        raise ValueError("sigmas: expected finite values >= 0 (only the first may be inf: zero SNR)")
    if times is not None and len(times) != len(levels) - 1:
        raise ValueError(f"timesteps: expected {len(levels) - 1} model times (one per sigma but the last), "
                         f"got {len(times)}")
    if schedule.kind == "flow":
        if levels[0] > 1:
            raise ValueError(f"sigmas: flow sigmas are times t in [0, 1], got {levels[0]:g}")
        tau, alpha, sigma = levels, 1.0 - levels, levels.copy()
    else:
        with np.errstate(invalid="ignore", divide="ignore"):
            alpha = np.where(np.isinf(levels), 0.0, 1.0 / np.sqrt(1.0 + levels * levels))
            sigma = np.where(np.isinf(levels), 1.0, levels * alpha)
        tau = schedule.tau_from_karras_sigma(levels)
    _check_decreasing("sigmas", sigma)
    if times is None:
        times = schedule.model_time(tau[:-1], model_time)
    return Grid(tau=tau, alpha=alpha, sigma=sigma, model_time=times)


def _explicit_values(name: str, values, least: int) -> np.ndarray:
    try:
        arr = np.asarray(values.cpu() if hasattr(values, "cpu") else values, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{name}: expected a 1-D sequence of numbers, got {type(values).__name__}") from e
    if arr.ndim != 1 or arr.size < least or np.isnan(arr).any():
        raise ValueError(f"{name}: expected a 1-D sequence of at least {least} numbers, got shape {arr.shape}")
    return arr


def _check_decreasing(name: str, values: np.ndarray) -> None:
    steps = np.diff(values)
    if np.any(steps[:-1] >= 0) or steps[-1] > 0:
        i = int(np.flatnonzero(np.append(steps[:-1] >= 0, steps[-1] > 0))[0]) + 1
        raise ValueError(f"{name}: expected decreasing noise levels (only the last step may have size zero); "
                         f"point {i} does not decrease")


def with_step_ends(grid: Grid, schedule: Schedule, prev_timesteps, model_time: str = "timestep") -> Grid:
    """`grid` whose step i ends at model time `prev_timesteps[i]` instead of point i + 1 (the
    next step still starts at point i + 1: diffusers' DDIM and PNDM step from t to t - T // N,
    which is not the next model time with trailing/linspace spacing when T % N != 0). A time
    below the schedule's smallest training time ends at the grid's end point (diffusers'
    negative prev_timestep: the final alpha)."""
    times = _explicit_values("prev_timesteps", prev_timesteps, 1)
    if len(times) != grid.steps:
        raise ValueError(f"prev_timesteps: expected {grid.steps} model times (one per step), got {len(times)}")
    tau = schedule.time_to_tau(times, model_time)
    if not np.all(np.isfinite(tau)) or np.any(tau >= grid.tau[:-1]):
        raise ValueError("prev_timesteps: each step must end below the time it starts at")
    end = tau < schedule.tau_min
    tau = np.where(end, grid.tau[-1], tau)
    alpha, sigma = schedule.alpha_sigma(np.where(end, schedule.tau_min, tau))
    alpha = np.where(end, grid.alpha[-1], alpha)
    sigma = np.where(end, grid.sigma[-1], sigma)
    return replace(grid, ends=(tau, alpha, sigma))
