"""The scheduler_config.json files that public checkpoints ship, written down as they publish
them (inert keys and all), for tests/test_diffusers_configs.py. No download: literal dicts."""

SD15 = {  # runwayml/stable-diffusion-v1-5, scheduler/scheduler_config.json
    "_class_name": "PNDMScheduler", "_diffusers_version": "0.6.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "num_train_timesteps": 1000,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "trained_betas": None,
    "clip_sample": False,
}
SD21 = {  # stabilityai/stable-diffusion-2-1 (768 px, v-prediction)
    "_class_name": "DDIMScheduler", "_diffusers_version": "0.8.0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "num_train_timesteps": 1000,
    "prediction_type": "v_prediction", "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1,
    "trained_betas": None,
}
SDXL = {  # stabilityai/stable-diffusion-xl-base-1.0
    "_class_name": "EulerDiscreteScheduler", "_diffusers_version": "0.19.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading", "trained_betas": None,
    "use_karras_sigmas": False,
}
SDXL_TURBO = {  # stabilityai/sdxl-turbo
    "_class_name": "EulerAncestralDiscreteScheduler", "_diffusers_version": "0.24.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "interpolation_type": "linear",
    "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0, "set_alpha_to_one": False,
    "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "trailing", "trained_betas": None,
    "use_karras_sigmas": False,
}
LCM = {  # SimianLuo/LCM_Dreamshaper_v7
    "_class_name": "LCMScheduler", "_diffusers_version": "0.22.0.dev0", "beta_end": 0.012,
    "beta_schedule": "scaled_linear", "beta_start": 0.00085, "clip_sample": False, "clip_sample_range": 1.0,
    "dynamic_thresholding_ratio": 0.995, "num_train_timesteps": 1000, "original_inference_steps": 50,
    "prediction_type": "epsilon", "rescale_betas_zero_snr": False, "sample_max_value": 1.0,
    "set_alpha_to_one": True, "steps_offset": 1, "thresholding": False, "timestep_scaling": 10.0,
    "timestep_spacing": "leading", "trained_betas": None,
}
SD3 = {  # stabilityai/stable-diffusion-3-medium-diffusers
    "_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.29.0.dev0",
    "num_train_timesteps": 1000, "shift": 3.0,
}
FLUX_DEV = {  # black-forest-labs/FLUX.1-dev
    "_class_name": "FlowMatchEulerDiscreteScheduler", "_diffusers_version": "0.30.0.dev0", "base_image_seq_len": 256,
    "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15, "num_train_timesteps": 1000, "shift": 3.0,
    "use_dynamic_shifting": True,
}

VP_CONFIGS = {"sd15": SD15, "sd21": SD21, "sdxl": SDXL, "sdxl_turbo": SDXL_TURBO, "lcm": LCM}
FLOW_CONFIGS = {"sd3": SD3, "flux_dev": FLUX_DEV}

# what a diffusers user swaps in: KarrasDiffusionSchedulers' members, LCM, TCD and the EDM schedulers
# for the VP configs; the flow-matching schedulers for the flow configs
VP_SCHEDULERS = (
    "DDIMScheduler", "DDPMScheduler", "PNDMScheduler", "LMSDiscreteScheduler", "EulerDiscreteScheduler",
    "HeunDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler", "KDPM2DiscreteScheduler", "KDPM2AncestralDiscreteScheduler",
    "DEISMultistepScheduler", "UniPCMultistepScheduler", "DPMSolverSDEScheduler", "EDMEulerScheduler",
    "LCMScheduler", "TCDScheduler", "EDMDPMSolverMultistepScheduler",
)
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
