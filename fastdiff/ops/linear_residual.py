"""`linear_residual`: the attention block's output projection with bias and residual add.

    out = residual + x @ weight^T + bias        x (..., K), weight (N, K), bias (N,), residual (..., N)

Two steps, the residual add done by the GEMM epilogue (beta = 1: the BLAS reads C while
writing the product):

    out = residual + bias                        one elementwise pass (a copy without bias)
    out += x @ weight^T                          addmm_ / baddbmm_ with C = out

`out` takes the memory layout of `residual` (like `torch.empty_like`), and the GEMM is oriented
to write that layout directly:

* rows: the last dim has unit stride (a contiguous (B, L, C) tensor): `out.view(-1, N).addmm_`.
* columns: a 3-D residual that is the transposed view of a contiguous (B, C, L) tensor -- the
  U-Net block's `tokens = x.flatten(2).transpose(1, 2)` of an NCHW feature map -- gets
  out^T (B, C, L) = out^T + W @ x^T from `baddbmm_` on the transposed views: the result is
  already NCHW memory, and `out.transpose(1, 2).reshape(B, C, H, W)` is a view.

Memory traffic, in passes over a (tokens x C) tensor (what the GPU time of this step is):

    eager block   proj_out(o) + tokens, then back to NCHW       o | Y | Y, R | T | T, X' = 7
    rows layout   residual + bias, then addmm_                  R | O | o, O | O        = 5
    columns       same, written straight in NCHW                R | O | o, O | O        = 5, no copy back
    out=residual  (in place, no bias): addmm_ only              o, R | R                = 3

So against eager `F.linear(o, W, b) + residual` on a contiguous residual it moves the same bytes
(one elementwise kernel + one GEMM each way); what it saves is the transposes around the U-Net
block (columns) and, in place without bias, a full pass. A GEMM with a fused bias + residual
epilogue would reach 3 passes in every case; the remaining 2 passes are ~10 MB at SD's level 0
(~3-4 us on an H100), so no kernel of ours is written for it (benchmarks/NOTES.md).

Rounding: fp16/bf16 see two roundings, as eager does (residual + bias, then the GEMM result
accumulated in fp32 with C and rounded once).

Plain PyTorch ops, no custom op: torch.compile and CUDA graphs see straight through it.
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


def _layout(t: torch.Tensor) -> Optional[str]:
    """"rows" when t views as (rows, N) (unit last-dim stride, dense rows), "columns" when t is
    3-D and t.transpose(1, 2) is contiguous, else None."""
    if t.dim() >= 1 and (t.is_contiguous() or t.numel() == 0):
        return "rows"
    if t.dim() == 3 and t.transpose(1, 2).is_contiguous():
        return "columns"
    if t.dim() >= 2:
        try:
            t.view(-1, t.shape[-1])
            if t.stride(-1) == 1:
                return "rows"
        except RuntimeError:
            pass
    return None


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
        if _layout(out) is None:
            raise _fail(ValueError, f"out must be dense with unit stride in its last dim, or (3-D) the "
                                    f"transposed view of a contiguous (B, {n}, L) tensor; got strides {out.stride()}")


def linear_residual(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: Optional[torch.Tensor],
    residual: torch.Tensor,
    *,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """`residual + x @ weight^T + bias` with the residual add in the GEMM epilogue; returns `out`.

    x (..., K), weight (N, K) (an nn.Linear's), bias (N,) or None, residual (..., N) with x's
    leading dims, all one dtype and device. `out` (allocated with residual's layout when None:
    a (B, L, C) tokens view of an NCHW map gives an NCHW-backed result) may be `residual`
    itself (in-place residual update) and may not otherwise share memory with the inputs.
    Errors name the argument and come before anything is written.
    """
    check_linear_residual_args(x, weight, bias, residual, out)
    n, k = weight.shape
    in_place = out is not None and out.data_ptr() == residual.data_ptr() and out.stride() == residual.stride()
    if out is None:
        out = torch.empty_like(residual)  # keeps a dense residual's strides (rows or columns)
        if _layout(out) is None:
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
    if _layout(out) == "rows":
        out.view(-1, n).addmm_(x.reshape(-1, k), weight.t())
    else:  # columns: out^T (B, N, L) += W @ x^T, batched over B, both operands as views
        b = out.shape[0]
        out.transpose(1, 2).baddbmm_(weight.expand(b, n, k), x.transpose(1, 2))
    return out
