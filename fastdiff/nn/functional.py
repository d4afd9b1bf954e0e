"""The inner computations of the U-Net blocks, as plain functions.

Each function here is the eager specification of one computation (plain PyTorch: the "eager
twin") and, with `backend=` set, runs the fused op instead (`fastdiff::group_norm_silu`,
`fastdiff::attention`, `fastdiff::layer_norm_modulate` through `fastdiff.ops`, `linear_residual`). The modules in
`fastdiff.nn` hold the parameters and call these functions with them, so switching between
the two never changes a parameter name or a state_dict.

Autograd: the fused kernels are inference kernels without a backward. When autograd records
(grad mode on and an input or parameter requires grad), the forward still runs the fused op and
backward recomputes the eager twin from the saved inputs and differentiates that: gradients
are the eager twin's, never silently dropped.

Layout conventions the fused kernels must follow:

* `group_norm_silu`: x is (B, C, *spatial) with C divisible by `num_groups`; `add` is
  (B, C) and broadcast over the spatial dims **before** the statistics (this is the ResBlock
  time-embedding add); `residual` has x's shape and is added **after** the activation.
* `qkv_attention`: `qkv` is (B, N, 3*C) as produced by one fused linear layer whose output
  features are ordered [q | k | v], each split into `C // head_dim` heads of `head_dim`
  contiguous features (head h of q is features [h*d, (h+1)*d)).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from fastdiff.ops.attention import kv_attention as fused_kv_attention
from fastdiff.ops.attention import qkv_attention as fused_qkv_attention
from fastdiff.ops.group_norm_silu import group_norm_silu as fused_group_norm_silu
from fastdiff.ops.layer_norm_modulate import layer_norm_modulate as fused_layer_norm_modulate
from fastdiff.ops.linear_residual import linear_residual as fused_linear_residual


class _FusedForwardEagerBackward(torch.autograd.Function):
    """The fused op's output, with gradients from its eager twin: the fused kernels have no
    backward, so backward recomputes the eager twin from the saved inputs and differentiates it
    (as activation checkpointing does). Once differentiable."""

    @staticmethod
    def forward(ctx, fused, eager, *inputs):
        ctx.eager = eager
        ctx.save_for_backward(*inputs)
        return fused(*inputs)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        wants = ctx.needs_input_grad[2:]
        inputs = [None if t is None else t.detach().requires_grad_(w) for t, w in zip(ctx.saved_tensors, wants)]
        with torch.enable_grad():
            out = ctx.eager(*inputs)
        leaves = [t for t, w in zip(inputs, wants) if w]
        grads = iter(torch.autograd.grad(out, leaves, grad, allow_unused=True))
        return (None, None, *[next(grads) if w else None for w in wants])


def _run(eager, fused, backend: Optional[str], *inputs):
    """`eager(*inputs)` without a backend; else `fused(*inputs)`, made differentiable through
    the eager twin when autograd records (grad mode on and an input requires grad), so a fused
    module never silently cuts the graph."""
    if backend is None:
        return eager(*inputs)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in inputs):
        return _FusedForwardEagerBackward.apply(fused, eager, *inputs)
    return fused(*inputs)


def group_norm_silu(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    num_groups: int,
    eps: float = 1e-5,
    silu: bool = True,
    add: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """`residual + act(GroupNorm(x + add[:, :, None, ...]))`, act = SiLU or identity.
    backend=None: plain PyTorch; else the fused op on that backend ("auto", "cuda", ...)."""

    def fused(x, weight, bias, add, residual):
        return fused_group_norm_silu(x, num_groups, weight, bias, eps=eps, silu=silu, temb=add, residual=residual,
                                     backend=backend)

    def eager(x, weight, bias, add, residual):
        if add is not None:
            if add.shape != x.shape[:2]:
                raise ValueError(f"add: expected shape {tuple(x.shape[:2])} (B, C), got {tuple(add.shape)}")
            x = x + add.reshape(*add.shape, *([1] * (x.dim() - 2)))
        h = F.group_norm(x, num_groups, weight, bias, eps)
        if silu:
            h = F.silu(h)
        if residual is not None:
            h = h + residual
        return h

    return _run(eager, fused, backend, x, weight, bias, add, residual)


def layer_norm_modulate(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, eps: float = 1e-6,
                        backend: Optional[str] = None) -> torch.Tensor:
    """`LayerNorm(x) * (1 + scale[:, None]) + shift[:, None]` (LayerNorm without affine), x
    (B, L, C), scale and shift (B, C): adaLN modulation. backend=None: plain PyTorch (as
    diffusers writes it); else the fused op on that backend."""

    def fused(x, scale, shift):
        return fused_layer_norm_modulate(x, scale, shift, eps=eps, backend=backend)

    def eager(x, scale, shift):
        return F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale[:, None]) + shift[:, None]

    return _run(eager, fused, backend, x, scale, shift)


def split_heads(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, N, C) -> (B, C // head_dim, N, head_dim)."""
    b, n, c = t.shape
    return t.reshape(b, n, c // head_dim, head_dim).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """(B, H, N, d) -> (B, N, H * d)."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def _eager_kv_attention(q: torch.Tensor, kv: torch.Tensor, head_dim: int) -> torch.Tensor:
    k, v = kv.chunk(2, dim=-1)
    o = F.scaled_dot_product_attention(split_heads(q, head_dim), split_heads(k, head_dim), split_heads(v, head_dim))
    return merge_heads(o)


def qkv_attention(qkv: torch.Tensor, head_dim: int, backend: Optional[str] = None) -> torch.Tensor:
    """Multi-head softmax self-attention from a fused QKV projection: (B, N, 3C) -> (B, N, C)."""

    def fused(qkv):
        return fused_qkv_attention(qkv, qkv.shape[-1] // (3 * head_dim), backend=backend)

    def eager(qkv):
        q, k, v = qkv.chunk(3, dim=-1)
        return _eager_kv_attention(q, torch.cat([k, v], dim=-1), head_dim)

    return _run(eager, fused, backend, qkv)


def kv_attention(q: torch.Tensor, kv: torch.Tensor, head_dim: int, backend: Optional[str] = None) -> torch.Tensor:
    """Multi-head softmax attention of queries (B, N, C) over a fused KV projection (B, L, 2C)."""

    def fused(q, kv):
        return fused_kv_attention(q, kv, q.shape[-1] // head_dim, backend=backend)

    def eager(q, kv):
        return _eager_kv_attention(q, kv, head_dim)

    return _run(eager, fused, backend, q, kv)


def linear_residual(x: torch.Tensor, linear: torch.nn.Linear, residual: torch.Tensor,
                    backend: Optional[str] = None) -> torch.Tensor:
    """`residual + linear(x)`; with a backend, the residual add rides in the GEMM epilogue and
    the result keeps residual's memory layout (an NCHW map's token view stays NCHW)."""

    def fused(x, weight, bias, residual):
        return fused_linear_residual(x, weight, bias, residual)

    def eager(x, weight, bias, residual):
        return residual + F.linear(x, weight, bias)

    return _run(eager, fused, backend, x, linear.weight, linear.bias, residual)
