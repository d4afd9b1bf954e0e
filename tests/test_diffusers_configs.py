"""The scheduler configs real checkpoints ship (tests/diffusers_configs.py), loaded into every
scheduler a diffusers user swaps in, through `Sampler.from_scheduler`: each case gives the plan
of diffusers' set_timesteps and its sampled result, or raises the scheduler's specific error.

The model is the analytic Gaussian mixture (closed-form model output); diffusers' loop starts
from noise * init_noise_sigma and calls scheduler.step, as its pipelines do."""
import warnings

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.integrations.diffusers.schedulers import NOT_SUPPORTED
from fastdiff.testing import GaussianMixture

from conftest import require
from diffusers_configs import FLOW_CONFIGS, FLOW_SCHEDULERS, VP_CONFIGS, VP_SCHEDULERS
from test_diffusers_schedulers import _diffusers_loop, ideal_model

diffusers = require("diffusers", "diffusers")

STEPS = (4, 10, 25)
CASES = [(c, s, n) for c in VP_CONFIGS for s in VP_SCHEDULERS for n in STEPS] + [
    (c, s, n) for c in FLOW_CONFIGS for s in FLOW_SCHEDULERS for n in STEPS]


# (config, scheduler) pairs whose config asks for what fastdiff does not run: their specific error
CONFIG_ERRORS = {}


def flux_mu(cfg: dict, image_seq_len: int) -> float:
    """FluxPipeline's mu: linear in the image's token count between the config's two ends."""
    m = (cfg["max_shift"] - cfg["base_shift"]) / (cfg["max_image_seq_len"] - cfg["base_image_seq_len"])
    return cfg["base_shift"] + m * (image_seq_len - cfg["base_image_seq_len"])


def _load(config_name, scheduler_name):
    config = {**VP_CONFIGS, **FLOW_CONFIGS}[config_name]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # diffusers' notes on the inert keys
        return config, getattr(diffusers, scheduler_name).from_config(config)


def _set_timesteps_args(config, scheduler_name="FlowMatchEulerDiscreteScheduler"):
    """mu, as FluxPipeline passes it, where the scheduler shifts dynamically (FlowMatchHeun
    takes neither the config's use_dynamic_shifting nor mu)."""
    dynamic = config.get("use_dynamic_shifting") and scheduler_name == "FlowMatchEulerDiscreteScheduler"
    return dict(mu=flux_mu(config, 1024)) if dynamic else {}


@pytest.mark.parametrize("case", CASES, ids=["-".join(map(str, c)).replace("Scheduler", "") for c in CASES])
def test_real_config_gives_diffusers_plan_and_result_or_its_specific_error(case):
    config_name, scheduler_name, n = case
    config = {**VP_CONFIGS, **FLOW_CONFIGS}[config_name]
    args = _set_timesteps_args(config, scheduler_name)
    error = CONFIG_ERRORS.get((config_name, scheduler_name))
    if scheduler_name in NOT_SUPPORTED:
        error = f"^scheduler: {scheduler_name} is not supported by fastdiff: "
    if error is not None:  # (as a config: DPMSolverSDEScheduler needs torchsde to exist)
        with pytest.raises(ValueError, match=error):
            fastdiff.Sampler.from_scheduler(config, n, scheduler_class=scheduler_name, **args)
        return
    config, sch = _load(config_name, scheduler_name)
    sampler = fastdiff.Sampler.from_scheduler(sch, n, **args)
    sch.set_timesteps(n, **args)
    # the model times diffusers computes, float32 rounding included
    np.testing.assert_array_equal(sampler.table.model_time.astype(np.float32), sch.timesteps.float().numpy())
    gm = GaussianMixture.random(shape=(2, 3, 3), seed=1)
    model = ideal_model(gm, sampler, sch)
    noise = torch.randn(3, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    ours = sampler.sample(model, noise, generator=torch.Generator().manual_seed(5))
    theirs = _diffusers_loop(sch, model, noise, n, {}, seed=5, **args)
    scale = theirs.abs().max().item()
    assert (ours - theirs).abs().max().item() <= 1e-4 * scale, (ours - theirs).abs().max().item() / scale


def test_pipeline_config_without_class_name_needs_the_class():
    config, sch = _load("sdxl", "DPMSolverMultistepScheduler")
    plain = {k: v for k, v in sch.config.items() if k != "_class_name"}
    s = fastdiff.Sampler.from_scheduler(plain, 6, scheduler_class=diffusers.DPMSolverMultistepScheduler)
    assert s.solver == "dpmpp_2m"
    assert fastdiff.Sampler.from_scheduler(config, 6, scheduler_class="UniPCMultistepScheduler").solver == "unipc"
    with pytest.raises(ValueError, match="^scheduler: this config has no '_class_name'.*scheduler_class="):
        fastdiff.Sampler.from_scheduler(plain, 6)
    with pytest.raises(ValueError, match="^scheduler_class: only for a config dict"):
        fastdiff.Sampler.from_scheduler(sch, 6, scheduler_class="DDIMScheduler")
    with pytest.raises(TypeError, match="^scheduler_class: expected a diffusers scheduler class or its name"):
        fastdiff.Sampler.from_scheduler(plain, 6, scheduler_class=3)


def test_inert_keys_are_ignored_and_misspelled_ones_named():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the keys real configs carry along: no warning at all
        fastdiff.Sampler.from_scheduler(dict(VP_CONFIGS["sd15"], _class_name="EulerDiscreteScheduler"), 6)
    with pytest.warns(UserWarning, match="^use_karas_sigmas: not a DPMSolverMultistepScheduler option, ignored "
                                         "as diffusers ignores it; did you mean 'use_karras_sigmas'"):
        fastdiff.Sampler.from_scheduler({"_class_name": "DPMSolverMultistepScheduler", "use_karas_sigmas": True}, 6)
    with pytest.raises(ValueError, match="^scheduler: DPMSolverMultistepSchedular is not supported.*did you mean "
                                         "'DPMSolverMultistepScheduler'"):
        fastdiff.Sampler.from_scheduler({"_class_name": "DPMSolverMultistepSchedular"}, 6)


def test_set_timesteps_arguments():
    flux = FLOW_CONFIGS["flux_dev"]
    with pytest.raises(ValueError, match="^mu: use_dynamic_shifting=True shifts by the image size: pass mu="):
        fastdiff.Sampler.from_scheduler(flux, 4)
    # without dynamic shifting mu is ignored, as set_timesteps ignores it
    np.testing.assert_array_equal(fastdiff.Sampler.from_scheduler(FLOW_CONFIGS["sd3"], 4, mu=1.0).grid.sigma,
                                  fastdiff.Sampler.from_scheduler(FLOW_CONFIGS["sd3"], 4).grid.sigma)
    with pytest.raises(ValueError, match="^mu: fastdiff maps DDIMScheduler.set_timesteps"):
        fastdiff.Sampler.from_scheduler(VP_CONFIGS["sd21"], 4, mu=1.0)
    # custom sigmas, shifted as diffusers shifts them; steps follow their count
    sigmas = np.linspace(1.0, 1 / 4, 4)
    sch = diffusers.FlowMatchEulerDiscreteScheduler.from_config(flux)
    sch.set_timesteps(sigmas=sigmas, mu=0.8)
    s = fastdiff.Sampler.from_scheduler(flux, sigmas=sigmas, mu=0.8)
    assert s.steps == 4
    np.testing.assert_allclose(s.grid.sigma, sch.sigmas.double().numpy(), rtol=1e-6, atol=1e-7)
    with pytest.raises(ValueError, match="^sigmas: 4 values for 5 steps"):
        fastdiff.Sampler.from_scheduler(flux, 5, sigmas=sigmas, mu=0.8)


@pytest.mark.parametrize("config, steps, difference", [
    ({"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3}, 6, "solver_order=3 runs fastdiff's dpmpp_3m"),
    ({"_class_name": "EDMDPMSolverMultistepScheduler", "solver_order": 3}, 6, "solver_order=3 runs fastdiff's dpmpp_3m"),
    ({"_class_name": "DPMSolverMultistepScheduler", "solver_order": 3, "use_karras_sigmas": True,
      "final_sigmas_type": "sigma_min"}, 16, "the last step has size zero"),
    ({"_class_name": "UniPCMultistepScheduler", "lower_order_final": False}, 5, "lower_order_final=False"),
])
def test_each_deliberate_difference_is_warned_once(monkeypatch, config, steps, difference):
    from fastdiff.integrations.diffusers import schedulers

    monkeypatch.setattr(schedulers, "_WARNED", set())
    with pytest.warns(schedulers.DiffusersDifferenceWarning, match=f"^{config['_class_name']}: {difference}"):
        fastdiff.Sampler.from_scheduler(config, steps)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fastdiff.Sampler.from_scheduler(config, steps)  # once


def test_real_configs_use_no_deliberate_difference(monkeypatch):
    from fastdiff.integrations.diffusers import schedulers

    monkeypatch.setattr(schedulers, "_WARNED", set())
    with warnings.catch_warnings():
        warnings.simplefilter("error", schedulers.DiffusersDifferenceWarning)
        for config_name, scheduler_name, n in CASES:
            config = {**VP_CONFIGS, **FLOW_CONFIGS}[config_name]
            if scheduler_name not in NOT_SUPPORTED and (config_name, scheduler_name) not in CONFIG_ERRORS:
                fastdiff.Sampler.from_scheduler(config, n, scheduler_class=scheduler_name,
                                                **_set_timesteps_args(config, scheduler_name))
