"""`fastdiff.sample()` and `Sampler`: the drop-in entry point.

A `Sampler` is a plan: schedule, grid and solver are validated and computed once (float64,
on the host); `Sampler.sample()` then runs the loop as often as you like. The model is any
callable `model(x, t, **cond) -> Tensor` with the same shape as x, where `t` is a float32
tensor of shape (batch,) holding the model time (see `model_time`).

Example (the analytic Gaussian-mixture model shipped for tests and benchmarks)::

    >>> import torch, fastdiff
    >>> from fastdiff.testing import GaussianMixture
    >>> gm = GaussianMixture.random(shape=(2, 4, 4), seed=0)
    >>> model = gm.model(fastdiff.get_schedule("linear"), prediction="epsilon")
    >>> noise = torch.randn(8, 2, 4, 4, generator=torch.Generator().manual_seed(0))
    >>> x0 = fastdiff.sample(model, noise, solver="dpmpp_2m", steps=10)
    >>> x0.shape
    torch.Size([8, 2, 4, 4])
"""
from __future__ import annotations

import dataclasses
import math
import sys
from typing import Callable, List, Mapping, Optional, Sequence

import numpy as np
import torch

from fastdiff.grid import Grid, TwoStage, explicit_grid, make_grid, with_step_ends
from fastdiff.graphs import CUDA_GRAPH_MODES, sample_graphed
from fastdiff._names import did_you_mean
from fastdiff.guidance import ModelCaller, check_guidance_scale, new_slots, state_layout
from fastdiff.noise import check_generator, randn
from fastdiff.ops.solver_step import solver_step
from fastdiff.profiling import nvtx_range
from fastdiff.reference.solvers import PREDICTIONS, SOLVERS
from fastdiff.schedules import MODEL_TIMES, Schedule, get_schedule
from fastdiff.solvers import (Churn, SolverTable, build_table, deis_table, dpmpp_singlestep_table, flow_heun_table,
                              heun_table, kdpm2_table, lms_table, pndm_table, tcd_table)

BACKENDS = ("auto", "reference", "cuda", "triton", "cpu")
_ETA_SOLVERS = ("ddim", "euler_ancestral", "flow_sde", "tcd", "kdpm2_ancestral")
_FLOW_SOLVERS = ("flow_euler", "flow_sde", "flow_heun")
_PREV_TIMESTEP_SOLVERS = ("ddim", "pndm", "pndm_prk")  # a step may end elsewhere than the next point
_VE_SOLVERS = ("euler", "euler_ancestral", "heun", "lms", "kdpm2", "kdpm2_ancestral")  # they work in sigma/alpha
_KDPM2 = ("kdpm2", "kdpm2_ancestral")


class Sampler:
    """A sampling plan, computed once and reused.

    Args:
        solver: one of `fastdiff.SOLVERS` ("ddpm", "ddim", "dpmpp_1m", "dpmpp_2m", "dpmpp_3m",
            "dpmpp_2m_sde", "euler", "euler_ancestral", "heun", "flow_euler", "flow_sde", "consistency",
            "unipc", "pndm", "pndm_prk", "lms", "flow_heun", "dpmpp_2s", "dpmpp_3s", "deis_2m", "deis_3m", "kdpm2",
            "kdpm2_ancestral", "tcd").
        steps: number of grid steps (>= 1; at most the schedule's training timesteps); default 20,
            or the length of an explicit grid. Every solver calls the model once per step but
            "heun", "flow_heun", "kdpm2" and "kdpm2_ancestral", which take 2N - 1 calls (2N with
            final="min"), and "pndm" (PLMS, diffusers' PNDMScheduler with skip_prk_steps), N + 1,
            and "pndm_prk" (its Runge-Kutta warm-up: 3 steps of 4 calls, then PLMS), N + 9:
            `model_calls` says how many.
        schedule: "linear", "scaled_linear", "cosine", "flow", or a VPSchedule/FlowSchedule.
        spacing: "leading", "trailing" (default), "linspace", "karras" or "logsnr", or a
            coarse-to-fine `fastdiff.TwoStage(coarse, split_sigma, ...)` (see `fastdiff.grid`).
        sigmas, timesteps: an explicit grid instead of a spacing (`fastdiff.grid.explicit_grid`):
            `sigmas` the N + 1 noise levels (sigma/alpha for VP schedules, t for flow; diffusers'
            convention), `timesteps` the N model times (alone: the grid ends at tau_min, with
            `final`). `Sampler.from_scheduler` builds these from a diffusers scheduler.
        prediction: what the model outputs: "epsilon", "v", "sample" (x0), "flow" (velocity
            noise - x0 of rectified flow; needs a flow schedule) or "edm" (the network F of EDM's
            preconditioning with sigma_data = 1: x0 = c_skip x / alpha + c_out F, c_skip =
            1 / (1 + s^2), c_out = s / sqrt(1 + s^2), s = sigma / alpha; on a VP schedule F = -v).
        model_time: how the model takes time: "timestep" (diffusers: 0..T-1, or 1000*t for
            flow), "t" (continuous in [0, 1]) or "karras_sigma" (sigma/alpha, EDM/k-diffusion).
        final: "zero" (last step jumps to the clean sample) or "min" (stop at the smallest
            training noise level; no first-order jump).
        eta: noise fraction for "ddim" (default 0), "euler_ancestral", "kdpm2_ancestral" and
            "flow_sde" (default 1); for "tcd" its gamma (default 0.3: each step goes back to
            s = floor((1 - gamma) t') first).
        lower_order_final: DPM-Solver++ and UniPC: True caps the order at N - i near the end
            (steadier at few steps), False does not; "last" (DPM-Solver++ only) makes only the last
            step first order. A step to sigma = 0 (or of size zero) is always first order.
        order, variant, corrector: "unipc" only (UniPC, Zhao et al. 2023, data prediction):
            order 1-3 (default 2), variant "bh1" (B(h) = h) or "bh2" (B(h) = e^h - 1, the
            default), corrector (default True; False runs the predictor UniP alone). UniP-p
            converges with order p, UniPC-p with p + 1 (measured:
            tests/test_reference_solvers.py).
        variance: "ddpm" posterior variance, "small" (beta tilde, the default) or "large" (beta);
            only for "ddpm". Every step but one from t = 0 adds it (Ho et al., diffusers): with
            "large" a last step from t > 0 to the clean end adds sqrt(beta) noise.
        clamp: if set, the data prediction x0 is clamped to [-clamp, clamp], like diffusers'
            clip_sample. The noise estimate follows the clamped x0 but for "ddim" (next option).
        clamped_model_output: "ddim" only: True takes its noise estimate from the clamped x0
            (diffusers' use_clipped_model_output=True); False (the default, diffusers' default)
            keeps the model's own.
        round_timesteps: round model times to integer training timesteps (discrete VP only);
            coinciding points are dropped with a warning.
        backend: "reference" runs the textbook solvers in plain PyTorch (the oracle). Every other
            backend runs the solver's coefficient table (`fastdiff.solvers`) with one fused
            `fastdiff::solver_step` per step: "cuda", "triton" or "cpu" force that kernel (an
            error if it cannot run), "auto" takes the first of cuda -> triton -> cpu that can
            run the inputs, else the op's plain-PyTorch implementation (`fastdiff.info()`
            says which).
        boundary_scaling: "consistency" only: the latent-consistency boundary condition
            c_skip(t) x + c_out(t) x0 with this timestep scaling (LCM: 10); None: plain x0.
        zero_terminal_snr, shift, steps_offset, rho, sigma_min, sigma_max: schedule and
            spacing options (see `fastdiff.schedules` and `fastdiff.grid`).
        s_churn, s_tmin, s_tmax, s_noise: "heun" only: EDM's stochastic churn (Karras et al.
            2022, Algorithm 2; see `fastdiff.solvers`). Steps starting at s_tmin <= sigma/alpha
            <= s_tmax raise their noise level by gamma = min(s_churn / steps, sqrt(2) - 1) with
            fresh noise (scaled by s_noise) before the model call. A raised level above the
            schedule's largest is an error (lower s_tmax, or start the grid lower). s_churn = 0
            (the default) is the deterministic Heun sampler.
        d2_weight: "dpmpp_3m" only: the weight on its second backward difference D2 ~ h^2 D''/2.
            2 (the default) is the Taylor coefficient, which makes the step third order; 1 is the
            widely copied form (diffusers' DPMSolverMultistepScheduler, k-diffusion), second
            order but measured more accurate at 6-15 steps on Karras grids (benchmarks/NOTES.md).
        mid_timesteps: "kdpm2" and "kdpm2_ancestral" only: the model times at their midpoints
            (default: the schedule's time of each midpoint's noise level; `from_scheduler` passes
            diffusers' own).
        prev_timesteps: "ddim", "pndm" and "pndm_prk" only: the model time each step ends at, one
            per step (default: the next grid point; the next step still starts there). diffusers'
            DDIM and PNDM step from t to t - T // N, which is not the next model time with
            "trailing"/"linspace" spacing when T % N != 0; `from_scheduler` passes those. A time
            below the smallest training time ends at the grid's end point (`final`).
        noise_scale: the loop starts from noise_scale * noise (1: from the noise as given).
            `from_scheduler` sets it for diffusers' Euler schedulers, whose pipelines start from
            noise * init_noise_sigma: sigma_max / sqrt(1 + sigma_max^2) in fastdiff's (VP)
            state with "linspace"/"trailing" spacing, about 0.2 % below 1.
        first_step: drop the grid's first `first_step` steps (0 <= first_step < N): the plan runs
            the remaining N - first_step steps from grid point tau_first_step, as a plan made for
            that grid alone would (multistep solvers warm up there; lower_order_final counts to
            the end as before; `steps`, progress and callback count the remaining steps). With
            `sample(..., x0=)` it is img2img / SDEdit: diffusers' img2img pipelines drop
            N - int(N * strength) steps.
        last_step: stop after this many steps of the plan (1 <= last_step <= its steps, counted
            after first_step; default: all): those steps exactly as the whole plan runs them
            (lower_order_final still counts to the plan's end), the result the state at grid
            point last_step, still noisy (SDXL's denoising_end, a refiner's input).
        output_scale: `sample()` returns output_scale * the loop's final state (1: the state
            itself; callbacks see the states unscaled). `from_scheduler` sets it for the EDM
            schedulers, whose state fastdiff keeps in units of sigma_data (their model input).
    """

    def __init__(self, solver: str = "dpmpp_2m", steps: Optional[int] = None, schedule="linear",
                 spacing: Optional[str] = None,
                 prediction: str = "epsilon", model_time: str = "timestep", final: str = "zero",
                 eta: Optional[float] = None, lower_order_final: bool = True, variance: Optional[str] = None,
                 clamp: Optional[float] = None, clamped_model_output: bool = False, round_timesteps: bool = False,
                 backend: str = "auto",
                 zero_terminal_snr: bool = False, shift: float = 1.0, steps_offset: int = 0, rho: float = 7.0,
                 sigma_min: Optional[float] = None, sigma_max: Optional[float] = None, sigmas=None, timesteps=None,
                 boundary_scaling: Optional[float] = None, order: Optional[int] = None,
                 variant: Optional[str] = None, corrector: Optional[bool] = None,
                 s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0,
                 noise_scale: float = 1.0, d2_weight: Optional[float] = None, mid_timesteps=None,
                 prev_timesteps=None, first_step: int = 0, last_step: Optional[int] = None,
                 output_scale: float = 1.0):
        for name, value, choices in (("solver", solver, sorted(SOLVERS)), ("prediction", prediction, list(PREDICTIONS)),
                                     ("model_time", model_time, sorted(MODEL_TIMES)), ("backend", backend, BACKENDS)):
            if value not in choices:
                raise ValueError(f"{name}: expected one of {list(choices)}, got {value!r}{did_you_mean(value, choices)}")
        if eta is not None and solver not in _ETA_SOLVERS:
            raise ValueError(f"eta: only {list(_ETA_SOLVERS)} take eta, not {solver!r}")
        if eta is not None and (isinstance(eta, bool) or not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0):
            raise ValueError(f"eta: expected a number in [0, 1], got {eta!r}")
        if variance is not None and solver != "ddpm":
            raise ValueError(f"variance: only 'ddpm' takes a posterior variance, not {solver!r}")
        variance = "small" if variance is None else variance
        if variance not in ("small", "large"):
            raise ValueError(f"variance: expected 'small' or 'large', got {variance!r}")
        unipc = _unipc_options(solver, order, variant, corrector)
        for name, value in (("noise_scale", noise_scale), ("output_scale", output_scale)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name}: expected a finite number > 0, got {value!r}")
        self.noise_scale, self.output_scale = float(noise_scale), float(output_scale)
        if clamp is not None and (isinstance(clamp, bool) or not isinstance(clamp, (int, float)) or not clamp > 0):
            raise ValueError(f"clamp: expected a positive bound or None, got {clamp!r}")
        if not isinstance(clamped_model_output, bool):
            raise ValueError(f"clamped_model_output: expected True or False, got {clamped_model_output!r}")
        if clamped_model_output and solver != "ddim":
            raise ValueError(f"clamped_model_output: only 'ddim' takes it (the other solvers' noise estimate "
                             f"always follows the clamped x0), not {solver!r}")
        if not (isinstance(lower_order_final, bool) or lower_order_final == "last"):
            raise ValueError(f"lower_order_final: expected True, False or 'last', got {lower_order_final!r}")
        if lower_order_final == "last" and not solver.startswith("dpmpp_"):
            raise ValueError(f"lower_order_final: 'last' is for the dpmpp_* solvers, not {solver!r}")
        if mid_timesteps is not None and solver not in _KDPM2:
            raise ValueError(f"mid_timesteps: only {list(_KDPM2)} take it, not {solver!r}")
        if d2_weight is not None:
            if solver != "dpmpp_3m":
                raise ValueError(f"d2_weight: only 'dpmpp_3m' takes it, not {solver!r}")
            if isinstance(d2_weight, bool) or not isinstance(d2_weight, (int, float)) or not 0 <= d2_weight < math.inf:
                raise ValueError(f"d2_weight: expected a finite number >= 0 (2: third order, 1: the common form), "
                                 f"got {d2_weight!r}")
        if boundary_scaling is not None:
            if solver != "consistency":
                raise ValueError(f"boundary_scaling: only 'consistency' takes it, not {solver!r}")
            if isinstance(boundary_scaling, bool) or not isinstance(boundary_scaling, (int, float)) or not (
                    boundary_scaling > 0 and np.isfinite(boundary_scaling)):
                raise ValueError(f"boundary_scaling: expected a finite number > 0, got {boundary_scaling!r}")
            if clamp is not None:
                raise ValueError("clamp: the fused step clamps the data prediction after the consistency boundary "
                                 "mix, where LCM clamps before it; boundary_scaling and clamp cannot be combined")
        self.schedule: Schedule = get_schedule(schedule, zero_terminal_snr=zero_terminal_snr, shift=shift)
        if (solver in _FLOW_SOLVERS or prediction == "flow") and self.schedule.kind != "flow":
            what = "solver" if solver in _FLOW_SOLVERS else "prediction"
            raise ValueError(f"{what}: {solver if what == 'solver' else prediction!r} needs a flow schedule "
                             f"(schedule='flow'), got {self.schedule!r}")
        if sigmas is None and timesteps is None:
            steps, spacing = 20 if steps is None else steps, "trailing" if spacing is None else spacing
            self.grid: Grid = make_grid(self.schedule, spacing, steps, final=final, model_time=model_time,
                                        round_timesteps=round_timesteps, steps_offset=steps_offset, rho=rho,
                                        sigma_min=sigma_min, sigma_max=sigma_max)
        else:
            for name, value, default in (("spacing", spacing, None), ("round_timesteps", round_timesteps, False),
                                         ("steps_offset", steps_offset, 0), ("rho", rho, 7.0),
                                         ("sigma_min", sigma_min, None), ("sigma_max", sigma_max, None)):
                if value != default:
                    raise ValueError(f"{name}: belongs to a spacing; an explicit grid (sigmas=/timesteps=) takes "
                                     "none")
            self.grid = explicit_grid(self.schedule, sigmas=sigmas, timesteps=timesteps, final=final,
                                      model_time=model_time)
            if steps is not None and steps != self.grid.steps:
                raise ValueError(f"steps: {steps} differs from the explicit grid's {self.grid.steps} steps")
            steps = self.grid.steps
        if prev_timesteps is not None:
            if solver not in _PREV_TIMESTEP_SOLVERS:
                raise ValueError(f"prev_timesteps: only {list(_PREV_TIMESTEP_SOLVERS)} take it, not {solver!r}")
            self.grid = with_step_ends(self.grid, self.schedule, prev_timesteps, model_time)
        mids = _check_mid_timesteps(mid_timesteps, self.grid)
        if isinstance(first_step, bool) or not isinstance(first_step, (int, np.integer)) or not (
                0 <= first_step < self.grid.steps):
            raise ValueError(f"first_step: expected an integer in [0, {self.grid.steps}) (the grid's steps), "
                             f"got {first_step!r}")
        if first_step:
            g, k = self.grid, int(first_step)
            self.grid = Grid(tau=g.tau[k:], alpha=g.alpha[k:], sigma=g.sigma[k:], model_time=g.model_time[k:],
                             ends=None if g.ends is None else tuple(v[k:] for v in g.ends))
            mids = None if mids is None else mids[k:]  # every dropped step has a midpoint (none ends at 0)
        model_alpha = self.grid.alpha[:-1]
        if prediction == "epsilon" and (model_alpha == 0).any():
            raise ValueError("prediction: an 'epsilon' model carries no information about x0 at zero SNR "
                             "(alpha = 0 at the first step); use a v- or sample-predicting model, or a spacing "
                             "that starts below the last timestep")
        if solver == "pndm_prk" and steps < 4:  # (the last Runge-Kutta step calls the model at point 3)
            raise ValueError(f"steps: 'pndm_prk' runs 3 Runge-Kutta steps, then PLMS; expected steps >= 4, got {steps}")
        if solver in ("pndm", "pndm_prk", "tcd") and (self.schedule.kind == "flow" or prediction == "flow"):
            raise ValueError(f"solver: {solver!r} transfers along a variance-preserving schedule's noise prediction; "
                             "use flow_euler for a flow schedule")
        if solver in _VE_SOLVERS and (model_alpha == 0).any():
            raise ValueError(f"solver: {solver!r} works in sigma/alpha, which is infinite at zero SNR; "
                             "use dpmpp_*, ddim or flow_euler")
        self.solver, self.prediction, self.backend = solver, prediction, backend
        self.options = dict(solver=solver, steps=steps,
                            spacing=spacing.as_dict() if isinstance(spacing, TwoStage) else spacing,
                            prediction=prediction, model_time=model_time,
                            final=final, eta=eta, lower_order_final=lower_order_final, variance=variance, clamp=clamp,
                            clamped_model_output=clamped_model_output, round_timesteps=round_timesteps,
                            backend=backend, zero_terminal_snr=zero_terminal_snr,
                            shift=shift, steps_offset=steps_offset, rho=rho, sigma_min=sigma_min, sigma_max=sigma_max,
                            boundary_scaling=boundary_scaling,
                            schedule=schedule if isinstance(schedule, str) else repr(schedule),
                            order=unipc.get("order"), variant=unipc.get("variant"), corrector=unipc.get("corrector"),
                            noise_scale=self.noise_scale, d2_weight=d2_weight, output_scale=self.output_scale,
                            mid_timesteps=_float_list(mid_timesteps), prev_timesteps=_float_list(prev_timesteps),
                            first_step=int(first_step))
        cls, fixed = SOLVERS[solver]
        self._solver_args = dict(fixed, eta=eta, lower_order_final=lower_order_final, variance=variance,
                                 clamp=clamp, **unipc)
        if boundary_scaling is not None:
            self._solver_args["boundary_scaling"] = boundary_scaling
        if d2_weight is not None:
            self._solver_args["d2_weight"] = float(d2_weight)
        if solver == "ddim":
            self._solver_args["clamped_model_output"] = clamped_model_output
        self._solver_cls = cls
        self.clamp = clamp
        self._times, self._row_args = {}, None
        # Heun: its churn options (checked here), its own rows and reference arguments
        churn = _check_churn(solver, s_churn, s_tmin, s_tmax, s_noise, round_timesteps)
        if solver == "heun":
            self.options.update(vars(churn))
            self._solver_args.update(vars(churn), schedule=self.schedule, model_time=model_time)
            self.table: SolverTable = heun_table(self.grid, self.schedule, model_time, prediction, churn)
        elif solver in ("pndm", "pndm_prk"):
            self._solver_args.update(schedule=self.schedule, model_time=model_time)
            self.table = pndm_table(self.grid, self.schedule, model_time, prediction, prk=solver == "pndm_prk")
        elif solver == "lms":
            self.table = lms_table(self.grid, prediction)
        elif solver in ("deis_2m", "deis_3m"):
            self.table = deis_table(self.grid, prediction, int(solver[5]), lower_order_final)
        elif solver in ("dpmpp_2s", "dpmpp_3s"):
            self.table = dpmpp_singlestep_table(self.grid, prediction, int(solver[6]), lower_order_final)
        elif solver == "tcd":
            self._solver_args["schedule"] = self.schedule
            gamma = cls.default_eta if eta is None else float(eta)  # the reference's default: one place
            self.table = tcd_table(self.grid, self.schedule, prediction, gamma)
        elif solver in _KDPM2:
            self._solver_args.update(schedule=self.schedule, model_time=model_time, mid_times=mids)
            eta = 0.0 if solver == "kdpm2" else cls.default_eta if eta is None else float(eta)
            self.table = kdpm2_table(self.grid, self.schedule, model_time, prediction, mids, eta)
        elif solver == "flow_heun":
            self.table = flow_heun_table(self.grid, self.schedule, model_time, prediction)
        else:
            self.table = build_table(solver, self.grid, prediction, eta=eta, lower_order_final=lower_order_final,
                                     variance=variance, boundary_scaling=boundary_scaling,
                                     d2_weight=2.0 if d2_weight is None else float(d2_weight),
                                     unclamped_noise=clamp is not None and not clamped_model_output, **unipc)
        self._last_step = self.grid.steps
        if last_step is not None:
            if isinstance(last_step, bool) or not isinstance(last_step, (int, np.integer)) or not (
                    1 <= last_step <= self.grid.steps):
                raise ValueError(f"last_step: expected an integer in [1, {self.grid.steps}] (the plan's steps"
                                 f"{' after first_step' if first_step else ''}), got {last_step!r}")
            self._last_step = int(last_step)
            rows = int(np.flatnonzero(self.table.ends_step)[self._last_step - 1]) + 1  # the row ending that step
            t = self.table
            self.table = dataclasses.replace(t, coef=t.coef[:rows], slots=t.slots[:rows],
                                             model_time=t.model_time[:rows], ends_step=t.ends_step[:rows],
                                             step_state=t.step_state[:rows])
        self.options["last_step"] = last_step
        if self.output_scale != 1.0:
            self.table = self.table.scaled_output(self.output_scale)

    @classmethod
    def from_scheduler(cls, scheduler, steps: Optional[int] = None, *, scheduler_class=None, mu=None, sigmas=None,
                       timesteps=None, use_clipped_model_output: bool = False, **overrides) -> "Sampler":
        """The plan a diffusers scheduler describes: the same model times and noise levels as its
        `set_timesteps(steps, mu=, sigmas=, timesteps=)`, the same update (see
        `fastdiff.integrations.diffusers.schedulers` for the mapping and where fastdiff differs on
        purpose). `scheduler`: a scheduler instance, or a config dict (scheduler_config.json, or
        `pipe.scheduler.config` with `scheduler_class=` naming the class; no diffusers import
        needed). Config keys the scheduler does not take are ignored, as diffusers ignores them.
        `mu`, `sigmas`, `timesteps`: set_timesteps' own arguments, in the scheduler's terms (mu:
        FlowMatch dynamic shifting). `use_clipped_model_output`: DDIMScheduler.step's argument
        (Sampler's clamped_model_output). `overrides`: Sampler options replacing the mapped ones
        (backend=, eta= for DDIM, ...)."""
        from fastdiff.integrations.diffusers.schedulers import sampler_options
        options = sampler_options(scheduler, steps, scheduler_class, mu=mu, sigmas=sigmas, timesteps=timesteps)
        if use_clipped_model_output:
            options["clamped_model_output"] = True
        return cls(**{**options, **overrides})

    @property
    def steps(self) -> int:
        """Grid steps the plan runs (callback and progress fire once per step); the result is the
        state at grid point `steps` (the clean end unless last_step stops earlier)."""
        return self._last_step

    @property
    def model_calls(self) -> int:
        """Model evaluations per sample (NFE; times 2 for CFG's unconditional half)."""
        return self.table.rows

    def describe(self) -> dict:
        """The whole plan as JSON-ready data: the constructor's options, and per model call its
        model time and coefficient row (for provenance in saved samples)."""
        t = self.table
        return dict(self.options, model_time_values=t.model_time.tolist(), coef=t.coef.tolist(),
                    slots=t.slots.tolist(), ends_step=t.ends_step.tolist(), initial=[t.initial_scale, t.initial_noise])

    @property
    def signature(self) -> tuple:
        """What the fused loop records, for the CUDA-graph cache key."""
        t = self.table
        return (self.solver, self.backend, self.clamp, t.coef.tobytes(), t.slots.tobytes(), t.model_time.tobytes(),
                t.initial_scale, t.initial_noise)

    def new_solver(self):
        return self._solver_cls(self.grid, self.prediction, **self._solver_args)

    @torch.no_grad()  # sampling is inference: the caller never needs to turn autograd off
    def sample(self, model: Callable, noise: Optional[torch.Tensor] = None, *, shape: Optional[Sequence[int]] = None,
               generator=None, device=None, guidance_scale: float = 1.0,
               cond: Optional[Mapping] = None, uncond: Optional[Mapping] = None, cfg: str = "batched",
               model_dtype: Optional[torch.dtype] = None, check_finite: bool = False, progress: bool = False,
               callback: Optional[Callable] = None, dtype: torch.dtype = torch.float32,
               cuda_graph=False, x0: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Run the plan. Returns the final state (in `dtype`; times output_scale).

        Args:
            model: `model(x, t, **cond)`; returns a tensor shaped like x.
            noise: the initial latent (standard normal); or give `shape` (+ `generator`, `device`).
            generator: draws the initial noise (when not given) and every SDE/ancestral step's noise.
                A list of generators, one per image, draws image b's noise from `generator[b]`
                only: each image then gets the same noise whatever batch it is sampled in.
            guidance_scale: classifier-free guidance w: m = m_uncond + w (m_cond - m_uncond).
                w = 1 needs no `uncond` and makes one model call per step.
            cond, uncond: keyword arguments for the model's conditional / unconditional call.
            cfg: "batched" (one call on the doubled batch, unconditional half first) or
                "separate" (two calls).
            model_dtype: cast the state to this dtype for the model call (the solver state stays fp32).
            check_finite: raise if the model returns NaN/inf (synchronises with the host each step).
            progress: True prints a progress bar to stderr; a callable `progress(done, total)`
                is called after each step instead (a tqdm bar's update, ...).
            callback: `callback(i, x)` after each grid step i, with the new state (a copy).
            dtype: the solver state's dtype: float32 (default; keep it even for fp16/bf16 models,
                a half-precision state loses about an order of magnitude of accuracy) or float64.
            cuda_graph: True records the whole loop (every model call and solver step) into one
                CUDA graph, cached, and replays it (see `fastdiff.graphs`); "auto" does so when
                the inputs are on a GPU and the model can be captured, else runs the eager fused
                loop (with a warning when capture failed). Needs a fused backend.
            x0: a clean sample (shaped like the noise) to start from instead of pure noise: the
                loop starts at the grid's first point from alpha_0 x0 + sigma_0 noise, the
                forward-noised x0 (img2img / SDEdit, with `first_step`; `noise_scale` does not
                apply). diffusers' add_noise gives the same state, for Euler-type schedulers in
                their sigma/alpha coordinates: x0 + (sigma_0 / alpha_0) noise = that / alpha_0.
        """
        if dtype not in (torch.float32, torch.float64):
            raise ValueError(f"dtype: the solver state must be float32 or float64, got {dtype}")
        fused = self.backend != "reference"
        if fused and dtype != torch.float32:
            raise ValueError(f"dtype: the fused backends keep the state in float32; {dtype} is for backend='reference'")
        if callback is not None and not callable(callback):
            raise TypeError(f"callback: expected a callable callback(i, x) or None, got {type(callback).__name__}")
        if not (isinstance(progress, bool) or callable(progress)):
            raise TypeError(f"progress: expected True, False or a callable progress(done, total), got "
                            f"{type(progress).__name__}")
        check_guidance_scale(guidance_scale)
        x = _initial_state(noise, shape, generator, device, dtype)
        if x0 is not None:
            _check_x0(x0, x)
            # the state is in units of output_scale (EDM: sigma_data): x0 enters it divided by that
            x.mul_(float(self.grid.sigma[0])).add_(x0.to(x.dtype), alpha=float(self.grid.alpha[0]) / self.output_scale)
        elif self.noise_scale != 1.0:
            x.mul_(self.noise_scale)
        if cuda_graph not in CUDA_GRAPH_MODES:
            raise ValueError(f"cuda_graph: expected one of {CUDA_GRAPH_MODES}, got {cuda_graph!r}")
        if cuda_graph is True and (not fused or x.device.type != "cuda"):
            why = "backend='reference' runs the textbook loop" if not fused else f"the noise is on {x.device}"
            raise ValueError(f"cuda_graph: True needs CUDA tensors and a fused backend ({why})")
        if cuda_graph and fused and x.device.type == "cuda":
            if check_finite or callback is not None or progress:
                raise ValueError("cuda_graph: check_finite, callback and progress need the host between steps; "
                                 "turn them off or use cuda_graph=False")
            with nvtx_range("fastdiff/sample"):
                out = sample_graphed(self, model, x, generator=generator, guidance_scale=guidance_scale, cond=cond,
                                     uncond=uncond, cfg=cfg, model_dtype=model_dtype, mode=cuda_graph)
            if out is not None:
                return out
        caller = ModelCaller(model, x, guidance_scale, cond, uncond, cfg, model_dtype, combine=not fused)
        with nvtx_range("fastdiff/sample"):
            if fused:
                layout = state_layout(x)

                def draw(k):
                    z = randn(x.shape, generator, x.device)
                    return z.contiguous(memory_format=layout)  # the fused step wants x's layout
                self.run_fused(caller, x, self.new_history(x), draw, float(guidance_scale), check_finite=check_finite,
                               progress=progress, callback=callback)
                return x
            return self._run_reference(caller, x, generator, check_finite, progress, callback)

    def model_times(self, device) -> torch.Tensor:
        """The model time of every call, as a float32 tensor on `device`, made once per device (a
        CUDA graph must not copy from the host while it records)."""
        device = torch.device(device)
        if device not in self._times:
            self._times[device] = torch.tensor(self.table.model_time, dtype=torch.float32).to(device)
        return self._times[device]

    def _rows(self) -> list:
        """Per table row (coef, slots, noisy, ends_step) as the loop passes them, made once per plan."""
        if self._row_args is None:
            t = self.table
            self._row_args = [(t.coef[r].tolist(), t.slots[r].tolist(), bool(t.noisy(r)), bool(t.ends_step[r]))
                              for r in range(t.rows)]
        return self._row_args

    def new_history(self, x: torch.Tensor) -> Optional[torch.Tensor]:
        """The ring buffer of earlier data predictions the table needs (None if none), each slot
        in x's layout (the fused step reads every tensor in one layout)."""
        return new_slots(self.table.history, x) if self.table.history else None

    def run_fused(self, caller: ModelCaller, x: torch.Tensor, hist, draw_noise: Callable, guidance,
                  check_finite: bool = False, progress: bool = False, callback=None,
                  times: Optional[torch.Tensor] = None) -> None:
        """The fused loop, updating x in place: per table row one model call and one solver_step.
        Host-sync free unless check_finite/callback ask otherwise, so a CUDA graph can record it;
        `guidance` is a float or a 0-d device tensor (read at replay time); `draw_noise(k)` gives
        the k-th standard-normal noise tensor of the run (`table.noise_draws` in all: the
        initial one, if any, then one per noisy row); `times` the model times tensor to read
        (default: `model_times(x.device)`)."""
        table, n = self.table, self.steps
        call, t_all = caller.bind(), self.model_times(x.device) if times is None else times
        t_rows = t_all.view(-1, 1).expand(-1, caller.model_batch)  # row r: its time at the model's batch, a view
        op_backend = "auto" if self.backend == "auto" else self.backend
        clamp = 0.0 if self.clamp is None else float(self.clamp)
        draws = iter(range(table.noise_draws))
        if table.initial_noise:  # Heun's churn of step 0 (fastdiff.solvers): no row comes before it
            x.mul_(table.initial_scale).add_(draw_noise(next(draws)), alpha=table.initial_noise)
        i = 0  # the grid step
        for r, (coef, slots, noisy, ends_step) in enumerate(self._rows()):
            with nvtx_range("fastdiff/step"):
                with nvtx_range("fastdiff/model"):
                    m_c, m_u = call(x, t_rows[r])
                if check_finite:
                    _check_finite(i, table.model_time[r], m_c, m_u)
                z = draw_noise(next(draws)) if noisy else None
                with nvtx_range("fastdiff/solver_step"):
                    solver_step(x, m_c, m_u, hist, z, coef=coef, slots=slots, guidance=guidance, clamp=clamp, out=x,
                                backend=op_backend)
            if not ends_step:
                continue
            if callback is not None:
                callback(i, table.completed_state(r, x, z))  # x is updated in place: hand out a copy
            if progress:
                _report(progress, i + 1, n)
            i += 1

    def _run_reference(self, caller, x, generator, check_finite, progress, callback) -> torch.Tensor:
        solver, call, n = self.new_solver(), caller.bind(), self.steps
        i = 0

        def call_model(state, time):
            m, _ = call(state, torch.full((caller.model_batch,), time, dtype=torch.float32, device=state.device))
            if check_finite:
                _check_finite(i, time, m, None)
            return m

        def draw_noise():
            return randn(x.shape, generator, x.device).to(x.dtype)

        for i in range(n):
            with nvtx_range("fastdiff/step"):
                x = solver.sample_step(i, x, call_model, draw_noise)
            if callback is not None:
                callback(i, x.clone())  # the same contract as the fused loop: a copy to keep or change
            if progress:
                _report(progress, i + 1, n)
        return x if self.output_scale == 1.0 else x * self.output_scale


def _check_churn(solver, s_churn, s_tmin, s_tmax, s_noise, round_timesteps) -> Churn:
    default = Churn()
    given = dict(s_churn=s_churn, s_tmin=s_tmin, s_tmax=s_tmax, s_noise=s_noise)
    for name, value in given.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
            raise ValueError(f"{name}: expected a number >= 0, got {value!r}")
        if name != "s_tmax" and math.isinf(value):
            raise ValueError(f"{name}: expected a finite number, got {value!r}")
        if solver != "heun" and value != getattr(default, name):
            raise ValueError(f"{name}: only 'heun' takes the churn options, not {solver!r}")
    if s_tmin > s_tmax:
        raise ValueError(f"s_tmin/s_tmax: expected s_tmin <= s_tmax, got {s_tmin!r} > {s_tmax!r}")
    if s_churn and round_timesteps:
        raise ValueError("s_churn: churned noise levels fall between the integer timesteps that "
                         "round_timesteps=True asks for; use one or the other")
    return Churn(**{k: float(v) for k, v in given.items()})


def _float_list(values) -> Optional[List[float]]:
    """Model times as given (checked already), JSON-ready for `options`."""
    return None if values is None else [float(v) for v in np.asarray(values, dtype=np.float64).ravel()]


def _check_mid_timesteps(mid_timesteps, grid) -> Optional[np.ndarray]:
    """kdpm2's midpoint model times: None (the schedule's), or one per step that does not end at
    sigma = 0 (the last step to sigma = 0 has no midpoint)."""
    if mid_timesteps is None:
        return None
    mids = np.asarray(mid_timesteps, dtype=np.float64)
    want = int(np.count_nonzero(grid.karras_sigma[1:] != 0))
    if mids.shape != (want,) or not np.isfinite(mids).all():
        raise ValueError(f"mid_timesteps: expected {want} finite model times (one per step with a midpoint), "
                         f"got shape {mids.shape}")
    return mids


def _unipc_options(solver, order, variant, corrector) -> dict:
    """UniPC's options with their defaults ({} for other solvers, which must not be given them)."""
    if solver != "unipc":
        for name, value in (("order", order), ("variant", variant), ("corrector", corrector)):
            if value is not None:
                raise ValueError(f"{name}: only 'unipc' takes {name}, not {solver!r}")
        return {}
    order = 2 if order is None else order
    if isinstance(order, bool) or not isinstance(order, int) or not 1 <= order <= 3:
        raise ValueError(f"order: expected 1, 2 or 3 for 'unipc', got {order!r}")
    variant = "bh2" if variant is None else variant
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant: expected 'bh1' or 'bh2', got {variant!r}{did_you_mean(variant, ('bh1', 'bh2'))}")
    corrector = True if corrector is None else corrector
    if not isinstance(corrector, bool):
        raise ValueError(f"corrector: expected True or False, got {corrector!r}")
    return dict(order=order, variant=variant, corrector=corrector)


def _check_finite(i, time, *outputs) -> None:
    if not all(bool(torch.isfinite(m).all()) for m in outputs if m is not None):
        raise FloatingPointError(f"model: returned non-finite values at step {i} (model time {time:g})")


def sample(model: Callable, noise: Optional[torch.Tensor] = None, *, shape=None, generator=None, device=None,
           guidance_scale: float = 1.0, cond=None, uncond=None, cfg: str = "batched", model_dtype=None,
           check_finite: bool = False, progress: bool = False, callback=None, dtype=torch.float32,
           cuda_graph=False, x0=None, **plan) -> torch.Tensor:
    """Sample in one call: `Sampler(**plan).sample(model, noise, ...)`. See `Sampler`."""
    return Sampler(**plan).sample(model, noise, shape=shape, generator=generator, device=device,
                                  guidance_scale=guidance_scale, cond=cond, uncond=uncond, cfg=cfg,
                                  model_dtype=model_dtype, check_finite=check_finite, progress=progress,
                                  callback=callback, dtype=dtype, cuda_graph=cuda_graph, x0=x0)


def _initial_state(noise, shape, generator, device, dtype) -> torch.Tensor:
    if shape is not None and (not isinstance(shape, (tuple, list, torch.Size)) or len(shape) == 0 or not all(
            isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in shape)):
        raise ValueError(f"shape: expected a sequence of positive integers like (batch, channels, height, width), "
                         f"got {shape!r}")
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device: expected a device like 'cpu' or 'cuda:0', got {device!r}") from e
    where = noise.device if isinstance(noise, torch.Tensor) else device or torch.device("cpu")
    if where.type == "meta":
        raise ValueError("noise: meta tensors hold no data to sample from; use a cpu or cuda device")
    if noise is None:
        if shape is None:
            raise ValueError("noise: give the initial noise tensor, or shape= to draw it")
        check_generator(generator, where, shape[0])
        return randn(tuple(shape), generator, device).to(dtype)
    if not isinstance(noise, torch.Tensor) or not noise.is_floating_point():
        raise TypeError(f"noise: expected a floating-point tensor, got {type(noise).__name__}")
    state_layout(noise)
    if shape is not None and tuple(noise.shape) != tuple(shape):
        raise ValueError(f"noise: shape {tuple(noise.shape)} does not match shape={tuple(shape)}")
    if noise.dim() < 1 or noise.shape[0] < 1:
        raise ValueError(f"noise: expected a batch dimension of size >= 1, got shape {tuple(noise.shape)}")
    if device is not None and torch.device(device) != noise.device:
        raise ValueError(f"device: {device} differs from noise.device {noise.device}")
    check_generator(generator, where, noise.shape[0])
    return noise.to(dtype, copy=True)


def _check_x0(x0, x: torch.Tensor) -> None:
    if not isinstance(x0, torch.Tensor) or not x0.is_floating_point():
        raise TypeError(f"x0: expected a floating-point tensor, got {type(x0).__name__}")
    if x0.shape != x.shape or x0.device != x.device:
        raise ValueError(f"x0: expected the noise's shape {tuple(x.shape)} on {x.device}, got {tuple(x0.shape)} on "
                         f"{x0.device}")


def _report(progress, done: int, total: int) -> None:
    """`progress` (True or a callable, see `Sampler.sample`) after `done` of `total` steps."""
    (progress if callable(progress) else _progress)(done, total)


def _progress(done: int, total: int) -> None:
    width = 30
    filled = width * done // total
    sys.stderr.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total}")
    if done == total:
        sys.stderr.write("\n")
    sys.stderr.flush()
