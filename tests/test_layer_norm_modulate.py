"""`fastdiff::layer_norm_modulate` on every backend against F.layer_norm + the modulation in float64.

Backends: ATen's CPU kernels ("cpu"), Triton under its CPU interpreter ("triton-interp"), the
plain-PyTorch fallback ("reference"), and, only with a GPU, Triton on CUDA ("triton-cuda").
There is no CUDA kernel of ours: on CUDA tensors Triton is the kernel.
"""
from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

from fastdiff.ops import _dispatch
from fastdiff.ops.layer_norm_modulate import BackendUnavailableError, layer_norm_modulate
from conftest import HAS_CUDA, setup_backend
from tolerances import assert_close_each

F64 = torch.float64
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@pytest.fixture(params=["cpu", "triton-interp", "reference", "triton-cuda"])
def backend(request, monkeypatch):
    return setup_backend(request.param, None, monkeypatch)


def make_case(b, l_, c, dtype, device, seed, *, mod_dtype=None, strided=False, mean=0.5, std=2.0):
    """x (B, L, C) and scale/shift (B, C); strided: every tensor a non-contiguous view (x
    token-transposed, scale/shift column slices of one (B, 3C) projection, as diffusers chunks)."""
    gen = torch.Generator().manual_seed(seed)

    def rnd(*s, dt=dtype, sd=1.0, off=0.0):
        return (torch.randn(s, generator=gen, dtype=F64) * sd + off).to(dt).to(device)

    md = mod_dtype or dtype
    if strided:
        x = rnd(b, c, l_, sd=std, off=mean).transpose(1, 2)
        emb = rnd(b, 3 * c, dt=md, sd=0.5)
        scale, shift = emb[:, c:2 * c], emb[:, 2 * c:]
    else:
        x = rnd(b, l_, c, sd=std, off=mean)
        scale, shift = rnd(b, c, dt=md, sd=0.5), rnd(b, c, dt=md, sd=0.5)
    return x, scale, shift


def oracle(x, scale, shift, eps):
    y = F.layer_norm(x.to(F64), (x.shape[-1],), eps=eps)
    return y * (1 + scale.to(F64)[:, None]) + shift.to(F64)[:, None]


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _poisoned(x):
    return torch.full(x.shape, float("nan"), dtype=x.dtype, device=x.device)


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("shape", [(2, 5, 48), (1, 1, 37), (3, 7, 130), (1, 9, 1)])
def test_matches_float64_layer_norm(backend, dtype, shape):
    be, device = backend
    dt = DTYPES[dtype]
    x, scale, shift = make_case(*shape, dt, device, _seed(shape, dtype))
    out = layer_norm_modulate(x, scale, shift, eps=1e-6, out=_poisoned(x), backend=be)
    assert out.dtype == dt and out.shape == x.shape
    assert_close_each(out, oracle(x, scale, shift, 1e-6), dt, what=f"{be} {shape}")


@pytest.mark.parametrize("mod_dtype", [None, torch.float32])
def test_non_contiguous_inputs_and_float32_modulation(backend, mod_dtype):
    be, device = backend
    x, scale, shift = make_case(2, 6, 40, torch.bfloat16, device, _seed("strided", mod_dtype), mod_dtype=mod_dtype,
                                strided=True)
    assert not x.is_contiguous() and not scale.is_contiguous()
    before = x.clone()
    out = layer_norm_modulate(x, scale, shift, eps=1e-5, backend=be)
    assert out.is_contiguous()
    assert_close_each(out, oracle(x, scale, shift, 1e-5), torch.bfloat16, what=be)
    assert torch.equal(x, before)


def test_far_from_zero_rows_keep_fp32_precision(backend):
    """1e3 + N(0, 1): a sum of squares in fp32 would cancel; the two-pass statistics do not."""
    be, device = backend
    x, scale, shift = make_case(2, 3, 300, torch.float32, device, 7, mean=1e3, std=1.0)
    out = layer_norm_modulate(x, scale, shift, backend=be)
    assert_close_each(out, oracle(x, scale, shift, 1e-6), torch.float32, factor=10.0, what=be)


def test_triton_multi_block_rows(monkeypatch):
    """Rows wider than the block: Chan-merged block statistics, then a second walk."""
    be, device = setup_backend("triton-interp", None, monkeypatch)
    kernel = _dispatch.import_kernel("layer_norm_modulate")
    for c in (40, 33, 16):
        x, scale, shift = make_case(2, 3, c, torch.float32, device, _seed("multi", c), strided=True, mean=50.0)
        out = _poisoned(x)
        kernel.layer_norm_modulate_triton(x, scale, shift, 1e-6, out, max_block=16)
        assert_close_each(out, oracle(x, scale, shift, 1e-6), torch.float32, what=f"C={c}")


def test_empty_input_writes_nothing():
    x = torch.empty(0, 3, 8)
    out = layer_norm_modulate(x, torch.empty(0, 8), torch.empty(0, 8))
    assert out.shape == x.shape


def _bad(**change):
    args = dict(x=torch.randn(2, 3, 8), scale=torch.randn(2, 8), shift=torch.randn(2, 8), eps=1e-6,
                out=torch.full((2, 3, 8), 7.0))
    args.update(change)
    return args


@pytest.mark.parametrize("change, exc, words", [
    (dict(x=torch.randn(3, 8)), ValueError, "x must have shape (B, L, C)"),
    (dict(x=torch.randn(2, 3, 8, dtype=F64)), TypeError, "x must be float32"),
    (dict(x=[1.0]), TypeError, "x must be a torch.Tensor"),
    (dict(scale=torch.randn(2, 9)), ValueError, "scale must have shape (B, C) = (2, 8)"),
    (dict(shift=torch.randn(1, 8)), ValueError, "shift must have shape (B, C) = (2, 8)"),
    (dict(scale=torch.randn(2, 8, dtype=torch.float16)), TypeError, "scale must be float32 or x's dtype"),
    (dict(scale=torch.randn(2, 8, device="meta")), ValueError, "scale must be on x's device"),
    (dict(out=torch.full((2, 3, 8), 7.0, dtype=torch.float16)), TypeError, "out must have x's dtype"),
    (dict(out=torch.full((2, 8, 3), 7.0).transpose(1, 2)), ValueError, "out must be contiguous"),
    (dict(out=torch.full((2, 3, 9), 7.0)), ValueError, "out must have x's shape"),
    (dict(eps=0.0), ValueError, "eps must be a finite number > 0"),
    (dict(eps=float("nan")), ValueError, "eps must be a finite number > 0"),
])
def test_bad_input_is_named_before_any_write(change, exc, words):
    a = _bad(**change)
    out_before = a["out"].clone()
    with pytest.raises(exc, match="layer_norm_modulate") as e:
        layer_norm_modulate(a["x"], a["scale"], a["shift"], eps=a["eps"], out=a["out"])
    assert words in str(e.value)
    assert torch.equal(a["out"], out_before)


def test_out_overlapping_an_input_is_refused():
    x = torch.randn(2, 3, 8)
    with pytest.raises(ValueError, match="out overlaps x"):
        layer_norm_modulate(x, torch.randn(2, 8), torch.randn(2, 8), out=x)


def test_forced_backend_that_cannot_run_is_an_error(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(2, 3, 8)
    with pytest.raises(BackendUnavailableError, match="backend='triton' cannot run"):
        layer_norm_modulate(x, torch.randn(2, 8), torch.randn(2, 8), backend="triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        layer_norm_modulate(x, torch.randn(2, 8), torch.randn(2, 8), backend="cuda")


def test_auto_picks_the_cpu_backend_on_cpu_tensors(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    from fastdiff.ops.layer_norm_modulate import DISPATCH

    assert DISPATCH.plan("cpu")["backend"] == "cpu"
    if not HAS_CUDA:
        assert DISPATCH.plan("cuda")["backend"] == "reference"


def test_torch_compile_and_fake_tensors_see_the_op():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        x = torch.empty(2, 3, 8)
        out = layer_norm_modulate(x, torch.empty(2, 8), torch.empty(2, 8))
        assert out.shape == (2, 3, 8)
        with pytest.raises(ValueError, match="scale must have shape"):
            layer_norm_modulate(x, torch.empty(2, 7), torch.empty(2, 8))


# Triton compiles for a GPU target without a GPU (catches compiled-mode errors the interpreter
# does not see): the one-block row (SD3 / Flux widths) and the multi-block loop, bf16.

GPU_COMPILE_CASES = [True, False]  # ONE_BLOCK


def gpu_compile_case(one_block, cc):
    """Run by gpu_compile.compile_isolated in a fresh interpreter: compile one launch variant
    for sm_<cc>; -> a summary of the PTX and the resources."""
    import inspect

    import triton

    from gpu_compile import compile_for_gpu

    kmod = _dispatch.import_kernel("layer_norm_modulate")
    consts = dict(BLOCK_C=kmod.MAX_BLOCK, ONE_BLOCK=one_block)
    sig, attrs = {}, {}
    for i, p in enumerate(inspect.signature(kmod._layer_norm_modulate_kernel).parameters):
        if p in consts:
            sig[p] = "constexpr"
        elif p.endswith("_ptr"):
            sig[p] = "*bf16"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[p] = "fp32" if p == "eps" else "i32"
    k = compile_for_gpu(triton.jit(kmod._layer_norm_modulate_kernel), sig, consts, attrs, cc, dict(num_warps=8))
    ptx = k.pop("ptx")
    return dict(k, named="_layer_norm_modulate_kernel" in ptx)


@pytest.fixture(scope="module")
def gpu_compiled():
    from gpu_compile import compile_isolated

    cases = [[c, cc] for cc in (90, 80) for c in GPU_COMPILE_CASES]
    return dict(zip((tuple(c) for c in cases), compile_isolated("test_layer_norm_modulate", "gpu_compile_case", cases)))


@pytest.mark.parametrize("cc", [90, 80])
@pytest.mark.parametrize("one_block", GPU_COMPILE_CASES, ids=["one-block", "multi-block"])
def test_triton_compiles_for_gpus(one_block, cc, gpu_compiled):
    """No GPU needed: each variant compiles for sm_90a and sm_80 and spills nothing."""
    from gpu_compile import SHARED_LIMIT

    k = gpu_compiled[(one_block, cc)]
    assert k["named"]
    assert k["stack"] == 0, f"sm_{cc}: {k['regs']} registers and {k['stack']} bytes of stack per thread: spills"
    assert k["shared"] <= SHARED_LIMIT[cc], k


@pytest.mark.gpu
@pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")
@pytest.mark.parametrize("dtype", ["bf16", "fp16"])
@pytest.mark.parametrize("shape", [(2, 333, 1536), (2, 4608, 3072), (1, 7, 5000)], ids=["sd3-text", "flux", "loop"])
def test_gpu_triton_transformer_shapes(shape, dtype, monkeypatch):
    """SD3 / Flux widths on the GPU (one block), and a row wider than the block (the loop)."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x, scale, shift = make_case(*shape, DTYPES[dtype], "cuda", _seed("gpu", shape), strided=True)
    out = layer_norm_modulate(x, scale, shift, out=_poisoned(x), backend="triton")
    assert_close_each(out, oracle(x, scale, shift, 1e-6), DTYPES[dtype], what=str(shape))


def test_torch_compile_traces_the_registered_op():
    x, scale, shift = make_case(2, 3, 24, torch.float32, "cpu", 11, strided=True)

    def block(x, scale, shift):
        return layer_norm_modulate(x * 2, scale, shift, backend="cpu") + 1

    compiled = torch.compile(block, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x, scale, shift), block(x, scale, shift))
