"""`fastdiff.accelerate(pipe)`: `pipe(...)` keeps diffusers' signature, defaults and return type
and runs its denoising loop through fastdiff (`pipelines.pipeline_sample`); `fastdiff.restore(pipe)`
gives the pipeline its own loop back.

Python looks `__call__` up on the class, so the pipeline object is given a subclass of its class
that only replaces `__call__` (same name and module, so `save_pretrained` and reprs are
unchanged; `inspect.signature(pipe.__call__)` is diffusers'). The denoiser (`pipe.unet` or
`pipe.transformer`) is `fastdiff.optimize()`d in place; restore() puts back every submodule
and attention processor optimize() replaced, and the strides of every 4-D weight a
memory_format converted. An accelerated pipeline cannot be pickled (its class is made at run
time): restore() it first.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, List

import torch

from fastdiff.integrations.diffusers.pipeline_parts import WRAPPERS, Options
from fastdiff.integrations.diffusers.pipelines import family_of, run
from fastdiff.optimize import optimize as optimize_model

_STATE = "_fastdiff_accelerate"
_CLASSES: dict = {}


@dataclass
class _State:
    base: type
    options: Options
    undo: List[Callable[[], None]]  # run last to first by restore()


def _accelerated_class(base: type) -> type:
    cls = _CLASSES.get(base)
    if cls is None:
        @functools.wraps(base.__call__)
        def __call__(self, *args, **kwargs):
            return run(self, args, kwargs, self.__dict__[_STATE].options)

        cls = type(base.__name__, (base,), {"__call__": __call__, "__module__": base.__module__,
                                            "__qualname__": base.__qualname__, "_fastdiff_base": base})
        _CLASSES[base] = cls
    return cls


def _undo_optimize(model) -> Callable[[], None]:
    """A function putting back what optimize() changes in `model`: each module's children (and
    their order) and each attention processor."""
    children = [(m, dict(m._modules)) for m in model.modules()]
    processors = [(m, m.processor) for m in model.modules() if callable(getattr(m, "set_processor", None))
                  and hasattr(m, "processor")]
    report = model.__dict__.get("_fastdiff_optimize_report")

    def undo():
        for m, proc in processors:
            m.set_processor(proc)
        for m, saved in children:
            m._modules.clear()
            m._modules.update(saved)
        model.__dict__.pop("_fastdiff_optimize_report", None)
        if report is not None:
            model.__dict__["_fastdiff_optimize_report"] = report

    return undo


def _undo_layout(model) -> Callable[[], None]:
    """A function giving each 4-D parameter and buffer of `model` (those `.to(memory_format=)`
    converts) its present strides back, values kept."""
    saved = [(table, name, t.stride()) for m in model.modules()
             for table in (m._parameters, m._buffers) for name, t in table.items() if t is not None and t.dim() == 4]

    def undo():
        with torch.no_grad():
            for table, name, stride in saved:
                t = table[name]
                if t.stride() == stride:
                    continue
                back = torch.empty_strided(t.shape, stride, dtype=t.dtype, device=t.device).copy_(t)
                if isinstance(t, torch.nn.Parameter):
                    t.data = back  # the same Parameter object: optimizers and references keep it
                else:
                    table[name] = back

    return undo


def accelerate(pipe, *, cuda_graph="auto", backend: str = "auto", optimize: bool = True, memory_format=None,
               **plan):
    """Run `pipe(...)`'s denoising loop through fastdiff; returns `pipe` itself.

    cuda_graph: True, False or "auto" (the default: one CUDA graph for the loop on a GPU, the
    eager fused loop elsewhere or, with a warning, where capture fails). backend: the kernels'
    backend ("auto", "cuda", "triton", "cpu", "reference"), for the solver step and optimize().
    optimize: fuse the denoiser's blocks with `fastdiff.optimize()` (default True). plan:
    `fastdiff.Sampler` options replacing the scheduler's (solver=, spacing=, ...). Accelerating
    an accelerated pipeline replaces its options.
    memory_format: None (the default) leaves layouts as they are; torch.channels_last converts
    the U-Net's 4-D weights to NHWC and runs the loop on channels_last latents (the fused solver
    step too; given `latents=` are converted once), U-Net pipelines only (SD 1.x/2.x, SDXL and
    their img2img); torch.contiguous_format converts the weights back. With a memory_format the
    returned latents are contiguous. restore() gives the weights their strides back."""
    fam = family_of(pipe)  # TypeError naming pipe if fastdiff does not know it
    options = Options(cuda_graph, backend, plan, memory_format)
    if memory_format is torch.channels_last and fam.no_channels_last:
        raise ValueError(f"memory_format: torch.channels_last is for U-Net pipelines with 4-D latents; "
                         f"{fam.cls.__name__}: {fam.no_channels_last}")
    if not isinstance(optimize, bool):
        raise TypeError(f"optimize: expected True or False, got {optimize!r}")
    if _STATE in pipe.__dict__:
        restore(pipe)
    denoiser = getattr(pipe, fam.denoiser)
    undo = [] if memory_format is None else [_undo_layout(denoiser)]
    if optimize:
        undo.append(_undo_optimize(denoiser))
        optimize_model(denoiser, backend=backend, memory_format=memory_format)
    elif memory_format is not None:
        denoiser.to(memory_format=memory_format)
    base = type(pipe)
    pipe.__dict__[_STATE] = _State(base, options, undo)  # not setattr: DiffusionPipeline's registers configs
    pipe.__class__ = _accelerated_class(base)
    return pipe


def restore(pipe):
    """Undo `accelerate(pipe)`: its own `__call__`, the denoiser's own modules and weight
    strides. Returns `pipe`."""
    state = pipe.__dict__.get(_STATE)
    if state is None:
        raise ValueError(f"pipe: this {type(pipe).__name__} is not accelerated (fastdiff.accelerate(pipe) first)")
    pipe.__class__ = state.base
    for undo in reversed(state.undo):
        undo()
    getattr(pipe, family_of(pipe).denoiser).__dict__.pop(WRAPPERS, None)  # the loop's callables (pipeline_parts.wrapper)
    del pipe.__dict__[_STATE]
    return pipe
