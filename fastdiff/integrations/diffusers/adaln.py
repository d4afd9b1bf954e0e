"""diffusers' adaLN norms of SD3 / Flux transformers as fused modules (`fastdiff::layer_norm_modulate`).

diffusers computes `emb = linear(silu(emb))`, splits it into chunks, and returns
`LayerNorm(x) * (1 + scale) + shift` with the chunks the block's forward uses later (gates, the
MLP's shift and scale). The fused modules keep the original's children (emb, silu, linear,
norm: the same parameters under the same state_dict keys), compute the projection and the
chunks as diffusers does, and run the norm and the modulation as one op:

    AdaLayerNormZero          6 chunks: shift, scale, gate (attention), shift, scale, gate (MLP)
    AdaLayerNormZeroSingle    3 chunks: shift, scale, gate
    SD35AdaLayerNormZeroX     9 chunks: the 6 above, then shift, scale, gate of attn2: two ops
    AdaLayerNormContinuous    2 chunks: scale, shift (that order; the output norm, norm_out)

The output dtype is diffusers': x's and the projection's promoted together. A norm other than
nn.LayerNorm without affine (FP32LayerNorm, RMSNorm, an affine LayerNorm) keeps the original.
optimize(backend="cuda") (a backend the op does not have) runs the modulation as diffusers'
eager ops, and the report says so.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
from diffusers.models.normalization import (AdaLayerNormContinuous, AdaLayerNormZero, AdaLayerNormZeroSingle,
                                            SD35AdaLayerNormZeroX)

from fastdiff.nn import functional as FD
from fastdiff.ops.layer_norm_modulate import DISPATCH


def op_backend(backend: str) -> Optional[str]:
    """The op's backend for optimize()'s `backend`; None (diffusers' eager ops, and the report
    says so) for a name the op does not have: "cuda" (fastdiff has no CUDA kernel for it; on
    CUDA tensors Triton is its kernel)."""
    return backend if backend == "auto" or backend in DISPATCH.backends else None


class FusedAdaLN(nn.Module):
    """The original's children as its own, and the fused modulation."""

    def __init__(self, original: nn.Module, backend: str):
        super().__init__()
        self.emb = getattr(original, "emb", None)  # AdaLayerNormZero's own timestep/label embedding (DiT)
        self.silu, self.linear, self.norm = original.silu, original.linear, original.norm
        self.backend = backend

    def _modulate(self, x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, scale.dtype)  # diffusers' result dtype
        return FD.layer_norm_modulate(x.to(dtype), scale.to(dtype), shift.to(dtype), self.norm.eps,
                                      op_backend(self.backend))


class FusedAdaLayerNormZero(FusedAdaLN):
    original = AdaLayerNormZero

    def forward(self, x, timestep=None, class_labels=None, hidden_dtype=None, emb=None):
        if self.emb is not None:
            emb = self.emb(timestep, class_labels, hidden_dtype=hidden_dtype)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.linear(self.silu(emb)).chunk(6, dim=1)
        return self._modulate(x, scale_msa, shift_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp


class FusedAdaLayerNormZeroSingle(FusedAdaLN):
    original = AdaLayerNormZeroSingle

    def forward(self, x, emb=None):
        shift_msa, scale_msa, gate_msa = self.linear(self.silu(emb)).chunk(3, dim=1)
        return self._modulate(x, scale_msa, shift_msa), gate_msa


class FusedSD35AdaLayerNormZeroX(FusedAdaLN):
    original = SD35AdaLayerNormZeroX

    def forward(self, hidden_states, emb=None):
        (shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp, shift_msa2, scale_msa2,
         gate_msa2) = self.linear(self.silu(emb)).chunk(9, dim=1)
        return (self._modulate(hidden_states, scale_msa, shift_msa), gate_msa, shift_mlp, scale_mlp, gate_mlp,
                self._modulate(hidden_states, scale_msa2, shift_msa2), gate_msa2)


class FusedAdaLayerNormContinuous(FusedAdaLN):
    original = AdaLayerNormContinuous

    def forward(self, x, conditioning_embedding):
        scale, shift = self.linear(self.silu(conditioning_embedding).to(x.dtype)).chunk(2, dim=1)
        return self._modulate(x, scale, shift)


FUSED = {cls.original: cls for cls in (FusedAdaLayerNormZero, FusedAdaLayerNormZeroSingle, FusedSD35AdaLayerNormZeroX,
                                       FusedAdaLayerNormContinuous)}


def adaln_unsupported(module: nn.Module) -> Optional[str]:
    """Why diffusers' adaLN `module` is not fused, or None."""
    if type(module) not in FUSED:  # a subclass may change forward
        return f"{type(module).__name__} is not one of {sorted(c.__name__ for c in FUSED)}"
    norm = module.norm
    affine = getattr(norm, "elementwise_affine", False)
    if type(norm) is not nn.LayerNorm or affine:
        return f"its norm is a {type(norm).__name__}{' with affine weights' if affine else ''}, not a LayerNorm " \
               f"without affine"
    return None
