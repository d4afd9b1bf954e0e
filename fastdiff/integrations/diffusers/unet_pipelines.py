"""StableDiffusionPipeline (SD 1.x/2.x) and StableDiffusionXLPipeline through fastdiff's loop
(see `pipelines`). The U-Net is called as the pipelines call it; SDXL's added conditioning
(pooled text embeddings and size/crop time ids) travels as batched tensors, so CFG doubles it
with the prompt embeddings (unconditional half first, as diffusers orders it).

guidance_rescale (Lin et al. 2023, diffusers' rescale_noise_cfg) needs each image's standard
deviation of the guided output, a reduction the fused step does not do. It is one extra group of
eager ops on the model output, before the fused step: the output is rescaled per image by
k = r std(m_c) / std(m_u + w (m_c - m_u)) + 1 - r, which the step's CFG carries over unchanged
(k m_u + w (k m_c - k m_u) = k m_cfg). SDXL with negative size conditioning and several images:
as diffusers pairs them, the [negative, positive] time ids pair is repeated over the doubled
batch: row r of the doubled batch (unconditional half first) gets the negative ids for even r,
the positive ones for odd r, so beyond one image the halves mix them; SDXL img2img pairs them
per image.

Image-to-image (StableDiffusionImg2ImgPipeline, StableDiffusionXLImg2ImgPipeline): the plan of
N steps keeps its last int(N * strength) steps (Sampler's first_step) and the loop starts from
the image's latents noised to the first kept level (Sampler.sample's x0), with the same VAE
sample and noise from the call's generator as diffusers draws them.
"""
from __future__ import annotations

from typing import Dict, Optional

import torch
from diffusers import (StableDiffusionImg2ImgPipeline, StableDiffusionPipeline, StableDiffusionXLImg2ImgPipeline,
                       StableDiffusionXLPipeline)
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from diffusers.pipelines.stable_diffusion_xl import StableDiffusionXLPipelineOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
from diffusers.utils.torch_utils import get_module_execution_device, randn_tensor

from fastdiff.integrations.diffusers.pipeline_parts import (Family, batch_size, check_generator, check_latents, denoise,
                                                       diffusers_state_scale, initial_noise, make_plan, wrapper)

_COMMON = ("prompt", "height", "width", "num_inference_steps", "timesteps", "sigmas", "guidance_scale",
           "negative_prompt", "num_images_per_prompt", "eta", "generator", "latents", "prompt_embeds",
           "negative_prompt_embeds", "output_type", "return_dict", "cross_attention_kwargs", "guidance_rescale",
           "clip_skip", "callback_on_step_end_tensor_inputs")
_SDXL = ("prompt_2", "negative_prompt_2", "pooled_prompt_embeds", "negative_pooled_prompt_embeds", "original_size",
         "crops_coords_top_left", "target_size", "negative_original_size", "negative_crops_coords_top_left",
         "negative_target_size")
_IMG2IMG = ("image", "strength", "aesthetic_score", "negative_aesthetic_score")


class UNetDenoiser:
    """`pipe.unet` as fastdiff calls it: model(x, t, **cond) -> the output tensor, with SDXL's
    added conditioning as top-level tensors, and guidance_rescale (see the module doc)."""

    def __init__(self, unet):
        self.unet = unet
        self._scales: Dict[torch.device, torch.Tensor] = {}  # [w, r] per device; read at graph replay
        self.rescale: Optional[torch.Tensor] = None

    def set_rescale(self, w: float, r: float, device) -> None:
        """Rescale the next calls' CFG output (r = 0: off). The scales are device tensors filled in
        place, so a recorded loop replays with the values of its call."""
        if not r:
            self.rescale = None
            return
        scales = self._scales.setdefault(torch.device(device), torch.empty(2, device=device))
        scales[0].fill_(w)
        scales[1].fill_(r)
        self.rescale = scales

    def __call__(self, x, t, encoder_hidden_states, text_embeds=None, time_ids=None, timestep_cond=None,
                 cross_attention_kwargs=None):
        added = None if text_embeds is None else {"text_embeds": text_embeds, "time_ids": time_ids}
        out = self.unet(x, t, encoder_hidden_states=encoder_hidden_states, timestep_cond=timestep_cond,
                        cross_attention_kwargs=cross_attention_kwargs, added_cond_kwargs=added, return_dict=False)[0]
        if self.rescale is None:
            return out
        w, r = self.rescale[0], self.rescale[1]
        m_u, m_c = out.float().chunk(2)  # the doubled CFG batch, unconditional half first
        dims = list(range(1, out.dim()))
        k = r * m_c.std(dims, keepdim=True) / (m_u + w * (m_c - m_u)).std(dims, keepdim=True) + (1 - r)
        return out.float() * torch.cat([k, k])


def _size(pipe, a):
    """diffusers' default height/width: the U-Net's sample size times the VAE's scale."""
    if a["height"] and a["width"]:
        return a["height"], a["width"]
    size = pipe.unet.config.sample_size
    size = (size, size) if isinstance(size, int) else size
    return size[0] * pipe.vae_scale_factor, size[1] * pipe.vae_scale_factor


def _from_noise(pipe, a, batch, height, width):
    """Text-to-image's start: `start(sampler, dtype)` -> (the initial noise, no image latents);
    the shape of a given `latents` checked now, before any model runs."""
    shape = (batch, pipe.unet.config.in_channels, int(height) // pipe.vae_scale_factor,
             int(width) // pipe.vae_scale_factor)
    check_latents(a["latents"], shape)
    return lambda sampler, dtype: (initial_noise(shape, a["generator"], pipe._execution_device, dtype, a["latents"]),
                                   None)


def _from_image(pipe, a, batch, encode_image, add_noise=True):
    """Image-to-image's start: `start(sampler, dtype)` -> (noise, the image's clean latents), drawn
    as the img2img pipelines' prepare_latents draws them: the VAE's latent sample first, then the
    noise, from the call's generator. Without `add_noise` (SDXL's denoising_start), or from given
    `latents`, the loop starts from that state itself (diffusers' loop state, in fastdiff's
    terms): -> (the state, None). The image is preprocessed and its batch checked now, before
    any model runs. `encode_image(image, dtype)` -> the clean latents, repeated to `batch`.
    -> (start, the preprocessed image's shape)."""
    if a["image"] is None:
        raise ValueError("image: the image (or image latents) to start from is required")
    image = pipe.image_processor.preprocess(a["image"])
    if image.shape[0] > batch or batch % image.shape[0]:
        raise ValueError(f"image: {image.shape[0]} images for {batch} images (prompts x num_images_per_prompt); "
                         "expected one image, or a number dividing the images")
    given = a.get("latents")
    if given is not None and (not isinstance(given, torch.Tensor) or given.dim() != 4 or given.shape[0] != batch
                              or given.shape[1] != pipe.unet.config.in_channels):
        got = tuple(given.shape) if isinstance(given, torch.Tensor) else type(given).__name__
        raise ValueError(f"latents: expected shape ({batch}, {pipe.unet.config.in_channels}, height, width), got {got}")

    def start(sampler, dtype):
        if given is not None:
            state = given.to(pipe._execution_device, dtype)
        else:
            state = encode_image(image, dtype)
            if add_noise:
                return randn_tensor(tuple(state.shape), generator=a["generator"], device=state.device,
                                    dtype=dtype), state
        return state * diffusers_state_scale(pipe, sampler), None

    return start, tuple(image.shape)


def _image_latents(pipe, image, batch, generator, dtype):
    """StableDiffusionImg2ImgPipeline's clean latents: a 4-channel `image` taken as latents,
    else the VAE's latent sample (one per image from a list of generators) times the scaling
    factor; repeated to `batch`."""
    image = image.to(device=pipe._execution_device, dtype=dtype)
    if image.shape[1] == 4:
        latents = image
    else:
        vae = pipe.vae
        if isinstance(generator, list):
            image = image.repeat(batch // image.shape[0], 1, 1, 1)
            latents = torch.cat([retrieve_latents(vae.encode(image[i:i + 1]), generator=generator[i])
                                 for i in range(batch)])
        else:
            latents = retrieve_latents(vae.encode(image), generator=generator)
        latents = vae.config.scaling_factor * latents
    return latents.repeat(batch // latents.shape[0], 1, 1, 1)


def _loop(pipe, a, options, batch, encode, start, **cut):
    """What SD and SDXL share: plan, conditioning, the loop. `encode(do_cfg)` -> (cond, uncond)
    of the prompt (uncond None without CFG); `start(sampler, dtype)` -> (noise or the initial
    state, image latents or None) (`_from_noise`, `_from_image`); `cut`: img2img's (make_plan's
    strength, denoising_start, from_state). -> the final latents, their dtype the prompt
    embeddings' (as the pipelines keep them)."""
    device = pipe._execution_device
    w = a["guidance_scale"]
    do_cfg = w > 1 and pipe.unet.config.time_cond_proj_dim is None
    sampler = make_plan(pipe, a, options, timesteps=a["timesteps"], sigmas=a["sigmas"], **cut)
    check_generator(sampler, a["generator"], batch, device)
    cond, uncond = encode(do_cfg)
    dtype = cond["encoder_hidden_states"].dtype
    noise, x0 = start(sampler, dtype)
    extra = {}
    if pipe.unet.config.time_cond_proj_dim is not None:  # a guidance-distilled U-Net (LCM): w as an embedding
        extra["timestep_cond"] = pipe.get_guidance_scale_embedding(
            torch.tensor(w - 1).repeat(batch), embedding_dim=pipe.unet.config.time_cond_proj_dim).to(device, dtype)
    if a["cross_attention_kwargs"] is not None:
        extra["cross_attention_kwargs"] = a["cross_attention_kwargs"]
    model = wrapper(pipe.unet, UNetDenoiser)
    model.set_rescale(w, a.get("guidance_rescale", 0.0) if do_cfg else 0.0, device)
    try:
        return denoise(pipe, sampler, model, noise, options, guidance_scale=w, cond={**cond, **extra},
                       uncond={**uncond, **extra} if do_cfg else None, generator=a["generator"], x0=x0)
    finally:
        model.set_rescale(w, 0.0, device)


def _lora_scale(a):
    return (a["cross_attention_kwargs"] or {}).get("scale")


def _sd_encoder(pipe, a):
    def encode(do_cfg):
        text, neg = pipe.encode_prompt(a["prompt"], pipe._execution_device, a["num_images_per_prompt"], do_cfg,
                                       a["negative_prompt"], prompt_embeds=a["prompt_embeds"],
                                       negative_prompt_embeds=a["negative_prompt_embeds"],
                                       lora_scale=_lora_scale(a), clip_skip=a["clip_skip"])
        return {"encoder_hidden_states": text}, {"encoder_hidden_states": neg} if do_cfg else None

    return encode


def _sd_output(pipe, a, latents):
    """SD's (and SD img2img's) VAE decode, safety checker, postprocessing and output."""
    if a["output_type"] == "latent":
        image, nsfw = latents, None
    else:
        image = pipe.vae.decode(latents / pipe.vae.config.scaling_factor, return_dict=False,
                                generator=a["generator"])[0]
        image, nsfw = pipe.run_safety_checker(image, pipe._execution_device, latents.dtype)
    denormalize = [True] * image.shape[0] if nsfw is None else [not n for n in nsfw]
    image = pipe.image_processor.postprocess(image, output_type=a["output_type"], do_denormalize=denormalize)
    pipe.maybe_free_model_hooks()
    if not a["return_dict"]:
        return image, nsfw
    return StableDiffusionPipelineOutput(images=image, nsfw_content_detected=nsfw)


def run_sd(pipe, a, options):
    height, width = _size(pipe, a)
    pipe.check_inputs(a["prompt"], height, width, a["callback_steps"], a["negative_prompt"], a["prompt_embeds"],
                      a["negative_prompt_embeds"], None, None, a["callback_on_step_end_tensor_inputs"])
    batch = batch_size(a)
    latents = _loop(pipe, a, options, batch, _sd_encoder(pipe, a), _from_noise(pipe, a, batch, height, width))
    return _sd_output(pipe, a, latents)


def run_sd_img2img(pipe, a, options):
    pipe.check_inputs(a["prompt"], a["strength"], a["callback_steps"], a["negative_prompt"], a["prompt_embeds"],
                      a["negative_prompt_embeds"], None, None, a["callback_on_step_end_tensor_inputs"])
    batch = batch_size(a)
    start, _ = _from_image(pipe, a, batch, lambda image, dtype: _image_latents(pipe, image, batch, a["generator"],
                                                                              dtype))
    latents = _loop(pipe, a, options, batch, _sd_encoder(pipe, a), start, strength=a["strength"])
    return _sd_output(pipe, a, latents)


def _sdxl_prompt(pipe, a, do_cfg):
    """SDXL's prompt embeddings through both encoders: (text, neg, pooled, neg_pooled, the
    projection width the time ids are sized with)."""
    text, neg, pooled, neg_pooled = pipe.encode_prompt(
        prompt=a["prompt"], prompt_2=a["prompt_2"], device=pipe._execution_device,
        num_images_per_prompt=a["num_images_per_prompt"], do_classifier_free_guidance=do_cfg,
        negative_prompt=a["negative_prompt"], negative_prompt_2=a["negative_prompt_2"],
        prompt_embeds=a["prompt_embeds"], negative_prompt_embeds=a["negative_prompt_embeds"],
        pooled_prompt_embeds=a["pooled_prompt_embeds"],
        negative_pooled_prompt_embeds=a["negative_pooled_prompt_embeds"], lora_scale=_lora_scale(a),
        clip_skip=a["clip_skip"])
    proj = int(pooled.shape[-1]) if pipe.text_encoder_2 is None else pipe.text_encoder_2.config.projection_dim
    return text, neg, pooled, neg_pooled, proj


def _sdxl_cond(pipe, text, neg, pooled, neg_pooled, ids, neg_ids, do_cfg):
    device = pipe._execution_device
    cond = {"encoder_hidden_states": text.to(device), "text_embeds": pooled.to(device), "time_ids": ids}
    if not do_cfg:
        return cond, None
    return cond, {"encoder_hidden_states": neg.to(device), "text_embeds": neg_pooled.to(device), "time_ids": neg_ids}


def _sdxl_output(pipe, a, latents):
    """SDXL's (and its img2img's) VAE decode (upcast, latents mean/std), watermark and output."""
    if a["output_type"] == "latent":
        image = latents
    else:
        vae = pipe.vae
        upcast = vae.dtype == torch.float16 and vae.config.force_upcast  # fp16 SDXL VAEs overflow
        if upcast:
            vae.to(torch.float32)
            latents = latents.float()
        mean, std = getattr(vae.config, "latents_mean", None), getattr(vae.config, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, len(mean), 1, 1)
            mean = torch.tensor(mean).view(shape).to(latents.device, latents.dtype)
            std = torch.tensor(std).view(shape).to(latents.device, latents.dtype)
            latents = latents * std / vae.config.scaling_factor + mean
        else:
            latents = latents / vae.config.scaling_factor
        image = vae.decode(latents.to(get_module_execution_device(vae)), return_dict=False)[0]
        if upcast:
            vae.to(dtype=torch.float16)
        if pipe.watermark is not None:
            image = pipe.watermark.apply_watermark(image)
        image = pipe.image_processor.postprocess(image, output_type=a["output_type"])
    pipe.maybe_free_model_hooks()
    return StableDiffusionXLPipelineOutput(images=image) if a["return_dict"] else (image,)


def _fraction(a, name):
    """SDXL's denoising_start / denoising_end: None or a float in (0, 1) (diffusers ignores
    other values, or half-applies them)."""
    value = a[name]
    if value is not None and (not isinstance(value, float) or not 0 < value < 1):
        raise ValueError(f"{name}: expected a float in (0, 1) (a fraction of the plan), got {value!r}")
    return value


def run_sdxl(pipe, a, options):
    height = a["height"] or pipe.default_sample_size * pipe.vae_scale_factor
    width = a["width"] or pipe.default_sample_size * pipe.vae_scale_factor
    pipe.check_inputs(a["prompt"], a["prompt_2"], height, width, a["callback_steps"], a["negative_prompt"],
                      a["negative_prompt_2"], a["prompt_embeds"], a["negative_prompt_embeds"],
                      a["pooled_prompt_embeds"], a["negative_pooled_prompt_embeds"], None, None,
                      a["callback_on_step_end_tensor_inputs"])
    device, batch = pipe._execution_device, batch_size(a)

    def encode(do_cfg):
        text, neg, pooled, neg_pooled, proj = _sdxl_prompt(pipe, a, do_cfg)

        def time_ids(original, crops, target):
            return pipe._get_add_time_ids(original or (height, width), crops, target or (height, width),
                                          dtype=text.dtype, text_encoder_projection_dim=proj).to(device)

        ids = time_ids(a["original_size"], a["crops_coords_top_left"], a["target_size"])
        neg_ids = ids
        if a["negative_original_size"] is not None and a["negative_target_size"] is not None:
            neg_ids = time_ids(a["negative_original_size"], a["negative_crops_coords_top_left"],
                               a["negative_target_size"])
        if not do_cfg:
            return _sdxl_cond(pipe, text, neg, pooled, neg_pooled, ids.repeat(batch, 1), None, do_cfg)
        # as diffusers: the [negative, positive] pair repeated over the doubled batch (see the module doc)
        pairs = torch.cat([neg_ids, ids]).repeat(batch, 1)
        return _sdxl_cond(pipe, text, neg, pooled, neg_pooled, pairs[batch:], pairs[:batch], do_cfg)

    latents = _loop(pipe, a, options, batch, encode, _from_noise(pipe, a, batch, height, width),
                    denoising_end=_fraction(a, "denoising_end"))
    return _sdxl_output(pipe, a, latents)


def run_sdxl_img2img(pipe, a, options):
    pipe.check_inputs(a["prompt"], a["prompt_2"], a["strength"], a["num_inference_steps"], a["callback_steps"],
                      a["negative_prompt"], a["negative_prompt_2"], a["prompt_embeds"], a["negative_prompt_embeds"],
                      None, None, a["callback_on_step_end_tensor_inputs"])
    start_at, end_at = _fraction(a, "denoising_start"), _fraction(a, "denoising_end")
    if start_at is not None and end_at is not None and start_at >= end_at:
        raise ValueError(f"denoising_end: expected more than denoising_start ({start_at}), got {end_at}")
    device, batch, per_prompt = pipe._execution_device, batch_size(a), a["num_images_per_prompt"]
    start, shape = _from_image(pipe, a, batch, lambda image, dtype: pipe.prepare_latents(
        image, None, batch // per_prompt, per_prompt, dtype, device, a["generator"], add_noise=False),
        add_noise=start_at is None)
    # the size conditioning's default: the latents' size in pixels (a 4-channel image: latents already)
    if a["latents"] is not None:
        shape = tuple(a["latents"].shape)
    scale = pipe.vae_scale_factor if shape[1] == 4 else 1
    height, width = shape[-2] * scale, shape[-1] * scale

    def encode(do_cfg):
        text, neg, pooled, neg_pooled, proj = _sdxl_prompt(pipe, a, do_cfg)
        original, target = a["original_size"] or (height, width), a["target_size"] or (height, width)
        ids, neg_ids = pipe._get_add_time_ids(
            original, a["crops_coords_top_left"], target, a["aesthetic_score"], a["negative_aesthetic_score"],
            a["negative_original_size"] or original, a["negative_crops_coords_top_left"],
            a["negative_target_size"] or target, dtype=text.dtype, text_encoder_projection_dim=proj)
        return _sdxl_cond(pipe, text, neg, pooled, neg_pooled, ids.to(device).repeat(batch, 1),
                          neg_ids.to(device).repeat(batch, 1), do_cfg)

    latents = _loop(pipe, a, options, batch, encode, start, strength=a["strength"], denoising_start=start_at,
                    denoising_end=end_at, from_state=start_at is not None or a["latents"] is not None)
    return _sdxl_output(pipe, a, latents)


FAMILIES = (
    Family(StableDiffusionPipeline, "unet", frozenset(_COMMON), run_sd),
    Family(StableDiffusionXLPipeline, "unet", frozenset(_COMMON + _SDXL + ("denoising_end",)), run_sdxl),
    # (the img2img pipelines take no height/width; SDXL's `latents` are the loop's start, noised already)
    Family(StableDiffusionImg2ImgPipeline, "unet", frozenset(_COMMON + _IMG2IMG), run_sd_img2img),
    Family(StableDiffusionXLImg2ImgPipeline, "unet",
           frozenset(_COMMON + _SDXL + _IMG2IMG + ("denoising_start", "denoising_end")), run_sdxl_img2img),
)
