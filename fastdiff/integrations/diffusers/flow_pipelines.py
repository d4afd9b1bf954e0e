"""StableDiffusion3Pipeline and FluxPipeline through fastdiff's loop (see `pipelines`): rectified
flow, the transformer called as the pipelines call it.

SD3: CFG on the doubled batch (prompt and pooled embeddings); mu for dynamic shifting from the
latent size, as the pipeline computes it. Flux: the latents stay packed (batch, tokens, 4 C)
through the loop; its positional ids have no batch dimension, so they travel expanded to the
batch (a CUDA graph refreshes them like any conditioning) and the wrapper hands the transformer
one row; the guidance embedding (guidance_scale) is conditioning, and true CFG
(true_cfg_scale > 1 with a negative prompt) calls the transformer twice per step, as the
pipeline does; the plan takes the pipeline's sigmas and mu from the image size.
"""
from __future__ import annotations

import numpy as np
import torch
from diffusers import FluxPipeline, StableDiffusion3Pipeline
from diffusers.pipelines.flux import FluxPipelineOutput
from diffusers.pipelines.flux import pipeline_flux
from diffusers.pipelines.stable_diffusion_3 import StableDiffusion3PipelineOutput
from diffusers.pipelines.stable_diffusion_3 import pipeline_stable_diffusion_3 as pipeline_sd3
from diffusers.utils.torch_utils import get_module_execution_device

from fastdiff.integrations.diffusers.pipeline_parts import Family, batch_size, check_generator, denoise, make_plan, wrapper

_COMMON = ("prompt", "prompt_2", "negative_prompt", "negative_prompt_2", "height", "width", "num_inference_steps",
           "sigmas", "guidance_scale", "num_images_per_prompt", "generator", "latents", "prompt_embeds",
           "negative_prompt_embeds", "pooled_prompt_embeds", "negative_pooled_prompt_embeds", "output_type",
           "return_dict", "joint_attention_kwargs", "callback_on_step_end_tensor_inputs", "max_sequence_length")
_SD3 = ("prompt_3", "negative_prompt_3", "clip_skip", "mu")
_FLUX = ("true_cfg_scale",)


class SD3Denoiser:
    def __init__(self, transformer):
        self.transformer = transformer

    def __call__(self, x, t, joint_attention_kwargs=None, **cond):
        return self.transformer(hidden_states=x, timestep=t, joint_attention_kwargs=joint_attention_kwargs,
                                return_dict=False, **cond)[0]


class FluxDenoiser:
    def __init__(self, transformer):
        self.transformer = transformer

    def __call__(self, x, t, img_ids, txt_ids, joint_attention_kwargs=None, **cond):
        # the pipeline's timestep: its t in the latents' dtype, over 1000
        return self.transformer(hidden_states=x, timestep=t.to(x.dtype) / 1000, img_ids=img_ids[0],
                                txt_ids=txt_ids[0], joint_attention_kwargs=joint_attention_kwargs,
                                return_dict=False, **cond)[0]


def _noise(pipe, a, batch, channels, height, width, dtype):
    """The pipeline's own prepare_latents (flow pipelines draw them unscaled). -> (latents, extras)."""
    if isinstance(a["generator"], list) and len(a["generator"]) != batch:
        raise ValueError(f"generator: a list needs one generator per image ({batch}), got {len(a['generator'])}")
    return pipe.prepare_latents(batch, channels, height, width, dtype, pipe._execution_device, a["generator"],
                                a["latents"])


def _decode(pipe, a, latents):
    if a["output_type"] == "latent":
        return latents
    latents = latents / pipe.vae.config.scaling_factor + pipe.vae.config.shift_factor
    image = pipe.vae.decode(latents.to(get_module_execution_device(pipe.vae)), return_dict=False)[0]
    return pipe.image_processor.postprocess(image, output_type=a["output_type"])


def _joint(a):
    kw = a["joint_attention_kwargs"]
    return ({"joint_attention_kwargs": kw} if kw is not None else {}), (kw or {}).get("scale")


def run_sd3(pipe, a, options):
    height = a["height"] or pipe.default_sample_size * pipe.vae_scale_factor
    width = a["width"] or pipe.default_sample_size * pipe.vae_scale_factor
    pipe.check_inputs(a["prompt"], a["prompt_2"], a["prompt_3"], height, width, negative_prompt=a["negative_prompt"],
                      negative_prompt_2=a["negative_prompt_2"], negative_prompt_3=a["negative_prompt_3"],
                      prompt_embeds=a["prompt_embeds"], negative_prompt_embeds=a["negative_prompt_embeds"],
                      pooled_prompt_embeds=a["pooled_prompt_embeds"],
                      negative_pooled_prompt_embeds=a["negative_pooled_prompt_embeds"],
                      callback_on_step_end_tensor_inputs=a["callback_on_step_end_tensor_inputs"],
                      max_sequence_length=a["max_sequence_length"])
    device, batch, w = pipe._execution_device, batch_size(a), a["guidance_scale"]
    do_cfg = w > 1
    mu, cfg = a["mu"], pipe.scheduler.config
    if cfg.get("use_dynamic_shifting", None) and mu is None:
        p = pipe.transformer.config.patch_size
        seq = (int(height) // pipe.vae_scale_factor // p) * (int(width) // pipe.vae_scale_factor // p)
        mu = pipeline_sd3.calculate_shift(seq, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                          cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.16))
    sampler = make_plan(pipe, a, options, sigmas=a["sigmas"], mu=mu)
    check_generator(sampler, a["generator"], batch, device)
    joint, lora_scale = _joint(a)
    text, neg, pooled, neg_pooled = pipe.encode_prompt(
        prompt=a["prompt"], prompt_2=a["prompt_2"], prompt_3=a["prompt_3"], negative_prompt=a["negative_prompt"],
        negative_prompt_2=a["negative_prompt_2"], negative_prompt_3=a["negative_prompt_3"],
        do_classifier_free_guidance=do_cfg, prompt_embeds=a["prompt_embeds"],
        negative_prompt_embeds=a["negative_prompt_embeds"], pooled_prompt_embeds=a["pooled_prompt_embeds"],
        negative_pooled_prompt_embeds=a["negative_pooled_prompt_embeds"], device=device, clip_skip=a["clip_skip"],
        num_images_per_prompt=a["num_images_per_prompt"], max_sequence_length=a["max_sequence_length"],
        lora_scale=lora_scale)
    noise = _noise(pipe, a, batch, pipe.transformer.config.in_channels, height, width, text.dtype)
    cond = {"encoder_hidden_states": text, "pooled_projections": pooled, **joint}
    uncond = {"encoder_hidden_states": neg, "pooled_projections": neg_pooled, **joint} if do_cfg else None
    latents = denoise(pipe, sampler, wrapper(pipe.transformer, SD3Denoiser), noise, options, guidance_scale=w,
                      cond=cond, uncond=uncond, generator=a["generator"])
    image = _decode(pipe, a, latents)
    pipe.maybe_free_model_hooks()
    return StableDiffusion3PipelineOutput(images=image) if a["return_dict"] else (image,)


def run_flux(pipe, a, options):
    height = a["height"] or pipe.default_sample_size * pipe.vae_scale_factor
    width = a["width"] or pipe.default_sample_size * pipe.vae_scale_factor
    pipe.check_inputs(a["prompt"], a["prompt_2"], height, width, negative_prompt=a["negative_prompt"],
                      negative_prompt_2=a["negative_prompt_2"], prompt_embeds=a["prompt_embeds"],
                      negative_prompt_embeds=a["negative_prompt_embeds"],
                      pooled_prompt_embeds=a["pooled_prompt_embeds"],
                      negative_pooled_prompt_embeds=a["negative_pooled_prompt_embeds"],
                      callback_on_step_end_tensor_inputs=a["callback_on_step_end_tensor_inputs"],
                      max_sequence_length=a["max_sequence_length"])
    device, batch, n = pipe._execution_device, batch_size(a), a["num_inference_steps"]
    has_neg = a["negative_prompt"] is not None or (a["negative_prompt_embeds"] is not None
                                                   and a["negative_pooled_prompt_embeds"] is not None)
    do_cfg = a["true_cfg_scale"] > 1 and has_neg
    if do_cfg and a["prompt_embeds"] is not None and a["negative_prompt_embeds"] is not None and (
            a["prompt_embeds"].shape != a["negative_prompt_embeds"].shape):
        raise ValueError(f"negative_prompt_embeds: shape {tuple(a['negative_prompt_embeds'].shape)} differs from "
                         f"prompt_embeds' {tuple(a['prompt_embeds'].shape)}")
    cfg = pipe.scheduler.config
    sigmas = np.linspace(1.0, 1 / n, n) if a["sigmas"] is None else a["sigmas"]
    if cfg.get("use_flow_sigmas", False):
        sigmas = None
    half = pipe.vae_scale_factor * 2  # the latents are packed in 2x2 patches
    seq = (int(height) // half) * (int(width) // half)
    mu = pipeline_flux.calculate_shift(seq, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                       cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
    sampler = make_plan(pipe, a, options, sigmas=sigmas, mu=mu)
    check_generator(sampler, a["generator"], batch, device)
    joint, lora_scale = _joint(a)

    def encode(prompt, prompt_2, embeds, pooled):
        text, pooled, ids = pipe.encode_prompt(prompt=prompt, prompt_2=prompt_2, prompt_embeds=embeds,
                                               pooled_prompt_embeds=pooled, device=device,
                                               num_images_per_prompt=a["num_images_per_prompt"],
                                               max_sequence_length=a["max_sequence_length"], lora_scale=lora_scale)
        return {"encoder_hidden_states": text, "pooled_projections": pooled,
                "txt_ids": ids.expand(batch, *ids.shape), **joint}

    cond = encode(a["prompt"], a["prompt_2"], a["prompt_embeds"], a["pooled_prompt_embeds"])
    uncond = encode(a["negative_prompt"], a["negative_prompt_2"], a["negative_prompt_embeds"],
                    a["negative_pooled_prompt_embeds"]) if do_cfg else None
    dtype = cond["encoder_hidden_states"].dtype
    noise, img_ids = _noise(pipe, a, batch, pipe.transformer.config.in_channels // 4, height, width, dtype)
    extra = {"img_ids": img_ids.expand(batch, *img_ids.shape)}
    if pipe.transformer.config.guidance_embeds:
        extra["guidance"] = torch.full((batch,), a["guidance_scale"], device=device, dtype=torch.float32)
    latents = denoise(pipe, sampler, wrapper(pipe.transformer, FluxDenoiser), noise, options,
                      guidance_scale=a["true_cfg_scale"], cond={**cond, **extra},
                      uncond={**uncond, **extra} if do_cfg else None, generator=a["generator"], cfg="separate")
    if a["output_type"] != "latent":
        latents = pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor)
    image = _decode(pipe, a, latents)
    pipe.maybe_free_model_hooks()
    return FluxPipelineOutput(images=image) if a["return_dict"] else (image,)


# channels_last is the layout of a convolution U-Net's 4-D feature maps
_TOKENS = "its transformer runs on tokens ({}), not on 4-D feature maps"
FAMILIES = (
    Family(StableDiffusion3Pipeline, "transformer", frozenset(_COMMON + _SD3), run_sd3,
           _TOKENS.format("the latents cut into patches")),
    Family(FluxPipeline, "transformer", frozenset(_COMMON + _FLUX), run_flux,
           _TOKENS.format("the latents packed as (batch, tokens, channels)")),
)
