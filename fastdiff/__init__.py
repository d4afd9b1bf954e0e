"""fastdiff: fused, CUDA-graphed few-step diffusion sampling.

    x0 = fastdiff.sample(model, noise, solver="dpmpp_2m", steps=8, guidance_scale=7.5,
                         cond={...}, uncond={...}, cuda_graph=True)

See `fastdiff.Sampler` for every option and `fastdiff.info()` for what was built.
"""
from fastdiff._info import info
from fastdiff.generation import Workload, generate
from fastdiff.graphs import GraphCaptureError, clear_graphs, graph_stats
from fastdiff.grid import SPACINGS, TwoStage, make_grid
from fastdiff.optimize import OptimizeReport, optimize, optimize_report
from fastdiff.reference.solvers import PREDICTIONS, SOLVERS
from fastdiff.sampler import Sampler, sample
from fastdiff.schedules import FlowSchedule, VPSchedule, get_schedule
from fastdiff.tuning import tune_grid


def accelerate(pipe, **options):
    """`pipe(...)` runs its denoising loop through fastdiff, same arguments and outputs (diffusers
    pipelines: `fastdiff.integrations.diffusers.accelerate`). Returns `pipe`."""
    from fastdiff.integrations.diffusers.accelerate import accelerate as run

    return run(pipe, **options)


def restore(pipe):
    """Undo `accelerate(pipe)`. Returns `pipe`."""
    from fastdiff.integrations.diffusers.accelerate import restore as run

    return run(pipe)


def pipeline_sample(pipe, *args, **kwargs):
    """`pipe(*args, **kwargs)` with the loop run by fastdiff (`steps=`, `cuda_graph=`, `backend=`,
    `plan=` are fastdiff's own): `fastdiff.integrations.diffusers.pipelines.pipeline_sample`."""
    from fastdiff.integrations.diffusers.pipelines import pipeline_sample as run

    return run(pipe, *args, **kwargs)


__version__ = "0.1.0"

__all__ = [
    "FlowSchedule", "GraphCaptureError", "OptimizeReport", "PREDICTIONS", "SOLVERS", "SPACINGS", "Sampler",
    "TwoStage", "VPSchedule", "Workload", "accelerate", "clear_graphs", "generate", "get_schedule", "graph_stats",
    "info", "make_grid", "optimize", "optimize_report", "pipeline_sample", "restore", "sample", "tune_grid",
]
