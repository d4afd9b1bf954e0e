"""The bundled digits model as a `fastdiff.generation.Workload`: the default model of
`python -m fastdiff generate` / `compare` (spec `fastdiff.demo.workload:digits`)."""
from __future__ import annotations

from typing import Optional

import torch

import fastdiff
from fastdiff.demo.assets import load_digits_model
from fastdiff.generation import Workload

DEFAULT_SOLVER, DEFAULT_STEPS = "dpmpp_2m", 8


def digits(device="cpu", solver: Optional[str] = None, steps: Optional[int] = None,
           guidance_scale: Optional[float] = None) -> Workload:
    """Image i is generated for digit i % 10 (saved as cond_class_labels); CFG (w != 1) runs the
    null class as the unconditional half."""
    model = load_digits_model(device=device).set_backend("auto")  # fused GroupNorm+SiLU / attention blocks
    sampler = fastdiff.Sampler(solver=solver or DEFAULT_SOLVER, steps=steps or DEFAULT_STEPS, schedule="linear",
                               prediction="epsilon", model_time="timestep")
    n_cls, null = model.config.num_classes, model.null_class
    w = 1.0 if guidance_scale is None else float(guidance_scale)
    return Workload(model=model, sampler=sampler, shape=tuple(model.config.sample_shape),
                    cond=lambda idx: {"class_labels": idx % n_cls},
                    uncond=(lambda idx: {"class_labels": torch.full_like(idx, null)}) if w != 1.0 else None,
                    guidance_scale=w)
