"""`linear_residual` (output projection + bias + residual, the add in the GEMM epilogue)
against float64, with the bound of the attention tests: relative error <= 2x the error of the
eager same-dtype `F.linear(x, W, b) + residual`."""
from __future__ import annotations

import zlib

import pytest
import torch
import torch.nn.functional as F

from fastdiff.ops.linear_residual import linear_residual, linear_residual_reference
from tolerances import rel_err

F64 = torch.float64
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _case(b, n, k, c, dtype, device, seed, residual_layout="contiguous"):
    gen = torch.Generator().manual_seed(zlib.crc32(repr(seed).encode()))

    def rnd(*shape, std=1.0):
        return (torch.randn(shape, generator=gen, dtype=F64) * std).to(dtype).to(device)

    x = rnd(b, n, k)
    w = rnd(c, k, std=k ** -0.5)
    bias = rnd(c)
    if residual_layout == "tokens":  # the block's residual: (B, C, H*W) feature map seen as (B, HW, C)
        residual = rnd(b, c, n).transpose(1, 2)
    else:
        residual = rnd(b, n, c)
    return x, w, bias, residual


def _check(got, x, w, bias, residual):
    ref = linear_residual_reference(*(t.cpu().to(F64) if t is not None else None for t in (x, w, bias, residual)),
                                    compute_dtype=F64)
    eager = F.linear(x, w, bias) + residual
    err, e_eager = rel_err(got, ref), rel_err(eager, ref)
    assert torch.isfinite(got).all()
    assert err <= 2 * e_eager, f"relative error {err:.3e} > 2 x eager ({e_eager:.3e}) [{x.dtype}]"


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("layout", ["contiguous", "tokens"])
@pytest.mark.parametrize("mode", ["alloc", "out", "inplace"])
def test_matches_float64(device, dtype, with_bias, layout, mode):
    """Both GEMM orientations: a contiguous residual ("rows") and the U-Net block's tokens
    view of an NCHW map ("columns"); out allocated, given (NaN-poisoned), or the residual."""
    dt = DTYPES[dtype]
    x, w, bias, residual = _case(2, 67, 40, 48, dt, device, (dtype, with_bias, mode, layout), layout)
    bias = bias if with_bias else None
    r0 = residual.clone()
    if mode == "alloc":
        got = linear_residual(x, w, bias, residual)
        assert got.stride() == residual.stride(), "out should take the residual's layout"
    elif mode == "out":
        out = torch.full_like(residual, float("nan"))
        got = linear_residual(x, w, bias, residual, out=out)
        assert got is out
    else:
        got = linear_residual(x, w, bias, residual, out=residual)
        assert got is residual
    _check(got, x, w, bias, r0)
    if mode != "inplace":
        assert torch.equal(residual, r0), "residual was modified"
    if layout == "tokens":  # the block's result is NCHW memory: back to (B, C, L) without a copy
        assert got.transpose(1, 2).is_contiguous()


def test_two_dim_other_layouts_and_empty():
    x, w, bias, residual = _case(1, 33, 16, 24, torch.float32, "cpu", "2d")
    _check(linear_residual(x[0], w, bias, residual[0]), x[0], w, bias, residual[0])
    rt = residual[0].t().contiguous().t()  # 2-D column-major residual: out falls back to contiguous
    got = linear_residual(x[0], w, bias, rt)
    assert got.is_contiguous()
    _check(got, x[0], w, bias, rt)
    rows = torch.randn(1, 33, 30)[..., :24]  # padded rows: still one strided GEMM, no copy
    out = torch.full((1, 33, 32), float("nan"))[..., :24]
    got = linear_residual(x, w, None, rows, out=out)
    assert got is out
    _check(got, x, w, None, rows)
    e = linear_residual(x[:, :0], w, bias, residual[:, :0])
    assert e.shape == (1, 0, 24)


def test_bad_inputs():
    x, w, bias, residual = _case(2, 9, 16, 24, torch.float32, "cpu", "bad")
    cases = [
        (dict(x=x.double()), TypeError, r"x must be float32"),
        (dict(w=w[:, :8]), ValueError, r"weight must have shape \(out_features, 16\)"),
        (dict(bias=bias[:5]), ValueError, r"bias must have shape \(24,\)"),
        (dict(bias=bias.half()), TypeError, r"bias must have x's dtype"),
        (dict(residual=residual[:, :3]), ValueError, r"residual must have shape \(2, 9, 24\)"),
        (dict(out=torch.empty(2, 9, 48)[..., ::2]), ValueError, r"out must be dense with unit stride"),
        (dict(out=torch.empty(2, 9, 25)), ValueError, r"out must have shape"),
        (dict(residual=torch.empty(2, 9, 24, device="meta")), ValueError, r"residual must be on x's device"),
        (dict(out="x"), TypeError, r"out must be a torch.Tensor or None"),
    ]
    for kw, exc, pattern in cases:
        args = dict(x=x, w=w, bias=bias, residual=residual, out=None)
        args.update(kw)
        with pytest.raises(exc, match=pattern):
            linear_residual(args["x"], args["w"], args["bias"], args["residual"], out=args["out"])
    big = torch.randn(4, 9, 24)
    with pytest.raises(ValueError, match=r"out overlaps residual"):
        linear_residual(x, w, bias, big[:2], out=big[1:3])
    buf = torch.randn(2 * 9 * 24)
    xa = buf[: 2 * 9 * 16].view(2, 9, 16)
    r0 = residual.clone()
    with pytest.raises(ValueError, match=r"out overlaps x"):
        linear_residual(xa, w, bias, residual, out=buf.view(2, 9, 24))
    assert torch.equal(residual, r0)
