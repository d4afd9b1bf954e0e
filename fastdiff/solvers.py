"""Every solver as a table of `solver_step` coefficient rows (DESIGN.md section 4).

For step i (grid point i -> i + 1) a row holds, in float64:

    D   = p x + q m                                   data prediction from the model output
    x'  = a x + b0 D + b1 D_{i-1} + b2 D_{i-2} + c z  the update

plus the ring-buffer slots (write D_i, read D_{i-1}, read D_{i-2}, read D_{i-3}). The rows
are derived here from each solver's formula rewritten in terms of D and x only (eps = (x -
alpha D) / sigma), independently of `fastdiff.reference`, which keeps the papers' own
variables: the parity tests between the two are what prove the tables right.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from fastdiff.grid import Grid


@dataclass(frozen=True)
class SolverTable:
    coef: np.ndarray   # (N, 8) float64: p, q, a, b0, b1, b2, b3, c
    slots: np.ndarray  # (N, 4) int64: write, read D_{i-1}, read D_{i-2}, read D_{i-3}; -1 unused
    history: int       # ring-buffer slots S

    @property
    def steps(self) -> int:
        return len(self.coef)

    def noisy(self, i: int) -> bool:
        """Does step i draw fresh noise?"""
        return self.coef[i, 7] != 0.0


def _data_prediction(alpha: float, sigma: float, prediction: str):
    """(p, q) with D = p x + q m."""
    if prediction == "epsilon":
        return 1.0 / alpha, -sigma / alpha
    if prediction == "v":
        n2 = alpha * alpha + sigma * sigma
        return alpha / n2, -sigma / n2
    if prediction == "sample":
        return 0.0, 1.0
    return 1.0, -sigma  # flow velocity: x0 = x - t v


def _dpmpp_order(i: int, n: int, order: int, lower_order_final, first_order: bool) -> int:
    """The multistep order of step i: warm-up min(order, i + 1); `lower_order_final` True caps it
    at N - i (last step 1, the one before 2), "last" makes only the last step first order; a step
    to sigma = 0 or of size zero (`first_order`) is first order (the corrections divide by h)."""
    k = min(order, i + 1)
    if lower_order_final is True:
        k = min(k, n - i)
    elif lower_order_final == "last" and i == n - 1:
        k = 1
    return 1 if first_order else k


def lcm_boundary(time: float, scaling: float):
    """(c_skip, c_out) of the latent-consistency boundary condition at model time t (Luo et al.
    2023, sigma_data = 0.5): the consistency function is c_skip x + c_out x0."""
    u, s2 = time * scaling, 0.25
    return s2 / (u * u + s2), u / math.sqrt(u * u + s2)


def build_table(solver: str, grid: Grid, prediction: str, *, eta: float | None = None, lower_order_final=True,
                variance: str = "small", boundary_scaling: float | None = None) -> SolverTable:
    """The coefficient table of `solver` on `grid` (arguments as in `fastdiff.Sampler`)."""
    n = grid.steps
    al, sg, lam = grid.alpha, grid.sigma, grid.lam
    coef = np.zeros((n, 8))
    slots = np.full((n, 4), -1, dtype=np.int64)
    history = {"dpmpp_2m": 1, "dpmpp_2m_sde": 1, "dpmpp_3m": 2}.get(solver, 0)
    order = {"dpmpp_2m": 2, "dpmpp_2m_sde": 2, "dpmpp_3m": 3}.get(solver, 1)
    for i in range(n):
        a_t, s_t, a_s, s_s = al[i], sg[i], al[i + 1], sg[i + 1]  # t: current point, s: next
        p, q = _data_prediction(a_t, s_t, prediction)
        a = b0 = b1 = b2 = c = 0.0
        if solver in ("ddim", "euler", "flow_euler"):
            # All three are the same first-order step in x and D (as is dpmpp_1m, below):
            # x' = (s'/s) x + (a' - (s'/s) a) D, plus DDIM's optional noise.
            c = 0.0 if solver != "ddim" or not eta else eta * math.sqrt((s_s**2 / s_t**2) * (1 - a_t**2 / a_s**2))
            k = math.sqrt(max(s_s**2 - c * c, 0.0))
            a, b0 = k / s_t, a_s - k * a_t / s_t
        elif solver == "ddpm":
            ab_t, ab_s = a_t**2, a_s**2
            beta = 1.0 - ab_t / ab_s
            a = math.sqrt(1.0 - beta) * (1.0 - ab_s) / (1.0 - ab_t)
            b0 = math.sqrt(ab_s) * beta / (1.0 - ab_t)
            var = (1.0 - ab_s) / (1.0 - ab_t) * beta if variance == "small" else beta
            c = 0.0 if i == n - 1 else math.sqrt(var)
        elif solver in ("dpmpp_1m", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde"):
            h = lam[i + 1] - lam[i]
            k = _dpmpp_order(i, n, order, lower_order_final, s_s == 0 or h == 0)
            if solver == "dpmpp_2m_sde":
                em2h = -np.expm1(-2.0 * h)  # 1 - e^{-2h}
                a = s_s / s_t * math.exp(-h)
                w = [a_s * em2h]  # weights on D_i, D_{i-1}
                if k == 2:
                    r = (lam[i] - lam[i - 1]) / h
                    w = [a_s * em2h * (1.0 + 0.5 / r), -a_s * em2h * 0.5 / r]
                c = s_s * math.sqrt(em2h)
            else:
                phi = float(np.expm1(-h))  # e^{-h} - 1
                a = s_s / s_t
                w = [-a_s * phi]
                if k == 2:
                    r = (lam[i] - lam[i - 1]) / h
                    w = [-a_s * phi * (1.0 + 0.5 / r), a_s * phi * 0.5 / r]
                elif k == 3:
                    w = _third_order_weights(a_s, phi, h, (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h)
            b0 = w[0]
            b1 = w[1] if len(w) > 1 else 0.0
            b2 = w[2] if len(w) > 2 else 0.0
            if history:
                slots[i, 0] = i % history if i < n - 1 else -1  # the last D is never read
                for j in range(1, len(w)):
                    slots[i, j] = (i - j) % history
        elif solver == "euler_ancestral":
            ks, ks_s = s_t / a_t, s_s / a_s
            e = 1.0 if eta is None else eta
            up = min(ks_s, e * math.sqrt(ks_s**2 * (ks**2 - ks_s**2) / ks**2))
            down = math.sqrt(ks_s**2 - up * up)
            a, b0, c = a_s * down / (ks * a_t), a_s * (1.0 - down / ks), a_s * up
        elif solver == "flow_sde":
            e = 1.0 if eta is None else eta
            keep = s_s * math.sqrt(1.0 - e * e)  # t' sqrt(1 - eta^2): weight of the predicted noise
            a, b0, c = keep / s_t, a_s - keep * a_t / s_t, e * s_s
        elif solver == "consistency":
            b0, c = a_s, s_s
            if boundary_scaling is not None:  # D = c_skip x + c_out (p x + q m)
                c_skip, c_out = lcm_boundary(float(grid.model_time[i]), boundary_scaling)
                p, q = c_out * p + c_skip, c_out * q
        else:
            raise ValueError(f"solver: no coefficient table for {solver!r}")
        coef[i] = (p, q, a, b0, b1, b2, 0.0, c)
    return SolverTable(coef=coef, slots=slots, history=history)


def _third_order_weights(a_s, phi, h, r0, r1):
    """Weights on D_i, D_{i-1}, D_{i-2} of the third-order multistep update
    x' = (s'/s) x - a' phi D_i + a' (phi/h + 1) D1 + 2 a' (1/2 - (phi + h)/h^2) D2, where D1 ~ h D'
    and D2 ~ h^2 D''/2 are the backward differences over steps r0 h and r1 h. (The factor 2 on
    D2 is the Taylor coefficient; the widely copied form without it is only second order.)"""
    c1 = a_s * (phi / h + 1.0)
    c2 = 2.0 * a_s * (0.5 - (phi + h) / (h * h))
    e = c1 * r0 / (r0 + r1) + c2 / (r0 + r1)  # weight on D1_0 - D1_1
    return [-a_s * phi + (c1 + e) / r0, -(c1 + e) / r0 - e / r1, e / r1]
