"""A diffusers U-Net, sampled by diffusers' own loop and by fastdiff: ms per image, one run.

Providers (one model, one noise, one scheduler config per row):
  eager    diffusers' denoising loop as its pipelines run it: `scheduler.set_timesteps`, then per
           step one U-Net call on the CFG-doubled batch (diffusers' SDPA attention), the CFG
           combination and `scheduler.step`
  compile  the same loop around `torch.compile(unet)` (GPU only by default: on a 2-core CPU the
           compile dwarfs the run; FASTDIFF_BENCH_PROVIDERS can ask for it)
  fused    `fastdiff.optimize(unet)` (fused GroupNorm+SiLU, packed-QKV attention) sampled by
           `Sampler.from_scheduler(scheduler)`: one fused solver_step (CFG included) per step
  graph    the fused loop recorded into one CUDA graph and replayed (GPU only)

Workloads: GPU: UNet2DConditionModel with SD-1.5's config (random weights, fp16), 64x64
latent, batch 1, CFG 7.5, 77x768 embeddings, DPMSolverMultistep (2M), 8 and 20 steps. CPU
(quick): a tiny config of the same layout, 4 steps.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

import fastdiff
from fastdiff.bench.harness import bench_sizes, run_benchmark

diffusers = pytest.importorskip("diffusers", reason="pip install 'fastdiff[diffusers]'")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.float16 if CUDA else torch.float32
GUIDANCE = 7.5

# (config name, steps)
WORKLOADS = bench_sizes(full=[("sd15", 8), ("sd15", 20)], quick=[("tiny", 4)])
PROVIDERS = ["eager", "fused"] + (["graph", "compile"] if CUDA else [])
ASKED = [p for p in os.environ.get("FASTDIFF_BENCH_PROVIDERS", "").split(",") if p]
if "compile" in ASKED and "compile" not in PROVIDERS:
    PROVIDERS.append("compile")

CONFIGS = {  # UNet2DConditionModel's defaults are SD-1.5's blocks; sample size and context set here
    "sd15": dict(sample_size=64, cross_attention_dim=768),
    "tiny": dict(sample_size=8, cross_attention_dim=32, block_out_channels=(32, 64), layers_per_block=1,
                 down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), attention_head_dim=8,
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D")),
}
_MODELS = {}


def _models(name: str):
    """The U-Net as diffusers builds it and a fastdiff-optimized copy (built once per run)."""
    if name not in _MODELS:
        torch.manual_seed(0)
        with torch.device(DEVICE):  # random init in place: 860M parameters take 14 s on 2 CPU cores
            unet = diffusers.UNet2DConditionModel(**CONFIGS[name])
        unet = unet.to(DTYPE).eval()
        _MODELS[name] = unet, fastdiff.optimize(copy.deepcopy(unet))
    return _MODELS[name]


def _scheduler():
    return diffusers.DPMSolverMultistepScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def diffusers_loop(unet, scheduler, latents, text, empty, steps):
    """What a diffusers text-to-image pipeline does between its noise and its VAE."""
    scheduler.set_timesteps(steps, device=latents.device)
    x = latents * scheduler.init_noise_sigma
    context = torch.cat([empty, text])
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(torch.cat([x, x]), t)
        out = unet(inp, t, encoder_hidden_states=context).sample
        uncond, cond = out.chunk(2)
        x = scheduler.step(uncond + GUIDANCE * (cond - uncond), t, x).prev_sample
    return x


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("workload", WORKLOADS, ids=lambda w: f"{w[0]}-s{w[1]}")
def test_diffusers_sampling(benchmark, hw, workload, provider):
    name, steps = workload
    unet, fused_unet = _models(name)
    cfg = unet.config
    g = torch.Generator(DEVICE).manual_seed(0)
    latents = torch.randn(1, cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g, device=DEVICE)
    text = torch.randn(1, 77, cfg.cross_attention_dim, generator=g, device=DEVICE, dtype=DTYPE)
    empty = torch.zeros_like(text)
    if provider in ("eager", "compile"):
        net = torch.compile(unet, mode="max-autotune") if provider == "compile" else unet
        scheduler = _scheduler()

        def run():
            with torch.no_grad():
                return diffusers_loop(net, scheduler, latents.to(DTYPE), text, empty, steps)
    else:
        sampler = fastdiff.Sampler.from_scheduler(_scheduler(), steps)

        def run():
            return sampler.sample(fused_unet, latents, guidance_scale=GUIDANCE, cond={"encoder_hidden_states": text},
                                  uncond={"encoder_hidden_states": empty}, model_dtype=DTYPE,
                                  cuda_graph=provider == "graph")

    out = run()  # first call: compile / capture / autotune outside the timing
    assert out.shape == latents.shape and torch.isfinite(out).all()
    run_benchmark(benchmark, run, hw=hw, op="sample_diffusers", provider=provider, size=f"{name}-b1",
                  images=1, solver="dpmpp_2m", steps=steps, cfg=True)
