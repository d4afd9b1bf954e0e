"""Host overhead of the sampling loop and of each op's Python wrapper, on tensors so small that
the kernels cost nothing. One thread, medians of repeated loops; a script, not a
pytest-benchmark suite (so not named bench_*.py, which gpu_check runs as suites).

    PYTHONPATH=. python benchmarks/host_overhead.py

1. Host time per step, side by side: fastdiff's `Sampler.sample` (DPM-Solver++ 2M, plan built
   once) and diffusers' DPM-Solver++ 2M pipeline loop (bench_diffusers.diffusers_loop: its
   `set_timesteps`, the CFG doubling, `scale_model_input`, the CFG combination,
   `scheduler.step`), CFG 7.5, a 1x4x8x8 latent, a model that returns its input (so what is
   timed is everything but the model).
2. Each op's Python wrapper against its raw compiled op, and the solver_step wrapper's parts
   (indented); then the fused ops as a U-Net calls them (a new output per call) against the
   PyTorch modules/ops they replace.
"""
from __future__ import annotations

import types

import torch
import torch.nn.functional as F

import fastdiff
from fastdiff.nn.layers import GroupNormSiLU
from fastdiff.ops import solver_step as ss
from fastdiff.ops.attention import attention
from fastdiff.ops.group_norm_silu import group_norm_silu
from fastdiff.ops.solver_step import check_solver_step_args, solver_step
from bench_diffusers import _scheduler, diffusers_loop  # benchmarks/, the script's folder
from solver_step_cpu_bandwidth import median_s

COEF = [0.9, -0.4, 0.7, 0.2, -0.1, 0.0, 0.0, 0.0, 0.0]
SLOTS = [0, 1, -1, -1]
STEPS, GUIDANCE = 20, 7.5


def loop_rows() -> dict:
    """Per-step host time of both loops around a model that costs nothing."""
    latents = torch.randn(1, 4, 8, 8)
    text, empty = torch.randn(1, 3, 8), torch.zeros(1, 3, 8)

    def unet(x, t, encoder_hidden_states):  # diffusers' U-Net call convention, no work
        return types.SimpleNamespace(sample=x)

    scheduler = _scheduler()
    sampler = fastdiff.Sampler.from_scheduler(_scheduler(), STEPS)

    def ours():
        sampler.sample(unet, latents, guidance_scale=GUIDANCE, cond={"encoder_hidden_states": text},
                       uncond={"encoder_hidden_states": empty})

    def theirs():
        diffusers_loop(unet, scheduler, latents, text, empty, STEPS)

    with torch.no_grad():  # as a diffusers pipeline runs it (fastdiff's sample needs no caller help)
        times = {"diffusers DPM-Solver++ 2M loop": median_s(theirs, calls=20, reps=15) / STEPS,
                 "fastdiff Sampler.sample": median_s(ours, calls=20, reps=15) / STEPS}
    return times


def op_rows() -> dict:
    x, m, u, out = torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4), torch.randn(1, 4, 4, 4), torch.empty(1, 4, 4, 4)
    hist = torch.randn(2, 1, 4, 4, 4)
    args = ss.SolverStepArgs(x, m, u, hist, None, COEF, SLOTS, 7.5, 0.0, out)
    gx, gw, gb, gout = torch.randn(1, 8, 4, 4), torch.randn(8), torch.randn(8), torch.empty(1, 8, 4, 4)
    norm, silu = torch.nn.GroupNorm(2, 8), torch.nn.SiLU()
    fused_norm = GroupNormSiLU.sharing(norm, silu=True, backend="auto")
    q, k, v = (torch.randn(2, 16, 2, 8).transpose(1, 2) for _ in range(3))  # (B, H, L, D) views
    rows = {
        "solver_step: raw op (torch.ops.fastdiff_C)": lambda: torch.ops.fastdiff_C.solver_step(
            x, m, u, hist, None, COEF, SLOTS, 7.5, None, 0.0, out),
        "solver_step()": lambda: solver_step(x, m, u, hist, coef=COEF, slots=SLOTS, guidance=7.5, out=out,
                                             backend="cpu"),
        "  registered op (torch.ops.fastdiff)": lambda: torch.ops.fastdiff.solver_step(
            x, m, u, hist, None, COEF, SLOTS, 7.5, None, 0.0, out, "cpu"),
        "  check_solver_step_args (uncached)": lambda: check_solver_step_args(
            x, m, u, hist, None, COEF, SLOTS, 7.5, 0.0, out),
        "  overlap check": lambda: ss._check_overlaps(x, m, u, hist, None, SLOTS, out),
        "  backend choice": lambda: ss.DISPATCH.select(args, "cpu"),
        "group_norm_silu: raw op (torch.ops.fastdiff_C)": lambda: torch.ops.fastdiff_C.group_norm_silu(
            gx, 2, gw, gb, 1e-5, True, None, None, 0, gout),
        "group_norm_silu()": lambda: group_norm_silu(gx, 2, gw, gb, out=gout, backend="cpu"),
        # as a U-Net calls them: a new output each call, module overhead included
        "nn.GroupNorm + SiLU module calls": lambda: silu(norm(gx)),
        "GroupNormSiLU module call": lambda: fused_norm(gx),
        "F.scaled_dot_product_attention": lambda: F.scaled_dot_product_attention(q, k, v),
        "attention() (new output)": lambda: attention(q, k, v),
    }
    with torch.no_grad():  # the modules' parameters require grad: as a pipeline runs them
        return {name: median_s(fn, calls=2000) for name, fn in rows.items()}


def main() -> None:
    torch.set_num_threads(1)
    loops = loop_rows()
    for name, s in loops.items():
        print(f"{name + ', host time per step':<50} {s * 1e6:8.1f} us")
    ratio = loops["fastdiff Sampler.sample"] / loops["diffusers DPM-Solver++ 2M loop"]
    print(f"{'  fastdiff / diffusers':<50} {ratio:8.2f} x")
    for name, s in op_rows().items():
        print(f"{name:<50} {s * 1e6:8.2f} us")


if __name__ == "__main__":
    main()
