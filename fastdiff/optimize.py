"""`fastdiff.optimize(model)`: swap a model's GroupNorm(+SiLU) and attention blocks for fused ones.

What it recognises (everything else is left alone, and reported when it looks fusable):

* fastdiff.nn `GroupNormSiLU` / `AttentionBlock` (and so every block of `fastdiff.nn.UNet`):
  switched to the fused ops (`module.backend = backend`).
* `nn.GroupNorm` followed directly by `nn.SiLU` inside an `nn.Sequential`: both replaced by
  one fused `GroupNormSiLU` (the SiLU entry is removed from the Sequential).
* any other `nn.GroupNorm`: replaced by a fused `GroupNormSiLU(silu=False)`. A SiLU its
  parent applies in `forward` code cannot be seen, so it stays a separate op (reported).
* attention of other types (`nn.MultiheadAttention`, third-party blocks): not replaced, reported.

The new modules share the original Parameter objects (weights are kept, not copied).
`inplace=True` (default) modifies and returns `model`; `inplace=False` works on a deep copy.
The report (`OptimizeReport`) is returned by `optimize_report(model)` and printed with
`verbose=True`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import List, Tuple

import torch.nn as nn

from fastdiff.nn.layers import AttentionBlock, GroupNormSiLU

FUSABLE = (GroupNormSiLU, AttentionBlock)
_REPORT_ATTR = "_fastdiff_optimize_report"


@dataclass
class OptimizeReport:
    fused: List[str] = field(default_factory=list)        # fastdiff.nn modules switched to fused ops
    replaced: List[str] = field(default_factory=list)     # torch modules replaced by fused ones
    not_replaced: List[Tuple[str, str]] = field(default_factory=list)  # (module, why)

    def __str__(self) -> str:
        lines = [f"fastdiff.optimize: {len(self.fused)} fastdiff.nn module(s) fused, "
                 f"{len(self.replaced)} torch module(s) replaced, {len(self.not_replaced)} not replaced"]
        lines += [f"  replaced     {r}" for r in self.replaced]
        lines += [f"  not replaced {name}: {why}" for name, why in self.not_replaced]
        return "\n".join(lines)


def set_backend(model: nn.Module, backend) -> int:
    """Point every fastdiff.nn block of `model` at `backend` (None: the eager twin). -> count."""
    n = 0
    for m in model.modules():
        if isinstance(m, FUSABLE):
            m.backend = backend
            n += 1
    return n


def _fused_norm(gn: nn.GroupNorm, silu: bool, backend) -> GroupNormSiLU:
    p = gn.weight if gn.weight is not None else gn.bias
    new = GroupNormSiLU(gn.num_channels, gn.num_groups, gn.eps, silu=silu,
                        device=p.device if p is not None else None, dtype=p.dtype if p is not None else None)
    new.weight, new.bias = gn.weight, gn.bias  # the same Parameters (or None when affine=False)
    new.backend = backend
    new.train(gn.training)
    return new


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _swap(module: nn.Module, prefix: str, backend, report: OptimizeReport) -> None:
    if isinstance(module, FUSABLE):
        return
    if isinstance(module, nn.Sequential):
        items = list(module.named_children())
        kept, i = [], 0
        while i < len(items):
            name, child = items[i]
            nxt = items[i + 1][1] if i + 1 < len(items) else None
            if isinstance(child, nn.GroupNorm) and isinstance(nxt, nn.SiLU):
                kept.append((name, _fused_norm(child, True, backend)))
                report.replaced.append(f"{_join(prefix, name)} + {_join(prefix, items[i + 1][0])} "
                                       "(GroupNorm -> SiLU): one fused GroupNormSiLU")
                i += 2
                continue
            kept.append((name, child))
            i += 1
        if len(kept) != len(items):
            for name, _ in items:
                delattr(module, name)
            for name, child in kept:
                module.add_module(name, child)
    for name, child in list(module.named_children()):
        full = _join(prefix, name)
        if isinstance(child, nn.GroupNorm):
            setattr(module, name, _fused_norm(child, False, backend))
            report.replaced.append(f"{full} (GroupNorm): fused GroupNormSiLU(silu=False)")
            report.not_replaced.append((full, "a SiLU applied by the parent's forward code (if any) stays a "
                                              "separate op; only GroupNorm -> SiLU inside an nn.Sequential fuses"))
        elif isinstance(child, nn.MultiheadAttention) or (
                "attention" in type(child).__name__.lower() and not isinstance(child, FUSABLE)):
            report.not_replaced.append((full, f"{type(child).__name__}: only fastdiff.nn.AttentionBlock "
                                              "attention is fused"))
            _swap(child, full, backend, report)
        else:
            _swap(child, full, backend, report)


def optimize(model: nn.Module, backend: str = "auto", *, inplace: bool = True, verbose: bool = False) -> nn.Module:
    """Swap fusable blocks of `model` for fused ones (see the module docstring). Returns the
    model (a deep copy when inplace=False); `optimize_report(model)` says what changed."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a backend name (auto, cuda, triton, cpu, reference), got {backend!r}")
    if not inplace:
        model = copy.deepcopy(model)
    report = OptimizeReport()
    _swap(model, "", backend, report)
    for name, m in model.named_modules():
        if isinstance(m, FUSABLE) and m.backend != backend:
            m.backend = backend
            report.fused.append(f"{name or '(root)'} ({type(m).__name__})")
    setattr(model, _REPORT_ATTR, report)
    if verbose:
        print(report)
    return model


def optimize_report(model: nn.Module) -> OptimizeReport:
    """What the last `optimize()` of this model did."""
    rep = getattr(model, _REPORT_ATTR, None)
    if rep is None:
        raise ValueError("model: optimize() has not been run on this model")
    return rep
