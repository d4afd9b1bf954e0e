"""diffusers scheduler configs as fastdiff plans (`fastdiff.Sampler.from_scheduler`).

Reads a scheduler instance's `.config` or the config dict itself (`_class_name` or the
`scheduler_class` argument names the scheduler; missing keys take diffusers' defaults, tabulated
here, so a dict needs no diffusers import; keys the scheduler's __init__ does not take are inert,
as in diffusers). The plan is an explicit grid (`fastdiff.grid.explicit_grid`) holding exactly the model
times and noise levels of the scheduler's `set_timesteps(steps)`, computed here in float64.
The EDM schedulers' plans measure the data in units of sigma_data, where their model input
x / sqrt(sigma^2 + sigma_data^2) is fastdiff's VP state (`_edm`): output type "edm", and the
result scaled back by `output_scale`.

DDIM and PNDM step from t to t - T // N (`Sampler(prev_timesteps=)`), which is not the next
model time with "trailing"/"linspace" spacing when T % N != 0: the next step starts from the
level of its own model time, as in diffusers; the last step ends at the final alpha
(set_alpha_to_one).

Where fastdiff differs from diffusers on purpose (each warned once, as a
DiffusersDifferenceWarning, when a plan contains it):

* DPMSolverMultistep and EDMDPMSolverMultistep solver_order=3 run fastdiff's dpmpp_3m, which is
  third order; diffusers' third-order update weights the second difference by half (measured
  order ~2.2, README).
* A zero-size last step (use_karras_sigmas with final_sigmas_type="sigma_min": the model runs
  at sigma_min, then steps to sigma_min) is the identity here; diffusers' third-order update
  divides by that zero step and returns NaN at >= 15 steps.
* UniPCMultistep with lower_order_final=False: its higher-order step to sigma = 0 divides by
  the zero log-SNR ratio of that step and returns inf/NaN; fastdiff's step to sigma = 0 is first
  order (as for DPM-Solver++), which is the limit of the formula.

DDIM clip_sample keeps the model's own noise estimate next to the clipped x0, as diffusers'
step does by default; `from_scheduler(..., use_clipped_model_output=True)` takes it from the
clipped x0 instead, as that step argument does.

The Euler-type schedulers (Euler, Euler ancestral, Heun, LMS, KDPM2 and KDPM2 ancestral) keep
their loop state as x0 + (sigma / alpha) noise; `Sampler.sample` returns fastdiff's
variance-preserving state, alpha x0 + sigma noise. The two are the same where the plan ends at
sigma = 0 (every checkpoint's config, and every one of these but EulerDiscrete, which alone
takes final_sigmas_type); at EulerDiscrete's sigma_min end they differ by the factor
alpha_min = 1 / sqrt(1 + sigma_min^2) (5e-5 on SD-1.5's schedule): divide by
`sampler.grid.alpha[-1]` for diffusers' numbers (`fastdiff.accelerate` does so). The EDM plans
return diffusers' loop state through `output_scale`.
"""
from __future__ import annotations

import math
import warnings
from typing import Mapping

import numpy as np

from fastdiff._names import did_you_mean
from fastdiff.schedules import FlowSchedule, VPSchedule

def _merge(*parts, **kw) -> dict:
    """Later keys win: a scheduler's own default replaces the shared one."""
    return {k: v for part in (*parts, kw) for k, v in part.items()}


_BETAS = dict(num_train_timesteps=1000, beta_start=0.0001, beta_end=0.02, beta_schedule="linear",
              trained_betas=None, prediction_type="epsilon", rescale_betas_zero_snr=False)
_SPACED = _merge(_BETAS, timestep_spacing="linspace", steps_offset=0)
_THRESHOLD = dict(thresholding=False, dynamic_thresholding_ratio=0.995, sample_max_value=1.0)
_SIGMA_KINDS = dict(use_karras_sigmas=False, use_exponential_sigmas=False, use_beta_sigmas=False)

_DPM = _merge(
    _SPACED, _THRESHOLD, _SIGMA_KINDS, solver_order=2, algorithm_type="dpmsolver++", solver_type="midpoint",
    lower_order_final=True, euler_at_final=False, use_lu_lambdas=False, use_flow_sigmas=False, flow_shift=1.0,
    final_sigmas_type="zero", lambda_min_clipped=-math.inf, variance_type=None, use_dynamic_shifting=False,
    time_shift_type="exponential")
_CONSISTENCY = _merge(_SPACED, _THRESHOLD, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                      original_inference_steps=50, clip_sample=False, clip_sample_range=1.0, set_alpha_to_one=True,
                      timestep_spacing="leading", timestep_scaling=10.0)


def _without(defaults: dict, *keys: str) -> dict:
    """`defaults` less the keys a scheduler's __init__ does not take."""
    return {k: v for k, v in defaults.items() if k not in keys}


_K_DIFFUSION = _without(_merge(_SPACED, _SIGMA_KINDS), "rescale_betas_zero_snr")  # LMS, Heun, KDPM2
_EDM = dict(sigma_min=0.002, sigma_max=80.0, sigma_data=0.5, sigma_schedule="karras", num_train_timesteps=1000,
            prediction_type="epsilon", rho=7.0, final_sigmas_type="zero")

# diffusers 0.42 defaults of every key fastdiff reads (tests/test_diffusers_schedulers.py checks them)
DEFAULTS = {
    "DDIMScheduler": _merge(_SPACED, _THRESHOLD, clip_sample=True, clip_sample_range=1.0, set_alpha_to_one=True,
                          timestep_spacing="leading"),
    "DDPMScheduler": _merge(_SPACED, _THRESHOLD, clip_sample=True, clip_sample_range=1.0, variance_type="fixed_small",
                          timestep_spacing="leading"),
    "DPMSolverMultistepScheduler": _DPM,
    "EulerDiscreteScheduler": _merge(_SPACED, _SIGMA_KINDS, interpolation_type="linear", sigma_min=None,
                                   sigma_max=None, timestep_type="discrete", final_sigmas_type="zero"),
    "EulerAncestralDiscreteScheduler": dict(_SPACED),
    "HeunDiscreteScheduler": _merge(_K_DIFFUSION, beta_start=0.00085, beta_end=0.012, clip_sample=False,
                                  clip_sample_range=1.0),
    "LMSDiscreteScheduler": _K_DIFFUSION,
    "KDPM2DiscreteScheduler": _merge(_K_DIFFUSION, beta_start=0.00085, beta_end=0.012),
    "KDPM2AncestralDiscreteScheduler": _merge(_K_DIFFUSION, beta_start=0.00085, beta_end=0.012),
    "EDMEulerScheduler": _EDM,
    "EDMDPMSolverMultistepScheduler": _merge(
        _without(_EDM, "final_sigmas_type"), _THRESHOLD, solver_order=2, algorithm_type="dpmsolver++",
        solver_type="midpoint", lower_order_final=True, euler_at_final=False, final_sigmas_type="zero"),
    "FlowMatchHeunDiscreteScheduler": dict(num_train_timesteps=1000, shift=1.0),
    "DPMSolverSinglestepScheduler": _merge(
        _without(_DPM, "timestep_spacing", "steps_offset", "rescale_betas_zero_snr", "euler_at_final",
                 "use_lu_lambdas"),
        lower_order_final=False),
    "DEISMultistepScheduler": _merge(
        _without(_DPM, "rescale_betas_zero_snr", "euler_at_final", "use_lu_lambdas", "final_sigmas_type",
                 "lambda_min_clipped", "variance_type"),
        algorithm_type="deis", solver_type="logrho"),
    "TCDScheduler": _CONSISTENCY,
    "PNDMScheduler": _without(_merge(_SPACED, skip_prk_steps=False, set_alpha_to_one=False, timestep_spacing="leading"),
                              "rescale_betas_zero_snr"),
    "LCMScheduler": _CONSISTENCY,
    "UniPCMultistepScheduler": _merge(
        _BETAS, _THRESHOLD, _SIGMA_KINDS, timestep_spacing="linspace", steps_offset=0, solver_order=2,
        predict_x0=True, solver_type="bh2", lower_order_final=True, disable_corrector=[], solver_p=None,
        use_flow_sigmas=False, flow_shift=1.0, final_sigmas_type="zero", use_dynamic_shifting=False,
        time_shift_type="exponential", sigma_min=None, sigma_max=None, shift_terminal=None),
    "FlowMatchEulerDiscreteScheduler": _merge(
        _SIGMA_KINDS, num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=False, base_shift=0.5,
        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096, invert_sigmas=False, shift_terminal=None,
        time_shift_type="exponential", stochastic_sampling=False),
}
# Schedulers a diffusers user can swap in that fastdiff does not map, and why. "Not yet": the
# update is linear in the model outputs, so it fits the fused step's rows, but its rows are not
# written yet (benchmarks/NOTES.md, the scheduler table).
_NOT_YET = "its update is linear in the model outputs and will run as rows of the fused step, not written yet"
NOT_SUPPORTED = {
    "DPMSolverSDEScheduler": "its noise comes from a Brownian tree (torchsde), which the fused step's per-step "
                             "Gaussian noise cannot reproduce; use DPMSolverMultistepScheduler with "
                             "algorithm_type='sde-dpmsolver++'",
}
_PREDICTIONS = {"epsilon": "epsilon", "v_prediction": "v", "sample": "sample"}
# Every key any scheduler's __init__ takes: a config key outside its own scheduler's __init__ but
# in this set is one diffusers carries between schedulers (SD-1.5's PNDM config holds DDIM's
# set_alpha_to_one, ...) and is inert; a key in neither is inert too, but may be a misspelling.
_KNOWN_KEYS = frozenset(k for defaults in DEFAULTS.values() for k in defaults)
# set_timesteps' own arguments beyond the step count, for the schedulers fastdiff maps them for
_SET_TIMESTEPS_ARGS = {"FlowMatchEulerDiscreteScheduler": ("mu", "sigmas", "timesteps")}


def sampler_options(scheduler, steps, scheduler_class=None, **set_timesteps_args) -> dict:
    """`fastdiff.Sampler` keyword arguments for a diffusers scheduler (instance or config dict).
    `set_timesteps_args`: the scheduler's own set_timesteps arguments (mu, sigmas, timesteps),
    None where not given."""
    name, cfg = _read(scheduler, scheduler_class)
    given = {k: v for k, v in set_timesteps_args.items() if v is not None}
    accepted = _SET_TIMESTEPS_ARGS.get(name, ())
    for key in given:
        if key not in accepted:
            raise ValueError(f"{key}: fastdiff maps {name}.set_timesteps(num_inference_steps) without {key}=; "
                             f"it takes {key}= for {sorted(k for k, v in _SET_TIMESTEPS_ARGS.items() if key in v)}")
    if steps is None:
        custom = given.get("sigmas", given.get("timesteps"))
        steps = len(custom) if custom is not None else getattr(scheduler, "num_inference_steps", None)
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"steps: expected an integer >= 1 (the scheduler's num_inference_steps), got {steps!r}")
    options = _MAPPERS[name](cfg, int(steps), **given)
    for difference in _differences(name, cfg, int(steps), options):
        if (name, difference) not in _WARNED:
            _WARNED.add((name, difference))
            warnings.warn(f"{name}: {difference}", DiffusersDifferenceWarning, stacklevel=3)
    return options


class DiffusersDifferenceWarning(UserWarning):
    """A plan from a diffusers scheduler where fastdiff differs from diffusers on purpose (the
    module doc lists each): warned once per scheduler and difference."""


_WARNED: set = set()


def _differences(name, cfg, n, options) -> list:
    """The listed deliberate differences (module doc) that this plan contains."""
    found = []
    if name in ("DPMSolverMultistepScheduler", "EDMDPMSolverMultistepScheduler") and cfg["solver_order"] == 3:
        found.append("solver_order=3 runs fastdiff's dpmpp_3m, which is third order; diffusers weights the second "
                     "difference by half (measured order ~2.2; from_scheduler(..., d2_weight=1) gives its numbers)")
    sigmas = options.get("sigmas")
    if sigmas is not None and len(sigmas) > 2 and sigmas[-1] == sigmas[-2] and not name.startswith("FlowMatch"):
        found.append("the last step has size zero (final_sigmas_type='sigma_min' on a grid that ends there): fastdiff "
                     "takes it as the identity; diffusers' higher-order updates divide by it")
    if name == "UniPCMultistepScheduler" and not cfg["lower_order_final"]:
        found.append("lower_order_final=False: fastdiff's step to sigma = 0 is first order (the limit of the formula); "
                     "diffusers' divides by that step's zero log-SNR ratio (inf/NaN)")
    return found


def _class_name(scheduler_class) -> str:
    if isinstance(scheduler_class, str):
        return scheduler_class
    if isinstance(scheduler_class, type):
        return scheduler_class.__name__
    raise TypeError(f"scheduler_class: expected a diffusers scheduler class or its name, got "
                    f"{type(scheduler_class).__name__}")


def _read(scheduler, scheduler_class=None):
    if isinstance(scheduler, Mapping):
        cfg = dict(scheduler)
        # as SomeScheduler.from_config(config): the class given wins over the config's _class_name
        name = _class_name(scheduler_class) if scheduler_class is not None else cfg.get("_class_name")
        if name is None:
            raise ValueError("scheduler: this config has no '_class_name' (pipe.scheduler.config has none); name "
                             "the scheduler: from_scheduler(config, steps, scheduler_class=EulerDiscreteScheduler)")
    else:
        cfg, name = getattr(scheduler, "config", None), type(scheduler).__name__
        if not isinstance(cfg, Mapping):
            raise TypeError(f"scheduler: expected a diffusers scheduler or its config dict, got {name}")
        if scheduler_class is not None:
            raise ValueError("scheduler_class: only for a config dict; a scheduler instance names its own class")
        cfg = dict(cfg)
    if name in NOT_SUPPORTED:
        raise ValueError(f"scheduler: {name} is not supported by fastdiff: {NOT_SUPPORTED[name]}")
    if name not in DEFAULTS:
        raise ValueError(f"scheduler: {name} is not supported; expected one of "
                         f"{sorted(DEFAULTS)}{did_you_mean(name, DEFAULTS)}")
    for key in sorted(k for k in set(cfg) - _KNOWN_KEYS if not k.startswith("_")):  # (_class_name, ...)
        hint = did_you_mean(key, DEFAULTS[name])
        if hint:
            warnings.warn(f"{key}: not a {name} option, ignored as diffusers ignores it{hint}", stacklevel=4)
    return name, {**DEFAULTS[name], **{k: v for k, v in cfg.items() if k in DEFAULTS[name]}}


def _require(cfg, name, *allowed):
    if cfg[name] not in allowed:
        raise ValueError(f"{name}: {cfg[name]!r} is not supported by fastdiff (supported: {list(allowed)})")


def _schedule(cfg) -> VPSchedule:
    """The VP schedule of the config's betas, in float64."""
    if "thresholding" in cfg:
        _require(cfg, "thresholding", False)
    T = cfg["num_train_timesteps"]
    if cfg["trained_betas"] is not None:
        sched = VPSchedule.from_betas(np.asarray(cfg["trained_betas"], dtype=np.float64), name="trained")
    else:
        _require(cfg, "beta_schedule", "linear", "scaled_linear", "squaredcos_cap_v2")
        kind = {"squaredcos_cap_v2": "cosine"}.get(cfg["beta_schedule"], cfg["beta_schedule"])
        kw = {} if kind == "cosine" else dict(beta_start=cfg["beta_start"], beta_end=cfg["beta_end"])
        sched = getattr(VPSchedule, kind)(num_train_timesteps=T, **kw)
    return sched.rescale_zero_terminal_snr() if cfg.get("rescale_betas_zero_snr") else sched


def _prediction(cfg) -> str:
    _require(cfg, "prediction_type", *_PREDICTIONS)
    return _PREDICTIONS[cfg["prediction_type"]]


def _spaced_timesteps(cfg, n: int, dpm: bool = False, rounded: bool = True) -> np.ndarray:
    """set_timesteps' spacing (DPM-Solver spaces N + 1 points for linspace/leading; the Euler
    schedulers keep linspace's fractional times)."""
    T, spacing = cfg["num_train_timesteps"], cfg["timestep_spacing"]
    _require(cfg, "timestep_spacing", "linspace", "leading", "trailing")
    if n > T:
        raise ValueError(f"steps: expected at most {T} (num_train_timesteps), got {n}")
    if spacing == "trailing":
        return np.round(np.arange(T, 0, -T / n)) - 1
    m = n + 1 if dpm else n
    if spacing == "linspace":
        times = np.linspace(0, T - 1, m)[::-1][:n]
        return np.round(times) if rounded else times
    return np.round(np.arange(m) * (T // m))[::-1][:n] + cfg["steps_offset"]


def _ve_sigmas(sched: VPSchedule) -> np.ndarray:
    """sigma/alpha of every training timestep. As diffusers' Euler and DPM-Solver schedulers do,
    a zero-SNR schedule's last alphas_cumprod counts as 2^-24 (a finite sigma of 4096)."""
    ac = sched.alphas_cumprod.copy()
    if ac[-1] == 0:
        ac[-1] = 2.0**-24
    return np.sqrt((1.0 - ac) / ac)


def _sigma_to_t(sigma, table) -> np.ndarray:
    """Model time of a noise level: linear in log sigma between training timesteps."""
    return np.interp(np.log(np.maximum(sigma, 1e-10)), np.log(table), np.arange(len(table), dtype=np.float64))


def _sigma_kind(cfg):
    kinds = [k for k in _SIGMA_KINDS if cfg.get(k)]
    if len(kinds) > 1:
        raise ValueError(f"{kinds[1]}: only one of {list(_SIGMA_KINDS)} can be set")
    return kinds[0] if kinds else None


def _converted_sigmas(kind: str, lo: float, hi: float, n: int) -> np.ndarray:
    """N noise levels from hi to lo: Karras (rho = 7), exponential, or beta(0.6, 0.6) quantiles."""
    ramp = np.linspace(0.0, 1.0, n)
    if kind == "use_karras_sigmas":
        return (hi ** (1 / 7) + ramp * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7
    if kind == "use_exponential_sigmas":
        return np.exp(np.linspace(math.log(hi), math.log(lo), n))
    try:
        from scipy.stats import beta
    except ImportError as e:
        raise ValueError("use_beta_sigmas: needs scipy (beta distribution quantiles)") from e
    return lo + beta.ppf(1.0 - ramp, 0.6, 0.6) * (hi - lo)


def _final_sigma(cfg, table, sigmas) -> float:
    """final_sigmas_type: 0, or the smallest training sigma; a Karras grid already ends there (up
    to rounding): then the last step has size zero exactly."""
    return min(table[0], sigmas[-1]) if cfg["final_sigmas_type"] == "sigma_min" else 0.0


def _prev_timesteps(cfg, times) -> np.ndarray:
    """DDIM's and PNDM's step ends: t - T // N (negative: the final alpha, the grid's end)."""
    return times - cfg["num_train_timesteps"] // len(times)


def _ddim(cfg, n):
    sched = _schedule(cfg)
    times = _spaced_timesteps(cfg, n)
    clamp = float(cfg["clip_sample_range"]) if cfg["clip_sample"] else None
    return dict(solver="ddim", schedule=sched, prediction=_prediction(cfg), timesteps=times, clamp=clamp,
                final="zero" if cfg["set_alpha_to_one"] else "min", prev_timesteps=_prev_timesteps(cfg, times))


# DDPMScheduler's variance types fastdiff does not run, and why
_DDPM_VARIANCES = {
    "fixed_large_log": "diffusers' step takes the square root of log(beta), which is negative: NaN from the first "
                       "step; use 'fixed_large'",
    **{name: "the model predicts its own variance (output channels doubled), which the fused step's single "
             "output does not carry; use 'fixed_small' or 'fixed_large'" for name in ("learned", "learned_range")},
}


def _ddpm(cfg, n):
    # (fixed_small_log is fixed_small: diffusers exponentiates half the log of the same variance)
    if cfg["variance_type"] in _DDPM_VARIANCES:
        raise ValueError(f"variance_type: {cfg['variance_type']!r} is not supported by fastdiff: "
                         f"{_DDPM_VARIANCES[cfg['variance_type']]}")
    _require(cfg, "variance_type", "fixed_small", "fixed_small_log", "fixed_large")
    sched = _schedule(cfg)
    clamp = float(cfg["clip_sample_range"]) if cfg["clip_sample"] else None
    return dict(solver="ddpm", schedule=sched, prediction=_prediction(cfg), timesteps=_spaced_timesteps(cfg, n),
                clamp=clamp, variance="large" if cfg["variance_type"] == "fixed_large" else "small")


def _pndm(cfg, n):
    _require(cfg, "prediction_type", "epsilon", "v_prediction")
    if not cfg["skip_prk_steps"] and n < 4:
        raise ValueError(f"steps: PNDMScheduler with skip_prk_steps=False runs its Runge-Kutta steps over the last "
                         f"4 timesteps' range; diffusers stops short of the end below 4 steps, got {n}")
    times = _spaced_timesteps(cfg, n)
    return dict(solver="pndm" if cfg["skip_prk_steps"] else "pndm_prk", schedule=_schedule(cfg),
                prediction=_prediction(cfg), timesteps=times, final="zero" if cfg["set_alpha_to_one"] else "min",
                prev_timesteps=_prev_timesteps(cfg, times))


def _multistep_grid(cfg, n, round_all_karras: bool = False):
    """The schedule, model times and N + 1 VE sigmas of DPMSolverMultistep's and UniPC's
    set_timesteps (the same construction in both, but for Karras times with cosine betas:
    UniPC rounds them too, `round_all_karras`)."""
    _require(cfg, "final_sigmas_type", "zero", "sigma_min")
    sched = _schedule(cfg)
    table = _ve_sigmas(sched)
    kind = _sigma_kind(cfg)
    if kind is None:
        times = _spaced_timesteps(cfg, n, dpm=True)
        sigmas = np.interp(times, np.arange(len(table), dtype=np.float64), table)
    else:
        sigmas = _converted_sigmas(kind, table[0], table[-1], n)
        times = _sigma_to_t(sigmas, table)
        if kind == "use_karras_sigmas" and (round_all_karras or cfg["beta_schedule"] != "squaredcos_cap_v2"):
            times = np.round(times)
    times = np.trunc(times)  # diffusers' int64 timesteps
    return sched, times, np.append(sigmas, _final_sigma(cfg, table, sigmas))


def _require_dpm_solver(cfg, *algorithms):
    """The options DPM-Solver's multistep and single-step schedulers share, at what fastdiff runs."""
    _require(cfg, "algorithm_type", *algorithms)
    _require(cfg, "solver_type", "midpoint")
    for name in ("use_flow_sigmas", "use_dynamic_shifting"):
        _require(cfg, name, False)
    _require(cfg, "variance_type", None)
    _require(cfg, "lambda_min_clipped", -math.inf)


def _dpm(cfg, n):
    _require_dpm_solver(cfg, "dpmsolver++", "sde-dpmsolver++")
    _require(cfg, "use_lu_lambdas", False)
    sched, times, sigmas = _multistep_grid(cfg, n)
    return dict(_dpm_multistep(cfg, n), schedule=sched, prediction=_prediction(cfg), sigmas=sigmas, timesteps=times)


def _dpm_multistep(cfg, n) -> dict:
    """The solver and lower_order_final of DPMSolverMultistep's (and EDMDPMSolverMultistep's) step."""
    _require(cfg, "solver_order", 1, 2, 3)
    sde = cfg["algorithm_type"] == "sde-dpmsolver++"
    if sde and cfg["solver_order"] != 2:
        raise ValueError(f"solver_order: sde-dpmsolver++ is supported with solver_order 2, got {cfg['solver_order']}")
    # diffusers' lower_order_final acts below 15 steps only (last step first order, the one
    # before at most second); euler_at_final makes the last step first order at any count
    if cfg["lower_order_final"] and n < 15:
        lof = True
    else:
        lof = "last" if cfg["euler_at_final"] else False
    return dict(solver="dpmpp_2m_sde" if sde else f"dpmpp_{cfg['solver_order']}m", lower_order_final=lof)


def _dpm_singlestep(cfg, n):
    _require_dpm_solver(cfg, "dpmsolver++")
    _require(cfg, "solver_order", 1, 2, 3)
    # its fixed spacing: linspace over N + 1 points; Karras times rounded
    sched, times, sigmas = _multistep_grid({**cfg, "timestep_spacing": "linspace", "steps_offset": 0}, n,
                                           round_all_karras=True)
    order = int(cfg["solver_order"])
    return dict(solver=f"dpmpp_{order}s" if order > 1 else "dpmpp_1m", schedule=sched,
                prediction=_prediction(cfg), sigmas=sigmas, timesteps=times,
                lower_order_final=bool(cfg["lower_order_final"]))


def _deis(cfg, n):
    _require(cfg, "algorithm_type", "deis")
    _require(cfg, "solver_type", "logrho")
    for name in ("use_flow_sigmas", "use_dynamic_shifting"):
        _require(cfg, name, False)
    _require(cfg, "solver_order", 1, 2, 3)
    # its grid is DPMSolverMultistep's ending at sigma_min (Karras times rounded)
    sched, times, sigmas = _multistep_grid({**cfg, "final_sigmas_type": "sigma_min"}, n, round_all_karras=True)
    order = int(cfg["solver_order"])
    return dict(solver="dpmpp_1m" if order == 1 else f"deis_{order}m", schedule=sched, prediction=_prediction(cfg),
                sigmas=sigmas, timesteps=times, lower_order_final=bool(cfg["lower_order_final"]) and n < 15)


def _unipc(cfg, n):
    _require(cfg, "predict_x0", True)
    _require(cfg, "solver_order", 1, 2, 3)
    _require(cfg, "solver_p", None)
    for name in ("use_flow_sigmas", "use_dynamic_shifting"):
        _require(cfg, name, False)
    for name in ("sigma_min", "sigma_max", "shift_terminal"):
        _require(cfg, name, None)
    if list(cfg["disable_corrector"]):
        raise ValueError(f"disable_corrector: per-step corrector switches are not supported by fastdiff (got "
                         f"{list(cfg['disable_corrector'])}); corrector=False turns it off everywhere")
    sched, times, sigmas = _multistep_grid(cfg, n, round_all_karras=True)
    # UniPC's lower_order_final acts at every step count (unlike DPMSolverMultistep's)
    return dict(solver="unipc", schedule=sched, prediction=_prediction(cfg), sigmas=sigmas, timesteps=times,
                order=int(cfg["solver_order"]), variant=cfg["solver_type"],
                lower_order_final=bool(cfg["lower_order_final"]))


def _euler(cfg, n, solver="euler"):
    """EulerDiscrete, EulerAncestralDiscrete, HeunDiscrete and LMSDiscrete: one grid construction
    (the ancestral one has no sigma kinds or final sigma options, Heun and LMS no interpolation
    options)."""
    for key, allowed in (("interpolation_type", ("linear",)), ("timestep_type", ("discrete",)),
                         ("final_sigmas_type", ("zero", "sigma_min"))):
        if key in cfg:
            _require(cfg, key, *allowed)
    sched = _schedule(cfg)
    table = _ve_sigmas(sched)
    times = _spaced_timesteps(cfg, n, rounded=False)
    sigmas = np.interp(times, np.arange(len(table), dtype=np.float64), table)
    kind = _sigma_kind(cfg)
    if kind is not None:
        lo = sigmas[-1] if cfg.get("sigma_min") is None else float(cfg["sigma_min"])
        hi = sigmas[0] if cfg.get("sigma_max") is None else float(cfg["sigma_max"])
        sigmas = _converted_sigmas(kind, lo, hi, n)
        times = _sigma_to_t(sigmas, table)
    final = _final_sigma(cfg, table, sigmas) if "final_sigmas_type" in cfg else 0.0
    # pipelines start from noise * init_noise_sigma: sigma_max ("linspace", "trailing") or
    # sqrt(1 + sigma_max^2), in VE coordinates; fastdiff's VP state is that / sqrt(1 + sigma_max^2)
    s0 = float(np.max(sigmas))
    init = s0 if cfg["timestep_spacing"] in ("linspace", "trailing") else math.sqrt(1.0 + s0 * s0)
    options = dict(solver=solver, schedule=sched, prediction=_prediction(cfg), sigmas=np.append(sigmas, final),
                   timesteps=times.astype(np.float32), noise_scale=init / math.sqrt(1.0 + s0 * s0))
    if cfg.get("clip_sample"):  # Heun's: the derivative follows the clipped x0, as fastdiff's clamp does
        options["clamp"] = float(cfg["clip_sample_range"])
    return options


def _kdpm2(cfg, n, solver="kdpm2"):
    """KDPM2Discrete and KDPM2AncestralDiscrete (the same grid; the ancestral step goes to
    sigma_down, its midpoints between s and sigma_down)."""
    _require(cfg, "prediction_type", "epsilon", "v_prediction")
    options = _euler(cfg, n, solver)
    if cfg["use_karras_sigmas"]:
        options["timesteps"] = np.round(options["timesteps"])
    options["mid_timesteps"] = _kdpm2_mid_times(cfg, n, ancestral=solver == "kdpm2_ancestral")
    return options


def _kdpm2_mid_times(cfg, n, ancestral: bool = False) -> np.ndarray:
    """KDPM2's midpoint model times as diffusers computes them: its grid from its float32 sigma
    table, the midpoints exp of the mean of float32 logs (of s and s', or for the ancestral form
    of s and its float32 sigma_down), the linear-in-log-sigma interpolation weight in float32
    (within a float32 ulp or two of diffusers', whose mixed numpy/torch types round a few
    differently)."""
    import torch

    T = cfg["num_train_timesteps"]
    if cfg["trained_betas"] is not None:
        betas = torch.tensor(cfg["trained_betas"], dtype=torch.float32)
    elif cfg["beta_schedule"] == "scaled_linear":
        betas = torch.linspace(cfg["beta_start"] ** 0.5, cfg["beta_end"] ** 0.5, T, dtype=torch.float32) ** 2
    elif cfg["beta_schedule"] == "linear":
        betas = torch.linspace(cfg["beta_start"], cfg["beta_end"], T, dtype=torch.float32)
    else:  # squaredcos_cap_v2: diffusers' float64 betas, stored in float32
        ac64 = _schedule(cfg).alphas_cumprod
        betas = torch.tensor(1.0 - ac64 / np.append(1.0, ac64[:-1]), dtype=torch.float32)
    ac = torch.cumprod(1.0 - betas, 0)
    sigma_table = (((1 - ac) / ac) ** 0.5).numpy()
    table = np.log(sigma_table)
    sigmas = np.interp(_spaced_timesteps(cfg, n, rounded=False), np.arange(T, dtype=np.float64), sigma_table)
    kind = _sigma_kind(cfg)
    if kind is not None:
        sigmas = _converted_sigmas(kind, sigmas[-1], sigmas[0], n)
    s = torch.tensor(np.append(sigmas, 0.0).astype(np.float32))
    if ancestral:
        after = s.roll(-1)
        up = (after**2 * (s**2 - after**2) / s**2) ** 0.5  # eta = 1
        down = (after**2 - up**2) ** 0.5
        mids = s.log().lerp(down.log(), 0.5).exp().numpy()[:n - 1]
    else:
        mids = s.log().lerp(s.roll(1).log(), 0.5).exp().numpy()[1:n]  # the last step, to 0, has none
    times = []
    for v in np.log(np.maximum(mids, np.float32(1e-10))):
        low = min(int(np.cumsum(v - table >= 0).argmax()), len(table) - 2)
        w = np.clip((table[low] - v) / (table[low] - table[low + 1]), 0, 1)
        times.append(float((1 - w) * low + w * (low + 1)))
    return np.asarray(times, dtype=np.float32).astype(np.float64)


def _lcm(cfg, n):
    if cfg["clip_sample"]:
        raise ValueError("clip_sample: LCM clips x0 before its boundary mix; fastdiff's clamp acts after it "
                         "(not supported with LCM)")
    return dict(solver="consistency", schedule=_schedule(cfg), prediction=_prediction(cfg),
                timesteps=_consistency_times(cfg, n, "LCM"), boundary_scaling=float(cfg["timestep_scaling"]))


def _consistency_times(cfg, n, name) -> np.ndarray:
    """LCM's and TCD's model times: N of the original_inference_steps training times, evenly
    indexed from the top."""
    T, orig = cfg["num_train_timesteps"], cfg["original_inference_steps"]
    if not 1 <= n <= orig <= T:
        raise ValueError(f"steps: {name} takes 1 <= steps <= original_inference_steps ({orig}) <= {T}, got {n}")
    origin = (np.arange(1, orig + 1) * (T // orig) - 1)[::-1]
    return origin[np.floor(np.linspace(0, orig, n, endpoint=False)).astype(np.int64)].astype(np.float64)


def _tcd(cfg, n):
    if cfg["clip_sample"]:
        raise ValueError("clip_sample: TCD clips x0 before its noise estimate is taken; not supported by fastdiff")
    # (the last step ends at training time 0's noise level, as TCDScheduler's does)
    return dict(solver="tcd", schedule=_schedule(cfg), prediction=_prediction(cfg),
                timesteps=_consistency_times(cfg, n, "TCD"), final="min")


def _flow(cfg, n, mu=None, sigmas=None, timesteps=None):
    for name in ("invert_sigmas", *_SIGMA_KINDS):
        _require(cfg, name, False)
    _require(cfg, "shift_terminal", None)
    _require(cfg, "time_shift_type", "exponential", "linear")
    T = cfg["num_train_timesteps"]
    if cfg["use_dynamic_shifting"]:
        if mu is None:
            raise ValueError("mu: use_dynamic_shifting=True shifts by the image size: pass mu= (as the pipeline "
                             "computes it from the image's sequence length) to from_scheduler")
        # time_shift(mu, 1, s) is the static shift with shift = e^mu ("exponential") or mu ("linear")
        shift = math.exp(mu) if cfg["time_shift_type"] == "exponential" else float(mu)
        lo = 1.0 / T  # the unshifted smallest training time
    else:  # (a mu given here is ignored, as set_timesteps ignores it: FluxPipeline always passes one)
        shift = float(cfg["shift"])
    sched = FlowSchedule(shift=shift, num_train_timesteps=T)
    if not cfg["use_dynamic_shifting"]:
        # diffusers' sigma_min: the smallest training time shifted (in float32) ...
        s = np.float32(1.0) / np.float32(T)
        lo = float(np.float32(shift) * s / (np.float32(1.0) + np.float32(shift - 1.0) * s))
    for key, custom in (("sigmas", sigmas), ("timesteps", timesteps)):
        if custom is not None and len(custom) != n:
            raise ValueError(f"{key}: {len(custom)} values for {n} steps")
    if sigmas is not None:
        base = np.asarray(sigmas, dtype=np.float32).astype(np.float64)
    elif timesteps is not None:
        base = np.asarray(timesteps, dtype=np.float32).astype(np.float64) / T
    else:
        base = np.linspace(float(T), lo * T, n) / T  # ... shifted once more with the grid
    t = sched.apply_shift(base).astype(np.float32)  # diffusers keeps float32 sigmas, times = sigma * T
    times = np.asarray(timesteps, dtype=np.float32) if timesteps is not None else t * np.float32(T)
    t = t.astype(np.float64)
    return dict(solver="flow_sde" if cfg["stochastic_sampling"] else "flow_euler", schedule=sched,
                prediction="flow", sigmas=np.append(t, 0.0), timesteps=times)


def _edm(cfg, n, multistep: bool = False):
    """EDMEuler and EDMDPMSolverMultistep. The model sees x_in = x / sqrt(s^2 + sigma_data^2) at
    time log(s) / 4 and D = c_skip x + c_out F (Karras et al. 2022): with the data measured in units
    of sigma_data, x_in is a VP state (alpha = sigma_data / sqrt(s^2 + sigma_data^2), sigma/alpha
    = s / sigma_data) and D / sigma_data = alpha x_in +- sigma F, fastdiff's "edm" output
    (epsilon) or its "v" (v_prediction). So fastdiff runs that state: no extra pass per model
    call; it starts from diffusers' noise * init_noise_sigma (noise_scale) and is scaled back to
    the data's units by the last row (output_scale)."""
    _require(cfg, "prediction_type", "epsilon", "v_prediction")
    _require(cfg, "sigma_schedule", "karras", "exponential")
    _require(cfg, "final_sigmas_type", "zero", "sigma_min")
    import torch

    lo, hi, sd = float(cfg["sigma_min"]), float(cfg["sigma_max"]), float(cfg["sigma_data"])
    if not 0 < sd < math.inf:
        raise ValueError(f"sigma_data: expected a finite number > 0, got {sd}")
    if not 0 < lo < hi < math.inf:
        raise ValueError(f"sigma_max: expected finite levels 0 < sigma_min < sigma_max, got sigma_min={lo}, "
                         f"sigma_max={hi}")

    def levels(ramp):  # diffusers' _compute_karras_sigmas / _compute_exponential_sigmas
        if cfg["sigma_schedule"] == "exponential":
            return torch.linspace(math.log(lo), math.log(hi), len(ramp)).exp().flip(0)
        return (hi ** (1 / cfg["rho"]) + ramp * (lo ** (1 / cfg["rho"]) - hi ** (1 / cfg["rho"]))) ** cfg["rho"]

    sigmas = levels(torch.linspace(0, 1, n, dtype=torch.float32 if multistep else torch.float64)).to(torch.float32)
    times = (0.25 * sigmas.log()).numpy().astype(np.float64)
    sigmas = sigmas.numpy().astype(np.float64)
    last = 0.0
    if cfg["final_sigmas_type"] == "sigma_min":
        # (an ulp above the last level in float32: diffusers' tiny step up there is the identity here)
        last = min(float(np.float32(lo)), sigmas[-1]) if multistep else sigmas[-1]
    # a VP schedule over the scheduler's own training levels (it only places tau: the grid is explicit)
    table = levels(torch.linspace(0, 1, cfg["num_train_timesteps"], dtype=torch.float64)).numpy()[::-1] / sd
    options = dict(schedule=VPSchedule(1.0 / (1.0 + table**2), name="edm"), sigmas=np.append(sigmas, last) / sd,
                   timesteps=times, prediction="edm" if cfg["prediction_type"] == "epsilon" else "v",
                   noise_scale=math.sqrt(hi * hi + 1.0) / math.sqrt(sigmas[0] ** 2 + sd * sd),
                   output_scale=math.sqrt(last * last + sd * sd))
    if not multistep:
        return dict(options, solver="euler")
    _require(cfg, "thresholding", False)
    _require(cfg, "algorithm_type", "dpmsolver++", "sde-dpmsolver++")
    _require(cfg, "solver_type", "midpoint")
    return dict(options, **_dpm_multistep(cfg, n))


_MAPPERS = {
    "DDIMScheduler": _ddim, "DDPMScheduler": _ddpm, "DPMSolverMultistepScheduler": _dpm,
    "EulerDiscreteScheduler": _euler, "EulerAncestralDiscreteScheduler": lambda c, n: _euler(c, n, "euler_ancestral"),
    "HeunDiscreteScheduler": lambda c, n: _euler(c, n, "heun"),
    "LMSDiscreteScheduler": lambda c, n: _euler(c, n, "lms"), "KDPM2DiscreteScheduler": _kdpm2, "TCDScheduler": _tcd,
    "KDPM2AncestralDiscreteScheduler": lambda c, n: _kdpm2(c, n, "kdpm2_ancestral"),
    "EDMEulerScheduler": _edm, "EDMDPMSolverMultistepScheduler": lambda c, n: _edm(c, n, multistep=True),
    "LCMScheduler": _lcm, "FlowMatchEulerDiscreteScheduler": _flow, "UniPCMultistepScheduler": _unipc,
    "PNDMScheduler": _pndm, "DPMSolverSinglestepScheduler": _dpm_singlestep, "DEISMultistepScheduler": _deis,
    # FlowMatchHeun's grid is FlowMatchEuler's with its options at their defaults
    "FlowMatchHeunDiscreteScheduler": lambda c, n: dict(
        _flow({**DEFAULTS["FlowMatchEulerDiscreteScheduler"], **c}, n), solver="flow_heun"),
}
