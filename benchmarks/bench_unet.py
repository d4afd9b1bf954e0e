"""The U-Net forward: eager twin vs fused blocks vs torch.compile, side by side.

Providers: `eager` (plain PyTorch GroupNorm/SiLU/SDPA), `fused` (`UNet.set_backend("auto")`:
fused GroupNorm+SiLU, attention and linear_residual), `compile` (`torch.compile` of the eager
module; GPU only by default, FASTDIFF_BENCH_PROVIDERS=compile asks for it on the CPU).
GPU: the CIFAR-size model (batch 1, 16, 64) and the SD-1.5-like model at 512x512 with CFG
(batch 2, 77x768 context), fp16 (goal: fused >= 1.3x eager). CPU: the digits model, fp32.
"""
from __future__ import annotations

import os

import pytest
import torch

from fastdiff.bench.harness import bench_sizes, run_benchmark
from fastdiff.nn import UNet, UNetConfig

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.float16 if CUDA else torch.float32
WORKLOADS = bench_sizes(full=[("cifar", 1), ("cifar", 16), ("cifar", 64), ("sd15_like", 2)],
                        quick=[("digits", 8)])
PROVIDERS = ["eager", "fused"] + (["compile"] if CUDA or "compile" in os.environ.get("FASTDIFF_BENCH_PROVIDERS", "")
                                  else [])
_MODELS = {}


def _model(name):
    if name not in _MODELS:
        torch.manual_seed(0)
        _MODELS[name] = UNet(getattr(UNetConfig, name)()).to(DEVICE, DTYPE).eval()
    return _MODELS[name]


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("workload", WORKLOADS, ids=lambda w: f"{w[0]}-b{w[1]}")
def test_unet_forward(benchmark, hw, workload, provider):
    name, batch = workload
    model = _model(name)
    cfg = model.config
    g = torch.Generator(DEVICE).manual_seed(0)
    x = torch.randn((batch,) + cfg.sample_shape, generator=g, device=DEVICE, dtype=DTYPE)
    t = torch.full((batch,), 500.0, device=DEVICE)
    kw = {}
    if cfg.context_dim:
        kw["context"] = torch.randn(batch, cfg.context_length, cfg.context_dim, generator=g, device=DEVICE, dtype=DTYPE)
    if cfg.num_classes:
        kw["class_labels"] = torch.arange(batch, device=DEVICE) % cfg.num_classes
    model.set_backend("auto" if provider == "fused" else None)
    net = torch.compile(model) if provider == "compile" else model

    def run():
        with torch.no_grad():
            return net(x, t, **kw)

    out = run()  # compile / autotune outside the timing
    assert out.shape == x.shape and torch.isfinite(out).all()
    run_benchmark(benchmark, run, hw=hw, op="unet_forward", provider=provider, size=f"{name}-b{batch}", images=batch)
    model.set_backend(None)
