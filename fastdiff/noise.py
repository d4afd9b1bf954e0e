"""Drawing the sampling noise: one generator for a batch, or one generator per image."""
from __future__ import annotations

from typing import Sequence

import torch


def randn(shape: Sequence[int], generator, device) -> torch.Tensor:
    """float32 standard normal noise of `shape` from `generator`: one generator (or None) for the
    whole tensor, or a list of generators, one per row of dimension 0 (per-image noise)."""
    if not isinstance(generator, (list, tuple)):
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float32)
    if len(generator) != shape[0]:
        raise ValueError(f"generator: a list needs one generator per image ({shape[0]}), got {len(generator)}")
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=device, dtype=torch.float32)
                        for g in generator])
