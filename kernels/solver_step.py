"""Triton kernel for `fastdiff::solver_step` (contract: fastdiff/ops/solver_step.py).

Flat over the common dense storage order of all tensors (contiguous or channels_last), one
program per BLOCK elements, int64 offsets, masked tail, fp32 arithmetic whatever the storage
dtype. Every element is loaded before it is stored by the same program, so `out` may alias `x`
and the history write slot may alias a read slot.

On CPU tensors this runs under the Triton interpreter (TRITON_INTERPRET=1). The @triton.jit
wrapper is created lazily, at the first launch, so that TRITON_INTERPRET is read when the kernel
is used rather than when this module is imported.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Optional, Sequence

import torch
import triton
import triton.language as tl


def _solver_step_kernel(
    x_ptr, m_ptr, u_ptr, h1_ptr, h2_ptr, h3_ptr, z_ptr, out_ptr, hw_ptr,
    numel,
    p, q, a, b0, b1, b2, b3, c, r, w, w_ptr, bound,
    HAS_U: tl.constexpr, HAS_WT: tl.constexpr, HAS_H1: tl.constexpr, HAS_H2: tl.constexpr, HAS_H3: tl.constexpr,
    HAS_Z: tl.constexpr, HAS_HW: tl.constexpr, HAS_CLAMP: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    offs = pid * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    mask = offs < numel

    m = tl.load(m_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_U:
        u = tl.load(u_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_WT:  # guidance from device memory (CUDA-graph replays see its current value)
            w = tl.load(w_ptr)
        m = u + w * (m - u)
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    d = p * x + q * m
    dc = d
    if HAS_CLAMP:
        # comparisons, not minimum/maximum, so that NaN propagates like torch.clamp
        dc = tl.where(d < -bound, -bound, tl.where(d > bound, bound, d))
    acc = a * x + r * d + b0 * dc
    if HAS_H1:
        acc += b1 * tl.load(h1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_H2:
        acc += b2 * tl.load(h2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_H3:
        acc += b3 * tl.load(h3_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_Z:
        acc += c * tl.load(z_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)
    if HAS_HW:
        tl.store(hw_ptr + offs, dc.to(hw_ptr.dtype.element_ty), mask=mask)


_KERNELS: dict = {}


def _kernel():
    """The jitted kernel; a separate one for interpreter mode (decided by TRITON_INTERPRET)."""
    from triton import knobs

    interpret = bool(knobs.runtime.interpret)
    k = _KERNELS.get(interpret)
    if k is None:
        k = _KERNELS[interpret] = triton.jit(_solver_step_kernel)
    return k


def solver_step_triton(
    x: torch.Tensor,
    model_out: torch.Tensor,
    uncond: Optional[torch.Tensor],
    history: Optional[torch.Tensor],
    noise: Optional[torch.Tensor],
    coef: Sequence[float],
    slots: Sequence[int],
    guidance,
    clamp: float,
    out: torch.Tensor,
) -> None:
    """Launch on x's device (current stream). Inputs must already be validated by
    `fastdiff.ops.solver_step.check_solver_step_args`. `guidance` is a number, or a
    one-element float32 tensor on x's device that the kernel reads."""
    numel = x.numel()
    if numel == 0:
        return
    p, q, a, b0, b1, b2, b3, c, r = (float(v) for v in coef)
    sw, s1, s2, s3 = (int(v) for v in slots)

    def slot(s):
        # unused pointers get x as a placeholder; the constexpr flags keep them unread
        return history[s] if s >= 0 else x

    if x.device.type == "cpu":
        # interpreter: one program per block is interpreted in Python, so use few, big blocks
        block = min(triton.next_power_of_2(numel), 1 << 16)
        num_warps = 4
    else:
        block, num_warps = 2048, 8
    grid = (triton.cdiv(numel, block),)
    wt = isinstance(guidance, torch.Tensor)
    kernel = _kernel()
    with torch.cuda.device(x.device) if x.device.type == "cuda" else nullcontext():
        kernel[grid](
            x, model_out, uncond if uncond is not None else model_out,
            slot(s1), slot(s2), slot(s3), noise if noise is not None else x,
            out, slot(sw) if sw >= 0 else out,
            numel,
            p, q, a, b0, b1, b2, b3, c, r, 1.0 if wt else float(guidance), guidance if wt else x, float(clamp),
            HAS_U=uncond is not None, HAS_WT=wt, HAS_H1=s1 >= 0, HAS_H2=s2 >= 0, HAS_H3=s3 >= 0,
            HAS_Z=noise is not None, HAS_HW=sw >= 0, HAS_CLAMP=clamp > 0,
            BLOCK=block, num_warps=num_warps,
        )

