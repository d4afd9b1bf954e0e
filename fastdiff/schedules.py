"""Noise schedules, in float64 on the host.

Every schedule is written in the VP form x_t = alpha * x0 + sigma * noise, on its own
time axis `tau`:

* `VPSchedule`: a discrete DDPM-style schedule of T training timesteps; tau is the
  (possibly fractional) timestep index in [0, T-1]. Between integer timesteps alpha is
  interpolated linearly, so fractional grids (Karras, logSNR) are continuous and exact at
  the integers.
* `FlowSchedule`: rectified flow, x_t = (1 - t) x0 + t noise, so alpha = 1 - t and
  sigma = t; tau is t in [0, 1] (after the resolution `shift`).

Quantities a solver needs: alpha, sigma, lambda = log(alpha / sigma) (half the log-SNR),
and the Karras/EDM noise level sigma / alpha. `model_time` maps tau to what the model
was trained to take (see `MODEL_TIMES`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Tuple, Union

import numpy as np

MODEL_TIMES = {
    "timestep": "diffusers-style timestep: tau for VP schedules (0..T-1), 1000*t for flow",
    "t": "continuous time in [0, 1]: tau/(T-1) for VP schedules, t for flow",
    "karras_sigma": "the EDM / k-diffusion noise level sigma/alpha",
}


def _check_time_convention(model_time: str) -> None:
    if model_time not in MODEL_TIMES:
        raise ValueError(f"model_time: expected one of {sorted(MODEL_TIMES)}, got {model_time!r}")


class VPSchedule:
    """A discrete variance-preserving schedule, defined by its alphas_cumprod."""

    kind = "vp"

    def __init__(self, alphas_cumprod, name: str = "custom"):
        ac = np.asarray(alphas_cumprod, dtype=np.float64)
        if ac.ndim != 1 or ac.size < 2:
            raise ValueError(f"alphas_cumprod: expected a 1-D array of at least 2 values, got shape {ac.shape}")
        if not np.all(np.isfinite(ac)) or np.any(ac < 0) or np.any(ac >= 1):
            raise ValueError("alphas_cumprod: expected finite values in [0, 1)")
        if np.any(np.diff(ac) >= 0):
            raise ValueError("alphas_cumprod: expected a strictly decreasing sequence")
        self.alphas_cumprod = ac
        self.name = name
        self.num_train_timesteps = ac.size
        self._alpha = np.sqrt(ac)

    # --- construction -------------------------------------------------------------
    @classmethod
    def from_betas(cls, betas, name: str = "custom") -> "VPSchedule":
        b = np.asarray(betas, dtype=np.float64)
        if b.ndim != 1 or np.any(b <= 0) or np.any(b > 1):
            raise ValueError("betas: expected a 1-D array of values in (0, 1]")
        return cls(np.cumprod(1.0 - b), name=name)

    @classmethod
    def linear(cls, beta_start=1e-4, beta_end=0.02, num_train_timesteps=1000) -> "VPSchedule":
        """DDPM (Ho et al. 2020): betas linear in t."""
        return cls.from_betas(np.linspace(beta_start, beta_end, num_train_timesteps), name="linear")

    @classmethod
    def scaled_linear(cls, beta_start=0.00085, beta_end=0.012, num_train_timesteps=1000) -> "VPSchedule":
        """Stable Diffusion: sqrt(betas) linear in t."""
        b = np.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps) ** 2
        return cls.from_betas(b, name="scaled_linear")

    @classmethod
    def cosine(cls, num_train_timesteps=1000, s=0.008, max_beta=0.999) -> "VPSchedule":
        """Squared-cosine schedule (Nichol & Dhariwal 2021), betas capped at max_beta."""
        T = num_train_timesteps
        f = lambda u: math.cos((u + s) / (1 + s) * math.pi / 2) ** 2  # noqa: E731
        b = [min(1 - f((i + 1) / T) / f(i / T), max_beta) for i in range(T)]
        return cls.from_betas(b, name="cosine")

    def rescale_zero_terminal_snr(self) -> "VPSchedule":
        """Lin et al. 2024: shift and scale sqrt(alphas_cumprod) so the last timestep has
        SNR exactly 0 while the first keeps its value. Only v- or x0-predicting models can be
        sampled from tau = T-1 then (an eps prediction carries no information at alpha = 0)."""
        a = self._alpha
        a0, aT = a[0], a[-1]
        a = (a - aT) * a0 / (a0 - aT)
        a[-1] = 0.0  # exactly, not a rounding residue
        return VPSchedule(a**2, name=self.name + "+zero_snr")

    # --- evaluation -------------------------------------------------------------------
    @property
    def tau_max(self) -> float:
        return float(self.num_train_timesteps - 1)

    @property
    def tau_min(self) -> float:
        return 0.0

    def alpha_sigma(self, tau) -> Tuple[np.ndarray, np.ndarray]:
        tau = np.asarray(tau, dtype=np.float64)
        if np.any(tau < self.tau_min) or np.any(tau > self.tau_max):
            raise ValueError(f"tau: expected values in [{self.tau_min}, {self.tau_max}]")
        alpha = np.interp(tau, np.arange(self.num_train_timesteps, dtype=np.float64), self._alpha)
        return alpha, np.sqrt(np.maximum(1.0 - alpha * alpha, 0.0))

    def tau_from_karras_sigma(self, ks) -> np.ndarray:
        """Inverse of sigma/alpha (monotone in tau)."""
        ks = np.asarray(ks, dtype=np.float64)
        alpha = 1.0 / np.sqrt(1.0 + ks * ks)
        # alpha decreases with tau: interpolate on the reversed arrays.
        idx = np.arange(self.num_train_timesteps, dtype=np.float64)
        return np.interp(-alpha, -self._alpha, idx)

    def model_time(self, tau, model_time: str) -> np.ndarray:
        _check_time_convention(model_time)
        tau = np.asarray(tau, dtype=np.float64)
        if model_time == "timestep":
            return tau
        if model_time == "t":
            return tau / self.tau_max
        alpha, sigma = self.alpha_sigma(tau)
        with np.errstate(divide="ignore"):
            return sigma / alpha

    def time_to_tau(self, time, model_time: str) -> np.ndarray:
        """Inverse of `model_time` (used by the analytic test model)."""
        _check_time_convention(model_time)
        time = np.asarray(time, dtype=np.float64)
        if model_time == "timestep":
            return time
        if model_time == "t":
            return time * self.tau_max
        return self.tau_from_karras_sigma(time)

    def __repr__(self) -> str:
        return f"VPSchedule({self.name!r}, T={self.num_train_timesteps})"


@dataclass(frozen=True)
class FlowSchedule:
    """Rectified flow: x_t = (1 - t) x0 + t noise, t in [0, 1].

    `shift` (SD3 / Flux resolution shift) warps a uniform grid towards high noise:
    t' = shift * t / (1 + (shift - 1) * t). It is applied by the spacing, not to the model
    time: the model sees the shifted t.
    """

    shift: float = 1.0
    num_train_timesteps: int = 1000
    kind = "flow"
    name = "flow"

    def __post_init__(self):
        if not (self.shift > 0 and math.isfinite(self.shift)):
            raise ValueError(f"shift: expected a finite positive number, got {self.shift}")

    tau_max = 1.0
    tau_min = 0.0

    def apply_shift(self, t) -> np.ndarray:
        t = np.asarray(t, dtype=np.float64)
        return self.shift * t / (1.0 + (self.shift - 1.0) * t)

    def alpha_sigma(self, tau):
        tau = np.asarray(tau, dtype=np.float64)
        if np.any(tau < 0) or np.any(tau > 1):
            raise ValueError("tau: expected flow times in [0, 1]")
        return 1.0 - tau, tau

    def tau_from_karras_sigma(self, ks) -> np.ndarray:
        ks = np.asarray(ks, dtype=np.float64)
        return ks / (1.0 + ks)

    def model_time(self, tau, model_time: str) -> np.ndarray:
        _check_time_convention(model_time)
        tau = np.asarray(tau, dtype=np.float64)
        if model_time == "timestep":
            return tau * self.num_train_timesteps
        if model_time == "t":
            return tau
        with np.errstate(divide="ignore"):
            return tau / (1.0 - tau)

    def time_to_tau(self, time, model_time: str) -> np.ndarray:
        _check_time_convention(model_time)
        time = np.asarray(time, dtype=np.float64)
        if model_time == "timestep":
            return time / self.num_train_timesteps
        if model_time == "t":
            return time
        return self.tau_from_karras_sigma(time)


Schedule = Union[VPSchedule, FlowSchedule]

_NAMED = {
    "linear": VPSchedule.linear,
    "scaled_linear": VPSchedule.scaled_linear,
    "cosine": VPSchedule.cosine,
    "flow": FlowSchedule,
}


def get_schedule(schedule: Union[str, Schedule] = "linear", *, zero_terminal_snr: bool = False, shift: float = 1.0) -> Schedule:
    """A schedule by name (`linear`, `scaled_linear`, `cosine`, `flow`) or as given."""
    if isinstance(schedule, (VPSchedule, FlowSchedule)):
        sched = schedule
    elif isinstance(schedule, str) and schedule in _NAMED:
        sched = _NAMED[schedule](shift=shift) if schedule == "flow" else _NAMED[schedule]()
    else:
        raise ValueError(f"schedule: expected one of {sorted(_NAMED)} or a schedule object, got {schedule!r}")
    if shift != 1.0 and sched.kind != "flow":
        raise ValueError("shift: only flow schedules take a resolution shift")
    if zero_terminal_snr:
        if sched.kind != "vp":
            raise ValueError("zero_terminal_snr: only VP schedules can be rescaled")
        sched = sched.rescale_zero_terminal_snr()
    return sched
