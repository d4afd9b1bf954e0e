"""A DDPM / Stable-Diffusion style U-Net, in plain PyTorch.

    x (B, C, H, W), t (B,) float diffusers-style timesteps
      conv_in
      down levels: num_res_blocks x [ResBlock (+ AttentionBlock)] then Downsample (not the last)
      mid: ResBlock, AttentionBlock (optional), ResBlock
      up levels: (num_res_blocks + 1) x [concat skip, ResBlock (+ AttentionBlock)] then Upsample
      GroupNorm+SiLU, conv_out

The time embedding is sinusoid(t) -> MLP (width `temb_mult * base_channels`); a
class-conditional model adds a learned class embedding to it, with one extra "null" class
(index `num_classes`) used when `class_labels` is None or for classifier-free guidance.
A cross-attending model (`context_dim` set) takes `context` (B, L, context_dim) in every
attention block.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional, Tuple

import torch
import torch.nn as nn

from fastdiff.nn.layers import AttentionBlock, Downsample, GroupNormSiLU, ResBlock, TimestepEmbedding, Upsample


def _check_positive_int(name: str, v) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ValueError(f"{name}: expected a positive integer, got {v!r}")


@dataclass(frozen=True)
class UNetConfig:
    sample_size: int = 32
    in_channels: int = 3
    out_channels: Optional[int] = None          # None: same as in_channels
    base_channels: int = 128
    channel_mults: Tuple[int, ...] = (1, 2, 2, 2)
    num_res_blocks: int = 2
    attention_levels: Tuple[int, ...] = (1,)    # level indices (0 = full resolution) with attention
    mid_attention: bool = True
    head_dim: Optional[int] = None              # exactly one of head_dim / num_heads
    num_heads: Optional[int] = 1
    context_dim: Optional[int] = None           # cross-attention to (B, L, context_dim)
    context_length: Optional[int] = None        # typical L (77 for SD); informational, for benchmarks
    num_classes: Optional[int] = None           # class-conditional with a null label at index num_classes
    dropout: float = 0.0
    groups: int = 32
    norm_eps: float = 1e-5
    temb_mult: int = 4
    resample_with_conv: bool = True
    zero_init: bool = True                      # zero the last conv/linear of residual branches and conv_out

    def __post_init__(self):
        object.__setattr__(self, "channel_mults", tuple(self.channel_mults))
        object.__setattr__(self, "attention_levels", tuple(self.attention_levels))
        for name in ("sample_size", "in_channels", "base_channels", "groups", "temb_mult"):
            _check_positive_int(name, getattr(self, name))
        if self.out_channels is not None:
            _check_positive_int("out_channels", self.out_channels)
        if isinstance(self.num_res_blocks, bool) or not isinstance(self.num_res_blocks, int) or self.num_res_blocks < 0:
            raise ValueError(f"num_res_blocks: expected an integer >= 0, got {self.num_res_blocks!r}")
        if not self.channel_mults:
            raise ValueError("channel_mults: expected at least one level")
        for m in self.channel_mults:
            _check_positive_int("channel_mults", m)
        n = len(self.channel_mults)
        if any(not 0 <= lvl < n for lvl in self.attention_levels):
            raise ValueError(f"attention_levels: expected level indices in [0, {n}), got {self.attention_levels}")
        if (self.head_dim is None) == (self.num_heads is None):
            raise ValueError("UNetConfig: give exactly one of head_dim, num_heads")
        if self.sample_size % (2 ** (n - 1)):
            raise ValueError(f"sample_size {self.sample_size} is not divisible by 2**{n - 1}")
        for c in self.channels:
            if c % self.groups:
                raise ValueError(f"channel count {c} is not divisible by groups={self.groups}")

    @property
    def channels(self) -> Tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_mults)

    @property
    def sample_shape(self) -> Tuple[int, int, int]:
        return (self.in_channels, self.sample_size, self.sample_size)

    def replace(self, **changes) -> "UNetConfig":
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"UNetConfig: unknown fields {sorted(unknown)}")
        return cls(**d)

    # --- named configurations --------------------------------------------------------
    @classmethod
    def digits(cls, **overrides) -> "UNetConfig":
        """The bundled demo model: class-conditional, 1x16x16 (8x8 sklearn digits upscaled)."""
        cfg = cls(sample_size=16, in_channels=1, base_channels=16, channel_mults=(1, 2, 4), num_res_blocks=1,
                  attention_levels=(2,), mid_attention=True, head_dim=32, num_heads=None, num_classes=10,
                  groups=8, dropout=0.0)
        return cfg.replace(**overrides)

    @classmethod
    def cifar(cls, **overrides) -> "UNetConfig":
        """DDPM's CIFAR-10 model (Ho et al. 2020): 3x32x32, ch 128, mults (1,2,2,2), 2 res blocks,
        attention at 16x16, dropout 0.1; about 35.7M parameters."""
        cfg = cls(sample_size=32, in_channels=3, base_channels=128, channel_mults=(1, 2, 2, 2), num_res_blocks=2,
                  attention_levels=(1,), mid_attention=True, head_dim=None, num_heads=1, dropout=0.1)
        return cfg.replace(**overrides)

    @classmethod
    def sd15_like(cls, **overrides) -> "UNetConfig":
        """Stable-Diffusion-1.5-shaped latent U-Net for benchmarks (random weights): 4x64x64,
        channels (320, 640, 1280, 1280), 2 res blocks, attention (8 heads: head_dim 40, 80, 160)
        with cross-attention to 77x768 context at the first three levels and in the middle.
        It has no transformer feed-forward, so it has fewer parameters than SD 1.5 (see
        `count_parameters`). Build it on the meta device, or at reduced width
        (`sd15_like(base_channels=32)`), where a full one is not needed."""
        cfg = cls(sample_size=64, in_channels=4, base_channels=320, channel_mults=(1, 2, 4, 4), num_res_blocks=2,
                  attention_levels=(0, 1, 2), mid_attention=True, head_dim=None, num_heads=8, context_dim=768,
                  context_length=77, zero_init=False)
        return cfg.replace(**overrides)


class _Level(nn.Module):
    def __init__(self, resnets, attentions, resample):
        super().__init__()
        self.resnets = nn.ModuleList(resnets)
        self.attentions = nn.ModuleList(attentions) if attentions else None
        self.resample = resample


class UNet(nn.Module):
    """`UNet(config)(x, t, context=None, class_labels=None)` -> the model output, x's shape."""

    def __init__(self, config: UNetConfig):
        super().__init__()
        self.config = cfg = config
        chans = cfg.channels
        temb = cfg.temb_mult * cfg.base_channels
        zi = cfg.zero_init

        def res(cin, cout):
            return ResBlock(cin, cout, temb, dropout=cfg.dropout, groups=cfg.groups, eps=cfg.norm_eps, zero_init=zi)

        def attn(c):
            return AttentionBlock(c, head_dim=cfg.head_dim, num_heads=cfg.num_heads, context_dim=cfg.context_dim,
                                  groups=cfg.groups, eps=cfg.norm_eps, zero_init=zi)

        self.time_embed = TimestepEmbedding(cfg.base_channels, temb)
        self.class_embed = nn.Embedding(cfg.num_classes + 1, temb) if cfg.num_classes else None
        self.conv_in = nn.Conv2d(cfg.in_channels, chans[0], 3, padding=1)

        skip_ch = [chans[0]]
        ch = chans[0]
        self.down = nn.ModuleList()
        for lvl, cout in enumerate(chans):
            resnets, attns = [], []
            for _ in range(cfg.num_res_blocks):
                resnets.append(res(ch, cout))
                ch = cout
                if lvl in cfg.attention_levels:
                    attns.append(attn(ch))
                skip_ch.append(ch)
            last = lvl == len(chans) - 1
            down = None if last else Downsample(ch, cfg.resample_with_conv)
            if not last:
                skip_ch.append(ch)
            self.down.append(_Level(resnets, attns, down))

        self.mid_res1 = res(ch, ch)
        self.mid_attn = attn(ch) if cfg.mid_attention else None
        self.mid_res2 = res(ch, ch)

        self.up = nn.ModuleList()
        for lvl in reversed(range(len(chans))):
            cout = chans[lvl]
            resnets, attns = [], []
            for _ in range(cfg.num_res_blocks + 1):
                resnets.append(res(ch + skip_ch.pop(), cout))
                ch = cout
                if lvl in cfg.attention_levels:
                    attns.append(attn(ch))
            up = Upsample(ch, cfg.resample_with_conv) if lvl > 0 else None
            self.up.append(_Level(resnets, attns, up))
        assert not skip_ch

        self.norm_out = GroupNormSiLU(ch, cfg.groups, cfg.norm_eps)
        self.conv_out = nn.Conv2d(ch, cfg.out_channels or cfg.in_channels, 3, padding=1)
        if zi:
            nn.init.zeros_(self.conv_out.weight)
            nn.init.zeros_(self.conv_out.bias)

    @property
    def null_class(self) -> Optional[int]:
        """The class index that means "no class" (classifier-free guidance), or None."""
        return self.config.num_classes

    def set_backend(self, backend) -> "UNet":
        """Run the GroupNorm(+SiLU) and attention blocks on the fused ops of `backend` ("auto",
        "cuda", "triton", "cpu", "reference"), or None for the eager twin. Returns self."""
        from fastdiff.optimize import set_backend

        set_backend(self, backend)
        return self

    def count_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def _embed(self, x, t, class_labels):
        b = x.shape[0]
        if not torch.is_tensor(t):
            t = torch.tensor(t, dtype=torch.float32, device=x.device)
        if t.dim() == 0:
            t = t.expand(b)
        if t.shape != (b,):
            raise ValueError(f"t: expected shape ({b},) (one timestep per sample), got {tuple(t.shape)}")
        emb = self.time_embed(t.to(x.device))
        if self.class_embed is not None:
            if class_labels is None:
                class_labels = torch.full((b,), self.config.num_classes, dtype=torch.long, device=x.device)
            class_labels = torch.as_tensor(class_labels, device=x.device).long()
            if class_labels.shape != (b,):
                raise ValueError(f"class_labels: expected shape ({b},), got {tuple(class_labels.shape)}")
            if class_labels.min() < 0 or class_labels.max() > self.config.num_classes:
                raise ValueError(f"class_labels: expected values in [0, {self.config.num_classes}] "
                                 f"({self.config.num_classes} = null class)")
            emb = emb + self.class_embed(class_labels)
        elif class_labels is not None:
            raise ValueError("class_labels: this model is not class-conditional (config.num_classes is None)")
        return emb

    def forward(self, x: torch.Tensor, t, context: Optional[torch.Tensor] = None,
                class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        cfg = self.config
        if x.dim() != 4 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"x: expected (B, {cfg.in_channels}, H, W), got {tuple(x.shape)}")
        f = 2 ** (len(cfg.channel_mults) - 1)
        if x.shape[2] % f or x.shape[3] % f:
            raise ValueError(f"x: H and W must be multiples of {f}, got {tuple(x.shape[2:])}")
        if cfg.context_dim and context is None:
            raise ValueError(f"context: this model cross-attends; expected a (B, L, {cfg.context_dim}) tensor")
        if not cfg.context_dim and context is not None:
            raise ValueError("context: this model has no cross-attention (config.context_dim is None)")
        emb = self._embed(x, t, class_labels)

        h = self.conv_in(x)
        hs = [h]
        for level in self.down:
            for i, rb in enumerate(level.resnets):
                h = rb(h, emb)
                if level.attentions is not None:
                    h = level.attentions[i](h, context)
                hs.append(h)
            if level.resample is not None:
                h = level.resample(h)
                hs.append(h)
        h = self.mid_res1(h, emb)
        if self.mid_attn is not None:
            h = self.mid_attn(h, context)
        h = self.mid_res2(h, emb)
        for level in self.up:
            for i, rb in enumerate(level.resnets):
                h = rb(torch.cat([h, hs.pop()], dim=1), emb)
                if level.attentions is not None:
                    h = level.attentions[i](h, context)
            if level.resample is not None:
                h = level.resample(h)
        return self.conv_out(self.norm_out(h))
