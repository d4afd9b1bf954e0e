"""The inner computations of the U-Net blocks, as plain functions.

Each function here is the eager specification of one computation (plain PyTorch: the "eager
twin") and, with `backend=` set, runs the fused op instead (`fastdiff::group_norm_silu`,
`fastdiff::attention` through `fastdiff.ops`, `linear_residual`). The modules in
`fastdiff.nn` hold the parameters and call these functions with them, so switching between
the two never changes a parameter name or a state_dict.

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

from fastdiff.ops.attention import kv_attention as fused_kv_attention
from fastdiff.ops.attention import qkv_attention as fused_qkv_attention
from fastdiff.ops.group_norm_silu import group_norm_silu as fused_group_norm_silu
from fastdiff.ops.linear_residual import linear_residual as fused_linear_residual


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
    if backend is not None:
        return fused_group_norm_silu(x, num_groups, weight, bias, eps=eps, silu=silu, temb=add, residual=residual,
                                     backend=backend)
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


def split_heads(t: torch.Tensor, head_dim: int) -> torch.Tensor:
    """(B, N, C) -> (B, C // head_dim, N, head_dim)."""
    b, n, c = t.shape
    return t.reshape(b, n, c // head_dim, head_dim).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """(B, H, N, d) -> (B, N, H * d)."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def qkv_attention(qkv: torch.Tensor, head_dim: int, backend: Optional[str] = None) -> torch.Tensor:
    """Multi-head softmax self-attention from a fused QKV projection: (B, N, 3C) -> (B, N, C)."""
    if backend is not None:
        return fused_qkv_attention(qkv, qkv.shape[-1] // (3 * head_dim), backend=backend)
    q, k, v = qkv.chunk(3, dim=-1)
    return kv_attention(q, torch.cat([k, v], dim=-1), head_dim)


def kv_attention(q: torch.Tensor, kv: torch.Tensor, head_dim: int, backend: Optional[str] = None) -> torch.Tensor:
    """Multi-head softmax attention of queries (B, N, C) over a fused KV projection (B, L, 2C)."""
    if backend is not None:
        return fused_kv_attention(q, kv, q.shape[-1] // head_dim, backend=backend)
    k, v = kv.chunk(2, dim=-1)
    o = F.scaled_dot_product_attention(split_heads(q, head_dim), split_heads(k, head_dim), split_heads(v, head_dim))
    return merge_heads(o)


def linear_residual(x: torch.Tensor, linear: torch.nn.Linear, residual: torch.Tensor,
                    backend: Optional[str] = None) -> torch.Tensor:
    """`residual + linear(x)`; with a backend, the residual add rides in the GEMM epilogue and
    the result keeps residual's memory layout (an NCHW map's token view stays NCHW)."""
    if backend is not None:
        return fused_linear_residual(x, linear.weight, linear.bias, residual)
    return residual + linear(x)
