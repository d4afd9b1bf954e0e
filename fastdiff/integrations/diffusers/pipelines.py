"""A Stable-Diffusion-style diffusers pipeline's denoising, run by fastdiff.

    images = fastdiff.pipeline_sample(pipe, prompt_embeds=text, negative_prompt_embeds=empty,
                                      steps=8, guidance_scale=7.5, cuda_graph="auto")

What the pipeline's `__call__` does with given prompt embeddings, with the loop replaced: the
plan comes from the pipeline's scheduler (`Sampler.from_scheduler`), the U-Net is called with
`encoder_hidden_states` through cond/uncond (CFG fused into the solver step, the loop graphed
on a GPU with `cuda_graph`), and the result is decoded by the pipeline's VAE and image
processor. Only the pipeline's attributes are read (`unet`, `vae`, `scheduler`,
`image_processor`); options the plain text-to-image loop does not have (timestep conditioning,
added conditioning, an image input) are refused by name.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastdiff.sampler import Sampler

_OUTPUT_TYPES = ("pt", "np", "pil", "latent")


def _check_pipeline(pipe) -> None:
    for name in ("unet", "vae", "scheduler"):
        if getattr(pipe, name, None) is None:
            raise TypeError(f"pipe: expected a Stable-Diffusion-style diffusers pipeline with .unet, .vae and "
                            f".scheduler, got {type(pipe).__name__} without .{name}")
    cfg = pipe.unet.config
    if getattr(cfg, "time_cond_proj_dim", None) is not None:
        raise ValueError("pipe: its U-Net takes a guidance-embedding timestep condition (time_cond_proj_dim, "
                         "LCM-distilled); pipeline_sample runs the plain text-to-image loop")
    if getattr(cfg, "addition_embed_type", None) is not None:
        raise ValueError(f"pipe: its U-Net needs added conditioning (addition_embed_type="
                         f"{cfg.addition_embed_type!r}, SDXL-style); pipeline_sample runs the SD-1.x/2.x loop")


def _check_embeds(name: str, t, like: Optional[torch.Tensor]) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != 3 or not t.is_floating_point():
        raise TypeError(f"{name}: expected a float tensor (batch, tokens, dim), got "
                        f"{tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__}")
    if like is not None and t.shape != like.shape:
        raise ValueError(f"{name}: shape {tuple(t.shape)} differs from prompt_embeds' {tuple(like.shape)}")


@torch.no_grad()
def pipeline_sample(pipe, *, prompt_embeds: torch.Tensor, negative_prompt_embeds: Optional[torch.Tensor] = None,
                    steps: int = 50, guidance_scale: float = 7.5, latents: Optional[torch.Tensor] = None,
                    generator=None, height: Optional[int] = None, width: Optional[int] = None,
                    output_type: str = "pt", cuda_graph="auto", backend: str = "auto", **plan_overrides):
    """Images from prompt embeddings (see the module doc). `steps`: as the pipeline's
    num_inference_steps (default 50, the pipeline's too). `latents`: the initial noise (drawn
    from `generator` otherwise, shaped by height/width, default the U-Net's sample size times
    the VAE's scale); `output_type`: "pt" (B, 3, H, W) in [0, 1], "np", "pil", or "latent" (no
    decode). `guidance_scale` != 1 needs `negative_prompt_embeds` (the unconditional branch
    uses them as given). `plan_overrides`: Sampler options replacing the scheduler's."""
    _check_pipeline(pipe)
    _check_embeds("prompt_embeds", prompt_embeds, None)
    if negative_prompt_embeds is not None:
        _check_embeds("negative_prompt_embeds", negative_prompt_embeds, prompt_embeds)
    if output_type not in _OUTPUT_TYPES:
        raise ValueError(f"output_type: expected one of {list(_OUTPUT_TYPES)}, got {output_type!r}")
    unet, vae = pipe.unet, pipe.vae
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    size = unet.config.sample_size
    size = (size, size) if isinstance(size, int) else tuple(size)
    h, w = height or size[0] * scale, width or size[1] * scale
    if h % scale or w % scale:
        raise ValueError(f"height/width: expected multiples of the VAE's scale {scale}, got {h}x{w}")
    device, dtype = unet.device, unet.dtype
    shape = (prompt_embeds.shape[0], unet.config.in_channels, h // scale, w // scale)
    if latents is not None and tuple(latents.shape) != shape:
        raise ValueError(f"latents: expected shape {shape}, got {tuple(latents.shape)}")
    sampler = Sampler.from_scheduler(pipe.scheduler, steps, backend=backend, **plan_overrides)
    guided = guidance_scale != 1  # (a bad scale is refused by sample(), naming guidance_scale)
    if guided and negative_prompt_embeds is None:
        raise ValueError("negative_prompt_embeds: guidance_scale != 1 needs the unconditional embeddings "
                         "(the empty or negative prompt's)")
    cond = {"encoder_hidden_states": prompt_embeds.to(device, dtype)}
    uncond = {"encoder_hidden_states": negative_prompt_embeds.to(device, dtype)} if guided else None
    x = sampler.sample(unet, latents.to(device) if latents is not None else None, shape=shape, generator=generator,
                       device=device, guidance_scale=guidance_scale, cond=cond, uncond=uncond,
                       model_dtype=dtype if dtype != torch.float32 else None, cuda_graph=cuda_graph)
    if output_type == "latent":
        return x
    image = vae.decode((x / vae.config.scaling_factor).to(vae.dtype), return_dict=False)[0]
    processor = getattr(pipe, "image_processor", None)
    if processor is None:
        raise TypeError("pipe: has no image_processor to turn decoded images into outputs; use output_type='latent'")
    return processor.postprocess(image, output_type=output_type)
