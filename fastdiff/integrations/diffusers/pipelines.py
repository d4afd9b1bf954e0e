"""A diffusers pipeline's `__call__`, with the denoising loop run by fastdiff.

    out = fastdiff.pipeline_sample(pipe, "a cat", num_inference_steps=8)   # as pipe("a cat", ...)
    out.images                                                              # PIL images by default

`pipeline_sample(pipe, *args, **kwargs)` takes the pipeline's own call arguments with its
defaults (`steps=` is accepted for num_inference_steps) and returns what the pipeline returns;
`fastdiff.accelerate(pipe)` makes `pipe(...)` call it. As the pipeline does: the input checks
(`pipe.check_inputs`), prompt encoding (`pipe.encode_prompt`), the initial noise (diffusers'
`randn_tensor`: the same generator gives the same noise), the VAE decode and postprocessing.
What fastdiff does instead: the plan comes from `pipe.scheduler` (`Sampler.from_scheduler`), CFG
runs in the fused solver step, and on a GPU the whole loop is one CUDA graph (`cuda_graph="auto"`:
the eager fused loop, with a warning, where it cannot be captured).

diffusers' semantics: guidance_scale <= 1 (Flux: true_cfg_scale <= 1 or no negative prompt)
runs no CFG, one model call per step. An argument fastdiff cannot honour (step-end callbacks,
IP-Adapter, ...) raises ValueError naming it, before any model runs; every other argument of
the pipeline's signature must keep its default. The families (`unet_pipelines`: SD 1.x/2.x,
SDXL and their img2img pipelines; `flow_pipelines`: SD3, Flux) say which arguments they honour.
The pipeline's progress bar counts the steps (`pipeline_parts.denoise`).
Stochastic schedulers (DDPM, LCM, ancestral) draw their step noise from `generator` in the
order diffusers does on the eager path; in a CUDA graph it is drawn before the loop, all at once.
"""
from __future__ import annotations

from typing import Optional

import torch

from fastdiff.integrations.diffusers.pipeline_parts import Family, Options, bind_call


def families():
    from fastdiff.integrations.diffusers import flow_pipelines, unet_pipelines

    return unet_pipelines.FAMILIES + flow_pipelines.FAMILIES


def family_of(pipe) -> Family:
    """The family of `pipe` (of its class before accelerate()); TypeError naming pipe if none."""
    base = getattr(type(pipe), "_fastdiff_base", type(pipe))
    for fam in families():
        if isinstance(pipe, fam.cls):
            if base.__call__ is not fam.cls.__call__:
                raise TypeError(f"pipe: {base.__name__} overrides {fam.cls.__name__}.__call__; fastdiff reproduces "
                                f"{fam.cls.__name__}'s own call only")
            return fam
    names = ", ".join(f.cls.__name__ for f in families())
    raise TypeError(f"pipe: expected one of the diffusers pipelines {names}, got {type(pipe).__name__}")


def run(pipe, args, kwargs, options: Options):
    fam = family_of(pipe)
    a = bind_call(fam, pipe, args, kwargs)
    with torch.no_grad():
        return fam.run(pipe, a, options)


def pipeline_sample(pipe, *args, steps: Optional[int] = None, cuda_graph="auto", backend: str = "auto",
                    plan: Optional[dict] = None, **kwargs):
    """`pipe(*args, **kwargs)` with the denoising loop run by fastdiff (see the module doc).
    `steps`: fastdiff's name for num_inference_steps; `cuda_graph`, `backend`: as in
    `Sampler.sample`; `plan`: Sampler options replacing the scheduler's (solver=, spacing=, ...)."""
    if steps is not None:
        if "num_inference_steps" in kwargs:
            raise ValueError("steps: the same as num_inference_steps; give one of them")
        kwargs["num_inference_steps"] = steps
    return run(pipe, args, kwargs, Options(cuda_graph, backend, dict(plan or {})))
