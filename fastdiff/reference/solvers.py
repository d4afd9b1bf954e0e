"""Eager reference solvers, each written the way its paper writes it.

They are the oracle for the fused coefficient tables, so they deliberately do NOT share
the table's algebra: every solver converts the model output to the quantities its paper
uses (x0, eps, velocity, the EDM derivative) and applies its own update formula.

A solver object is built once per grid and runs step i with `sample_step(i, x, call_model,
draw_noise)`: `call_model(x, time)` returns the (guided) model output at model time `time`,
`draw_noise()` the next standard-normal tensor. By default that is one model call at grid
point i, then `step(i, x, m, z)` with `z` drawn after the call (None when `noise_scale(i) ==
0`); a solver that calls the model more than once per step (Heun) overrides `sample_step`.
Grid quantities are float64 numpy scalars; tensors are whatever dtype the caller keeps the
state in (fp32 by default, float64 in tests).
"""
from __future__ import annotations

import math

import numpy as np

from fastdiff.grid import Grid

PREDICTIONS = ("epsilon", "v", "sample", "flow", "edm")


def to_x0(x, m, alpha, sigma, prediction):
    """The data prediction x0 from a model output of the given type."""
    if prediction == "epsilon":
        return (x - sigma * m) / alpha
    if prediction == "v":  # v = alpha * eps - sigma * x0 (divide by alpha^2 + sigma^2: 1 for VP, not for flow)
        return (alpha * x - sigma * m) / (alpha * alpha + sigma * sigma)
    if prediction == "sample":
        return m
    if prediction == "edm":
        # EDM's preconditioned network F (Karras et al. 2022, sigma_data = 1) on the VE state
        # x / alpha at s = sigma / alpha: x0 = c_skip x / alpha + c_out F with c_skip = 1 / (1 + s^2)
        # = alpha^2 / n2 and c_out = s / sqrt(1 + s^2) = sigma / sqrt(n2), n2 = alpha^2 + sigma^2
        n2 = alpha * alpha + sigma * sigma
        return alpha * x / n2 + sigma / n2**0.5 * m
    # flow velocity v = eps - x0 on x = (1 - t) x0 + t eps
    return x - sigma * m


def to_eps(x, m, alpha, sigma, prediction):
    """The noise prediction eps from a model output of the given type."""
    if prediction == "epsilon":
        return m
    if prediction == "v":
        return (sigma * x + alpha * m) / (alpha * alpha + sigma * sigma)
    if prediction == "sample":
        return (x - alpha * m) / sigma
    if prediction == "edm":
        return (x - alpha * to_x0(x, m, alpha, sigma, prediction)) / sigma
    return x + alpha * m


class ReferenceSolver:
    """Base: holds the grid and the prediction type; subclasses implement `step`."""

    stochastic = False

    def __init__(self, grid: Grid, prediction: str, eta: float | None = None, order: int = 1,
                 lower_order_final: bool = True, variance: str = "small", clamp: float | None = None):
        self.grid = grid
        self.prediction = prediction
        self.eta = self.default_eta if eta is None else float(eta)
        self.order = order
        self.lower_order_final = lower_order_final
        self.variance = variance
        self.clamp = clamp
        self.a = grid.alpha
        self.s = grid.sigma
        self.lam = grid.lam
        self.x0_history: list = []

    default_eta = 0.0

    def noise_scale(self, i: int) -> float:
        """Standard deviation of the fresh noise that step i adds (0: no noise drawn)."""
        return 0.0

    def sample_step(self, i, x, call_model, draw_noise):
        """Step i from state x: one model call at grid point i, then `step`."""
        m = call_model(x, self.grid.model_time[i])
        return self.step(i, x, m, draw_noise() if self.noise_scale(i) != 0 else None)

    def x0(self, i, x, m):
        x0 = to_x0(x, m, self.a[i], self.s[i], self.prediction)
        return x0 if self.clamp is None else x0.clamp(-self.clamp, self.clamp)

    def eps(self, i, x, m):
        if self.clamp is not None:  # diffusers' clip_sample: eps follows the clamped x0
            return (x - self.a[i] * self.x0(i, x, m)) / self.s[i]
        return to_eps(x, m, self.a[i], self.s[i], self.prediction)


class DDPM(ReferenceSolver):
    """Ho et al. 2020, ancestral sampling from the posterior q(x_s | x_t, x0), for any pair of
    grid points (beta_t = 1 - abar_t / abar_s). `variance`: "small" (the posterior variance
    beta~) or "large" (beta_t). Noise on every step but one from the first training time
    (Algorithm 2's t = 1, tau = 0 here), as diffusers' DDPMScheduler: a last step from a later
    time to the clean end adds none with "small" (beta~ = 0 there) but sqrt(beta_t) with "large"."""

    stochastic = True

    def _parts(self, i):
        ab_t, ab_s = self.a[i] ** 2, self.a[i + 1] ** 2
        beta = 1.0 - ab_t / ab_s
        return ab_t, ab_s, beta

    def noise_scale(self, i):
        ab_t, ab_s, beta = self._parts(i)
        if self.grid.tau[i] == 0.0:
            return 0.0
        var = (1.0 - ab_s) / (1.0 - ab_t) * beta if self.variance == "small" else beta
        return math.sqrt(var)

    def step(self, i, x, m, z):
        ab_t, ab_s, beta = self._parts(i)
        x0 = self.x0(i, x, m)
        mean = (math.sqrt(ab_s) * beta / (1.0 - ab_t)) * x0 + (math.sqrt(1.0 - beta) * (1.0 - ab_s) / (1.0 - ab_t)) * x
        return mean if z is None else mean + self.noise_scale(i) * z


class DDIM(ReferenceSolver):
    """Song et al. 2021, eq. 12: x_s = alpha_s x0 + sqrt(sigma_s^2 - s^2) eps + s z with
    s = eta * sqrt((sigma_s^2 / sigma_t^2) (1 - alpha_t^2 / alpha_s^2)). Step i goes from point i
    to `grid.step_end(i)` (point i + 1 unless the grid says otherwise). With clamp, eps is the
    model's own (diffusers' default) unless `clamped_model_output`: then it follows the clamped x0."""

    stochastic = True

    def __init__(self, grid, prediction, clamped_model_output: bool = False, **kw):
        super().__init__(grid, prediction, **kw)
        self.clamped_model_output = clamped_model_output

    def noise_scale(self, i):
        _, a_s, s_s = self.grid.step_end(i)
        return self.eta * math.sqrt((s_s**2 / self.s[i] ** 2) * (1.0 - self.a[i] ** 2 / a_s**2))

    def step(self, i, x, m, z):
        s = self.noise_scale(i)
        _, a_s, s_s = self.grid.step_end(i)
        x0 = self.x0(i, x, m)
        eps = self.eps(i, x, m) if self.clamped_model_output else to_eps(x, m, self.a[i], self.s[i], self.prediction)
        out = a_s * x0 + math.sqrt(max(s_s**2 - s * s, 0.0)) * eps
        return out if z is None else out + s * z


class DPMSolverPP(ReferenceSolver):
    """DPM-Solver++ multistep (Lu et al. 2022), data prediction, orders 1-3. The order at step
    i is min(order, i + 1), and with `lower_order_final` True also <= N - i ("last": only the
    last step first order); a step to sigma = 0 or of size zero is always first order (the
    higher-order corrections divide by r = h_prev / h, 0 or infinite there)."""

    def __init__(self, grid, prediction, d2_weight: float = 2.0, **kw):
        super().__init__(grid, prediction, **kw)
        self.d2_weight = d2_weight  # 2: the Taylor coefficient of D2 (third order); 1: the common form

    def step_order(self, i):
        order = min(self.order, i + 1)
        last = i == self.grid.steps - 1
        if self.lower_order_final is True:
            order = min(order, self.grid.steps - i)
        elif self.lower_order_final == "last" and last:
            order = 1
        if self.s[i + 1] == 0 or self.lam[i + 1] == self.lam[i]:  # to sigma = 0, or a step of size zero
            order = 1
        return order

    def step(self, i, x, m, z):
        self.x0_history.append(self.x0(i, x, m))
        m0 = self.x0_history[-1]
        lam, a_s, s_t, s_s = self.lam, self.a[i + 1], self.s[i + 1], self.s[i]
        h = lam[i + 1] - lam[i]
        phi = np.expm1(-h)  # e^{-h} - 1
        order = self.step_order(i)
        if order == 1:
            out = (s_t / s_s) * x - (a_s * phi) * m0
        elif order == 2:
            r = (lam[i] - lam[i - 1]) / h
            d = (1.0 + 0.5 / r) * m0 - (0.5 / r) * self.x0_history[-2]
            out = (s_t / s_s) * x - (a_s * phi) * d
        else:
            m1, m2 = self.x0_history[-2], self.x0_history[-3]
            r0 = (lam[i] - lam[i - 1]) / h
            r1 = (lam[i - 1] - lam[i - 2]) / h
            d1_0 = (m0 - m1) / r0
            d1_1 = (m1 - m2) / r1
            d1 = d1_0 + (r0 / (r0 + r1)) * (d1_0 - d1_1)
            d2 = (d1_0 - d1_1) / (r0 + r1)
            out = ((s_t / s_s) * x - (a_s * phi) * m0 + (a_s * (phi / h + 1.0)) * d1
                   - (self.d2_weight * a_s * ((phi + h) / h**2 - 0.5)) * d2)
        del self.x0_history[:-2]
        return out


class DEIS(DPMSolverPP):
    """DEIS, rho-AB (Zhang & Chen 2022), as diffusers' DEISMultistepScheduler ("logrho"): in
    rho = sigma / alpha, d(x / alpha) / d rho = eps, with eps extrapolated by the Lagrange
    polynomial in log rho through the last k outputs (k: DPM-Solver++'s order schedule, 2 or 3),
    integrated exactly over [rho_i, rho_{i+1}]; here by 16-point Gauss-Legendre in u = log rho,
    where the integrand is that polynomial times e^u."""

    def step(self, i, x, m, z):
        self.x0_history.append(self.eps(i, x, m))  # the stored outputs are noise predictions
        k = self.step_order(i)
        rho = self.s / self.a
        if k == 1:  # (also the step to rho = 0)
            out = self.a[i + 1] * (x / self.a[i] + (rho[i + 1] - rho[i]) * self.x0_history[-1])
        else:
            u = np.log(rho[i - np.arange(k)])
            nodes, weights = np.polynomial.legendre.leggauss(16)
            lo, hi = u[0], math.log(rho[i + 1])
            v = 0.5 * (hi - lo) * nodes + 0.5 * (hi + lo)
            out = x / self.a[i]
            for j in range(k):
                basis = np.prod([(v - u[l]) / (u[j] - u[l]) for l in range(k) if l != j], axis=0)
                c = 0.5 * (hi - lo) * np.sum(weights * basis * np.exp(v))
                out = out + c * self.x0_history[-1 - j]
            out = self.a[i + 1] * out
        del self.x0_history[:-2]
        return out


def singlestep_orders(steps: int, lower_order_final: bool, order: int = 2) -> list:
    """The order of each step of singlestep DPM-Solver++ (diffusers' DPMSolverSinglestepScheduler's
    list): blocks (1, .., order); a step count that is not a multiple of the order ends with a
    shorter block (diffusers then turns lower_order_final on), and with lower_order_final a
    multiple ends with (1, .., order - 1) then 1; a last step to sigma = 0 is first order."""
    block = list(range(1, order + 1))
    full, rest = divmod(steps, order)
    if rest == 0:
        return block * full if not lower_order_final else block * (full - 1) + block[:-1] + [1]
    return block * full + block[:rest]


class DPMSolverPPSinglestep(ReferenceSolver):
    """DPM-Solver++(2S) and (3S), singlestep (Lu et al. 2022, Algorithm 1; the third order as
    DPM-Solver-3 in data prediction), with the intermediate points on the grid as diffusers'
    DPMSolverSinglestepScheduler places them: steps go in blocks of orders (1, 2) or (1, 2, 3)
    (`singlestep_orders`). A first-order step from point s is the DPM-Solver++ update; each later
    step of the block starts again from the block's first point s and reaches point t with the
    data predictions at s and at the current point u (h = lambda_t - lambda_s,
    r = (lambda_u - lambda_s) / h):
      order 2: x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) ((1 - 1/(2r)) D_s + 1/(2r) D_u);
      order 3: x_t = (sigma_t / sigma_s) x_s - alpha_t (e^{-h} - 1) D_s
                     + alpha_t ((e^{-h} - 1) / h + 1) (D_u - D_s) / r
    (diffusers' "midpoint" form: the block's second point only feeds the third's model call).
    A step to sigma = 0 is first order."""

    def __init__(self, grid, prediction, **kw):
        super().__init__(grid, prediction, **kw)
        self.orders = singlestep_orders(grid.steps, self.lower_order_final is True, self.order)
        self.block = None  # (point, state, data prediction) where the block started

    def step(self, i, x, m, z):
        d = self.x0(i, x, m)
        lam, a, s = self.lam, self.a, self.s
        if self.orders[i] == 1 or s[i + 1] == 0:
            self.block = (i, x, d)
            return (s[i + 1] / s[i]) * x - (a[i + 1] * np.expm1(lam[i] - lam[i + 1])) * d
        j, x_s, d_s = self.block
        h = lam[i + 1] - lam[j]
        r = (lam[i] - lam[j]) / h
        phi = np.expm1(-h)
        if self.orders[i] == 2:
            return (s[i + 1] / s[j]) * x_s - (a[i + 1] * phi) * ((1.0 - 0.5 / r) * d_s + (0.5 / r) * d)
        return (s[i + 1] / s[j]) * x_s - (a[i + 1] * phi) * d_s + (a[i + 1] * (phi / h + 1.0) / r) * (d - d_s)


class DPMSolverPP2MSDE(DPMSolverPP):
    """DPM-Solver++(2M) SDE (Lu et al. 2022, midpoint form):
    x_s = (sigma_s/sigma_t) e^{-h} x + alpha_s (1 - e^{-2h}) (D0 + D1/2) + sigma_s sqrt(1 - e^{-2h}) z."""

    stochastic = True

    def __init__(self, grid, prediction, **kw):
        kw["order"] = 2
        super().__init__(grid, prediction, **kw)

    def noise_scale(self, i):
        h = self.lam[i + 1] - self.lam[i]
        return float(self.s[i + 1] * math.sqrt(-np.expm1(-2.0 * h)))

    def step(self, i, x, m, z):
        self.x0_history.append(self.x0(i, x, m))
        m0 = self.x0_history[-1]
        h = self.lam[i + 1] - self.lam[i]
        one_m = -np.expm1(-2.0 * h)  # 1 - e^{-2h}
        d = m0
        if self.step_order(i) == 2:
            r = (self.lam[i] - self.lam[i - 1]) / h
            d = m0 + 0.5 * (m0 - self.x0_history[-2]) / r
        out = (self.s[i + 1] / self.s[i] * np.exp(-h)) * x + (self.a[i + 1] * one_m) * d
        del self.x0_history[:-1]
        return out if z is None else out + self.noise_scale(i) * z


class Euler(ReferenceSolver):
    """Karras et al. 2022 Euler on the probability-flow ODE in the variance-exploding
    coordinates x~ = x / alpha, sigma~ = sigma / alpha: dx~/dsigma~ = (x~ - x0) / sigma~."""

    def _ks(self, i):
        return self.s[i] / self.a[i]

    def step(self, i, x, m, z):
        ks, ks_next = self._ks(i), self._ks(i + 1)
        xt = x / self.a[i]
        d = (xt - self.x0(i, x, m)) / ks
        return self.a[i + 1] * (xt + (ks_next - ks) * d)


def ancestral_split(s, s_next, eta):
    """k-diffusion's ancestral step from s to s' (VE levels): (sigma_up, sigma_down) with
    sigma_up = min(s', eta sqrt(s'^2 (s^2 - s'^2) / s^2)), sigma_down = sqrt(s'^2 - sigma_up^2)."""
    up = min(s_next, eta * math.sqrt(s_next**2 * (s**2 - s_next**2) / s**2))
    return up, math.sqrt(s_next**2 - up**2)


class EulerAncestral(Euler):
    """k-diffusion's ancestral Euler: step down to sigma_down by Euler, add sigma_up noise,
    with sigma_up = min(s', eta * sqrt(s'^2 (s^2 - s'^2) / s^2)) in VE coordinates."""

    stochastic = True
    default_eta = 1.0

    def _up_down(self, i):
        return ancestral_split(self._ks(i), self._ks(i + 1), self.eta)

    def noise_scale(self, i):
        return float(self.a[i + 1] * self._up_down(i)[0])

    def step(self, i, x, m, z):
        ks = self._ks(i)
        up, down = self._up_down(i)
        xt = x / self.a[i]
        d = (xt - self.x0(i, x, m)) / ks
        out = self.a[i + 1] * (xt + (down - ks) * d)
        return out if z is None else out + self.a[i + 1] * up * z


def _flow_velocity(solver, i, x, m):
    if solver.prediction == "flow" and solver.clamp is None:
        return m
    return solver.eps(i, x, m) - solver.x0(i, x, m)


class FlowEuler(ReferenceSolver):
    """Rectified-flow Euler (Liu et al. 2023): x_{t'} = x_t + (t' - t) v."""

    def step(self, i, x, m, z):
        return x + (self.s[i + 1] - self.s[i]) * _flow_velocity(self, i, x, m)


class KDPM2(ReferenceSolver):
    """DPM-Solver-2 as k-diffusion's sample_dpm_2 (diffusers' KDPM2DiscreteScheduler), in the
    variance-exploding coordinates y = x / alpha, s = sigma / alpha: from s_i, an Euler step to
    the midpoint s_m = sqrt(s_i s_{i+1}), then y_{i+1} = y_i + (s_{i+1} - s_i) d_m with d_m the
    derivative (y_m - D(y_m; s_m)) / s_m there; a step to s = 0 is Euler's. The model sees the VP
    state alpha(s_m) y_m at the schedule's time of s_m, or `mid_times[i]` when given."""

    def __init__(self, grid, prediction, *, schedule, model_time, mid_times=None, **kw):
        super().__init__(grid, prediction, **kw)
        self.schedule, self.time_convention, self.mid_times = schedule, model_time, mid_times
        self.t = grid.karras_sigma

    def _derivative(self, y, s, alpha, sigma, time, call_model):
        x = alpha * y
        x0 = to_x0(x, call_model(x, time), alpha, sigma, self.prediction)
        return (y - (x0 if self.clamp is None else x0.clamp(-self.clamp, self.clamp))) / s

    def _up_down(self, i):
        """(noise level added after the step, level the step goes to): no noise here."""
        return 0.0, self.t[i + 1]

    def sample_step(self, i, x, call_model, draw_noise):
        s = self.t[i]
        up, s_next = self._up_down(i)
        y = x / self.a[i]
        d = self._derivative(y, s, self.a[i], self.s[i], self.grid.model_time[i], call_model)
        if s_next == 0:
            return self.a[i + 1] * (y - s * d)
        s_mid = math.sqrt(s * s_next)
        tau = float(self.schedule.tau_from_karras_sigma(s_mid))
        alpha, sigma = (float(v) for v in self.schedule.alpha_sigma(tau))
        time = (float(self.schedule.model_time(np.array([tau]), self.time_convention)[0])
                if self.mid_times is None else float(self.mid_times[i]))
        d_mid = self._derivative(y + (s_mid - s) * d, s_mid, alpha, sigma, time, call_model)
        y_next = y + (s_next - s) * d_mid
        return self.a[i + 1] * (y_next if up == 0 else y_next + up * draw_noise())


class KDPM2Ancestral(KDPM2):
    """k-diffusion's sample_dpm_2_ancestral (diffusers' KDPM2AncestralDiscreteScheduler): KDPM2's
    step goes to sigma_down (midpoint sqrt(s sigma_down)) instead of s_{i+1}, then adds sigma_up
    noise (`ancestral_split`; eta = 0 is KDPM2). A step to s = 0 is Euler's, without noise."""

    stochastic = True
    default_eta = 1.0

    def _up_down(self, i):
        return ancestral_split(self.t[i], self.t[i + 1], self.eta)


class FlowHeun(ReferenceSolver):
    """Heun's method on the rectified-flow ODE dx/dt = v in its own coordinates (x, t), as
    diffusers' FlowMatchHeunDiscreteScheduler (no churn): the Euler step x* = x + (t' - t) v,
    then, unless t' = 0, x_{t'} = x + (t' - t) (v + v*) / 2 with v* the velocity at (x*, t')."""

    def sample_step(self, i, x, call_model, draw_noise):
        h = self.s[i + 1] - self.s[i]
        v = _flow_velocity(self, i, x, call_model(x, self.grid.model_time[i]))
        euler = x + h * v
        if self.s[i + 1] == 0:
            return euler
        v_next = _flow_velocity(self, i + 1, euler, call_model(euler, self.grid.model_time[i + 1]))
        return x + h * (0.5 * v + 0.5 * v_next)


class FlowSDE(ReferenceSolver):
    """Stochastic flow sampler: re-noise the Euler step's endpoint with a fraction eta of
    fresh noise, x_{t'} = (1 - t') x0 + t' (sqrt(1 - eta^2) eps + eta z), where x0 = x - t v and
    eps = x + (1 - t) v. eta = 0 is exactly flow Euler; eta = 1 is full re-noising."""

    stochastic = True
    default_eta = 1.0

    def noise_scale(self, i):
        return float(self.eta * self.s[i + 1])

    def step(self, i, x, m, z):
        v = _flow_velocity(self, i, x, m)
        t, t_next = self.s[i], self.s[i + 1]
        x0, eps = x - t * v, x + (1.0 - t) * v
        out = (1.0 - t_next) * x0 + t_next * math.sqrt(1.0 - self.eta**2) * eps
        return out if z is None else out + t_next * self.eta * z


class Consistency(ReferenceSolver):
    """Consistency-model multistep sampling (Song et al. 2023, Alg. 1): jump to the data
    estimate, then re-noise to the next grid point: x_s = alpha_s x0 + sigma_s z. With
    `boundary_scaling` s the estimate is the latent-consistency parametrisation
    c_skip(t) x + c_out(t) x0, c_skip = 1/4 / ((s t)^2 + 1/4), c_out = s t / sqrt((s t)^2 + 1/4),
    t the model time (Luo et al. 2023)."""

    stochastic = True

    def __init__(self, grid, prediction, boundary_scaling=None, **kw):
        super().__init__(grid, prediction, **kw)
        self.boundary_scaling = boundary_scaling

    def x0(self, i, x, m):
        x0 = super().x0(i, x, m)
        if self.boundary_scaling is None:
            return x0
        u = float(self.grid.model_time[i]) * self.boundary_scaling
        return (u / math.sqrt(u * u + 0.25)) * x0 + (0.25 / (u * u + 0.25)) * x

    def noise_scale(self, i):
        return float(self.s[i + 1])

    def step(self, i, x, m, z):
        out = self.a[i + 1] * self.x0(i, x, m)
        return out if z is None else out + self.s[i + 1] * z


class TCD(ReferenceSolver):
    """Trajectory consistency distillation's strategic stochastic sampling (Zheng et al. 2024),
    as diffusers' TCDScheduler: from point i, the model's x0 and eps take the DDIM step to the
    earlier noise level s = floor((1 - gamma) tau_{i+1}) (the schedule's discrete time), then
    forward noise brings it to point i + 1: x_s = alpha_s x0 + sigma_s eps,
    x' = (alpha'/alpha_s) x_s + sqrt(1 - (alpha'/alpha_s)^2) z, with no noise on the last step.
    gamma is `eta` (default 0.3); gamma = 0 is DDIM."""

    stochastic = True
    default_eta = 0.3

    def __init__(self, grid, prediction, *, schedule, **kw):
        super().__init__(grid, prediction, **kw)
        # (a step to sigma = 0 ends there: x' = x0)
        self.mid = [(self.a[i + 1], self.s[i + 1]) if self.s[i + 1] == 0 else
                    tuple(float(v) for v in schedule.alpha_sigma(math.floor((1.0 - self.eta) * grid.tau[i + 1])))
                    for i in range(grid.steps)]

    def noise_scale(self, i):
        if i == self.grid.steps - 1:
            return 0.0
        return math.sqrt(max(1.0 - (self.a[i + 1] / self.mid[i][0]) ** 2, 0.0))

    def step(self, i, x, m, z):
        alpha_s, sigma_s = self.mid[i]
        out = (self.a[i + 1] / alpha_s) * (alpha_s * self.x0(i, x, m) + sigma_s * self.eps(i, x, m))
        return out if z is None else out + self.noise_scale(i) * z


class Heun(ReferenceSolver):
    """Karras et al. 2022, Algorithm 2 (EDM's stochastic Heun sampler), in the VE coordinates
    y = x / alpha, t = sigma / alpha, with D(y; t) the data prediction. Per step i:
    gamma = min(s_churn / N, sqrt(2) - 1) if s_tmin <= t_i <= s_tmax else 0; t^ = t_i (1 + gamma);
    y^ = y_i + sqrt(t^^2 - t_i^2) s_noise z; d = (y^ - D(y^; t^)) / t^; y_{i+1} = y^ + (t_{i+1} - t^) d,
    and if t_{i+1} != 0 the second-order correction
    y_{i+1} = y^ + (t_{i+1} - t^) (d + d') / 2 with d' = (y_{i+1} - D(y_{i+1}; t_{i+1})) / t_{i+1}.
    (The paper draws z every step; this draws it only when gamma > 0, where it is used.) The
    model sees the VP state alpha(t) y at the schedule's time of t (`schedule`, `model_time`)."""

    stochastic = True

    def __init__(self, grid, prediction, *, schedule, model_time, s_churn=0.0, s_tmin=0.0, s_tmax=math.inf,
                 s_noise=1.0, **kw):
        super().__init__(grid, prediction, **kw)
        self.schedule, self.time_convention = schedule, model_time
        self.s_churn, self.s_tmin, self.s_tmax, self.s_noise = s_churn, s_tmin, s_tmax, s_noise
        self.t = grid.karras_sigma

    def _denoise(self, y, tau, alpha, sigma, call_model):
        x = alpha * y
        m = call_model(x, float(self.schedule.model_time(tau, self.time_convention)))
        x0 = to_x0(x, m, alpha, sigma, self.prediction)
        return x0 if self.clamp is None else x0.clamp(-self.clamp, self.clamp)

    def sample_step(self, i, x, call_model, draw_noise):
        n, t, t_next = self.grid.steps, self.t[i], self.t[i + 1]
        y = x / self.a[i]
        gamma = min(self.s_churn / n, math.sqrt(2.0) - 1.0) if self.s_tmin <= t <= self.s_tmax else 0.0
        t_hat, tau_hat, a_hat, s_hat = t, self.grid.tau[i], self.a[i], self.s[i]
        if gamma > 0:
            t_hat = t * (1.0 + gamma)
            tau_hat = float(self.schedule.tau_from_karras_sigma(t_hat))
            a_hat, s_hat = (float(v) for v in self.schedule.alpha_sigma(tau_hat))
            y = y + math.sqrt(t_hat**2 - t**2) * self.s_noise * draw_noise()
        d = (y - self._denoise(y, tau_hat, a_hat, s_hat, call_model)) / t_hat
        y_next = y + (t_next - t_hat) * d
        if t_next != 0:
            j = i + 1
            d2 = (y_next - self._denoise(y_next, self.grid.tau[j], self.a[j], self.s[j], call_model)) / t_next
            y_next = y + (t_next - t_hat) * (0.5 * d + 0.5 * d2)
        return self.a[i + 1] * y_next
class LMS(ReferenceSolver):
    """Linear multistep on the probability-flow ODE in the variance-exploding coordinates
    y = x / alpha, s = sigma / alpha (k-diffusion's sample_lms; diffusers' LMSDiscreteScheduler
    with step's default order 4): the derivative d_i = (y_i - D_i) / s_i, and
    y_{i+1} = y_i + sum_k c_k d_{i-k}, c_k the integral over [s_i, s_{i+1}] of the Lagrange basis
    polynomial of s_{i-k} on the last min(i + 1, 4) points."""

    ORDER = 4

    def __init__(self, grid, prediction, **kw):
        super().__init__(grid, prediction, **kw)
        self.derivatives: list = []  # newest last

    def step(self, i, x, m, z):
        s = self.grid.karras_sigma
        y = x / self.a[i]
        self.derivatives = (self.derivatives + [(y - self.x0(i, x, m)) / s[i]])[-self.ORDER:]
        points = [s[i - k] for k in range(len(self.derivatives))]
        for k, d in enumerate(reversed(self.derivatives)):
            basis = np.poly1d([1.0])
            for j, p in enumerate(points):
                if j != k:
                    basis = basis * np.poly1d([1.0, -p]) / (points[k] - p)
            antiderivative = basis.integ()
            y = y + (antiderivative(s[i + 1]) - antiderivative(s[i])) * d
        return self.a[i + 1] * y


class PNDM(ReferenceSolver):
    """PNDM's pseudo linear multistep (Liu et al. 2022, PLMS) as diffusers' PNDMScheduler runs it:
    the transfer phi of eq. 9 moves x from grid point i to `grid.step_end(i)` along a noise
    prediction e; e is an Adams-Bashforth combination of the stored model outputs (orders 2, 3, 4
    as they accumulate). Without `prk` step 0 predicts with phi and corrects with the mean of the
    two outputs (two model calls, the second at point 1, whose model time the next step repeats;
    the corrector moves x_0 over a step of step 0's length that ends at point 1). With `prk`
    ("pndm_prk", diffusers' skip_prk_steps=False) steps 0-2 are its Runge-Kutta steps instead:
    from x_j, with h half the step's length (tau_j - step end) in whole training timesteps,
      x_B = phi(x_j, m_A; tau_j -> tau_j - h)              m_A at (x_j, tau_j)
      x_C = phi(x_j, m_B; tau_j -> tau_{j+1} + h)          m_B at (x_B, tau_{j+1} + h)
      x_D = phi(x_j, m_C; tau_j -> tau_{j+1})              m_C at (x_C, tau_{j+1} + h)
      x_{j+1} = phi(x_j, (m_A + 2 m_B + 2 m_C + m_D) / 6; tau_j -> tau_{j+1})   m_D at (x_D, tau_{j+1})
    and each m_A is kept for the Adams-Bashforth steps that follow (order 4 from step 3).
    Non-epsilon outputs are combined first, then converted to e at the transfer's start, as
    diffusers does."""

    WEIGHTS = {1: (1.0,), 2: (1.5, -0.5), 3: (23 / 12, -16 / 12, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -9 / 24)}

    def __init__(self, grid, prediction, *, schedule, model_time="timestep", prk=False, **kw):
        super().__init__(grid, prediction, **kw)
        self.schedule, self.time_convention, self.prk = schedule, model_time, prk
        self.outputs: list = []  # the stored model outputs, newest last (step 0's corrector call is not kept)

    def _level(self, tau):
        alpha, sigma = self.schedule.alpha_sigma(tau)
        return float(alpha), float(sigma)

    def _transfer(self, start, end_alpha, x, m):
        """phi from the level start = (alpha, sigma) to the level of alpha `end_alpha`."""
        a, s = start
        ab, ab_next = a * a, end_alpha * end_alpha
        e = to_eps(x, m, a, s, self.prediction)
        denom = ab * math.sqrt(1.0 - ab_next) + math.sqrt(ab * (1.0 - ab) * ab_next)
        return math.sqrt(ab_next / ab) * x - (ab_next - ab) / denom * e

    def _prk_step(self, j, x, call_model):
        tau, here, nxt = self.grid.tau, (self.a[j], self.s[j]), self.a[j + 1]
        h = math.floor((tau[j] - self.grid.step_end(j)[0]) / 2)
        a_half = self._level(tau[j] - h)[0]
        mid = self._level(tau[j + 1] + h)
        mid_time = float(self.schedule.model_time(tau[j + 1] + h, self.time_convention))
        m_a = call_model(x, self.grid.model_time[j])
        m_b = call_model(self._transfer(here, a_half, x, m_a), mid_time)
        m_c = call_model(self._transfer(here, mid[0], x, m_b), mid_time)
        m_d = call_model(self._transfer(here, nxt, x, m_c), self.grid.model_time[j + 1])
        self.outputs.append(m_a)
        return self._transfer(here, nxt, x, (m_a + 2.0 * m_b + 2.0 * m_c + m_d) / 6.0)

    def sample_step(self, i, x, call_model, draw_noise):
        if self.prk and i < 3:
            return self._prk_step(i, x, call_model)
        times, here, end = self.grid.model_time, (self.a[i], self.s[i]), self.grid.step_end(i)[1]
        m = call_model(x, times[i])
        if i == 0:
            self.outputs = [m]
            if self.grid.steps == 1:
                return self._transfer(here, end, x, m)
            m1 = call_model(self._transfer(here, end, x, m), times[1])
            g = self.grid
            corrector_start = here if g.ends is None else self._level(g.tau[1] + g.tau[0] - g.step_end(0)[0])
            return self._transfer(corrector_start, self.a[1], x, 0.5 * (m + m1))
        self.outputs = (self.outputs + [m])[-4:]
        weights = self.WEIGHTS[len(self.outputs)]
        combined = sum(w * out for w, out in zip(weights, reversed(self.outputs)))
        return self._transfer(here, end, x, combined)


class UniPC(ReferenceSolver):
    """UniPC (Zhao et al. 2023), data prediction, orders 1-3: the predictor UniP-p and the
    corrector UniC-p, written as the paper's unified update from the state x at point j
    (lambda = log(alpha/sigma), h = lambda_{j+1} - lambda_j, hh = -h for data prediction):

        x_{j+1} = (s_{j+1}/s_j) x - a_{j+1} (e^{-h} - 1) D_j - a_{j+1} B(h) sum_m rho_m D1_m,
        D1_m = (D_{t_m} - D_j) / r_m,   r_m = (lambda_{t_m} - lambda_j) / h,

    with B(h) = hh ("bh1") or e^{hh} - 1 ("bh2"), and rho solving R rho = b where
    R[k-1][m] = r_m^(k-1) and b_k = k! hh phi_{k+1}(hh) / B(h), k = 1..len(rho). UniP-p takes
    the p - 1 earlier points t_m = j-1 .. j-p+1 (p - 1 equations); UniC-p corrects the
    predicted x_{j+1} once D_{j+1} (of the uncorrected x_{j+1}) is known, by redoing the same
    step from the same x with the new point t_m = j + 1 (r = 1) added (p equations). Where
    the system is 1x1 (UniP-2, UniC-1) the published algorithm takes its h -> 0 limit
    rho = 1/2. The corrected state feeds the next predictor; the final state is the last
    predictor output (no model call follows it, so nothing corrects it).

    Orders follow DPMSolverPP.step_order; a point at zero SNR (lambda = -inf) is never a
    multistep point and the step from it is not corrected (its h is infinite)."""

    def __init__(self, grid, prediction, variant: str = "bh2", corrector: bool = True, **kw):
        super().__init__(grid, prediction, **kw)
        self.variant, self.corrector = variant, corrector
        self.first = 1 if np.isneginf(self.lam[0]) else 0  # the first point usable as a multistep point
        self.d = {}  # data predictions D_j by grid index
        self.x_last = None  # (the state that started the previous step, its index, its order)

    def step_order(self, i):
        order = max(1, min(self.order, i + 1 - self.first))
        if self.lower_order_final:
            order = min(order, self.grid.steps - i)
        if self.s[i + 1] == 0:
            order = 1
        return order

    def _rhos(self, h, rks):
        """rho (solving R rho = b) and B(h) for the multistep points at ratios rks."""
        hh = -h
        bh = hh if self.variant == "bh1" else np.expm1(hh)
        if len(rks) == 1:
            return [0.5], bh
        phi, fact, b = np.expm1(hh) / hh, 1, []  # phi_1
        for k in range(1, len(rks) + 1):
            fact *= k
            phi = (phi - 1.0 / fact) / hh  # phi_{k+1}
            b.append(fact * hh * phi / bh)
        R = np.array([[r ** (k - 1) for r in rks] for k in range(1, len(rks) + 1)])
        return np.linalg.solve(R, np.array(b)), bh

    def _update(self, j, x, points):
        """The state at j + 1 from x at j, using D at the grid indices `points`."""
        lam, a_next = self.lam, self.a[j + 1]
        h = lam[j + 1] - lam[j]
        out = (self.s[j + 1] / self.s[j]) * x - (a_next * np.expm1(-h)) * self.d[j]
        if points:
            rks = [(lam[t] - lam[j]) / h for t in points]
            rhos, bh = self._rhos(h, rks)
            for rho, r, t in zip(rhos, rks, points):
                out = out - (a_next * bh * rho / r) * (self.d[t] - self.d[j])
        return out

    def step(self, i, x, m, z):
        self.d[i] = self.x0(i, x, m)
        if self.x_last is not None and self.corrector:
            x_prev, j, p = self.x_last
            x = self._update(j, x_prev, [j - k for k in range(1, p)] + [i])  # UniC-p
        p = self.step_order(i)
        self.x_last = (x, i, p) if i >= self.first else None
        for t in [t for t in self.d if t <= i - self.order]:
            del self.d[t]
        return self._update(i, x, [i - k for k in range(1, p)])  # UniP-p


SOLVERS = {
    "ddpm": (DDPM, {}),
    "ddim": (DDIM, {}),
    "dpmpp_1m": (DPMSolverPP, {"order": 1}),
    "dpmpp_2m": (DPMSolverPP, {"order": 2}),
    "dpmpp_3m": (DPMSolverPP, {"order": 3}),
    "dpmpp_2m_sde": (DPMSolverPP2MSDE, {}),
    "euler": (Euler, {}),
    "euler_ancestral": (EulerAncestral, {}),
    "flow_euler": (FlowEuler, {}),
    "flow_sde": (FlowSDE, {}),
    "consistency": (Consistency, {}),
    "heun": (Heun, {}),
    "unipc": (UniPC, {}),
    "pndm": (PNDM, {}),
    "pndm_prk": (PNDM, {"prk": True}),
    "lms": (LMS, {}),
    "flow_heun": (FlowHeun, {}),
    "kdpm2": (KDPM2, {}),
    "kdpm2_ancestral": (KDPM2Ancestral, {}),
    "tcd": (TCD, {}),
    "dpmpp_2s": (DPMSolverPPSinglestep, {"order": 2}),
    "dpmpp_3s": (DPMSolverPPSinglestep, {"order": 3}),
    "deis_2m": (DEIS, {"order": 2}),
    "deis_3m": (DEIS, {"order": 3}),
}
