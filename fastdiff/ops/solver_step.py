"""`fastdiff::solver_step`: one sampler step in one pass over memory.

The algebra (DESIGN.md section 4), elementwise over the latent of one step:

    m   = m_u + w * (m_c - m_u)          CFG (only when `uncond` is given)
    D   = p * x + q * m                  data prediction
    D   = clamp(D, -r, r)                only when clamp r > 0
    out = a * x + b0 * D + b1 * H[s1] + b2 * H[s2] + b3 * H[s3] + c * z
    H[sw] = D                            only when a write slot is given

`x` is the solver state, `m`/`m_u` the model output (conditional / unconditional),
`H` the history ring buffer of earlier data predictions (shape (S, *x.shape)), `z`
the step's noise. `coef = (p, q, a, b0, b1, b2, b3, c)` and `slots = (sw, s1, s2, s3)`
(-1 = unused) come from a host-side float64 table built once per plan; the kernels only
multiply and add, in fp32 whatever the storage dtype.

This module holds the specification (`solver_step_reference`, float64-capable plain
PyTorch). Kernels live in `kernels/solver_step.py` (Triton) and `csrc/solver_step/`.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch

NUM_COEFS = 8  # p, q, a, b0, b1, b2, b3, c
NUM_SLOTS = 4  # write, read D_{i-1}, D_{i-2}, D_{i-3}


def solver_step_reference(
    x: torch.Tensor,
    model_out: torch.Tensor,
    uncond: Optional[torch.Tensor],
    history: Optional[torch.Tensor],
    noise: Optional[torch.Tensor],
    coef: Sequence[float],
    slots: Sequence[int],
    guidance: float = 1.0,
    clamp: float = 0.0,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The specification of `solver_step`, in plain PyTorch.

    Returns the next state (in `x.dtype`) and writes the new data prediction into
    `history[slots[0]]` when `slots[0] >= 0`. Arithmetic happens in `compute_dtype`
    (float64 for test oracles).
    """
    p, q, a, b0, b1, b2, b3, c = (float(v) for v in coef)
    sw, s1, s2, s3 = (int(v) for v in slots)
    f = compute_dtype
    m = model_out.to(f)
    if uncond is not None:
        m_u = uncond.to(f)
        m = m_u + guidance * (m - m_u)
    xf = x.to(f)
    d = p * xf + q * m
    if clamp > 0:
        d = d.clamp(-clamp, clamp)
    out = a * xf + b0 * d
    for b, s in ((b1, s1), (b2, s2), (b3, s3)):
        if s >= 0:
            out = out + b * history[s].to(f)
    if noise is not None:
        out = out + c * noise.to(f)
    if sw >= 0:
        history[sw].copy_(d)
    return out.to(x.dtype)
