"""`fastdiff::group_norm_silu` against the eager ops it replaces.

The ResBlock's second normalisation, `silu(GroupNorm(x + temb[:, :, None, None]))` with 32
groups, at the U-Net's activation shapes:

  GPU (fp16, the SD-1.5 U-Net at 512x512 with CFG, batch 2): 2x320x64x64, 2x640x32x32,
      2x1280x16x16; a CIFAR-size DDPM U-Net (128 channels at 32x32) sampling 64 images with
      CFG: 128x128x32x32
  CPU (fp32, smoke sizes): 2x128x16x16, 2x320x32x32

Variants: "temb" (x + temb -> GN -> SiLU: ResBlock norm2) everywhere; on the CPU also "all"
(+ a residual added after the activation) and "plain" (GN -> SiLU: norm1).

Providers:
  eager     nn.GroupNorm + F.silu + the adds as separate ops (what a diffusers ResBlock runs)
  compile   torch.compile of that module (inductor, dynamic=False)
  cuda      fused op, CUDA kernel(s)                (GPU)
  triton    fused op, Triton kernel(s)              (GPU)
  cpu       fused op, C++/OpenMP kernel             (CPU)

Bytes moved (the fewest any implementation needs): read x once (+ temb, + residual, + the
affine parameters), write y once. A split group (the fused kernels' two-pass path, which the
SD shapes take on a GPU) reads x twice, so its GB/s understates its DRAM traffic when the second
read misses L2; `x_reads` in extra_info says which path Triton took (1 or 2). Each provider is
checked against eager once before it is timed.

    pytest benchmarks/bench_group_norm_silu.py --benchmark-json=out.json        # GPU: full sizes
    FASTDIFF_BENCH_QUICK=1 pytest benchmarks/bench_group_norm_silu.py           # small sizes
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdiff import _ext
from fastdiff.bench.harness import Rotating, bench_sizes, rel_err, run_benchmark
from fastdiff.ops.group_norm_silu import group_norm_silu

GPU = torch.cuda.is_available()
GROUPS = 32
SIZES = bench_sizes(
    # the last full size is what the Nsight Compute phase of gpu_check.sh profiles
    # (FASTDIFF_BENCH_SIZES=largest): SD-1.5's first level, the split path
    full=[(128, 128, 32, 32), (2, 1280, 16, 16), (2, 640, 32, 32), (2, 320, 64, 64)],
    quick=[(2, 128, 16, 16), (2, 320, 32, 32)],
)
DTYPES = ["fp16"] if GPU else ["fp32"]
VARIANTS = ["temb"] if GPU else ["temb", "all", "plain"]
PROVIDERS = ["eager", "compile"] + (["cuda", "triton"] if GPU else ["cpu"])


class EagerGroupNormSiLU(nn.Module):
    """The unfused block: add, nn.GroupNorm, F.silu, add -- each its own kernel(s)."""

    def __init__(self, channels: int, groups: int):
        super().__init__()
        self.norm = nn.GroupNorm(groups, channels, eps=1e-5)

    def forward(self, x, temb=None, residual=None):
        if temb is not None:
            x = x + temb[:, :, None, None]
        h = F.silu(self.norm(x))
        if residual is not None:
            h = h + residual
        return h


def _make_set(size, dtype, device, variant, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    n, c = size[0], size[1]
    x = torch.randn(size, generator=g).to(device=device, dtype=dtype)
    temb = torch.randn(n, c, generator=g).to(device=device, dtype=dtype) if variant != "plain" else None
    res = torch.randn(size, generator=g).to(device=device, dtype=dtype) if variant == "all" else None
    return x, temb, res, torch.empty_like(x)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES)
def test_group_norm_silu(benchmark, hw, device, size, dtype, variant, provider):
    dt = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
    if provider == "cuda" and not _ext.has_kernel("group_norm_silu", "CUDA"):
        pytest.skip("fastdiff._C was built without CUDA kernels")
    if provider == "cpu" and not _ext.has_kernel("group_norm_silu", "CPU"):
        pytest.skip("fastdiff._C is not built")
    if provider == "triton":
        pytest.importorskip("triton")
    n, c = size[0], size[1]
    numel = math.prod(size)
    esize = torch.tensor([], dtype=dt).element_size()
    bytes_moved = esize * (2 * numel + (n * c if variant != "plain" else 0) + (numel if variant == "all" else 0))
    bytes_moved += 2 * c * esize  # weight, bias
    sets = [_make_set(size, dt, device, variant, seed)
            for seed in range(Rotating.count(bytes_moved + numel * esize, device))]

    torch.manual_seed(0)
    module = EagerGroupNormSiLU(c, GROUPS).to(device=device, dtype=dt)
    with torch.no_grad():
        module.norm.weight.copy_(torch.rand(c) + 0.5)
        module.norm.bias.copy_(torch.randn(c) * 0.5)
    w, b = module.norm.weight.detach(), module.norm.bias.detach()
    x, temb, res, out = sets[0]
    with torch.no_grad():
        expect = module(x, temb, res)
    tol = 1e-4 if dt == torch.float32 else 1e-2  # eager rounds every intermediate to the storage dtype
    extra = {}

    if provider in ("eager", "compile"):
        mod = module if provider == "eager" else torch.compile(module, dynamic=False)

        def step(x, temb, res, out):
            with torch.no_grad():
                return mod(x, temb, res)
    else:
        if provider == "triton":
            from fastdiff.kernels import group_norm_silu as kmod

            _, _, _, rows, cols, *_ = kmod.geometry(x, GROUPS, False)
            plan = kmod.plan(rows, cols, n * GROUPS, 0, on_gpu=device == "cuda",
                             sm_count=torch.cuda.get_device_properties(0).multi_processor_count if GPU else 132)
            extra = dict(x_reads=1 if plan["single_tile"] else 2, splits=plan["nsplit"])

        def step(x, temb, res, out):
            return group_norm_silu(x, GROUPS, w, b, temb=temb, residual=res, out=out, backend=provider)

    got = step(*sets[0])
    assert rel_err(got, expect) < tol, f"{provider}: rel err {rel_err(got, expect):.2e} vs eager"
    fn = Rotating(sets).bind(step)
    for _ in range(len(sets)):  # touch every set once before timing
        fn()
    run_benchmark(benchmark, fn, hw=hw, op="group_norm_silu", provider=provider, size=size, bytes_moved=bytes_moved,
                  variant=f"{dtype}-{variant}", **extra)
