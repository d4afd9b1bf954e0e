"""`fastdiff::attention` at the U-Net's shapes, side by side with the eager alternatives.

Shapes (batch, heads, Lq, Lk, head_dim): SD-1.5's U-Net at 512x512 with CFG (batch 2, 8 heads;
latent 64x64 -> 4096 tokens at level 0, 1024 at level 1, 256 at level 2), self-attention and
cross-attention to the 77 CLIP tokens, plus a CIFAR-size model (16x16 = 256 tokens, D = 64).
Inputs come in the block's layout: q/k/v are strided head views of one packed QKV projection
output (B, L, 3, H, D) (cross: q from (B, Lq, H, D), k/v from a packed (B, 77, 2, H, D)).

Providers:
  eager     matmul -> softmax -> matmul in the input dtype (`attention_eager`: diffusers'
            AttnProcessor without SDPA)
  sdpa      torch.nn.functional.scaled_dot_product_attention (flash / cuDNN / efficient)
  compile   torch.compile of eager (inductor, dynamic=False)
  triton    fastdiff.attention(backend="triton"): our flash-attention kernel (GPU only: on the
            CPU it runs in the Triton interpreter, which is not a performance path)
  cuda/cpu  fastdiff.attention(backend="auto") into a static `out`: SDPA through the op
            (dispatch + the copy into `out`); "cuda" on a GPU, "cpu" on the CPU

Reported: TFLOP/s with flops = 4 * B * H * Lq * Lk * D (the two GEMMs), and for every provider
but sdpa `sdpa_ratio` = SDPA time / provider time (1.0 = as fast as SDPA; the goal for triton
on a GPU is >= 0.9) in extra_info, when sdpa ran earlier in the same session. Each provider
is checked against SDPA once before it is timed.

The block's output projection with bias and residual (`linear_residual`, op "linear_residual")
is timed here too, as the block uses it: residual = the tokens view of an NCHW map, result
needed in NCHW. eager (linear + add + copy back to NCHW), `addmm` (linear_residual: residual +
bias in one pass, the GEMM epilogue adds it and writes NCHW memory), compile (of eager); at the
three SD levels; bytes_moved = o, x read + result written (+ W, b).

    pytest benchmarks/bench_attention.py --benchmark-json=out.json            # GPU: full sizes
    FASTDIFF_BENCH_QUICK=1 pytest benchmarks/bench_attention.py               # small sizes
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fastdiff.bench.harness import Rotating, bench_sizes, rel_err, run_benchmark
from fastdiff.ops.attention import attention, attention_eager
from fastdiff.ops.linear_residual import linear_residual

GPU = torch.cuda.is_available()

# (B, H, Lq, Lk, D)
SIZES = bench_sizes(
    full=[
        (2, 8, 4096, 4096, 40), (2, 8, 4096, 77, 40),    # SD-1.5 level 0: 64x64 latent, 320 channels
        (2, 8, 1024, 1024, 80), (2, 8, 1024, 77, 80),    # level 1: 32x32, 640 channels
        (2, 8, 256, 256, 160), (2, 8, 256, 77, 160),     # level 2: 16x16, 1280 channels
        (2, 8, 256, 256, 64),                            # CIFAR-size model: 16x16 tokens, D = 64
    ],
    quick=[(1, 2, 256, 256, 40), (1, 2, 256, 77, 80), (1, 2, 64, 64, 160)],
)
DTYPES = ["fp16"] if GPU else ["fp32"]
# sdpa first: the others' sdpa_ratio needs its time; compile last (slowest to set up)
PROVIDERS = ["sdpa", "eager"] + (["triton", "cuda"] if GPU else ["cpu"]) + ["compile"]
_DT = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}

_SDPA_MS: dict = {}  # (size, dtype) -> sdpa median ms, this session


def flops(size) -> int:
    b, h, lq, lk, d = size
    return 4 * b * h * lq * lk * d


def _make_set(size, dtype, device, seed):
    """q, k, v as head views of packed projections (the block's layout), and an out buffer
    laid out (B, Lq, H, D) like the block's (B, L, H*D) result."""
    b, h, lq, lk, d = size
    g = torch.Generator(device="cpu").manual_seed(seed)
    if lq == lk:
        q, k, v = (t.transpose(1, 2) for t in torch.randn(b, lq, 3, h, d, generator=g).to(device, dtype).unbind(2))
    else:
        q = torch.randn(b, lq, h, d, generator=g).to(device, dtype).transpose(1, 2)
        k, v = (t.transpose(1, 2) for t in torch.randn(b, lk, 2, h, d, generator=g).to(device, dtype).unbind(2))
    out = torch.empty(b, lq, h, d, device=device, dtype=dtype).transpose(1, 2)
    return q, k, v, out


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES)
def test_attention(benchmark, hw, device, size, dtype, provider):
    if provider == "triton":
        pytest.importorskip("triton")
    dt = _DT[dtype]
    b, h, lq, lk, d = size
    el = torch.tensor([], dtype=dt).element_size()
    bytes_per_set = el * (b * h * d) * (2 * lq + 2 * lk)
    if provider in ("eager", "compile"):  # the materialised scores live in the working set too
        bytes_per_set += el * b * h * lq * lk
    sets = [_make_set(size, dt, device, seed) for seed in range(Rotating.count(bytes_per_set, device))]

    q, k, v, _ = sets[0]
    expect = F.scaled_dot_product_attention(q, k, v)
    tol = 1e-4 if dt == torch.float32 else 1e-2

    if provider == "sdpa":
        fn = Rotating([s[:3] for s in sets]).bind(lambda q, k, v: F.scaled_dot_product_attention(q, k, v))
    elif provider in ("eager", "compile"):
        f = attention_eager
        if provider == "compile":
            torch._dynamo.reset()
            f = torch.compile(attention_eager, dynamic=False)
        assert rel_err(f(q, k, v), expect) < tol
        fn = Rotating([s[:3] for s in sets]).bind(f)
    else:
        backend = "triton" if provider == "triton" else "auto"

        def op(q, k, v, out):
            return attention(q, k, v, out=out, backend=backend)

        op(*sets[0])  # first call: Triton autotuning happens here
        assert rel_err(sets[0][3], expect) < tol
        fn = Rotating(sets).bind(op)

    for _ in range(len(sets)):  # touch every set once before timing
        fn()
    run_benchmark(benchmark, fn, hw=hw, op="attention", provider=provider, size=size, flops=flops(size),
                  variant=dtype)
    median = benchmark.extra_info.get("median_ms")
    if median:
        if provider == "sdpa":
            _SDPA_MS[(size, dtype)] = median
        elif (size, dtype) in _SDPA_MS:
            benchmark.extra_info["sdpa_ratio"] = _SDPA_MS[(size, dtype)] / median


# (B, L, C): the attention block's output projection at the SD levels, batch 2 (CFG)
LR_SIZES = bench_sizes(full=[(2, 4096, 320), (2, 1024, 640), (2, 256, 1280)], quick=[(2, 1024, 64), (2, 256, 320)])
LR_DTYPES = ["fp16"] if GPU else ["fp32"]


def _block_eager(o, w, b, x):
    """The block as written eagerly: tokens view of the NCHW input as residual, result back to
    NCHW memory (the `.transpose(1, 2).reshape(B, C, H, W)` of the block copies)."""
    tokens = x.flatten(2).transpose(1, 2)
    return (F.linear(o, w, b) + tokens).transpose(1, 2).contiguous()


def _block_fused(o, w, b, x):
    return linear_residual(o, w, b, x.flatten(2).transpose(1, 2)).transpose(1, 2)  # NCHW already: a view


@pytest.mark.parametrize("provider", ["eager", "addmm", "compile"])
@pytest.mark.parametrize("dtype", LR_DTYPES)
@pytest.mark.parametrize("size", LR_SIZES)
def test_linear_residual(benchmark, hw, device, size, dtype, provider):
    """The block's `x + proj_out(o)` with x an NCHW map and the result needed in NCHW:
    eager (linear, add on the tokens view, copy back to NCHW), `linear_residual` (the GEMM
    writes NCHW memory, residual + bias in one pass first), torch.compile of eager."""
    dt = _DT[dtype]
    bsz, length, c = size
    el = torch.tensor([], dtype=dt).element_size()
    bytes_moved = el * (3 * bsz * length * c + c * c + c)  # o, x in; result out; W, b

    def make(seed):
        g = torch.Generator(device="cpu").manual_seed(seed)
        o = torch.randn(bsz, length, c, generator=g).to(device, dt)
        w = (torch.randn(c, c, generator=g) * c ** -0.5).to(device, dt)
        b = torch.randn(c, generator=g).to(device, dt)
        x = torch.randn(bsz, c, length, generator=g).to(device, dt)  # NCHW with H*W flattened
        return o, w, b, x

    sets = [make(i) for i in range(Rotating.count(bytes_moved, device))]
    expect = _block_eager(*sets[0])
    f = {"eager": _block_eager, "addmm": _block_fused}.get(provider)
    if provider == "compile":
        torch._dynamo.reset()
        f = torch.compile(_block_eager, dynamic=False)
    assert rel_err(f(*sets[0]), expect) < (1e-4 if dt == torch.float32 else 1e-2)
    fn = Rotating(sets).bind(f)
    for _ in range(len(sets)):
        fn()
    run_benchmark(benchmark, fn, hw=hw, op="linear_residual", provider=provider, size=size,
                  bytes_moved=bytes_moved, flops=2 * bsz * length * c * c, variant=dtype)
