"""`fastdiff::layer_norm_modulate` against the eager ops it replaces.

The adaLN normalisation of SD3 / Flux transformer blocks, `LayerNorm(x) * (1 + scale[:, None])
+ shift[:, None]` (LayerNorm without affine, eps 1e-6), at their activation shapes:

  GPU (bf16, 1024x1024 with CFG, batch 2): SD3-medium image tokens 2x4096x1536 and its text
      tokens 2x333x1536; Flux.1 image tokens 2x4096x3072 and single-stream tokens 2x4608x3072
  CPU (fp32, smoke sizes): 2x64x96, 2x256x384

Providers:
  eager     nn.LayerNorm(elementwise_affine=False), 1 + scale, multiply, add: diffusers' four kernels
  compile   torch.compile of that module (inductor, dynamic=False)
  triton    fused op, Triton kernel                 (GPU)
  cpu       fused op, ATen's CPU kernels composed   (CPU)

Bytes moved (the fewest any implementation needs): read x once, write out once, read scale and
shift. Eager moves about 4 reads and 3 writes of x's size (benchmarks/NOTES.md). Each provider is
checked against eager once before it is timed.

    pytest benchmarks/bench_layer_norm_modulate.py --benchmark-json=out.json        # GPU: full sizes
    FASTDIFF_BENCH_QUICK=1 pytest benchmarks/bench_layer_norm_modulate.py           # small sizes
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from fastdiff.bench.harness import Rotating, bench_sizes, rel_err, run_benchmark
from fastdiff.ops.layer_norm_modulate import layer_norm_modulate

GPU = torch.cuda.is_available()
EPS = 1e-6
SIZES = bench_sizes(
    full=[(2, 333, 1536), (2, 4096, 1536), (2, 4096, 3072), (2, 4608, 3072)],
    quick=[(2, 64, 96), (2, 256, 384)],
)
DTYPES = ["bf16"] if GPU else ["fp32"]
PROVIDERS = ["eager", "compile"] + (["triton"] if GPU else ["cpu"])


class EagerAdaLN(nn.Module):
    """What diffusers' AdaLayerNormZero runs after its projection: four kernels."""

    def __init__(self, channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(channels, elementwise_affine=False, eps=EPS)

    def forward(self, x, scale, shift):
        return self.norm(x) * (1 + scale[:, None]) + shift[:, None]


def _make_set(size, dtype, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    b, _, c = size
    # scale and shift as diffusers has them: column slices of one (B, 6C) projection output
    emb = torch.randn(b, 6 * c, generator=g).mul_(0.5).to(device=device, dtype=dtype)
    x = torch.randn(size, generator=g).to(device=device, dtype=dtype)
    return x, emb[:, c:2 * c], emb[:, :c], torch.empty_like(x)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES)
def test_layer_norm_modulate(benchmark, hw, device, size, dtype, provider):
    dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    if provider == "triton":
        pytest.importorskip("triton")
    b, _, c = size
    numel = math.prod(size)
    esize = torch.tensor([], dtype=dt).element_size()
    bytes_moved = esize * (2 * numel + 2 * b * c)
    footprint = bytes_moved + 4 * b * c * esize  # + the rest of the (B, 6C) projection
    sets = [_make_set(size, dt, device, seed) for seed in range(Rotating.count(footprint, device))]
    module = EagerAdaLN(c).to(device)
    x, scale, shift, out = sets[0]
    with torch.no_grad():
        expect = module(x, scale, shift)
    tol = 1e-4 if dt == torch.float32 else 2e-2  # eager rounds every intermediate to the storage dtype

    if provider in ("eager", "compile"):
        mod = module if provider == "eager" else torch.compile(module, dynamic=False)

        def step(x, scale, shift, out):
            with torch.no_grad():
                return mod(x, scale, shift)
    else:
        def step(x, scale, shift, out):
            return layer_norm_modulate(x, scale, shift, eps=EPS, out=out, backend=provider)

    got = step(*sets[0])
    assert rel_err(got, expect) < tol, f"{provider}: rel err {rel_err(got, expect):.2e} vs eager"
    fn = Rotating(sets).bind(step)
    for _ in range(len(sets)):  # touch every set once before timing
        fn()
    run_benchmark(benchmark, fn, hw=hw, op="layer_norm_modulate", provider=provider, size=size,
                  bytes_moved=bytes_moved, variant=dtype)
