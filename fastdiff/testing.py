"""The analytic test model: data from a Gaussian mixture with diagonal covariances.

Under x_t = alpha x0 + sigma eps the marginal of x_t is again a Gaussian mixture, so the
posterior mean E[x0 | x_t] — the ideal denoiser — is closed-form, and so are the ideal
eps / v / x0 / flow predictions. Sampling with the ideal model is solving the exact
probability-flow ODE, whose solution `GaussianMixture.ode_solution` integrates to high
accuracy: solvers can be checked against it and their convergence order measured.

    >>> gm = GaussianMixture.random(shape=(3, 4, 4), components=4, seed=0)
    >>> model = gm.model(fastdiff.get_schedule("linear"), prediction="v")
    >>> x0 = fastdiff.sample(model, shape=(16, 3, 4, 4), prediction="v", steps=20)
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from fastdiff.reference.solvers import PREDICTIONS


@dataclass
class GaussianMixture:
    """weights (K,), means (K, D), variances (K, D); samples have `shape` (prod = D)."""

    weights: torch.Tensor
    means: torch.Tensor
    variances: torch.Tensor
    shape: tuple

    @classmethod
    def random(cls, shape: Sequence[int] = (2, 4, 4), components: int = 3, seed: int = 0,
               spread: float = 1.5, std_range=(0.05, 0.4)) -> "GaussianMixture":
        g = torch.Generator().manual_seed(seed)
        d = math.prod(shape)
        w = torch.rand(components, generator=g, dtype=torch.float64) + 0.5
        means = spread * torch.randn(components, d, generator=g, dtype=torch.float64) / math.sqrt(2.0)
        lo, hi = std_range
        std = lo + (hi - lo) * torch.rand(components, d, generator=g, dtype=torch.float64)
        return cls(w / w.sum(), means, std**2, tuple(shape))

    # --- exact quantities ---------------------------------------------------------------
    def sample(self, n: int, generator=None) -> torch.Tensor:
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.means.shape[1], generator=generator, dtype=torch.float64)
        return (self.means[k] + self.variances[k].sqrt() * z).view(n, *self.shape)

    def denoise(self, x: torch.Tensor, alpha, sigma) -> torch.Tensor:
        """E[x0 | x_t = x] in float64; alpha, sigma scalars or per-sample tensors (B,)."""
        b = x.shape[0]
        xf = x.reshape(b, 1, -1).to(torch.float64)
        alpha = torch.as_tensor(alpha, dtype=torch.float64).reshape(-1, 1, 1)
        sigma = torch.as_tensor(sigma, dtype=torch.float64).reshape(-1, 1, 1)
        var = alpha**2 * self.variances + sigma**2  # (B?, K, D)
        diff = xf - alpha * self.means
        logp = -0.5 * (diff**2 / var + var.log()).sum(-1) + self.weights.log()  # (B, K)
        resp = torch.softmax(logp, dim=-1).unsqueeze(-1)
        post = self.means + (alpha * self.variances / var) * diff
        return (resp * post).sum(1).view(b, *self.shape)

    def prediction(self, x, alpha, sigma, prediction: str) -> torch.Tensor:
        """The ideal model output of the given type, in float64."""
        x = x.to(torch.float64)
        x0 = self.denoise(x, alpha, sigma)
        shape = (-1,) + (1,) * (x.dim() - 1)
        a = torch.as_tensor(alpha, dtype=torch.float64).reshape(shape)
        s = torch.as_tensor(sigma, dtype=torch.float64).reshape(shape)
        if prediction == "sample":
            return x0
        if prediction == "epsilon":
            return (x - a * x0) / s
        eps = (x - a * x0) / s
        if prediction == "v":
            return a * eps - s * x0
        if prediction == "flow":
            return eps - x0
        if prediction == "edm":  # x0 = alpha x / n2 + sigma F / sqrt(n2) (fastdiff.reference.to_x0)
            n2 = a * a + s * s
            return (x0 - a * x / n2) * n2.sqrt() / s
        raise ValueError(f"prediction: expected one of {list(PREDICTIONS)}, got {prediction!r}")

    def model(self, schedule, prediction: str = "epsilon", model_time: str = "timestep", dtype=torch.float32,
              times=None):
        """A `model(x, t)` callable giving the ideal prediction at model time t.

        With `times` (the model times it will be called at, e.g. `sampler.grid.model_time`)
        the model is torch-only on x's device -- no host copies, so a CUDA graph can capture it:
        alpha and sigma of those times are tabulated once, and each call looks its t up in the
        table (the nearest entry; a t not in `times` gives the prediction at the nearest one)."""
        if prediction not in PREDICTIONS:
            raise ValueError(f"prediction: expected one of {list(PREDICTIONS)}, got {prediction!r}")
        if times is not None:
            return self._tabulated_model(schedule, prediction, model_time, dtype, times)

        def ideal_model(x, t, **_):
            tau = schedule.time_to_tau(t.detach().double().cpu().numpy(), model_time)
            alpha, sigma = schedule.alpha_sigma(np.clip(tau, schedule.tau_min, schedule.tau_max))
            out = self.prediction(x.cpu(), torch.from_numpy(alpha), torch.from_numpy(sigma), prediction)
            return out.to(device=x.device, dtype=dtype)

        return ideal_model

    def _tabulated_model(self, schedule, prediction, model_time, dtype, times):
        times = np.asarray(times, dtype=np.float64).ravel()
        tau = np.clip(schedule.time_to_tau(times, model_time), schedule.tau_min, schedule.tau_max)
        alpha, sigma = schedule.alpha_sigma(tau)
        table = torch.from_numpy(np.stack([times, alpha, sigma]))  # (3, N) float64
        on_device = {}  # device -> (table, this mixture's tensors) copied there once

        def ideal_model(x, t, **_):
            if x.device not in on_device:
                mix = GaussianMixture(self.weights.to(x.device), self.means.to(x.device),
                                      self.variances.to(x.device), self.shape)
                on_device[x.device] = table.to(x.device), mix
            tab, mix = on_device[x.device]
            i = (t.to(torch.float64).view(-1, 1) - tab[0]).abs().argmin(dim=1)
            return mix.prediction(x, tab[1][i], tab[2][i], prediction).to(dtype)

        return ideal_model

    def ode_solution(self, x: torch.Tensor, alpha_start: float, sigma_start: float, alpha_end: float,
                     sigma_end: float, step: float = 2e-3) -> torch.Tensor:
        """Exact probability-flow ODE solution from x at (alpha_start, sigma_start) to the end
        noise level, in float64. Integrated in lambda = log(alpha/sigma) on y = x / sigma, where
        dy/dlambda = e^lambda x0(x) (smooth and non-stiff), by classic RK4 with `step` in lambda.
        The end may be clean (sigma_end = 0): then x0 at sigma/alpha = 6e-6 is returned (its
        distance to the limit is O(1e-11))."""
        x = x.to(torch.float64)
        lam0 = max(math.log(alpha_start) - math.log(sigma_start) if alpha_start > 0 else -math.inf, -25.0)

        clean = sigma_end == 0
        lam1 = 12.0 if clean else math.log(alpha_end) - math.log(sigma_end)
        n = max(1, math.ceil((lam1 - lam0) / step))
        h = (lam1 - lam0) / n
        y = x / sigma_start

        def f(lam, y):
            ks = math.exp(-lam)  # sigma/alpha; in VP coordinates x = alpha y sigma ... only x/alpha matters
            xt = y * ks  # x / alpha = (x / sigma) (sigma / alpha)
            a = 1.0 / math.sqrt(1.0 + ks * ks)
            return math.exp(lam) * self.denoise(xt * a, a, ks * a)

        lam = lam0
        for _ in range(n):
            k1 = f(lam, y)
            k2 = f(lam + h / 2, y + h / 2 * k1)
            k3 = f(lam + h / 2, y + h / 2 * k2)
            k4 = f(lam + h, y + h * k3)
            y = y + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
            lam += h
        ks = math.exp(-lam1)
        if clean:
            a = 1.0 / math.sqrt(1.0 + ks * ks)
            return self.denoise(y * ks * a, a, ks * a)
        return sigma_end * y
