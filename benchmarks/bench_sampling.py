"""End-to-end sampling: ms per image, side by side in one run.

Providers (one model, one noise, one plan per row):
  eager    the textbook reference loop (`backend="reference"`): the 10-20 small ops per step
           a scheduler does, around the eager model
  fused    the fused loop: one `solver_step` kernel per step, eager model
  graph    the fused loop recorded into one CUDA graph and replayed (GPU only)
  compile  `torch.compile(model, mode="max-autotune")` inside the reference loop (GPU only by
           default: on a 2-core CPU its compile time dwarfs the run; FASTDIFF_BENCH_PROVIDERS
           can ask for it)

Workloads: GPU: the CIFAR-size U-Net (batch 1, 16, 64) and the SD-1.5-like latent U-Net
(batch 1 with CFG, 77x768 context), fp16, 4 / 8 / 20 steps of DPM-Solver++ 2M. CPU (quick):
the bundled digits-size U-Net, 4 and 8 steps.
"""
from __future__ import annotations

import os

import pytest
import torch

import fastdiff
from fastdiff.bench.harness import bench_sizes, run_benchmark
from fastdiff.nn import UNet, UNetConfig

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.float16 if CUDA else torch.float32

# (model name, batch, steps)
WORKLOADS = bench_sizes(
    full=[(m, b, s) for m, b in (("cifar", 1), ("cifar", 16), ("cifar", 64), ("sd15_like", 1)) for s in (4, 8, 20)],
    quick=[("digits", 4, 4), ("digits", 4, 8)],
)
PROVIDERS = ["eager", "fused"] + (["graph", "compile"] if CUDA else [])
ASKED = [p for p in os.environ.get("FASTDIFF_BENCH_PROVIDERS", "").split(",") if p]
if "compile" in ASKED and "compile" not in PROVIDERS:
    PROVIDERS.append("compile")

_MODELS = {}


def _model(name: str):
    """One model per config per run (built once, random weights, eval mode, DTYPE)."""
    if name not in _MODELS:
        cfg = getattr(UNetConfig, name)()
        torch.manual_seed(0)
        _MODELS[name] = (UNet(cfg).to(DEVICE, DTYPE).eval(), cfg)
    return _MODELS[name]


def _inputs(cfg: UNetConfig, batch: int):
    g = torch.Generator(DEVICE).manual_seed(0)
    noise = torch.randn((batch,) + cfg.sample_shape, generator=g, device=DEVICE)
    kw = {}
    if cfg.context_dim:  # SD-like: text context, CFG on a doubled batch
        ctx = torch.randn(batch, cfg.context_length, cfg.context_dim, generator=g, device=DEVICE, dtype=DTYPE)
        kw = dict(guidance_scale=7.5, cond={"context": ctx}, uncond={"context": torch.zeros_like(ctx)})
    elif cfg.num_classes:
        labels = torch.arange(batch, device=DEVICE) % cfg.num_classes
        kw = dict(guidance_scale=2.0, cond={"class_labels": labels},
                  uncond={"class_labels": torch.full_like(labels, cfg.num_classes)})
    return noise, kw


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("workload", WORKLOADS, ids=lambda w: f"{w[0]}-b{w[1]}-s{w[2]}")
def test_sampling(benchmark, hw, workload, provider):
    name, batch, steps = workload
    model, cfg = _model(name)
    noise, kw = _inputs(cfg, batch)
    backend = "reference" if provider in ("eager", "compile") else "auto"
    sampler = fastdiff.Sampler(solver="dpmpp_2m", steps=steps, backend=backend)
    net = torch.compile(model, mode="max-autotune") if provider == "compile" else model

    def run():
        with torch.no_grad():
            return sampler.sample(net, noise, model_dtype=DTYPE, cuda_graph=provider == "graph", **kw)

    out = run()  # first call: compile / capture / autotune outside the timing
    assert out.shape == noise.shape and torch.isfinite(out).all()
    run_benchmark(benchmark, run, hw=hw, op="sample", provider=provider, size=f"{name}-b{batch}",
                  images=batch, solver="dpmpp_2m", steps=steps, cfg=bool(kw))
