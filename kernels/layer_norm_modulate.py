"""Triton kernel for `fastdiff::layer_norm_modulate` (contract: fastdiff/ops/layer_norm_modulate.py).

One program per token row (b, l) of x (B, L, C). A row that fits one block (C <= BLOCK_C: SD3's
1536, Flux's 3072) is read once and kept in registers: exact two-pass mean and variance, then
one FMA per element, `xn * (1 + scale) + shift`. Wider rows are walked in blocks, the block
statistics merged with Chan's formula (never a sum of squares), then a second walk normalises.
All arithmetic in fp32, out rounded once to its dtype. The statistics are
taken of x - x0 (x0: the row's first element; LayerNorm is invariant to the shift, and the
difference is exact for close values), so a row far from zero (1e3 + N(0, 1)) keeps fp32
precision.

On CPU tensors this runs under the Triton interpreter (TRITON_INTERPRET=1); the @triton.jit
wrapper is created at the first launch, so TRITON_INTERPRET is read when the kernel is used.
"""
from __future__ import annotations

from contextlib import nullcontext

import torch
import triton
import triton.language as tl


def _layer_norm_modulate_kernel(
    x_ptr, scale_ptr, shift_ptr, out_ptr,
    L, C, X_SB, X_SL, X_SC, SC_SB, SC_SC, SH_SB, SH_SC, eps,
    BLOCK_C: tl.constexpr, ONE_BLOCK: tl.constexpr,
):
    row = tl.program_id(0)
    b = row // L
    l_ = row - b * L
    x_row = x_ptr + b.to(tl.int64) * X_SB + l_.to(tl.int64) * X_SL
    out_row = out_ptr + row.to(tl.int64) * C
    sc_row = scale_ptr + b.to(tl.int64) * SC_SB
    sh_row = shift_ptr + b.to(tl.int64) * SH_SB
    cc = tl.arange(0, BLOCK_C)
    x0 = tl.load(x_row).to(tl.float32)
    if ONE_BLOCK:
        mask = cc < C
        xv = tl.load(x_row + cc.to(tl.int64) * X_SC, mask=mask, other=0.0).to(tl.float32) - x0
        mean = tl.sum(tl.where(mask, xv, 0.0), axis=0) / C
        xc = tl.where(mask, xv - mean, 0.0)
        rstd = 1.0 / tl.sqrt(tl.sum(xc * xc, axis=0) / C + eps)
        sc = tl.load(sc_row + cc.to(tl.int64) * SC_SC, mask=mask, other=0.0).to(tl.float32)
        sh = tl.load(sh_row + cc.to(tl.int64) * SH_SC, mask=mask, other=0.0).to(tl.float32)
        y = (xc * rstd) * (1.0 + sc) + sh
        tl.store(out_row + cc, y.to(out_ptr.dtype.element_ty), mask=mask)
    else:
        n_acc = 0.0
        mean = 0.0
        m2 = 0.0
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + cc
            mask = cols < C
            xv = tl.load(x_row + cols.to(tl.int64) * X_SC, mask=mask, other=0.0).to(tl.float32) - x0
            cnt = tl.minimum(C - c0, BLOCK_C).to(tl.float32)
            bmean = tl.sum(tl.where(mask, xv, 0.0), axis=0) / cnt
            xc = tl.where(mask, xv - bmean, 0.0)
            bm2 = tl.sum(xc * xc, axis=0)
            # Chan et al.: merge (n_acc, mean, m2) with the block's (cnt, bmean, bm2)
            n_new = n_acc + cnt
            delta = bmean - mean
            mean = mean + delta * (cnt / n_new)
            m2 = m2 + bm2 + delta * delta * (n_acc * cnt / n_new)
            n_acc = n_new
        rstd = 1.0 / tl.sqrt(m2 / C + eps)
        for c0 in range(0, C, BLOCK_C):
            cols = c0 + cc
            mask = cols < C
            xv = tl.load(x_row + cols.to(tl.int64) * X_SC, mask=mask, other=0.0).to(tl.float32) - x0
            sc = tl.load(sc_row + cols.to(tl.int64) * SC_SC, mask=mask, other=0.0).to(tl.float32)
            sh = tl.load(sh_row + cols.to(tl.int64) * SH_SC, mask=mask, other=0.0).to(tl.float32)
            y = ((xv - mean) * rstd) * (1.0 + sc) + sh
            tl.store(out_row + cols, y.to(out_ptr.dtype.element_ty), mask=mask)


_KERNELS: dict = {}


def _kernel():
    """The jitted kernel; a separate one for interpreter mode (decided by TRITON_INTERPRET)."""
    from triton import knobs

    interpret = bool(knobs.runtime.interpret)
    k = _KERNELS.get(interpret)
    if k is None:
        k = _KERNELS[interpret] = triton.jit(_layer_norm_modulate_kernel)
    return k


# Widest row kept whole in registers (16 fp32 per thread at 8 warps on a GPU); wider rows loop.
MAX_BLOCK = 4096


def layer_norm_modulate_triton(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float,
                               out: torch.Tensor, max_block: int = MAX_BLOCK) -> None:
    """Launch on x's device (current stream). Inputs must already be validated by
    `fastdiff.ops.layer_norm_modulate.check_layer_norm_modulate_args`. `max_block` caps the
    block width (tests make it small to run the multi-block path)."""
    b, l_, c = x.shape
    if x.numel() == 0:
        return
    on_gpu = x.device.type == "cuda"
    block = min(triton.next_power_of_2(c), max_block)
    num_warps = max(1, min(8, block // 256)) if on_gpu else 4
    with torch.cuda.device(x.device) if on_gpu else nullcontext():
        _kernel()[(b * l_,)](x, scale, shift, out, l_, c, *x.stride(), *scale.stride(), *shift.stride(), float(eps),
                             BLOCK_C=block, ONE_BLOCK=block >= c, num_warps=num_warps)
