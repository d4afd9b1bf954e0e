"""U-Net building blocks in plain PyTorch.

Every block keeps its parameters in plainly named submodules / tensors and delegates the
inner computation to `fastdiff.nn.functional`, so fused kernels can replace the computation
without touching a state_dict key.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from fastdiff.nn import functional as FD


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps: (B,) -> (B, dim), float32.

    [cos(t * f_0), ..., cos(t * f_{h-1}), sin(t * f_0), ..., sin(t * f_{h-1})] with
    f_i = max_period^(-i / h), h = dim // 2 (the diffusers `flip_sin_to_cos=True,
    downscale_freq_shift=0` convention); an odd `dim` gets a zero last column.
    """
    if t.dim() != 1:
        raise ValueError(f"t: expected a 1-D tensor of timesteps, got shape {tuple(t.shape)}")
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.to(torch.float32)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class TimestepEmbedding(nn.Module):
    """sinusoid(t) -> Linear -> SiLU -> Linear."""

    def __init__(self, freq_dim: int, dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.linear_1 = nn.Linear(freq_dim, dim)
        self.linear_2 = nn.Linear(dim, dim)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = timestep_embedding(t, self.freq_dim).to(self.linear_1.weight.dtype)
        return self.linear_2(F.silu(self.linear_1(emb)))


class GroupNormSiLU(nn.Module):
    """GroupNorm with optional SiLU, optional pre-statistics add, optional residual add.

    `forward(x, add=None, residual=None)` returns
    `residual + act(GroupNorm(x + add[:, :, None, None]))` where `add` is (B, C) (the
    ResBlock time-embedding add) and act is SiLU when `silu=True`. Parameters are named like
    `nn.GroupNorm` (`weight`, `bias`), so a state_dict of an `nn.GroupNorm` loads into it.
    """

    def __init__(self, num_channels: int, num_groups: int = 32, eps: float = 1e-5, silu: bool = True,
                 device=None, dtype=None):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f"num_channels ({num_channels}) must be divisible by num_groups ({num_groups})")
        self.num_channels = num_channels
        self.num_groups = num_groups
        self.eps = eps
        self.silu = silu
        self.weight = nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(num_channels, device=device, dtype=dtype))

    backend: Optional[str] = None  # None: the eager twin (plain PyTorch); else the fused op's backend

    @classmethod
    def sharing(cls, gn: nn.GroupNorm, silu: bool, backend, replaced: Optional[str] = None) -> "GroupNormSiLU":
        """A GroupNormSiLU sharing `gn`'s Parameters (what `fastdiff.optimize` swaps in);
        `replaced` (what it stands for, when it is reported on its own) goes into the report."""
        p = gn.weight if gn.weight is not None else gn.bias
        new = cls(gn.num_channels, gn.num_groups, gn.eps, silu=silu,
                  device=p.device if p is not None else None, dtype=p.dtype if p is not None else None)
        new.weight, new.bias = gn.weight, gn.bias  # the same Parameters (or None when affine=False)
        new.backend = backend
        new.replaced = replaced
        new.train(gn.training)
        return new

    def forward(self, x: torch.Tensor, add: Optional[torch.Tensor] = None,
                residual: Optional[torch.Tensor] = None) -> torch.Tensor:
        return FD.group_norm_silu(x, self.weight, self.bias, self.num_groups, self.eps, self.silu, add, residual,
                                  backend=self.backend)

    def extra_repr(self) -> str:
        return f"{self.num_channels}, groups={self.num_groups}, eps={self.eps}, silu={self.silu}"


def _zero_(module: nn.Module) -> nn.Module:
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class ResBlock(nn.Module):
    """GN+SiLU -> conv3x3 -> (+ temb) -> GN+SiLU -> dropout -> conv3x3, plus skip.

    The time embedding (projected to `out_channels` after a SiLU) is added before the second
    GroupNorm's statistics, i.e. inside `norm2` (one fused op). The skip is a 1x1 conv when
    the channel count changes, the identity otherwise.
    """

    def __init__(self, in_channels: int, out_channels: int, temb_channels: Optional[int], *, dropout: float = 0.0,
                 groups: int = 32, eps: float = 1e-5, zero_init: bool = False):
        super().__init__()
        self.in_channels, self.out_channels = in_channels, out_channels
        self.norm1 = GroupNormSiLU(in_channels, groups, eps)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.temb_proj = nn.Linear(temb_channels, out_channels) if temb_channels else None
        self.norm2 = GroupNormSiLU(out_channels, groups, eps)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if zero_init:
            _zero_(self.conv2)
        self.skip = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.conv1(self.norm1(x))
        add = self.temb_proj(F.silu(temb)) if (self.temb_proj is not None and temb is not None) else None
        h = self.conv2(self.dropout(self.norm2(h, add=add)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the H*W tokens, optionally followed by cross-attention to a context.

    Self:  x1 = x  + proj_out(attn(qkv(GroupNorm(x))))           one fused QKV linear
    Cross: x2 = x1 + proj_out_cross(attn(to_q(GroupNorm(x1)), to_kv(context)))   (context_dim set)

    Attention is `F.scaled_dot_product_attention` (softmax(q k^T / sqrt(head_dim)) v) with
    `channels // head_dim` heads. Context is (B, L, context_dim).
    """

    def __init__(self, channels: int, *, head_dim: Optional[int] = None, num_heads: Optional[int] = None,
                 context_dim: Optional[int] = None, groups: int = 32, eps: float = 1e-5, zero_init: bool = False):
        super().__init__()
        if (head_dim is None) == (num_heads is None):
            raise ValueError("AttentionBlock: give exactly one of head_dim, num_heads")
        if head_dim is None:
            if channels % num_heads:
                raise ValueError(f"channels ({channels}) not divisible by num_heads ({num_heads})")
            head_dim = channels // num_heads
        if channels % head_dim:
            raise ValueError(f"channels ({channels}) not divisible by head_dim ({head_dim})")
        self.channels, self.head_dim, self.num_heads = channels, head_dim, channels // head_dim
        self.context_dim = context_dim
        self.norm = GroupNormSiLU(channels, groups, eps, silu=False)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj_out = nn.Linear(channels, channels)
        if context_dim:
            self.norm_cross = GroupNormSiLU(channels, groups, eps, silu=False)
            self.to_q = nn.Linear(channels, channels)
            self.to_kv = nn.Linear(context_dim, 2 * channels)
            self.proj_out_cross = nn.Linear(channels, channels)
        if zero_init:
            _zero_(self.proj_out)
            if context_dim:
                _zero_(self.proj_out_cross)

    backend: Optional[str] = None  # None: the eager twin (plain PyTorch); else the fused ops' backend

    @staticmethod
    def _tokens(x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)  # (B, C, H, W) -> (B, HW, C)

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self._tokens(x)
        t = self._tokens(self.norm(x))
        be = self.backend
        tokens = FD.linear_residual(FD.qkv_attention(self.qkv(t), self.head_dim, be), self.proj_out, tokens, be)
        if self.context_dim:
            if context is None:
                raise ValueError(f"context: this block cross-attends; expected a (B, L, {self.context_dim}) tensor")
            if context.dim() != 3 or context.shape[0] != b or context.shape[2] != self.context_dim:
                raise ValueError(f"context: expected shape ({b}, L, {self.context_dim}), got {tuple(context.shape)}")
            x1 = tokens.transpose(1, 2).reshape(b, c, h, w)
            t = self._tokens(self.norm_cross(x1))
            o = FD.kv_attention(self.to_q(t), self.to_kv(context.to(t.dtype)), self.head_dim, be)
            tokens = FD.linear_residual(o, self.proj_out_cross, tokens, be)
        return tokens.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    """Halve H and W: a stride-2 3x3 conv, or 2x2 average pooling."""

    def __init__(self, channels: int, with_conv: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x) if self.conv is not None else F.avg_pool2d(x, 2)


class Upsample(nn.Module):
    """Double H and W: nearest-neighbour upsampling, then (optionally) a 3x3 conv."""

    def __init__(self, channels: int, with_conv: bool = True):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1) if with_conv else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")
        return self.conv(x) if self.conv is not None else x
