"""Sampler.from_scheduler: diffusers scheduler configs as fastdiff plans (fastdiff.integrations.diffusers.schedulers.py).

Grids: the model times and noise levels equal those of diffusers' set_timesteps (diffusers computes
its tables in float32, fastdiff in float64: levels agree to 5e-5 in alpha and sigma, integer model
times exactly). Sampling: on the analytic Gaussian-mixture model, fastdiff's reference and fused
(cpu) loops equal diffusers' own scheduler.step loop to float32 tolerance."""
import inspect

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.integrations.diffusers.schedulers import DEFAULTS
from fastdiff.testing import GaussianMixture

from conftest import require

diffusers = require("diffusers", "diffusers")

SL = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
# (scheduler, config, steps)
CASES = [
    ("DDIMScheduler", dict(clip_sample=False), 10),
    ("DDIMScheduler", dict(clip_sample=False, steps_offset=1, set_alpha_to_one=False, **SL), 5),
    ("DDIMScheduler", dict(clip_sample=False, timestep_spacing="trailing", prediction_type="v_prediction",
                           rescale_betas_zero_snr=True), 4),
    ("DDPMScheduler", dict(clip_sample=False), 5),
    ("DDPMScheduler", dict(timestep_spacing="trailing", variance_type="fixed_small_log"), 4),
    ("DDPMScheduler", dict(variance_type="fixed_large", clip_sample_range=1.5, beta_schedule="squaredcos_cap_v2"), 4),
    # a last timestep > 0: diffusers adds noise on the last step, sqrt(beta) with fixed_large
    ("DDPMScheduler", dict(variance_type="fixed_large", timestep_spacing="trailing", clip_sample=False), 4),
    ("DDPMScheduler", dict(variance_type="fixed_large", steps_offset=1, prediction_type="v_prediction", **SL), 5),
    ("DPMSolverMultistepScheduler", dict(), 7),
    ("DPMSolverMultistepScheduler", dict(solver_order=1, timestep_spacing="leading", steps_offset=1, **SL), 6),
    ("DPMSolverMultistepScheduler", dict(timestep_spacing="trailing", prediction_type="v_prediction",
                                         rescale_betas_zero_snr=True), 6),
    ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True, **SL), 8),
    ("DPMSolverMultistepScheduler", dict(use_karras_sigmas=True, final_sigmas_type="sigma_min"), 6),
    ("DPMSolverMultistepScheduler", dict(use_exponential_sigmas=True, prediction_type="sample"), 6),
    ("DPMSolverMultistepScheduler", dict(use_beta_sigmas=True), 5),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++", use_karras_sigmas=True), 6),
    ("DPMSolverMultistepScheduler", dict(final_sigmas_type="sigma_min", euler_at_final=True,
                                         timestep_spacing="trailing"), 16),
    ("DPMSolverMultistepScheduler", dict(lower_order_final=False, timestep_spacing="trailing"), 5),
    ("EulerDiscreteScheduler", dict(**SL), 6),
    ("EulerDiscreteScheduler", dict(timestep_spacing="trailing", prediction_type="v_prediction"), 5),
    ("EulerDiscreteScheduler", dict(use_karras_sigmas=True, sigma_max=10.0), 6),
    ("EulerAncestralDiscreteScheduler", dict(timestep_spacing="leading", steps_offset=1, **SL), 5),
    ("EulerAncestralDiscreteScheduler", dict(timestep_spacing="trailing"), 4),
    ("LCMScheduler", dict(), 4),
    ("LCMScheduler", dict(original_inference_steps=20), 3),
    ("UniPCMultistepScheduler", dict(), 7),
    ("UniPCMultistepScheduler", dict(solver_order=3, use_karras_sigmas=True, **SL), 8),
    ("UniPCMultistepScheduler", dict(solver_type="bh1", timestep_spacing="trailing", prediction_type="v_prediction",
                                     final_sigmas_type="sigma_min"), 6),
    ("UniPCMultistepScheduler", dict(solver_order=1, timestep_spacing="leading", steps_offset=1), 5),
    ("DEISMultistepScheduler", dict(solver_order=3, **SL), 8),
    ("DEISMultistepScheduler", dict(solver_order=3, use_karras_sigmas=True, prediction_type="v_prediction"), 16),
    ("DPMSolverSinglestepScheduler", dict(lower_order_final=True), 6),
    ("DPMSolverSinglestepScheduler", dict(use_karras_sigmas=True, prediction_type="sample"), 7),
    ("DPMSolverSinglestepScheduler", dict(solver_order=3), 7),
    ("DPMSolverSinglestepScheduler", dict(solver_order=3, lower_order_final=False, final_sigmas_type="sigma_min",
                                          use_karras_sigmas=True, prediction_type="v_prediction", **SL), 9),
    ("LMSDiscreteScheduler", dict(use_karras_sigmas=True, **SL), 7),
    ("HeunDiscreteScheduler", dict(timestep_spacing="trailing", prediction_type="v_prediction"), 5),
    ("KDPM2DiscreteScheduler", dict(use_karras_sigmas=True, **SL), 6),
    # (not squaredcos_cap_v2: its first sigma/alpha is 2e4, where both fp32 loops lose 1e-1)
    ("KDPM2DiscreteScheduler", dict(prediction_type="v_prediction", timestep_spacing="trailing", **SL), 5),
    ("PNDMScheduler", dict(skip_prk_steps=True, steps_offset=1, prediction_type="v_prediction", **SL), 6),
    # T % N != 0 with trailing / linspace spacing: DDIM and PNDM step to t - T // N, not the next time
    ("DDIMScheduler", dict(clip_sample=False, timestep_spacing="trailing", set_alpha_to_one=False), 3),
    ("DDIMScheduler", dict(clip_sample=False, timestep_spacing="linspace", prediction_type="v_prediction"), 7),
    ("PNDMScheduler", dict(skip_prk_steps=True, timestep_spacing="linspace", set_alpha_to_one=True), 7),
    # skip_prk_steps=False: 3 Runge-Kutta steps of 4 model calls, then PLMS
    ("PNDMScheduler", dict(), 6),
    ("PNDMScheduler", dict(timestep_spacing="trailing", prediction_type="v_prediction", **SL), 7),
    ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0), 5),
    ("KDPM2AncestralDiscreteScheduler", dict(use_karras_sigmas=True, **SL), 6),
    ("KDPM2AncestralDiscreteScheduler", dict(prediction_type="v_prediction", timestep_spacing="trailing", **SL), 5),
    ("KDPM2AncestralDiscreteScheduler", dict(timestep_spacing="leading", steps_offset=1), 4),
    ("EDMEulerScheduler", dict(), 6),
    ("EDMEulerScheduler", dict(prediction_type="v_prediction", sigma_data=1.0, final_sigmas_type="sigma_min"), 5),
    ("EDMEulerScheduler", dict(sigma_schedule="exponential", sigma_max=20.0, rho=5.0), 4),
    ("EDMDPMSolverMultistepScheduler", dict(), 7),
    ("EDMDPMSolverMultistepScheduler", dict(solver_order=1, sigma_schedule="exponential",
                                            final_sigmas_type="sigma_min"), 5),
    ("EDMDPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++", prediction_type="v_prediction"), 6),
    ("EDMDPMSolverMultistepScheduler", dict(euler_at_final=True, final_sigmas_type="sigma_min", sigma_data=0.8), 16),
    ("FlowMatchEulerDiscreteScheduler", dict(stochastic_sampling=True), 4),
]
IDS = [f"{n.replace('Scheduler', '')}-{i}" for i, (n, _, _) in enumerate(CASES)]
# diffusers casts these continuous model times to integers by truncation: a time its float32
# arithmetic puts just below an integer lands one lower than fastdiff's float64 value
TRUNCATED = ("use_exponential_sigmas", "use_beta_sigmas")


def _scheduler(name, cfg):
    return getattr(diffusers, name)(**cfg)


def ideal_model(gm, sampler, sch):
    """The Gaussian mixture's exact model output for the plan (also tests/test_diffusers_configs.py).
    An EDM scheduler's model takes time log(sigma) / 4 (sigma in the data's units) and fastdiff's
    plan measures the data in units of sigma_data: its level sigma/alpha is sigma / sigma_data."""
    if not type(sch).__name__.startswith("EDM"):
        return gm.model(sampler.schedule, prediction=sampler.prediction)

    def model(x, t):
        s = (4.0 * t.double()).exp() / sch.config.sigma_data
        alpha = 1.0 / (1.0 + s * s).sqrt()
        return gm.prediction(x, alpha, s * alpha, sampler.prediction).float()
    return model


def test_tabulated_defaults_are_diffusers_defaults():
    for name, defaults in DEFAULTS.items():
        params = inspect.signature(getattr(diffusers, name).__init__).parameters
        assert {k: p.default for k, p in params.items() if k != "self"} == defaults, name


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_grid_equals_set_timesteps(case):
    name, cfg, n = case
    sch = _scheduler(name, cfg)
    sch.set_timesteps(n)
    for source in (sch, dict(sch.config, _class_name=name)):  # instance and plain config dict
        sampler = fastdiff.Sampler.from_scheduler(source, n)
        g = sampler.grid
        times = sch.timesteps.double().numpy()
        if name in ("HeunDiscreteScheduler", "PNDMScheduler", "KDPM2DiscreteScheduler",
                    "KDPM2AncestralDiscreteScheduler"):  # one time per model call
            np.testing.assert_allclose(sampler.table.model_time, times, atol=1e-2)
            continue
        if name in ("EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "FlowMatchEulerDiscreteScheduler",
                    "LMSDiscreteScheduler"):
            np.testing.assert_allclose(g.model_time, times, atol=1e-2)  # continuous times from float32 tables
        elif any(cfg.get(k) for k in TRUNCATED):
            assert np.abs(g.model_time - times).max() <= 1
        else:
            np.testing.assert_array_equal(g.model_time, times)
        if hasattr(sch, "sigmas") and name not in ("DDIMScheduler", "DDPMScheduler"):
            ref = sch.sigmas.double().numpy()
            if name.startswith("FlowMatch"):
                alpha, sigma = 1 - ref, ref
            elif name.startswith("EDM"):  # fastdiff's levels are in units of sigma_data
                alpha = 1 / np.sqrt(1 + (ref / sch.config.sigma_data) ** 2)
                sigma = np.sqrt(1 - alpha**2)
            else:
                alpha = 1 / np.sqrt(1 + ref**2)
                sigma = ref * alpha
        else:  # DDIM, DDPM, LCM: alphas_cumprod at the timesteps, then the end point
            ac = sch.alphas_cumprod.double().numpy()
            end = sch.final_alpha_cumprod.item() if hasattr(sch, "final_alpha_cumprod") else 1.0
            if name == "LCMScheduler":
                end = 1.0  # its last step returns the clean estimate
            alpha = np.sqrt(np.append(ac[sch.timesteps.numpy()], end))
            sigma = np.sqrt(1 - alpha**2)
        np.testing.assert_allclose(g.alpha, alpha, atol=5e-5)
        np.testing.assert_allclose(g.sigma, sigma, atol=5e-5)


def _diffusers_loop(sch, model, noise, n, step_kw, seed, **set_timesteps_args):
    """diffusers' own loop, as its pipelines run it (also tests/test_diffusers_configs.py)."""
    sch.set_timesteps(n, **set_timesteps_args)
    gen = torch.Generator().manual_seed(seed)
    x = noise * getattr(sch, "init_noise_sigma", 1.0)  # as diffusers' pipelines start
    for t in sch.timesteps:
        xin = sch.scale_model_input(x, t) if hasattr(type(sch), "scale_model_input") else x
        m = model(xin, t.float().expand(x.shape[0]))
        if "generator" in inspect.signature(sch.step).parameters:  # (UniPC's step is deterministic and takes none)
            step_kw = dict(step_kw, generator=gen)
        x = sch.step(m, t, x, **step_kw).prev_sample
    return x


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_sampling_equals_the_diffusers_loop(case, backend):
    name, cfg, n = case
    sch = _scheduler(name, cfg)
    sampler = fastdiff.Sampler.from_scheduler(sch, n, backend=backend)
    gm = GaussianMixture.random(shape=(2, 3, 3), seed=1)
    model = ideal_model(gm, sampler, sch)
    noise = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    step_kw = dict(use_clipped_model_output=True) if name == "DDIMScheduler" else {}
    ours = sampler.sample(model, noise, generator=torch.Generator().manual_seed(5))
    theirs = _diffusers_loop(sch, model, noise, n, step_kw, seed=5)
    torch.testing.assert_close(ours, theirs, rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("backend", ["reference", "cpu"])
@pytest.mark.parametrize("eta", [0.0, 0.6])
@pytest.mark.parametrize("clipped", [False, True])
def test_ddim_clip_sample_equals_the_diffusers_loop(backend, eta, clipped):
    """clip_sample with either noise estimate: the model's own (diffusers' default) or the
    clipped x0's (use_clipped_model_output=True). The range is small enough that the clip acts
    (the two diffusers results differ), so a plan that took the wrong one fails."""
    sch = _scheduler("DDIMScheduler", dict(clip_sample=True, clip_sample_range=0.3))
    sampler = fastdiff.Sampler.from_scheduler(sch, 6, backend=backend, eta=eta, use_clipped_model_output=clipped)
    gm = GaussianMixture.random(shape=(2, 3, 3), seed=1)
    model = ideal_model(gm, sampler, sch)
    noise = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    ours = sampler.sample(model, noise, generator=torch.Generator().manual_seed(5))
    theirs, other = (_diffusers_loop(sch, model, noise, 6, dict(eta=eta, use_clipped_model_output=u), seed=5)
                     for u in (clipped, not clipped))
    assert not torch.allclose(theirs, other, atol=1e-2)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def _gm_case(cfg, n, name="DPMSolverMultistepScheduler"):
    sch = _scheduler(name, cfg)
    sampler = fastdiff.Sampler.from_scheduler(sch, n, backend="reference")
    gm = GaussianMixture.random(shape=(2, 3, 3), seed=1)
    noise = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    return sch, sampler, gm, gm.model(sampler.schedule, prediction=sampler.prediction), noise


def test_third_order_is_fastdiffs_and_closer_to_the_exact_solution_than_diffusers():
    """solver_order=3 maps to dpmpp_3m, whose D2 weight makes it third order (README); diffusers'
    update differs from it and is further from the exact probability-flow ODE solution."""
    sch, sampler, gm, model, noise = _gm_case(dict(solver_order=3, timestep_spacing="trailing"), 12)
    assert sampler.solver == "dpmpp_3m" and sampler.options["lower_order_final"] is True
    ours = sampler.sample(model, noise.double(), dtype=torch.float64)
    theirs = _diffusers_loop(sch, model, noise, 12, {}, seed=0).double()
    g = sampler.grid
    exact = gm.ode_solution(noise.double(), g.alpha[0], g.sigma[0], 1.0, 0.0, step=2e-2)
    assert not torch.allclose(ours, theirs, atol=1e-5)
    assert (ours - exact).norm() < (theirs - exact).norm()


@pytest.mark.parametrize("name, cfg, n", [
    ("DPMSolverMultistepScheduler", dict(solver_order=3, timestep_spacing="trailing"), 12),
    ("DPMSolverMultistepScheduler", dict(solver_order=3, use_karras_sigmas=True, **SL), 10),
    ("EDMDPMSolverMultistepScheduler", dict(solver_order=3), 10),
    ("EDMDPMSolverMultistepScheduler", dict(solver_order=3, prediction_type="v_prediction", lower_order_final=False),
     25)])
def test_third_order_with_d2_weight_1_is_diffusers_own(name, cfg, n):
    """d2_weight=1 (the common form) gives diffusers' third-order numbers, for a user chasing a
    regression (the deliberate difference's warning names the option)."""
    sch = _scheduler(name, cfg)
    sampler = fastdiff.Sampler.from_scheduler(sch, n, d2_weight=1, backend="cpu")
    assert sampler.solver == "dpmpp_3m"
    gm = GaussianMixture.random(shape=(2, 3, 3), seed=1)
    model = ideal_model(gm, sampler, sch)
    noise = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(sampler.sample(model, noise), _diffusers_loop(sch, model, noise, n, {}, seed=0),
                               rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("final_sigmas_type", ["zero", "sigma_min"])
def test_diffusers_karras_grid_is_fastdiffs_karras_levels_of_one_step_fewer_then_the_end(final_sigmas_type):
    """diffusers' N-step Karras grid calls the model at N levels down to sigma_min inclusive: exactly
    the levels of fastdiff's `karras` spacing with N - 1 steps and final='min' (the documented
    difference from fastdiff's own N-step grid, whose last model level is above sigma_min)."""
    n = 8
    sch = diffusers.DPMSolverMultistepScheduler(use_karras_sigmas=True, final_sigmas_type=final_sigmas_type, **SL)
    theirs = fastdiff.Sampler.from_scheduler(sch, n).grid.karras_sigma
    levels = fastdiff.Sampler(steps=n - 1, schedule="scaled_linear", spacing="karras", final="min").grid.karras_sigma
    np.testing.assert_allclose(theirs[:n], levels, rtol=1e-9)
    assert theirs[n] == (0.0 if final_sigmas_type == "zero" else pytest.approx(levels[-1], rel=1e-9))
    own = fastdiff.Sampler(steps=n, schedule="scaled_linear", spacing="karras").grid.karras_sigma
    assert own[n - 1] > theirs[n - 1] and own[n] == 0.0


def test_karras_sigma_min_third_order_zero_last_step_is_the_identity_not_nan():
    """use_karras_sigmas + final_sigmas_type='sigma_min': the model runs at sigma_min, then the last
    step goes to sigma_min. At >= 15 steps diffusers' third-order update divides by that zero step
    (NaN); fastdiff takes it as the identity: the result is the state before it."""
    cfg = dict(solver_order=3, use_karras_sigmas=True, final_sigmas_type="sigma_min")
    sch, sampler, gm, model, noise = _gm_case(cfg, 15)
    g = sampler.grid
    assert g.sigma[-1] == g.sigma[-2]
    theirs = _diffusers_loop(sch, model, noise, 15, {}, seed=0)
    assert torch.isnan(theirs).all()
    seen = []
    ours = sampler.sample(model, noise, callback=lambda i, x: seen.append(x))
    assert torch.isfinite(ours).all() and torch.equal(ours, seen[-2])
    fused = fastdiff.Sampler.from_scheduler(sch, 15, backend="cpu").sample(model, noise)
    torch.testing.assert_close(fused, ours, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["EDMEulerScheduler", "EDMDPMSolverMultistepScheduler"])
def test_edm_state_is_the_model_input(name):
    """fastdiff's EDM plan keeps the state diffusers hands the model (x / sqrt(sigma^2 +
    sigma_data^2), precondition_inputs): both loops call the model with the same inputs at the
    same times, with no scaling pass in fastdiff's."""
    sch = _scheduler(name, dict(sigma_data=0.7, final_sigmas_type="sigma_min"))
    sampler = fastdiff.Sampler.from_scheduler(sch, 5, backend="cpu")
    model = ideal_model(GaussianMixture.random(shape=(2, 3, 3), seed=1), sampler, sch)
    noise = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    seen = {"ours": [], "theirs": []}

    def recording(key):
        def call(x, t):
            seen[key].append((x.clone(), t.clone()))
            return model(x, t)
        return call
    ours = sampler.sample(recording("ours"), noise)
    theirs = _diffusers_loop(sch, recording("theirs"), noise, 5, {}, seed=0)
    assert len(seen["ours"]) == len(seen["theirs"]) == 5
    for (x, t), (x_d, t_d) in zip(seen["ours"], seen["theirs"]):
        torch.testing.assert_close(x, x_d, rtol=1e-5, atol=1e-6)
        assert torch.equal(t, t_d.float())
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)  # in the data's units, at sigma_min


@pytest.mark.parametrize("name", ["DDIMScheduler", "PNDMScheduler"])
def test_ddim_and_pndm_steps_end_at_diffusers_prev_timestep(name):
    """trailing with T % N != 0: diffusers' DDIM and PNDM step from t to t - T // N (the last to
    the final alpha), not to the next timestep; the next step starts at its own timestep's level."""
    sch = getattr(diffusers, name).from_config(dict(timestep_spacing="trailing", skip_prk_steps=True,
                                                    set_alpha_to_one=False))
    sch.set_timesteps(3)
    times = sch._timesteps[::-1] if name == "PNDMScheduler" else sch.timesteps.numpy()
    prev = times - 1000 // 3
    assert times[1] - 1000 // 3 != times[2]  # diffusers' own inconsistency
    g = fastdiff.Sampler.from_scheduler(sch, 3).grid
    np.testing.assert_array_equal(g.tau[:-1], times)
    ac = sch.alphas_cumprod.double().numpy()
    want = np.where(prev >= 0, ac[np.maximum(prev, 0)], sch.final_alpha_cumprod.item())
    np.testing.assert_allclose([g.step_end(i)[1] ** 2 for i in range(3)], want, rtol=1e-6)
    np.testing.assert_allclose(g.alpha[:-1] ** 2, ac[times], rtol=1e-6)


BAD = [
    ("DDIMScheduler", dict(thresholding=True), "thresholding"),
    ("DDPMScheduler", dict(variance_type="learned_range"), "variance_type"),
    ("DDIMScheduler", dict(beta_schedule="sigmoid"), "beta_schedule"),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="dpmsolver", final_sigmas_type="sigma_min"), "algorithm_type"),
    ("DPMSolverMultistepScheduler", dict(solver_type="heun"), "solver_type"),
    ("DPMSolverMultistepScheduler", dict(use_lu_lambdas=True), "use_lu_lambdas"),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++", solver_order=3), "solver_order"),
    ("DPMSolverMultistepScheduler", dict(lambda_min_clipped=-5.1), "lambda_min_clipped"),
    ("EulerDiscreteScheduler", dict(interpolation_type="log_linear"), "interpolation_type"),
    ("EulerDiscreteScheduler", dict(timestep_type="continuous"), "timestep_type"),
    ("LCMScheduler", dict(clip_sample=True), "clip_sample"),
    ("UniPCMultistepScheduler", dict(predict_x0=False), "predict_x0"),
    ("UniPCMultistepScheduler", dict(disable_corrector=[0]), "disable_corrector"),
    ("UniPCMultistepScheduler", dict(solver_order=4), "solver_order"),
    ("FlowMatchEulerDiscreteScheduler", dict(invert_sigmas=True), "invert_sigmas"),
    ("FlowMatchEulerDiscreteScheduler", dict(shift_terminal=0.1), "shift_terminal"),
    ("FlowMatchEulerDiscreteScheduler", dict(use_karras_sigmas=True), "use_karras_sigmas"),
    ("KDPM2AncestralDiscreteScheduler", dict(prediction_type="sample"), "prediction_type"),
    ("EDMEulerScheduler", dict(sigma_data=0.0), "sigma_data"),
    ("EDMEulerScheduler", dict(sigma_min=90.0), "sigma_max"),
    ("EDMDPMSolverMultistepScheduler", dict(prediction_type="sample"), "prediction_type"),
    ("EDMDPMSolverMultistepScheduler", dict(thresholding=True), "thresholding"),
    ("EDMDPMSolverMultistepScheduler", dict(solver_type="heun"), "solver_type"),
    ("EDMDPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++", solver_order=1), "solver_order"),
    ("EDMDPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++", solver_order=3), "solver_order"),
    ("EDMDPMSolverMultistepScheduler", dict(sigma_schedule="linear"), "sigma_schedule"),
]


@pytest.mark.parametrize("row", BAD, ids=[r[2] for r in BAD])
def test_unsupported_options_raise_naming_the_option(row):
    name, cfg, option = row
    with pytest.raises(ValueError, match=f"^{option}: "):
        fastdiff.Sampler.from_scheduler(dict(cfg, _class_name=name), 4)


@pytest.mark.parametrize("variance_type, why", [("learned", "the model predicts its own variance"),
                                                ("learned_range", "the model predicts its own variance"),
                                                ("fixed_large_log", "diffusers. step takes the square root of log\\(beta\\).*NaN")])
def test_ddpm_variance_types_fastdiff_does_not_run_say_why(variance_type, why):
    with pytest.raises(ValueError, match=f"^variance_type: '{variance_type}' is not supported by fastdiff: {why}"):
        fastdiff.Sampler.from_scheduler({"_class_name": "DDPMScheduler", "variance_type": variance_type}, 4)


def test_config_dicts_without_diffusers_and_their_errors():
    """A plain dict is enough (missing keys: diffusers' defaults); unsupported schedulers and a
    missing step count are errors naming the cause."""
    s = fastdiff.Sampler.from_scheduler({"_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.30.0"}, 4)
    assert s.solver == "euler" and s.steps == 4
    s = fastdiff.Sampler.from_scheduler({"_class_name": "UniPCMultistepScheduler"}, 4)
    assert s.solver == "unipc" and s.options["order"] == 2 and s.options["variant"] == "bh2"
    with pytest.raises(ValueError, match="^scheduler: DPMSolverSDEScheduler is not supported by fastdiff: its "
                                         "noise comes from a Brownian tree"):
        fastdiff.Sampler.from_scheduler({"_class_name": "DPMSolverSDEScheduler"}, 4)
    with pytest.raises(ValueError, match="^scheduler: this config has no '_class_name'"):
        fastdiff.Sampler.from_scheduler({"beta_schedule": "linear"}, 4)
    # a key the scheduler does not take is inert, as in diffusers (a newer diffusers' new keys too)
    assert fastdiff.Sampler.from_scheduler({"_class_name": "DDIMScheduler", "new_knob": 1}, 4).solver == "ddim"
    with pytest.raises(ValueError, match="^steps: "):
        fastdiff.Sampler.from_scheduler({"_class_name": "DDIMScheduler"})
    # below 4 steps diffusers' Runge-Kutta warm-up never reaches the end of the grid
    with pytest.raises(ValueError, match="^steps: PNDMScheduler with skip_prk_steps=False .* got 3"):
        fastdiff.Sampler.from_scheduler({"_class_name": "PNDMScheduler"}, 3)
    with pytest.raises(TypeError, match="^scheduler: expected a diffusers scheduler"):
        fastdiff.Sampler.from_scheduler(object(), 4)


def test_overrides_and_steps_from_the_instance():
    sch = _scheduler("DDIMScheduler", dict(clip_sample=False))
    sch.set_timesteps(6)
    s = fastdiff.Sampler.from_scheduler(sch, eta=0.5, backend="cpu")
    assert s.steps == 6 and s.options["eta"] == 0.5 and s.backend == "cpu"


def test_unipc_without_lower_order_final_is_finite_where_diffusers_is_not():
    """diffusers' UniPC takes its higher-order step to sigma = 0 too (lower_order_final=False) and
    divides by that step's zero log-SNR ratio; fastdiff's last step is first order there."""
    sch, sampler, gm, model, noise = _gm_case(dict(lower_order_final=False), 6, "UniPCMultistepScheduler")
    ours = sampler.sample(model, noise)
    theirs = _diffusers_loop(sch, model, noise, 6, {}, seed=0)
    assert torch.isfinite(ours).all() and not torch.isfinite(theirs).all()
    assert sampler.options["lower_order_final"] is False


def test_kdpm2_plan_records_its_midpoint_times():
    """from_scheduler hands KDPM2's midpoint model times over as mid_timesteps: options record
    them, and a plan made from them again has the same table."""
    sch = _scheduler("KDPM2DiscreteScheduler", dict(use_karras_sigmas=True))
    s = fastdiff.Sampler.from_scheduler(sch, 5)
    mids = s.options["mid_timesteps"]
    assert isinstance(mids, list) and len(mids) == 4 and all(isinstance(t, float) for t in mids)
    again = fastdiff.Sampler.from_scheduler(sch, 5, mid_timesteps=[t + 1.0 for t in mids])
    assert (again.table.model_time != s.table.model_time).sum() == 4  # exactly the midpoint calls moved
