"""Every solver as a table of `solver_step` coefficient rows (DESIGN.md section 4).

One row per MODEL CALL. Row r holds, in float64, the model time of its call and

    D   = p x + q m                                              data prediction from the model output
    x'  = a x + b0 D + b1 D_{r-1} + b2 D_{r-2} + b3 D_{r-3} + c z  the update

plus the ring-buffer slots (write D, read D_{r-1}, read D_{r-2}, read D_{r-3}). For every
solver but Heun a row is a grid step (point i -> i + 1). The rows are derived here from each
solver's formula rewritten in terms of D and x only (eps = (x - alpha D) / sigma),
independently of `fastdiff.reference`, which keeps the papers' own variables: the parity
tests between the two are what prove the tables right. UniPC's corrector needs no extra
kernel pass: it folds into the next step's row (`_unipc_table`).

Heun (Karras et al. 2022, Algorithm 2) takes two rows per step, in the VE coordinates
y = x / alpha, s = sigma / alpha. Step j goes from s_j to s_{j+1}; with churn the model sees
s^_j = s_j (1 + gamma_j), gamma_j = min(s_churn / N, sqrt 2 - 1) where s_tmin <= s_j <= s_tmax
(else 0, and s^_j = s_j), and y^_j = y_j + sqrt(s^_j^2 - s_j^2) s_noise z. With h = s_{j+1} - s^_j:

  row A (model at s^_j, state x^ = alpha^ y^): the Euler step y' = y^ + h (y^ - D^) / s^_j;
        in x: x' = (sigma_{j+1} / sigma^) x^ + (alpha_{j+1} - alpha^ sigma_{j+1} / sigma^) D^.
        Writes D^ to the history.
  row B (model at s_{j+1}, state x' = alpha_{j+1} y'): the trapezoid
        y_{j+1} = y^ + h/2 (d^ + d'), d^ = (y^ - D^)/s^_j, d' = (y' - D')/s_{j+1}. y^ is not
        stored, but h d^ = y' - y^ and y^ = (s^_j y' + h D^) / s_{j+1}, so
        y_{j+1} = y' + h / (2 s_{j+1}) (D^ - D'): x_{j+1} = x' + k (D^ - D') with
        k = alpha_{j+1} h / (2 s_{j+1}), i.e. a = 1, b0 = -k, b1 = k (D^ read from the history).
  The next step's churn is folded into row B: it outputs x^_{j+1} = (alpha^_{j+1} / alpha_{j+1})
  x_{j+1} + alpha^_{j+1} sqrt(s^_{j+1}^2 - s_{j+1}^2) s_noise z (its own noise z). Step 0 has no
  row before it: `initial_scale` and `initial_noise` say how the loop turns the starting state
  into x^_0 (x^_0 = initial_scale x + initial_noise z, the first noise drawn) before the first
  call. Callbacks want the completed step's state x_{j+1}, not x^_{j+1}: `step_state` undoes
  the churn, x_{j+1} = k x^_{j+1} + e z.
  A step to s = 0 (final="zero") is the plain Euler row (the trapezoid would divide by
  s_{j+1} = 0): EDM's 2N - 1 model calls for N steps; final="min" takes 2N.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np

from fastdiff.grid import Grid
from fastdiff.ops.solver_step import NUM_COEFS
from fastdiff.reference.solvers import ancestral_split, singlestep_orders


@dataclass(frozen=True)
class SolverTable:
    """R rows, one per model call (R = N grid steps for every solver but Heun)."""

    coef: np.ndarray        # (R, 9) float64: p, q, a, b0, b1, b2, b3, c, r (fastdiff::solver_step)
    slots: np.ndarray       # (R, 4) int64: write, read D_{r-1}, read D_{r-2}, read D_{r-3}; -1 unused
    history: int            # ring-buffer slots S
    model_time: np.ndarray  # (R,) float64: what the model is called with for the row
    ends_step: np.ndarray   # (R,) bool: the row completes a grid step (callback, progress)
    step_state: np.ndarray  # (R, 2) float64 (k, e): that step's state is k * out + e * z
    initial_scale: float = 1.0  # before the first call: x <- initial_scale x + initial_noise z
    initial_noise: float = 0.0

    @property
    def rows(self) -> int:
        return len(self.coef)

    def noisy(self, r: int) -> bool:
        """Does row r draw fresh noise?"""
        return self.coef[r, 7] != 0.0

    @property
    def noise_draws(self) -> int:
        """How many standard-normal tensors one run draws (the initial one first, then one per noisy row)."""
        return int(self.initial_noise != 0.0) + int(np.count_nonzero(self.coef[:, 7]))

    def scaled_output(self, k: float) -> "SolverTable":
        """This table with its last row writing k times its state (`Sampler`'s output_scale, for
        free: no extra pass); `completed_state` still gives the unscaled state."""
        coef, state = self.coef.copy(), self.step_state.copy()
        coef[-1, 2:] *= k  # a, b0..b3, c, r
        state[-1, 0] /= k
        return replace(self, coef=coef, step_state=state)

    def completed_state(self, r: int, out, z):
        """The grid step's state after row r (an ends_step row) as a new tensor, from its output `out`."""
        k, e = self.step_state[r]
        if e == 0.0:  # (no noise drawn for the row: z may be None)
            return out.clone() if k == 1.0 else k * out
        return k * out + e * z


def _table(coef, slots, history: int, times, ends) -> SolverTable:
    """A table from its rows (lists or arrays) whose outputs are the completed steps' own states
    (no churn to undo: step_state (1, 0))."""
    return SolverTable(coef=np.array(coef, dtype=np.float64), slots=np.array(slots, dtype=np.int64),
                       history=history, model_time=np.array(times, dtype=np.float64),
                       ends_step=np.array(ends, dtype=bool), step_state=np.tile([1.0, 0.0], (len(coef), 1)))


def _one_row_per_step(coef, slots, history, grid: Grid) -> SolverTable:
    return _table(coef, slots, history, grid.model_time, np.ones(len(coef), dtype=bool))


@dataclass(frozen=True)
class Churn:
    """Heun's stochastic churn (Karras et al. 2022): s_churn = 0 is the deterministic sampler."""

    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0

    def gamma(self, s: float, steps: int) -> float:
        """The churn of a step starting at noise level s (sigma / alpha)."""
        return min(self.s_churn / steps, math.sqrt(2.0) - 1.0) if self.s_tmin <= s <= self.s_tmax else 0.0


def _data_prediction(alpha: float, sigma: float, prediction: str):
    """(p, q) with D = p x + q m."""
    if prediction == "epsilon":
        return 1.0 / alpha, -sigma / alpha
    if prediction == "v":
        n2 = alpha * alpha + sigma * sigma
        return alpha / n2, -sigma / n2
    if prediction == "sample":
        return 0.0, 1.0
    if prediction == "edm":  # EDM's F with sigma_data = 1: D = c_skip x / alpha + c_out F
        n2 = alpha * alpha + sigma * sigma
        return alpha / n2, sigma / math.sqrt(n2)
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
                variance: str = "small", boundary_scaling: float | None = None, order: int = 2, variant: str = "bh2",
                corrector: bool = True, d2_weight: float = 2.0, unclamped_noise: bool = False) -> SolverTable:
    """The coefficient table of `solver` on `grid` (arguments as in `fastdiff.Sampler`;
    order, variant and corrector are UniPC's). `unclamped_noise` ("ddim", for a clamped step): the
    noise estimate is the model's own, from the unclamped D (the op's r), not the clamped one's."""
    if solver == "unipc":
        return _unipc_table(grid, prediction, order, variant, corrector, lower_order_final)
    n = grid.steps
    al, sg, lam = grid.alpha, grid.sigma, grid.lam
    coef = np.zeros((n, NUM_COEFS))
    slots = np.full((n, 4), -1, dtype=np.int64)
    history = {"dpmpp_2m": 1, "dpmpp_2m_sde": 1, "dpmpp_3m": 2}.get(solver, 0)
    order = {"dpmpp_2m": 2, "dpmpp_2m_sde": 2, "dpmpp_3m": 3}.get(solver, 1)
    for i in range(n):
        # t: current point, s: where the step ends (the next point but for an explicit step end: ddim)
        (a_t, s_t), (_, a_s, s_s) = (al[i], sg[i]), grid.step_end(i)
        p, q = _data_prediction(a_t, s_t, prediction)
        a = b0 = b1 = b2 = c = unclamped = 0.0
        if solver in ("ddim", "euler", "flow_euler"):
            # All three are the same first-order step in x and D (as is dpmpp_1m, below):
            # x' = (s'/s) x + (a' - (s'/s) a) D, plus DDIM's optional noise. With the model's own
            # noise estimate (x - a D) / s next to a clamped D: x' = (s'/s) x - (s'/s) a D + a' clamp(D).
            c = 0.0 if solver != "ddim" or not eta else eta * math.sqrt((s_s**2 / s_t**2) * (1 - a_t**2 / a_s**2))
            k = math.sqrt(max(s_s**2 - c * c, 0.0))
            a, b0 = k / s_t, a_s - k * a_t / s_t
            if unclamped_noise and solver == "ddim":
                unclamped, b0 = -k * a_t / s_t, a_s
        elif solver == "ddpm":
            ab_t, ab_s = a_t**2, a_s**2
            beta = 1.0 - ab_t / ab_s
            a = math.sqrt(1.0 - beta) * (1.0 - ab_s) / (1.0 - ab_t)
            b0 = math.sqrt(ab_s) * beta / (1.0 - ab_t)
            var = (1.0 - ab_s) / (1.0 - ab_t) * beta if variance == "small" else beta
            c = 0.0 if grid.tau[i] == 0.0 else math.sqrt(var)  # none from the first training time
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
                    w = _third_order_weights(a_s, phi, h, (lam[i] - lam[i - 1]) / h, (lam[i - 1] - lam[i - 2]) / h,
                                             d2_weight)
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
        coef[i] = (p, q, a, b0, b1, b2, 0.0, c, unclamped)
    return _one_row_per_step(coef, slots, history, grid)


def churned_points(grid: Grid, schedule, churn: Churn):
    """Where step j's model call is, for each step: (tau^, alpha^, sigma^, s^). Without churn
    (gamma_j = 0) the grid point itself, else the schedule's point at s^ = s_j (1 + gamma_j),
    which must not lie above the schedule's largest noise level."""
    n, ks = grid.steps, grid.karras_sigma
    top = float(schedule.model_time(schedule.tau_max, "karras_sigma"))
    points = []
    for j in range(n):
        gamma = churn.gamma(ks[j], n)
        if gamma == 0.0:
            points.append((grid.tau[j], grid.alpha[j], grid.sigma[j], ks[j]))
            continue
        s_hat = ks[j] * (1.0 + gamma)
        if s_hat > top:
            raise ValueError(f"s_churn: step {j} would raise sigma/alpha from {ks[j]:g} to {s_hat:g}, above this "
                             f"schedule's largest ({top:g}); lower s_churn, set s_tmax below {ks[j]:g}, or start "
                             "the grid lower (spacing='karras' with a smaller sigma_max)")
        tau = float(schedule.tau_from_karras_sigma(s_hat))
        alpha, sigma = (float(v) for v in schedule.alpha_sigma(tau))
        points.append((tau, alpha, sigma, s_hat))
    return points


def heun_table(grid: Grid, schedule, model_time: str, prediction: str, churn: Churn = Churn()) -> SolverTable:
    """Heun's rows (see the module doc): two per step, one (Euler) for a step to s = 0."""
    n, al, sg, ks = grid.steps, grid.alpha, grid.sigma, grid.karras_sigma
    hat = churned_points(grid, schedule, churn)
    rows, times = [], []  # rows: (coef, slots, ends_step, step_state); each row's model time
    # an unchurned point keeps the grid's own model time (an explicit grid's may be the caller's,
    # e.g. diffusers' float32 timesteps); a churned one, or the grid's end, is mapped from tau
    def time_at(tau, j):
        same = j < n and tau == grid.tau[j]
        return float(grid.model_time[j]) if same else float(schedule.model_time(np.array([tau]), model_time)[0])
    for j in range(n):
        tau_h, a_h, s_h, ks_h = hat[j]
        a_n, s_n = al[j + 1], sg[j + 1]
        euler = (*_data_prediction(a_h, s_h, prediction), s_n / s_h, a_n - a_h * s_n / s_h, 0.0, 0.0, 0.0, 0.0, 0.0)
        times.append(time_at(tau_h, j))
        if s_n == 0.0:
            rows.append((euler, (-1, -1, -1, -1), True, (1.0, 0.0)))
            continue
        rows.append((euler, (0, -1, -1, -1), False, (1.0, 0.0)))
        k = a_n * (ks[j + 1] - ks_h) / (2.0 * ks[j + 1])
        scale, c = 1.0, 0.0
        if j + 1 < n:  # fold in step j+1's churn
            scale = hat[j + 1][1] / a_n
            c = hat[j + 1][1] * math.sqrt(hat[j + 1][3] ** 2 - ks[j + 1] ** 2) * churn.s_noise
        trapezoid = (*_data_prediction(a_n, s_n, prediction), scale, -scale * k, scale * k, 0.0, 0.0, c, 0.0)
        rows.append((trapezoid, (-1, 0, -1, -1), True, (1.0 / scale, -c / scale)))
        times.append(time_at(grid.tau[j + 1], j + 1))
    a0, ks0 = hat[0][1], hat[0][3]
    return SolverTable(coef=np.array([r[0] for r in rows], dtype=np.float64),
                       slots=np.array([r[1] for r in rows], dtype=np.int64), history=1,
                       model_time=np.array(times, dtype=np.float64), ends_step=np.array([r[2] for r in rows]),
                       step_state=np.array([r[3] for r in rows]),
                       initial_scale=a0 / al[0], initial_noise=a0 * math.sqrt(ks0**2 - ks[0] ** 2) * churn.s_noise)


def lms_table(grid: Grid, prediction: str, order: int = 4) -> SolverTable:
    """Linear multistep in y = x / alpha, s = sigma / alpha (`fastdiff.reference.solvers.LMS`):
    the history holds the ODE derivatives d = (y - D) / s, a row's own in the same terms as D,
    H = ((1/alpha - p) x - q m) / s; then x' = alpha' (x / alpha + sum_k c_k H_{-k}). The weights
    c_k integrate the Lagrange basis over [s_i, s_{i+1}] by 4-point Gauss-Legendre (exact for
    the cubic basis polynomials)."""
    n, al, sg, ks = grid.steps, grid.alpha, grid.sigma, grid.karras_sigma
    nodes, weights = np.polynomial.legendre.leggauss(4)
    slots_n = min(order, n)
    coef = np.zeros((n, NUM_COEFS))
    slots = np.full((n, 4), -1, dtype=np.int64)
    for i in range(n):
        p, q = _data_prediction(al[i], sg[i], prediction)
        k = min(i + 1, order)
        points = ks[i - np.arange(k)]
        half = 0.5 * (ks[i + 1] - ks[i])
        tau = half * nodes + 0.5 * (ks[i + 1] + ks[i])
        c = [half * np.sum(weights * np.prod([(tau - points[j]) / (points[m] - points[j])
                                              for j in range(k) if j != m], axis=0)) for m in range(k)]
        coef[i, :3] = ((1.0 / al[i] - p) / ks[i], -q / ks[i], al[i + 1] / al[i])
        coef[i, 3:3 + k] = al[i + 1] * np.array(c)
        slots[i, 0] = i % slots_n
        slots[i, 1:k] = (i - np.arange(1, k)) % slots_n
    return _one_row_per_step(coef, slots, slots_n, grid)


def flow_heun_table(grid: Grid, schedule, model_time: str, prediction: str) -> SolverTable:
    """Heun in a flow schedule's own coordinates (`fastdiff.reference.solvers.FlowHeun`): Heun's
    rows (module doc) with y = x and s = t. Step j, t -> t', h = t' - t:
      row A (model at t, x): x* = (t'/t) x + (1 - t'/t) D, stores D (the Euler step to t');
      row B (model at t', x*): x' = x* + h / (2 t') (D_A - D*), the trapezoid (x is recovered
            from x* and D_A as in Heun's rows);
    a step to t' = 0 is row A alone (2N - 1 calls; 2N with final="min")."""
    n, t = grid.steps, grid.sigma
    end_time = float(schedule.model_time(np.array([grid.tau[-1]]), model_time)[0])
    coef, slots, times, ends = [], [], [], []
    for j in range(n):
        ratio = t[j + 1] / t[j]
        last = t[j + 1] == 0.0
        coef.append([*_data_prediction(grid.alpha[j], t[j], prediction), ratio, 1.0 - ratio, 0.0, 0.0, 0.0, 0.0, 0.0])
        slots.append([-1 if last else 0, -1, -1, -1])
        times.append(grid.model_time[j])
        ends.append(last)
        if last:
            continue
        k = (t[j + 1] - t[j]) / (2.0 * t[j + 1])
        coef.append([*_data_prediction(grid.alpha[j + 1], t[j + 1], prediction), 1.0, -k, k, 0.0, 0.0, 0.0, 0.0])
        slots.append([-1, 0, -1, -1])
        times.append(grid.model_time[j + 1] if j + 1 < n else end_time)
        ends.append(True)
    return _table(coef, slots, 1, times, ends)


def deis_table(grid: Grid, prediction: str, order: int, lower_order_final) -> SolverTable:
    """DEIS rho-AB (`fastdiff.reference.solvers.DEIS`) as rows: the history holds noise
    predictions e = (x - alpha D) / sigma, in row terms ((1 - alpha p) x - alpha q m) / sigma;
    x' = (alpha'/alpha) x + alpha' sum_j c_j e_{i-j}. c_j = F_j(u') - F_j(u) in u = log rho, with
    F_j(u) = e^u sum_k (-1)^k L_j^(k)(u) the antiderivative of L_j(u) e^u (L_j: the Lagrange basis
    polynomial of point i - j in log rho); first order: c_0 = rho' - rho."""
    n, al, sg, lam = grid.steps, grid.alpha, grid.sigma, grid.lam
    rho = sg / al
    coef = np.zeros((n, NUM_COEFS))
    slots = np.full((n, 4), -1, dtype=np.int64)
    for i in range(n):
        p, q = _data_prediction(al[i], sg[i], prediction)
        coef[i, :3] = ((1.0 - al[i] * p) / sg[i], -al[i] * q / sg[i], al[i + 1] / al[i])
        k = _dpmpp_order(i, n, order, lower_order_final, sg[i + 1] == 0 or lam[i + 1] == lam[i])
        if k == 1:
            c = [rho[i + 1] - rho[i]]
        else:
            u = np.log(rho[i - np.arange(k)])
            c = []
            for j in range(k):
                basis = np.poly1d([1.0])
                for other in np.delete(u, j):
                    basis = basis * np.poly1d([1.0, -other]) / (u[j] - other)
                terms = [basis.deriv(d) * (-1) ** d if d else basis for d in range(k)]

                def antiderivative(x, terms=terms):
                    return math.exp(x) * sum(t(x) for t in terms)
                c.append(antiderivative(math.log(rho[i + 1])) - antiderivative(u[0]))
        coef[i, 3:3 + k] = al[i + 1] * np.array(c)
        slots[i, 0] = i % order
        slots[i, 1:k] = (i - np.arange(1, k)) % order
    return _one_row_per_step(coef, slots, order, grid)


def kdpm2_table(grid: Grid, schedule, model_time: str, prediction: str, mid_times=None,
                eta: float = 0.0) -> SolverTable:
    """DPM-Solver-2 (`fastdiff.reference.solvers.KDPM2`) as rows, two per step (Heun's pattern,
    module doc), in y = x / alpha, s = sigma / alpha. The step goes to d = s' (eta = 0) or, for
    the ancestral form (eta > 0, `KDPM2Ancestral`), to d = sigma_down and then adds alpha' sigma_up z;
    the midpoint is s_m = sqrt(s d):
      row A (model at s, x): Euler to s_m, x_m = (sigma_m / sigma) x + alpha_m (1 - s_m / s) D,
            stores D;
      row B (model at s_m, x_m): y' = y + (d - s) d_m with y recovered from y_m and D:
            x' = (alpha' d / (alpha_m s_m)) x_m + alpha' (s_m - s) / s_m D - alpha' (d - s) / s_m D_m
            (+ alpha' sigma_up z); for d = s' the first weight is sigma' / sigma_m;
    a step to s = 0 is row A with s_m = 0 (Euler's), 2N - 1 calls."""
    n, al, sg, ks = grid.steps, grid.alpha, grid.sigma, grid.karras_sigma
    coef, slots, times, ends = [], [], [], []
    for i in range(n):
        p, q = _data_prediction(al[i], sg[i], prediction)
        times.append(grid.model_time[i])
        if ks[i + 1] == 0.0:
            coef.append([p, q, 0.0, al[i + 1], 0.0, 0.0, 0.0, 0.0, 0.0])
            slots.append([-1, -1, -1, -1])
            ends.append(True)
            continue
        up, down = ancestral_split(ks[i], ks[i + 1], eta)
        s_mid = math.sqrt(ks[i] * down)
        tau = float(schedule.tau_from_karras_sigma(s_mid))
        a_m, s_m = (float(v) for v in schedule.alpha_sigma(tau))
        coef.append([p, q, s_m / sg[i], a_m * (1.0 - s_mid / ks[i]), 0.0, 0.0, 0.0, 0.0, 0.0])
        slots.append([0, -1, -1, -1])
        ends.append(False)
        k = al[i + 1] / s_mid
        coef.append([*_data_prediction(a_m, s_m, prediction), k * down / a_m, -k * (down - ks[i]),
                     k * (s_mid - ks[i]), 0.0, 0.0, al[i + 1] * up, 0.0])
        slots.append([-1, 0, -1, -1])
        times.append(float(schedule.model_time(np.array([tau]), model_time)[0]) if mid_times is None
                     else float(mid_times[i]))
        ends.append(True)
    return _table(coef, slots, 1, times, ends)


def tcd_table(grid: Grid, schedule, prediction: str, gamma: float) -> SolverTable:
    """TCD (`fastdiff.reference.solvers.TCD`) as rows: the DDIM step to s = floor((1 - gamma) tau')
    in x and D, x_s = (sigma_s / sigma) x + (alpha_s - sigma_s alpha / sigma) D, scaled by
    k = alpha' / alpha_s, plus noise sqrt(1 - k^2) z but on the last row."""
    n, al, sg = grid.steps, grid.alpha, grid.sigma
    coef = np.zeros((n, NUM_COEFS))
    for i in range(n):
        if sg[i + 1] == 0.0:  # a step to sigma = 0 ends there: x' = D
            a_s, s_s = al[i + 1], 0.0
        else:
            a_s, s_s = (float(v) for v in schedule.alpha_sigma(math.floor((1.0 - gamma) * grid.tau[i + 1])))
        k = al[i + 1] / a_s
        c = 0.0 if i == n - 1 else math.sqrt(max(1.0 - k * k, 0.0))
        coef[i] = (*_data_prediction(al[i], sg[i], prediction), k * s_s / sg[i],
                   k * (a_s - s_s * al[i] / sg[i]), 0.0, 0.0, 0.0, c, 0.0)
    return _one_row_per_step(coef, np.full((n, 4), -1, dtype=np.int64), 0, grid)


def dpmpp_singlestep_table(grid: Grid, prediction: str, order: int, lower_order_final) -> SolverTable:
    """DPM-Solver++(2S)/(3S) (`fastdiff.reference.solvers.DPMSolverPPSinglestep`) as rows. A
    first-order row is dpmpp_1m's and stores D_s (slot 0). A later row of the block, at point u
    with state x_u = (s_u/s_s) x_s + sum_k c_k D_k (the row before it: its coefficients on the
    block's earlier D, no x term), recovers x_s = (s_s/s_u) (x_u - sum_k c_k D_k), so the block's
    update x_t = (s_t/s_s) x_s + sum_k w_k D_k becomes
        x_t = (s_t/s_u) x_u + sum_k (w_k - (s_t/s_u) c_k) D_k;
    order 2: w_s = -E (1 - 1/(2r)), w_u = -E/(2r) with E = a_t (e^{-h} - 1); order 3: w_s = -E - F/r,
    w_u = F/r with F = a_t ((e^{-h} - 1)/h + 1). With order 3 the second row stores D_u (slot 1)."""
    n, al, sg, lam = grid.steps, grid.alpha, grid.sigma, grid.lam
    orders = singlestep_orders(n, lower_order_final is True, order)
    coef = np.zeros((n, NUM_COEFS))
    slots = np.full((n, 4), -1, dtype=np.int64)
    block = {}  # the current block's x_u expressed in x_s: its coefficients on D_k, by block position
    for i in range(n):
        coef[i, :2] = _data_prediction(al[i], sg[i], prediction)
        if orders[i] == 1 or sg[i + 1] == 0.0:
            coef[i, 2] = sg[i + 1] / sg[i]
            coef[i, 3] = -al[i + 1] * np.expm1(lam[i] - lam[i + 1])
            slots[i, 0] = 0
            block = {0: coef[i, 3]}  # x_{s+1} = (s_{s+1}/s_s) x_s + c_0 D_s
            continue
        k = orders[i] - 1  # this row's position in the block; the block started at point i - k
        j = i - k
        h = lam[i + 1] - lam[j]
        r = (lam[i] - lam[j]) / h
        e = al[i + 1] * np.expm1(-h)
        w = {0: -e * (1.0 - 0.5 / r), k: -e * 0.5 / r} if k == 1 else {
            0: -e - al[i + 1] * (np.expm1(-h) / h + 1.0) / r, k: al[i + 1] * (np.expm1(-h) / h + 1.0) / r}
        a = sg[i + 1] / sg[i]
        coef[i, 2] = a
        coef[i, 3] = w[k]  # D_u: this row's own
        for pos in range(k):  # the block's earlier D: slot pos, read as b_{k - pos}
            coef[i, 3 + k - pos] = w.get(pos, 0.0) - a * block.get(pos, 0.0)
            slots[i, k - pos] = pos
        if k + 1 < order and i + 1 < n and orders[i + 1] == k + 2:  # the next row continues the block
            slots[i, 0] = k
            block = w  # x_{u+1} = (s_{u+1}/s_s) x_s + sum_k w_k D_k
    return _one_row_per_step(coef, slots, order - 1, grid)


# Adams-Bashforth weights on the newest output first, by order (written out again here, apart
# from the reference's, so that the parity tests check them too)
PLMS_WEIGHTS = {1: (1.0,), 2: (3 / 2, -1 / 2), 3: (23 / 12, -4 / 3, 5 / 12), 4: (55 / 24, -59 / 24, 37 / 24, -3 / 8)}


def pndm_table(grid: Grid, schedule, model_time: str, prediction: str, prk: bool = False) -> SolverTable:
    """PNDM (`fastdiff.reference.solvers.PNDM`) as rows: N + 1 model calls for N >= 2 steps, N + 9
    with `prk`. The history holds raw model outputs (p = 0, q = 1), since PNDM combines outputs,
    not data predictions. With e = e_x x + e_m m the noise prediction of an output at a transfer's
    start and the DDIM transfer x' = (a'/a) x + (s' - a' s / a) e, a combined output m~ moves x
    to P x + Q m~ (`transfer`).
      row 0 (point 0, x_0): x1* = P_0 x_0 + Q_0 m_0, stores m_0;
      row 1 (point 1, x1*): the corrector P' x_0 + Q' (m_0 + m_1) / 2 (P', Q': the transfer of
            step 0's length ending at point 1), with x_0 = (x1* - Q_0 m_0) / P_0; m_1 is not
            stored, as diffusers does not keep it;
      row k >= 2 (point k - 1, whose model time row 1 already used for k = 2): Adams-Bashforth
            over the stored outputs, order min(k, 4), x' = P x + Q sum_l w_l m_{-l}.
    With `prk` steps 0-2 are four rows each, every transfer starting from x_j, which each row
    recovers from its own state and the output that made it (x_j = (x - Q m) / P):
      A: x_B = P_A x_j + Q_A m_A (stores m_A, kept for Adams-Bashforth);
      B: x_C = (P_B / P_A) x_B - (P_B Q_A / P_A) m_A + Q_B m_B (stores m_B);
      C: x_D = (P_D / P_B) x_C - (P_D Q_B / P_B) m_B + Q_D m_C (stores m_C);
      D: x_{j+1} = x_D + Q_D (m_A + 2 m_B - 4 m_C + m_D) / 6;
    then Adams-Bashforth of order 4 from step 3. Slots: stored output i in i % 4 (step j's m_A is
    output j), m_B in 3 and m_C in 4 (free again when output 3 is written)."""
    n, al, sg = grid.steps, grid.alpha, grid.sigma
    e_x, e_m = {"epsilon": (lambda a, s: 0.0, lambda a, s: 1.0), "v": (lambda a, s: s, lambda a, s: a),
                "sample": (lambda a, s: 1.0 / s, lambda a, s: -a / s),
                "edm": (lambda a, s: s, lambda a, s: -a)}[prediction]  # D = a x + s F on a VP schedule

    def level(tau):
        return tuple(float(v) for v in schedule.alpha_sigma(tau))

    def transfer(start, end):
        (a, s), (a2, s2) = start, end
        c = s2 - a2 * s / a
        return a2 / a + c * e_x(a, s), c * e_m(a, s)

    def point(i):
        return al[i], sg[i]

    plms = [transfer(point(i), grid.step_end(i)[1:]) for i in range(n)]
    coef, slots, times, ends = [], [], [], []

    def row(c, s, time, end):
        coef.append(list(c) + [0.0] * (NUM_COEFS - len(c)))
        slots.append(list(s) + [-1] * (4 - len(s)))
        times.append(time)
        ends.append(end)

    if prk:
        for j in range(3):  # slots: m_A of step j in j (the Adams-Bashforth ring below), m_B 3, m_C 4
            h = math.floor((grid.tau[j] - grid.step_end(j)[0]) / 2)
            mid_time = float(schedule.model_time(grid.tau[j + 1] + h, model_time))
            p_a, q_a = transfer(point(j), level(grid.tau[j] - h))
            p_b, q_b = transfer(point(j), level(grid.tau[j + 1] + h))
            p_d, q_d = transfer(point(j), point(j + 1))
            row([0.0, 1.0, p_a, q_a], [j], grid.model_time[j], False)
            row([0.0, 1.0, p_b / p_a, q_b, -p_b * q_a / p_a], [3, j], mid_time, False)
            row([0.0, 1.0, p_d / p_b, q_d, -p_d * q_b / p_b], [4, 3], mid_time, False)
            row([0.0, 1.0, 1.0, q_d / 6, q_d / 6, q_d / 3, -2 * q_d / 3], [-1, j, 3, 4], grid.model_time[j + 1], True)
        first, slots_n = 3, 5
    else:
        slots_n = min(4, n) if n > 1 else 0
        p0, q0 = plms[0]
        row([0.0, 1.0, p0, q0], [0 if n > 1 else -1], grid.model_time[0], n == 1)
        if n > 1:
            start = point(0) if grid.ends is None else level(grid.tau[1] + grid.tau[0] - grid.step_end(0)[0])
            pc, qc = transfer(start, point(1))
            row([0.0, 1.0, pc / p0, 0.5 * qc, 0.5 * qc - pc * q0 / p0], [-1, 0], grid.model_time[1], True)
        first = 1
    ring = min(4, slots_n)
    for i in range(first, n):  # stored output i (output 0 is row 0's; with prk outputs 0-2 are the m_A)
        p, q = plms[i]
        k = min(i + 1, 4)
        w = PLMS_WEIGHTS[k]
        row([0.0, 1.0, p] + [q * wl for wl in w], [i % ring] + [(i - l) % ring for l in range(1, k)],
            grid.model_time[i], True)
    return _table(coef, slots, slots_n, times, ends)


def _third_order_weights(a_s, phi, h, r0, r1, d2_weight=2.0):
    """Weights on D_i, D_{i-1}, D_{i-2} of the third-order multistep update
    x' = (s'/s) x - a' phi D_i + a' (phi/h + 1) D1 + 2 a' (1/2 - (phi + h)/h^2) D2, where D1 ~ h D'
    and D2 ~ h^2 D''/2 are the backward differences over steps r0 h and r1 h. (The factor 2 on
    D2, `d2_weight`, is the Taylor coefficient; the widely copied form with 1 is only second
    order.)"""
    c1 = a_s * (phi / h + 1.0)
    c2 = d2_weight * a_s * (0.5 - (phi + h) / (h * h))
    e = c1 * r0 / (r0 + r1) + c2 / (r0 + r1)  # weight on D1_0 - D1_1
    return [-a_s * phi + (c1 + e) / r0, -(c1 + e) / r0 - e / r1, e / r1]


def _unipc_table(grid: Grid, prediction: str, order: int, variant: str, corrector: bool,
                 lower_order_final: bool) -> SolverTable:
    """UniPC (Zhao et al. 2023), data prediction, as rows of the same table: no kernel change.

    The unified step from x_j (h = lambda_{j+1} - lambda_j, r_m = (lambda_{t_m} - lambda_j) / h):
        x_{j+1} = (s_{j+1}/s_j) x_j - a_{j+1} (e^{-h} - 1) D_j - a_{j+1} sum_m W_m (D_{t_m} - D_j) / r_m.
    UniP-p sums over t_m = j-1 .. j-p+1. UniC-p, once the model has answered at the predicted
    x_{j+1}, redoes the step from the same x_j with t_m = j+1 (r = 1) added. The two share the x_j
    and D_j terms, so x^c_{j+1} = x_{j+1} + C_{j+1}, C = (UniC sum) - (UniP sum): a combination of
    D_{j+1} .. D_{j+1-p}. The next predictor is linear in x^c, so row i is
        x_{i+1} = (s_{i+1}/s_i) x_i + (s_{i+1}/s_i) C_i + UniP(i) terms,
    applied to the uncorrected x_i; it reads D_i .. D_{i-p} (b0..b3 at order 3). The loop carries
    the uncorrected predictor output, D_i is that state's data prediction (as in the paper: the
    model is called at the predicted point), and the corrected state is never stored. The final
    state is the last predictor output: no model call follows it to correct it.

    W = B(h) rho: where the paper solves R rho = b, W solves sum_m W_m r_m^(k-1) = k! hh
    phi_{k+1}(hh), k = 1..len(W), hh = -h (B(h) cancels); a single point (UniP-2, UniC-1) takes
    the published rho = 1/2, W = B(h)/2 with B(h) = hh ("bh1") or e^hh - 1 ("bh2") -- the only
    place the variant matters. Orders as dpmpp (`_dpmpp_order`), counted from the first point
    with finite lambda: a zero-SNR point is never a multistep point, nor is its step corrected.
    """
    n, lam = grid.steps, grid.lam
    first = 1 if np.isneginf(lam[0]) else 0
    orders = [1 if i < first else _dpmpp_order(i - first, n - first, order, lower_order_final, grid.sigma[i + 1] == 0)
              for i in range(n)]
    history = order if corrector else order - 1
    coef = np.zeros((n, NUM_COEFS))
    slots = np.full((n, 4), -1, dtype=np.int64)
    for i in range(n):
        s_t, s_s, a_s = grid.sigma[i], grid.sigma[i + 1], grid.alpha[i + 1]
        a = s_s / s_t
        w = {i: -a_s * float(np.expm1(-(lam[i + 1] - lam[i])))}  # weights on D_k, by grid index k
        _add(w, _unipc_sum(grid, i, list(range(i - 1, i - orders[i], -1)), variant))
        if corrector and i > first and s_s > 0:  # a step to sigma = 0 (a = 0) needs no corrected state
            earlier = list(range(i - 2, i - 1 - orders[i - 1], -1))
            _add(w, _unipc_sum(grid, i - 1, earlier + [i], variant), a)
            _add(w, _unipc_sum(grid, i - 1, earlier, variant), -a)
        coef[i, :3] = (*_data_prediction(grid.alpha[i], s_t, prediction), a)
        back = i - min(w)
        coef[i, 3:4 + back] = [w.get(i - k, 0.0) for k in range(back + 1)]
        if history:
            slots[i, 0] = i % history if i < n - 1 else -1  # the last D is never read
            slots[i, 1:back + 1] = [(i - k) % history for k in range(1, back + 1)]
    return _one_row_per_step(coef, slots, history, grid)


def _add(w: dict, terms: dict, scale: float = 1.0) -> None:
    for k, v in terms.items():
        w[k] = w.get(k, 0.0) + scale * v


def _unipc_sum(grid: Grid, j: int, points: list, variant: str) -> dict:
    """Weights on D_k of -a_{j+1} sum_m W_m (D_{t_m} - D_j) / r_m (see `_unipc_table`)."""
    if not points:
        return {}
    lam, a_next = grid.lam, grid.alpha[j + 1]
    hh = -(lam[j + 1] - lam[j])
    r = np.array([(lam[t] - lam[j]) / -hh for t in points])
    if len(points) == 1:
        W = np.array([0.5 * (hh if variant == "bh1" else np.expm1(hh))])
    else:
        k = np.arange(1, len(points) + 1)
        # k! hh phi_{k+1}(hh) = k! (e^hh - sum_{l<=k} hh^l / l!) / hh^k
        taylor = np.array([sum(hh**l / math.factorial(l) for l in range(1, kk + 1)) for kk in k])
        rhs = np.array([math.factorial(kk) for kk in k]) * (np.expm1(hh) - taylor) / hh**k
        W = np.linalg.solve(r[None, :] ** (k[:, None] - 1), rhs)
    out = {j: float(a_next * np.sum(W / r))}
    for t, wt, rt in zip(points, W, r):
        out[t] = out.get(t, 0.0) - float(a_next * wt / rt)
    return out
