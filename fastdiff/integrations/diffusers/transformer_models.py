"""`fastdiff.optimize()` for diffusers' transformer denoisers (SD3 `SD3Transformer2DModel`, Flux
`FluxTransformer2DModel`): their joint attention on fastdiff's ops. Registered by `models`.

* SD3's `Attention` with `JointAttnProcessor2_0` (joint image + context attention, and the
  image-only `attn2` of SD3.5's dual-attention blocks) and Flux's `FluxAttention` with
  `FluxAttnProcessor` (double-stream blocks: image + context; single-stream blocks: one stream,
  no output projection) get `FastdiffJointAttnProcessor`: one packed QKV GEMM per stream (Flux
  after `fuse_qkv_projections()`: its packed layers, else the weights packed once into one buffer
  per stream, the parameters views of it: `packed.PackedProjections`), both
  streams' projections side by side in one (B, L, 3, H, D) buffer, q/k RMSNorm (SD3 with
  qk_norm="rms_norm", Flux always) and Flux's rotary embedding applied to q and k together, in
  float32, rounded once, on their way into that buffer; then `fastdiff::attention` reads head-split
  views of it and writes the (B, L, H*D) layout the output projections take (no transposes).
  Modules with q/k norms other than per-head RMSNorm or with any other processor (IP-Adapter,
  a user's own, a subclass) keep theirs, and the report says why.
* adaLN modules (AdaLayerNormZero, AdaLayerNormZeroSingle, SD35AdaLayerNormZeroX,
  AdaLayerNormContinuous: norm1 / norm1_context / norm_out) become the fused modules of `adaln`
  (LayerNorm + modulation in one `fastdiff::layer_norm_modulate`). The blocks' norm2 /
  norm2_context (a LayerNorm without affine modulated by the block's own forward code) run as in
  diffusers, reported so.
"""
from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from diffusers.models.attention_processor import Attention, JointAttnProcessor2_0
from diffusers.models.normalization import RMSNorm
from diffusers.models.transformers.transformer_flux import FluxAttention, FluxAttnProcessor

from fastdiff.integrations.diffusers import adaln
from fastdiff.integrations.diffusers.packed import packed_linear, packed_projections
from fastdiff.nn import functional as FD

# the processors whose computation FastdiffJointAttnProcessor reproduces, by module type
_THEIRS = {Attention: JointAttnProcessor2_0, FluxAttention: FluxAttnProcessor}
_ROOT = "it is the model passed to optimize() itself and cannot be replaced in place: optimize its parent"


def _norm_unsupported(norm: Optional[nn.Module], head_dim: int) -> Optional[str]:
    if norm is None:
        return None
    if type(norm) not in (RMSNorm, nn.RMSNorm):
        return f"{type(norm).__name__}: only RMSNorm q/k norms are fused"
    dims = tuple(norm.dim if type(norm) is RMSNorm else norm.normalized_shape)
    if dims != (head_dim,):
        return f"RMSNorm over {dims}, not over each head's {head_dim} features: not fused"
    if getattr(norm, "bias", None) is not None:
        return "RMSNorm with a bias: not fused"
    return None


def _norm_pairs(attn: nn.Module) -> List[Tuple[Optional[nn.Module], Optional[nn.Module]]]:
    """(q norm, k norm) of the image stream, then of the context stream where there is one."""
    pairs = [(attn.norm_q, attn.norm_k)]
    if attn.added_kv_proj_dim is not None:
        pairs.append((getattr(attn, "norm_added_q", None), getattr(attn, "norm_added_k", None)))
    return pairs


def _pair_unsupported(norm_q, norm_k, head_dim: int) -> Optional[str]:
    why = _norm_unsupported(norm_q, head_dim) or _norm_unsupported(norm_k, head_dim)
    if why is None and (norm_q is None) != (norm_k is None):
        why = "a q norm without a k norm (or the reverse): not fused"
    if why is None and norm_q is not None and (
            norm_q.eps != norm_k.eps or (norm_q.weight is None) != (norm_k.weight is None)):
        why = "q and k norms with different eps or affine settings: not fused"
    return why


def joint_attention_unsupported(attn: nn.Module) -> Optional[str]:
    """Why `attn` (an SD3 `Attention` or a `FluxAttention`) keeps its processor, or None."""
    proc = attn.processor
    if type(proc) not in (_THEIRS[type(attn)], FastdiffJointAttnProcessor):  # a subclass may change it
        return (f"processor {type(proc).__name__} is not diffusers' plain {_THEIRS[type(attn)].__name__} (it may add "
                "behaviour fastdiff's processor does not reproduce)")
    if not attn.to_q.out_features == attn.to_k.out_features == attn.to_v.out_features:
        return "q, k and v projections of different widths (grouped KV heads): not fused"
    for norm_q, norm_k in _norm_pairs(attn):
        why = _pair_unsupported(norm_q, norm_k, attn.to_q.out_features // attn.heads)
        if why is not None:
            return f"q/k norms: {why}"
    return None


def _projections(attn: nn.Module, context: bool) -> tuple:
    """The linear layer(s) giving one stream's [q | k | v]: Flux's processor uses the packed layers
    `fuse_qkv_projections()` made (no weight concatenation per call); SD3's ignores them."""
    if isinstance(attn, FluxAttention) and attn.fused_projections:
        return (attn.to_added_qkv,) if context else (attn.to_qkv,)
    return (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj) if context else (attn.to_q, attn.to_k, attn.to_v)


def _rms_and_rope(qk: torch.Tensor, norm_q, norm_k, rope) -> torch.Tensor:
    """q and k of one stream, (B, L, 2, H, D): RMSNorm (each its own weight) and the rotary
    embedding (cos, sin of shape (L, D), pairs interleaved as Flux has them), in float32."""
    h = qk.float()
    if norm_q is not None:
        eps = norm_q.eps if norm_q.eps is not None else torch.finfo(qk.dtype).eps  # nn.RMSNorm's default
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
        if norm_q.weight is not None:
            h = h * torch.stack([norm_q.weight, norm_k.weight]).float()[:, None, :]
    if rope is not None:
        cos, sin = (t.float()[:, None, None, :] for t in rope)
        even, odd = h.unflatten(-1, (-1, 2)).unbind(-1)
        h = h * cos + torch.stack([-odd, even], dim=-1).flatten(-2) * sin
    return h


def _rope_arg(image_rotary_emb, tokens: int):
    if image_rotary_emb is None:
        return None
    if not (isinstance(image_rotary_emb, (tuple, list)) and len(image_rotary_emb) == 2):
        raise ValueError("image_rotary_emb: fastdiff's attention processor takes a (cos, sin) pair, got "
                         f"{type(image_rotary_emb).__name__}")
    if any(t.shape[0] != tokens for t in image_rotary_emb):
        raise ValueError(f"image_rotary_emb: expected (cos, sin) for {tokens} tokens, got shapes "
                         f"{[tuple(t.shape) for t in image_rotary_emb]}")
    return image_rotary_emb


def _joint_qkv(streams, pairs, rope, heads: int, head_dim: int) -> torch.Tensor:
    """The streams' packed projections side by side in token order, (B, L, 3 * H * D) with
    features [q | k | v]: each written once into the joint buffer, q and k normalised and rotated
    on the way (slice assignment rather than in-place updates, so autograd differentiates it)."""
    parts = [linears[0](x) if len(linears) == 1 else packed_linear(x, packed, *linears)
             for x, linears, packed in streams]
    if len(parts) == 1 and pairs[0][0] is None and rope is None:
        return parts[0]  # already the layout the attention reads
    tokens = [p.shape[1] for p in parts]
    qkv = parts[0].new_empty(parts[0].shape[0], sum(tokens), 3, heads, head_dim)
    start = 0
    for part, (norm_q, norm_k), n in zip(parts, pairs, tokens):
        part = part.unflatten(-1, (3, heads, head_dim))
        if norm_q is None and rope is None:
            qkv[:, start:start + n] = part
        else:
            qkv[:, start:start + n, :2] = _rms_and_rope(
                part[:, :, :2], norm_q, norm_k, None if rope is None else [t[start:start + n] for t in rope])
            qkv[:, start:start + n, 2] = part[:, :, 2]
        start += n
    return qkv.flatten(2)


class FastdiffJointAttnProcessor:
    """SD3's JointAttnProcessor2_0 / Flux's FluxAttnProcessor on fastdiff's ops (see the module
    docstring). Masks are not supported."""

    def __init__(self, backend: str):
        self.backend = backend

    def __call__(self, attn: nn.Module, hidden_states: torch.Tensor,
                 encoder_hidden_states: Optional[torch.Tensor] = None,
                 attention_mask: Optional[torch.Tensor] = None, image_rotary_emb=None):
        if attention_mask is not None:
            raise ValueError("attention_mask: fastdiff's fused attention takes no mask; run this model without "
                             "fastdiff.optimize() to use attention masks")
        flux = isinstance(attn, FluxAttention)
        if encoder_hidden_states is not None and attn.added_kv_proj_dim is None:
            raise ValueError("encoder_hidden_states: this attention module has no context projections "
                             "(added_kv_proj_dim=None): expected None")
        heads = attn.heads
        head_dim = attn.to_q.out_features // heads
        streams = [(hidden_states, _projections(attn, False), packed_projections(attn))]
        if encoder_hidden_states is not None:
            context = (encoder_hidden_states, _projections(attn, True), packed_projections(attn, "context"))
            streams = [context] + streams if flux else streams + [context]  # Flux: context tokens first
        pairs = _norm_pairs(attn)
        if flux and encoder_hidden_states is not None:
            pairs = pairs[::-1]
        tokens = [x.shape[1] for x, _, _ in streams]
        rope = _rope_arg(image_rotary_emb, sum(tokens))
        o = FD.qkv_attention(_joint_qkv(streams, pairs, rope, heads, head_dim), head_dim, self.backend)
        if encoder_hidden_states is None:
            return o if flux and attn.pre_only else attn.to_out[1](attn.to_out[0](o))
        first, second = o.split(tokens, dim=1)
        sample, ctx = (second, first) if flux else (first, second)
        sample = attn.to_out[1](attn.to_out[0](sample))
        if attn.context_pre_only and not flux:
            return sample, ctx  # diffusers' JointAttnProcessor2_0 returns the context tokens unprojected
        return sample, attn.to_add_out(ctx)


# --- the adapter interface models.py forwards to ---------------------------------------------

def _is_joint(module: nn.Module) -> bool:
    """An SD3 / Flux attention module this file handles (a plain Attention only when it runs
    the joint processor or ours: the U-Net rules in `models` handle the others)."""
    if type(module) is FluxAttention:
        return True
    return type(module) is Attention and type(module.processor) in (JointAttnProcessor2_0, FastdiffJointAttnProcessor)


def transform(parent: Optional[nn.Module], name: str, child: nn.Module, backend: str) -> Optional[bool]:
    """Give `child` the fused processor if it is SD3/Flux joint attention, or replace it by its
    fused module if it is an adaLN norm. None: not ours; True: handled (do not descend)."""
    if isinstance(child, adaln.FusedAdaLN):
        child.backend = backend
        return True
    if type(child) in adaln.FUSED:
        if parent is not None and adaln.adaln_unsupported(child) is None:
            setattr(parent, name, adaln.FUSED[type(child)](child, backend))
        return True
    if not _is_joint(child):
        return None
    if joint_attention_unsupported(child) is None:
        if isinstance(child.processor, FastdiffJointAttnProcessor):
            child.processor.backend = backend
        else:
            child.set_processor(FastdiffJointAttnProcessor(backend))
    return True


def describe(module: nn.Module) -> Optional[Tuple[str, str, bool]]:
    """(report list, what, descend) for SD3/Flux modules, else None."""
    if _is_joint(module):
        kind = type(module).__name__
        why = joint_attention_unsupported(module)
        if why is not None:
            return "not_replaced", f"{kind} left as is: {why}", False
        norms = " + q/k RMSNorm" if module.norm_q is not None else ""
        rope = " + rotary embedding" if isinstance(module, FluxAttention) else ""
        return ("replaced", f"{kind}: FastdiffJointAttnProcessor (packed QKV GEMM per stream{norms}{rope} into one "
                            f"joint buffer, fastdiff::attention) on backend {module.processor.backend!r}", False)
    if isinstance(module, adaln.FusedAdaLN) and adaln.op_backend(module.backend) is None:
        return ("not_replaced", f"{module.original.__name__}: backend {module.backend!r}, which "
                                f"fastdiff::layer_norm_modulate does not have (backends {adaln.DISPATCH.backends}): "
                                f"LayerNorm + adaLN modulation run as diffusers' eager ops", False)
    if isinstance(module, adaln.FusedAdaLN):
        return ("replaced", f"{module.original.__name__}: LayerNorm + adaLN modulation (x * (1 + scale) + shift) in "
                            f"one fastdiff::layer_norm_modulate on backend {module.backend!r}; the emb projection "
                            f"and its chunks as in diffusers", False)
    if type(module) in adaln.FUSED:
        return ("not_replaced", f"{type(module).__name__} left as is (adaLN): "
                                f"{adaln.adaln_unsupported(module) or _ROOT}", False)
    if type(module) is nn.LayerNorm and not module.elementwise_affine:
        return "not_replaced", ("LayerNorm without affine: its block's forward modulates it (adaLN written in the "
                                "forward code, not a module fastdiff swaps): runs as in diffusers"), False
    return None
