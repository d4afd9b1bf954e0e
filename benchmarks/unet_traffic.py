"""Launches, bytes and FLOPs of one SD-1.5 U-Net call (diffusers' UNet2DConditionModel, SD-1.5
config, fp16, 64x64 latent, 77x768 context) at batch 2 and 8 (CFG at 1 and 4 images), counted
on meta tensors: no GPU and no weights needed. The numbers behind NOTES' H100 prediction.

    PYTHONPATH=. python benchmarks/unet_traffic.py

Launches and bytes: fastdiff.bench.traffic.OpTraffic, with attention counted as one
flash-attention kernel reading q, k, v and writing its output (what SDPA runs on an H100; on
meta tensors SDPA would decompose into its math path and count the score matrices). FLOPs:
torch.utils.flop_counter on the same call.
"""
from __future__ import annotations

import contextlib
from collections import Counter

import diffusers
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from fastdiff.bench.traffic import OpTraffic, span


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


def main() -> None:
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
