"""`fastdiff.optimize()` for diffusers models: imported only when a model contains diffusers modules.

What is fused (parameters and state_dict keys unchanged: the fused modules hold the very same
Parameter objects under the same names):

* `ResnetBlock2D` with `time_embedding_norm="default"` and a SiLU nonlinearity -> `FusedResnetBlock2D`:
  norm1 + SiLU is one `fastdiff::group_norm_silu`; the projected time embedding is added inside
  norm2's op, before its statistics, with the SiLU after (one op instead of add, GroupNorm, SiLU).
  Dropout (identity in eval), up/down-sampling, conv_shortcut and output_scale_factor run as in
  diffusers. Other modes ("scale_shift") or nonlinearities: the block is left as it is.
* the U-Net's output `conv_norm_out` (GroupNorm) + `conv_act` (SiLU): one fused GroupNormSiLU,
  conv_act becomes an `nn.Identity`.
* every other GroupNorm (e.g. `Transformer2DModel.norm`, `Attention.group_norm`): the generic
  rule of `fastdiff.optimize` (a fused GroupNormSiLU(silu=False)).
* `Attention` modules running diffusers' plain processor (`AttnProcessor2_0` / `AttnProcessor`):
  `attn.set_processor(FastdiffAttnProcessor(backend))`, diffusers' own per-module extension point
  (`set_attn_processor` on the model calls it; not every model has that method, UNet2DModel has
  not); its q/k/v (or k/v) weights are packed into one buffer, the parameters becoming views of
  it (`packed.PackedProjections`: state_dict keys and save_pretrained unchanged). Modules with features
  the processor does not implement (spatial_norm, norm_cross, q/k norms, added KV projections,
  grouped KV heads, no output projection, scale_qk=False) or with any other processor (LoRA,
  IP-Adapter, fused projections, a user's own) keep theirs.
* SD3 / Flux transformers' joint attention and adaLN: `transformer_models` (the rules there run first).
"""
from __future__ import annotations

import inspect
from typing import Optional, Tuple

import torch
import torch.nn as nn
from diffusers.models.attention_processor import Attention, AttnProcessor, AttnProcessor2_0
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d import UNet2DModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionModel

from fastdiff.integrations.diffusers import transformer_models  # SD3 / Flux
from fastdiff.integrations.diffusers.packed import packed_linear, packed_projections
from fastdiff.nn import functional as FD
from fastdiff.nn.layers import GroupNormSiLU


def _scaled(x: torch.Tensor, factor: float) -> torch.Tensor:
    """x / factor, without the kernel when factor is 1 (the default: x / 1.0 is x exactly)."""
    return x if factor == 1 else x / factor


# --- ResnetBlock2D ---------------------------------------------------------------------------

def resnet_unsupported(block: ResnetBlock2D) -> Optional[str]:
    """Why `block` cannot be fused, or None."""
    if block.time_embedding_norm != "default":
        return (f"time_embedding_norm={block.time_embedding_norm!r}: only 'default' (time embedding added before "
                "norm2) is fused")
    if type(block.nonlinearity) is not nn.SiLU:
        return f"nonlinearity {type(block.nonlinearity).__name__}: only SiLU is fused"
    if not (type(block.norm1) is nn.GroupNorm and type(block.norm2) is nn.GroupNorm):
        return "norm1/norm2 are not plain nn.GroupNorm"
    return None


class FusedResnetBlock2D(nn.Module):
    """diffusers' ResnetBlock2D (time_embedding_norm="default", SiLU) with norm1 + SiLU and
    (+ time embedding) norm2 + SiLU as fused ops. Built from a block: it takes over the block's
    submodules under their names, so parameters and state_dict keys are the block's."""

    def __init__(self, block: ResnetBlock2D, backend: str):
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        self.norm1 = GroupNormSiLU.sharing(block.norm1, True, backend)
        self.norm2 = GroupNormSiLU.sharing(block.norm2, True, backend)
        # optional parts: a module, a plain callable (FIR/avg-pool resampling) or None
        self.time_emb_proj, self.conv_shortcut = block.time_emb_proj, block.conv_shortcut
        self.upsample, self.downsample = block.upsample, block.downsample
        self.skip_time_act = block.skip_time_act
        self.output_scale_factor = block.output_scale_factor
        self.in_channels, self.out_channels = block.in_channels, block.out_channels
        self.train(block.training)

    def forward(self, input_tensor: torch.Tensor, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        if (temb is None) != (self.time_emb_proj is None):
            raise ValueError("temb: this block " + ("adds a time embedding: expected a (B, temb_channels) tensor, "
                                                    "got None" if temb is None else
                                                    "has no time-embedding projection (temb_channels=None): "
                                                    "expected None"))
        x = input_tensor
        h = self.norm1(x)  # GroupNorm + SiLU, one op
        if self.upsample is not None:
            x, h = self.upsample(x), self.upsample(h)
        elif self.downsample is not None:
            x, h = self.downsample(x), self.downsample(h)
        h = self.conv1(h)
        add = None
        if temb is not None:
            add = self.time_emb_proj(temb if self.skip_time_act else self.nonlinearity(temb))
        h = self.conv2(self.dropout(self.norm2(h, add=add)))  # (h + temb) -> GroupNorm -> SiLU, one op
        if self.conv_shortcut is not None:
            x = self.conv_shortcut(x)
        return _scaled(x + h, self.output_scale_factor)


# --- Attention -------------------------------------------------------------------------------

PLAIN_PROCESSORS = (AttnProcessor, AttnProcessor2_0)


def attention_unsupported(attn: Attention) -> Optional[str]:
    """Why `attn` keeps its processor, or None."""
    proc = attn.processor
    if type(proc) not in PLAIN_PROCESSORS + (FastdiffAttnProcessor,):  # a subclass may change the computation
        return (f"processor {type(proc).__name__} is not diffusers' plain AttnProcessor2_0/AttnProcessor (it may "
                "add behaviour fastdiff's processor does not reproduce)")
    features = (("spatial_norm", attn.spatial_norm is not None), ("norm_cross", attn.norm_cross is not None),
                ("q/k norms", attn.norm_q is not None or attn.norm_k is not None),
                ("added KV projections", attn.added_kv_proj_dim is not None),
                ("grouped KV heads (kv_heads)", attn.inner_kv_dim != attn.inner_dim),
                ("pre_only (no output projection)", attn.to_out is None),
                ("scale_qk=False", not attn.scale_qk))
    missing = [name for name, present in features if present]
    if missing:
        return f"uses {', '.join(missing)}, which fastdiff's attention processor does not implement"
    return None


def projections(attn: Attention) -> Tuple[nn.Linear, ...]:
    """The projections packed into one GEMM: q, k, v (self-attention) or k, v (cross-attention)."""
    return (attn.to_k, attn.to_v) if attn.is_cross_attention else (attn.to_q, attn.to_k, attn.to_v)


class FastdiffAttnProcessor:
    """A diffusers attention processor on fastdiff's fused ops: GroupNorm (if any) on the
    (B, C, tokens) layout, one packed QKV GEMM (cross-attention: q from the hidden states, one
    packed KV GEMM from the encoder states), `fastdiff::attention` reading the packed
    projection in place, and the output projection with the residual added in the GEMM epilogue
    (`linear_residual`) when the module has a residual connection. Masks are not supported."""

    def __init__(self, backend: str):
        self.backend = backend

    def __call__(self, attn: Attention, hidden_states: torch.Tensor,
                 encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, temb: Optional[torch.Tensor] = None) -> torch.Tensor:
        # temb feeds diffusers' spatial_norm only, which modules given this processor do not have
        if attention_mask is not None:
            raise ValueError("attention_mask: fastdiff's fused attention takes no mask; run this model without "
                             "fastdiff.optimize() to use attention masks")
        x = hidden_states
        residual = x.flatten(2).transpose(1, 2) if x.dim() == 4 else x  # (B, L, C); a view of an NCHW map
        tokens = residual
        if attn.group_norm is not None:
            tokens = attn.group_norm(residual.transpose(1, 2)).transpose(1, 2)
        head_dim = attn.to_q.out_features // attn.heads
        packed = packed_projections(attn)
        if encoder_hidden_states is None:
            o = FD.qkv_attention(packed_linear(tokens, packed, attn.to_q, attn.to_k, attn.to_v), head_dim,
                                 self.backend)
        else:
            o = FD.kv_attention(attn.to_q(tokens), packed_linear(encoder_hidden_states, packed, attn.to_k, attn.to_v),
                                head_dim, self.backend)
        proj, dropout = attn.to_out
        if attn.residual_connection and not (dropout.training and dropout.p > 0):
            y = FD.linear_residual(o, proj, residual, self.backend)
        else:
            y = dropout(proj(o))
            if attn.residual_connection:
                y = y + residual
        if x.dim() == 4:
            y = y.transpose(1, 2).reshape(x.shape)
        return _scaled(y, attn.rescale_output_factor)

    # diffusers' Attention.forward reads the processor's signature at every call (to drop the
    # keyword arguments it does not take); computed once here, inspect returns it as is (~70 us
    # a call saved)
    __call__.__signature__ = inspect.signature(__call__)


# --- the adapter interface fastdiff.optimize calls -------------------------------------------

_UNETS = (UNet2DModel, UNet2DConditionModel)
_OUTPUT_NORM = ("conv_norm_out + conv_act (GroupNorm -> SiLU): one fused GroupNormSiLU; conv_act is now an "
                "nn.Identity")


_ROOT_BLOCK = "it is the model passed to optimize() itself and cannot be replaced in place: optimize its parent"


def transform(parent: Optional[nn.Module], name: str, child: nn.Module, backend: str) -> bool:
    """Fuse `child` (named `name` in `parent`; parent None: the model itself) if diffusers-specific.
    True: handled, do not descend."""

    handled = transformer_models.transform(parent, name, child, backend)
    if handled is not None:
        return handled
    if isinstance(child, FusedResnetBlock2D):
        return True  # already fused; optimize() points its norms at `backend`
    if type(child) is ResnetBlock2D:  # a subclass may change forward: not recognised
        if parent is not None and resnet_unsupported(child) is None:
            setattr(parent, name, FusedResnetBlock2D(child, backend))
        return True  # an unsupported block is left whole, GroupNorms included
    if type(child) is Attention:
        if attention_unsupported(child) is not None:
            return True  # left whole: its processor may use its GroupNorms in ways we do not know
        if isinstance(child.processor, FastdiffAttnProcessor):
            child.processor.backend = backend
        else:
            child.set_processor(FastdiffAttnProcessor(backend))
        packed_projections(child).get(projections(child))  # the parameters become views of one buffer now
        return False  # its group_norm is fused by the generic rule
    if (isinstance(parent, _UNETS) and name == "conv_norm_out" and type(child) is nn.GroupNorm
            and type(parent.conv_act) is nn.SiLU):
        parent.conv_norm_out = GroupNormSiLU.sharing(child, True, backend, _OUTPUT_NORM)
        parent.conv_act = nn.Identity()
        return True
    return False


def describe(module: nn.Module) -> Optional[Tuple[str, str, bool]]:
    """(report list, what, descend) for a diffusers-specific module, else None."""

    entry = transformer_models.describe(module)
    if entry is not None:
        return entry
    if isinstance(module, FusedResnetBlock2D):
        return ("replaced", "ResnetBlock2D: norm1 + SiLU one fused op; time-embedding add + norm2 + SiLU one fused "
                            "op (the add before the statistics)", False)
    if type(module) is ResnetBlock2D:
        return "not_replaced", f"ResnetBlock2D left as is: {resnet_unsupported(module) or _ROOT_BLOCK}", False
    if type(module) is Attention:
        why = attention_unsupported(module)
        if why is not None:
            return "not_replaced", f"Attention left as is: {why}", False
        out = "out-projection + residual in one GEMM" if module.residual_connection else "out-projection"
        return ("replaced", f"Attention: FastdiffAttnProcessor (packed QKV/KV GEMM, fastdiff::attention, {out}) on "
                            f"backend {module.processor.backend!r}", True)
    return None
