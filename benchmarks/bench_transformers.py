"""diffusers' SD3 and Flux transformers, one forward: as diffusers builds them vs `fastdiff.optimize`d.

Providers: `eager` (diffusers' JointAttnProcessor2_0 / FluxAttnProcessor, SDPA), `fused`
(`fastdiff.optimize(model)`: packed QKV per stream, q/k RMSNorm + RoPE written into one joint
buffer, `fastdiff::attention`), `fused-packed` (Flux only: after `fuse_qkv_projections()`, its
own packed layers). adaLN and MLPs are diffusers' in every provider.

GPU (bf16): the released models' widths at 1024x1024 (4096 image tokens), fewer blocks (random
weights, built on the GPU): Flux.1-dev (dim 3072, 24 heads of 128, 512 text tokens, batch 1,
2 double + 4 single blocks) and SD3-medium (dim 1536, 24 heads of 64, 333 text tokens, CFG
batch 2, 4 blocks). CPU (quick, fp32): tiny configs. Prediction: benchmarks/NOTES.md.
"""
from __future__ import annotations

import copy

import pytest
import torch

import fastdiff
from fastdiff.bench.harness import bench_sizes, run_benchmark

diffusers = pytest.importorskip("diffusers", reason="pip install 'fastdiff[diffusers]'")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32

# name: (model class, config, image tokens per side (after patching), text tokens, batch)
MODELS = {
    "flux-dev-2+4": ("FluxTransformer2DModel", dict(
        in_channels=64, num_layers=2, num_single_layers=4, attention_head_dim=128, num_attention_heads=24,
        joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
        64, 512, 1),
    "sd3-medium-4": ("SD3Transformer2DModel", dict(
        sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=4, attention_head_dim=64,
        num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
        pos_embed_max_size=192), 64, 333, 2),
    "flux-tiny": ("FluxTransformer2DModel", dict(
        in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 4, 8)), 4, 5, 1),
    "sd3-tiny": ("SD3Transformer2DModel", dict(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2, attention_head_dim=8,
        num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=16, pooled_projection_dim=16,
        pos_embed_max_size=8, qk_norm="rms_norm"), 4, 5, 2),
}
WORKLOADS = bench_sizes(full=["flux-dev-2+4", "sd3-medium-4"], quick=["flux-tiny", "sd3-tiny"])
PROVIDERS = ["eager", "fused", "fused-packed"]
_BUILT = {}


def _models(name: str):
    """{provider: model}, built once per run (random init on the device: ~1e9 parameters)."""
    if name not in _BUILT:
        cls, cfg, _, _, _ = MODELS[name]
        torch.manual_seed(0)
        with torch.device(DEVICE):
            model = getattr(diffusers, cls)(**cfg).to(DTYPE).eval()
        built = {"eager": model, "fused": fastdiff.optimize(copy.deepcopy(model))}
        if cls == "FluxTransformer2DModel":
            packed = copy.deepcopy(model)
            packed.fuse_qkv_projections()
            built["fused-packed"] = fastdiff.optimize(packed)
        _BUILT[name] = built
    return _BUILT[name]


def _inputs(name: str, model):
    cls, cfg, side, text, batch = MODELS[name]
    g = torch.Generator(DEVICE).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=DEVICE).to(DTYPE)

    kw = dict(encoder_hidden_states=rand(batch, text, cfg["joint_attention_dim"]),
              pooled_projections=rand(batch, cfg["pooled_projection_dim"]))
    if cls == "FluxTransformer2DModel":
        n = side * side
        pos = torch.arange(n, device=DEVICE)
        return dict(kw, hidden_states=rand(batch, n, cfg["in_channels"]),
                    timestep=torch.full((batch,), 0.5, device=DEVICE, dtype=DTYPE),
                    guidance=torch.full((batch,), 3.5, device=DEVICE, dtype=DTYPE),
                    img_ids=torch.stack([torch.zeros_like(pos), pos // side, pos % side], -1).float(),
                    txt_ids=torch.zeros(text, 3, device=DEVICE))
    pixels = side * cfg["patch_size"]
    return dict(kw, hidden_states=rand(batch, cfg["in_channels"], pixels, pixels),
                timestep=torch.full((batch,), 500.0, device=DEVICE))


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("workload", WORKLOADS)
def test_transformer_forward(benchmark, hw, workload, provider):
    models = _models(workload)
    if provider not in models:
        pytest.skip(f"{provider}: Flux only (SD3's fused-projection processor is not fastdiff's)")
    model = models[provider]
    kw = _inputs(workload, model)

    def run():
        with torch.no_grad():
            return model(**kw).sample

    out = run()  # first call (cuDNN / Triton choices) outside the timing
    assert out.shape[0] == kw["hidden_states"].shape[0] and torch.isfinite(out).all()
    run_benchmark(benchmark, run, hw=hw, op="transformer_forward", provider=provider, size=workload,
                  images=out.shape[0])
