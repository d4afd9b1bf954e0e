"""Launches, bytes and FLOPs of one SD-1.5 U-Net call (diffusers' UNet2DConditionModel, SD-1.5
config, fp16, 64x64 latent, 77x768 context) at batch 2 and 8 (CFG at 1 and 4 images), counted
on meta tensors: no GPU and no weights needed; and what one DPM-Solver++ 2M step with CFG
launches and moves outside the model in fastdiff's loop and in diffusers' pipeline loop (CPU
tensors, a model that returns its input, 20 steps, per-step mean). The numbers behind NOTES'
H100 prediction.

    PYTHONPATH=. python benchmarks/unet_traffic.py

Launches and bytes: fastdiff.bench.traffic.OpTraffic, with attention counted as one
flash-attention kernel reading q, k, v and writing its output (what SDPA runs on an H100; on
meta tensors SDPA would decompose into its math path and count the score matrices). FLOPs:
torch.utils.flop_counter on the same call.
"""
from __future__ import annotations

import contextlib
import types
from collections import Counter

import diffusers
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import fastdiff
from fastdiff.bench.traffic import OpTraffic, span
from bench_diffusers import _scheduler, diffusers_loop  # benchmarks/, the script's folder

STEPS = 20


@contextlib.contextmanager
def flash_attention(traffic: OpTraffic):
    """F.scaled_dot_product_attention as one kernel: reads q, k, v, writes the output."""
    sdpa = F.scaled_dot_product_attention

    def one_kernel(q, k, v, *args, **kwargs):
        out = q.new_empty(q.shape[:-1] + v.shape[-1:])
        traffic.record("flash attention", span(q) + span(k) + span(v) + span(out))
        return out

    F.scaled_dot_product_attention = one_kernel
    try:
        yield
    finally:
        F.scaled_dot_product_attention = sdpa


def loop_rows(images: int) -> None:
    latents = torch.randn(images, 4, 64, 64)
    text, empty = torch.randn(images, 77, 768, dtype=torch.float16), torch.zeros(images, 77, 768, dtype=torch.float16)
    traffic = OpTraffic()

    def unet(x, t, encoder_hidden_states):  # diffusers' call convention; its (no) work is not counted
        with traffic.pause():
            return types.SimpleNamespace(sample=x.half())

    sampler = fastdiff.Sampler.from_scheduler(_scheduler(), STEPS)
    runs = {
        "fastdiff": lambda: sampler.sample(unet, latents, guidance_scale=7.5, model_dtype=torch.float16,
                                           cond={"encoder_hidden_states": text},
                                           uncond={"encoder_hidden_states": empty}),
        "diffusers": lambda: diffusers_loop(unet, _scheduler(), latents.half(), text, empty, STEPS),
    }
    for name, run in runs.items():
        traffic.ops = []
        with torch.no_grad(), traffic:
            run()
        print(f"{images} image(s), {name} loop outside the model: {traffic.launches / STEPS:.1f} launches, "
              f"{traffic.bytes / STEPS / 1e6:.2f} MB per step")


def main() -> None:
    for images in (1, 4):
        loop_rows(images)
    with torch.device("meta"):
        unet = diffusers.UNet2DConditionModel(sample_size=64, cross_attention_dim=768).half().eval()
    weights = sum(p.numel() * p.element_size() for p in unet.parameters())
    print(f"weights: {weights / 1e6:.0f} MB (fp16)")
    for batch in (2, 8):
        x = torch.empty(batch, 4, 64, 64, device="meta", dtype=torch.float16)
        ctx = torch.empty(batch, 77, 768, device="meta", dtype=torch.float16)
        t = torch.full((batch,), 500.0, device="meta")
        traffic, flops = OpTraffic(), FlopCounterMode(display=False)
        with torch.no_grad():
            with traffic, flash_attention(traffic):
                unet(x, t, encoder_hidden_states=ctx)
            with flops:
                unet(x, t, encoder_hidden_states=ctx)
        kinds = Counter(name.split(".")[1] if "." in name else name for name, _ in traffic.ops)
        print(f"batch {batch}: {traffic.launches} launches, {traffic.bytes / 1e6:.0f} MB moved, "
              f"{flops.get_total_flops() / 1e12:.2f} TFLOP")
        print("   ", ", ".join(f"{k} {n}" for k, n in kinds.most_common(14)))


if __name__ == "__main__":
    main()
