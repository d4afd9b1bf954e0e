"""Drawing the sampling noise: one generator for a batch, or one generator per image."""
from __future__ import annotations

from typing import Sequence

import torch


def check_generator(generator, where: torch.device, batch: int) -> None:
    """`generator` is None, a torch.Generator, or a list of one per image, on `where`'s device type."""
    if generator is None:
        return
    gens = generator if isinstance(generator, (list, tuple)) else [generator]
    for g in gens:
        if not isinstance(g, torch.Generator):
            raise TypeError(f"generator: expected a torch.Generator, a list of them (one per image) or None, "
                            f"got {type(g).__name__}" + (" in the list" if gens is generator else ""))
        if g.device.type != where.type:
            raise ValueError(f"generator: a {g.device} generator cannot draw noise on {where}")
    if gens is generator and len(gens) != batch:
        raise ValueError(f"generator: a list needs one generator per image ({batch}), got {len(gens)}")
    # one object twice would advance its state between images: image 0 would no longer be its solo run
    if len({id(g) for g in gens}) != len(gens):
        raise ValueError("generator: the list holds one generator object for several images; give each image "
                         "its own torch.Generator")


def randn(shape: Sequence[int], generator, device) -> torch.Tensor:
    """float32 standard normal noise of `shape` from `generator` (checked by `check_generator`):
    one generator (or None) for the whole tensor, or a list of generators, one per row of
    dimension 0 (per-image noise)."""
    if not isinstance(generator, (list, tuple)):
        return torch.randn(tuple(shape), generator=generator, device=device, dtype=torch.float32)
    return torch.stack([torch.randn(tuple(shape[1:]), generator=g, device=device, dtype=torch.float32)
                        for g in generator])
