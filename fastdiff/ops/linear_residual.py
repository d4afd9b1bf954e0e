"""`linear_residual`: the attention block's output projection with bias and residual add.

    out = residual + x @ weight^T + bias          x (..., K), weight (N, K), bias (N,), residual (..., N)

One GEMM whose epilogue does the residual add: `out` is first set to `residual + bias` (one
elementwise pass; it takes the place of the copy of the C operand that `torch.addmm(residual,
x, W^T)` does anyway when `out` is not the residual), then `out.addmm_(x, W^T)` runs the GEMM
with beta = 1, so cuBLAS (or the CPU BLAS) reads C in its epilogue and writes the sum once. Eager
`F.linear(x, W, b) + residual` writes the GEMM result, then reads it back with the residual and
writes the sum: one more full write + read of the output. With `out=residual` (the block's
`tokens += proj(o)`), the first pass is an in-place bias add (or nothing without bias).

Rounding: the GEMM accumulates in fp32 and rounds once after adding C; `residual + bias` is
rounded to the storage dtype first, so fp16/bf16 see two roundings, as eager does.

Plain PyTorch ops, no custom op: torch.compile and CUDA graphs see straight through it, and a
Triton GEMM of ours would have to beat cuBLAS to be worth it (nothing says it would).
"""
from __future__ import annotations

from typing import Optional

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def linear_residual_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: torch.Tensor,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The specification, computed in `compute_dtype` (float64 for oracles), returned in
    residual's dtype."""
    f = compute_dtype
    y = torch.matmul(x.to(f), weight.to(f).t())
    if bias is not None:
        y = y + bias.to(f)
    return (y + residual.to(f)).to(residual.dtype)


def _fail(exc, msg):
    return exc(f"fastdiff.linear_residual: {msg}")


def _span(t: torch.Tensor):
    start = t.data_ptr()
    last = sum((n - 1) * st for n, st in zip(t.shape, t.stride()))
    return start, start + (last + 1) * t.element_size()


def check_linear_residual_args(x, weight, bias, residual, out) -> None:
    """Raise TypeError/ValueError naming the offending argument; touches no data."""
    for name, t in (("x", x), ("weight", weight), ("residual", residual)):
        if not isinstance(t, torch.Tensor):
            raise _fail(TypeError, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("bias", bias), ("out", out)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise _fail(TypeError, f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if x.dtype not in DTYPES:
        raise _fail(TypeError, f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 1:
        raise _fail(ValueError, "x must have at least one dimension (..., in_features), got a 0-d tensor")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise _fail(ValueError, f"weight must have shape (out_features, {x.shape[-1]}) (x's last dim is "
                                f"in_features), got {tuple(weight.shape)}")
    n = weight.shape[0]
    expect = tuple(x.shape[:-1]) + (n,)
    named = [("weight", weight), ("residual", residual)] + ([("bias", bias)] if bias is not None else []) \
        + ([("out", out)] if out is not None else [])
    for name, t in named:
        if t.device != x.device:
            raise _fail(ValueError, f"{name} must be on x's device {x.device}, got {t.device}")
        if t.dtype != x.dtype:
            raise _fail(TypeError, f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise _fail(ValueError, f"bias must have shape ({n},) (out_features), got {tuple(bias.shape)}")
    if tuple(residual.shape) != expect:
        raise _fail(ValueError, f"residual must have shape {expect} (x's leading dims, out_features), "
                                f"got {tuple(residual.shape)}")
    if out is not None:
        if tuple(out.shape) != expect:
            raise _fail(ValueError, f"out must have shape {expect}, got {tuple(out.shape)}")
        if not out.is_contiguous():
            raise _fail(ValueError, f"out must be contiguous (the GEMM writes it as a (rows, {n}) matrix), "
                                    f"got strides {out.stride()}")


def linear_residual(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: torch.Tensor,
    *,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """`residual + x @ weight^T + bias` with the add in the GEMM epilogue; returns `out`.

    x (..., K), weight (N, K) (an nn.Linear's), bias (N,) or None, residual (..., N) with x's
    leading dims and any strides (e.g. the transposed (B, HW, C) view of a feature map), all
    one dtype and device. `out` (..., N) contiguous; may be `residual` itself (in-place
    residual update) when residual is contiguous, and may not otherwise share memory with
    the inputs. Errors name the argument and come before anything is written.
    """
    check_linear_residual_args(x, weight, bias, residual, out)
    n, k = weight.shape
    in_place = out is not None and out.data_ptr() == residual.data_ptr() and out.stride() == residual.stride()
    if out is None:
        out = torch.empty(residual.shape, dtype=residual.dtype, device=residual.device)
    elif out.numel() and not in_place:
        os_, oe = _span(out)
        for name, t in (("x", x), ("weight", weight), ("bias", bias), ("residual", residual)):
            if t is not None and t.numel():
                ts, te = _span(t)
                if ts < oe and os_ < te:
                    raise _fail(ValueError, f"out overlaps {name} in memory; the only aliasing allowed is "
                                            f"out=residual")
    if out.numel() == 0:
        return out
    if bias is not None:
        torch.add(residual, bias, out=out)  # out = residual + bias (in place when out is residual)
    elif not in_place:
        out.copy_(residual)
    # beta = 1: C (= out) is read by the GEMM epilogue, the sum written once
    out.view(-1, n).addmm_(x.reshape(-1, k), weight.t())
    return out
