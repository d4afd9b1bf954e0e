"""`fastdiff.accelerate(pipe)`: `pipe(...)` keeps diffusers' signature, defaults and return type
and runs its denoising loop through fastdiff (`pipelines.pipeline_sample`); `fastdiff.restore(pipe)`
gives the pipeline its own loop back.

Python looks `__call__` up on the class, so the pipeline object is given a subclass of its class
that only replaces `__call__` (same name and module, so `save_pretrained` and reprs are
unchanged; `inspect.signature(pipe.__call__)` is diffusers'). The denoiser (`pipe.unet` or
`pipe.transformer`) is `fastdiff.optimize()`d in place; restore() puts back every submodule
and attention processor optimize() replaced. An accelerated pipeline cannot be pickled (its
class is made at run time): restore() it first.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Optional

from fastdiff.integrations.diffusers.pipeline_parts import WRAPPERS, Options
from fastdiff.integrations.diffusers.pipelines import family_of, run
from fastdiff.optimize import optimize as optimize_model

_STATE = "_fastdiff_accelerate"
_CLASSES: dict = {}


@dataclass
class _State:
    base: type
    options: Options
    undo: Optional[Callable[[], None]]


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


def accelerate(pipe, *, cuda_graph="auto", backend: str = "auto", optimize: bool = True, **plan):
    """Run `pipe(...)`'s denoising loop through fastdiff; returns `pipe` itself.

    cuda_graph: True, False or "auto" (the default: one CUDA graph for the loop on a GPU, the
    eager fused loop elsewhere or, with a warning, where capture fails). backend: the kernels'
    backend ("auto", "cuda", "triton", "cpu", "reference"), for the solver step and optimize().
    optimize: fuse the denoiser's blocks with `fastdiff.optimize()` (default True). plan:
    `fastdiff.Sampler` options replacing the scheduler's (solver=, spacing=, ...). Accelerating
    an accelerated pipeline replaces its options."""
    family_of(pipe)  # TypeError naming pipe if fastdiff does not know it
    options = Options(cuda_graph, backend, plan)
    if not isinstance(optimize, bool):
        raise TypeError(f"optimize: expected True or False, got {optimize!r}")
    if _STATE in pipe.__dict__:
        restore(pipe)
    denoiser = getattr(pipe, family_of(pipe).denoiser)
    undo = None
    if optimize:
        undo = _undo_optimize(denoiser)
        optimize_model(denoiser, backend=backend)
    base = type(pipe)
    pipe.__dict__[_STATE] = _State(base, options, undo)  # not setattr: DiffusionPipeline's registers configs
    pipe.__class__ = _accelerated_class(base)
    return pipe


def restore(pipe):
    """Undo `accelerate(pipe)`: its own `__call__` and the denoiser's own modules. Returns `pipe`."""
    state = pipe.__dict__.get(_STATE)
    if state is None:
        raise ValueError(f"pipe: this {type(pipe).__name__} is not accelerated (fastdiff.accelerate(pipe) first)")
    pipe.__class__ = state.base
    if state.undo is not None:
        state.undo()
    getattr(pipe, family_of(pipe).denoiser).__dict__.pop(WRAPPERS, None)  # the loop's callables (pipeline_parts.wrapper)
    del pipe.__dict__[_STATE]
    return pipe
