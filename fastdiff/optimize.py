"""`fastdiff.optimize(model)`: swap a model's GroupNorm(+SiLU) and attention blocks for fused ones.

What it recognises (everything else is left alone, and reported when it looks fusable):

* fastdiff.nn `GroupNormSiLU` / `AttentionBlock` (and so every block of `fastdiff.nn.UNet`):
  switched to the fused ops (`module.backend = backend`).
* `nn.GroupNorm` followed directly by `nn.SiLU` inside an `nn.Sequential`: both replaced by
  one fused `GroupNormSiLU` (the SiLU entry is removed from the Sequential).
* any other `nn.GroupNorm`: replaced by a fused `GroupNormSiLU(silu=False)`. A SiLU its
  parent applies in `forward` code cannot be seen, so it stays a separate op (the report says so).
* diffusers models (`UNet2DModel`, `UNet2DConditionModel`, ...): their ResNet blocks, output
  GroupNorm + SiLU and attention processors, by `fastdiff.integrations.diffusers.models` (imported only
  when the model contains diffusers modules; see there); SD3 / Flux transformers' joint attention by
  its `transformer_models`.
* attention of other types (`nn.MultiheadAttention`, third-party blocks): not replaced, reported.

The new modules share the original Parameter objects (weights are kept, not copied), so
parameters and state_dict keys are unchanged. Fused modules stay differentiable: with autograd
recording, backward runs through their eager twin (`fastdiff.nn.functional`).
`inplace=True` (default) modifies and returns `model`; `inplace=False` works on a deep copy.

The report (`OptimizeReport`) describes the optimized model as it is (each module once), so
optimizing twice reports, and does, the same as once. It is returned by `optimize_report(model)`
and printed with `verbose=True`.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
import torch.nn as nn

from fastdiff.nn.layers import AttentionBlock, GroupNormSiLU

FUSABLE = (GroupNormSiLU, AttentionBlock)
_REPORT_ATTR = "_fastdiff_optimize_report"


@dataclass
class OptimizeReport:
    """(module name, what) entries; every module appears in at most one list, at most once."""

    fused: List[Tuple[str, str]] = field(default_factory=list)         # fastdiff.nn modules on fused ops
    replaced: List[Tuple[str, str]] = field(default_factory=list)      # torch/diffusers modules now fused
    not_replaced: List[Tuple[str, str]] = field(default_factory=list)  # left as they were, and why

    def modules(self) -> List[str]:
        return [name for name, _ in self.fused + self.replaced + self.not_replaced]

    def __str__(self) -> str:
        lines = [f"fastdiff.optimize: {len(self.fused)} fastdiff.nn module(s) fused, "
                 f"{len(self.replaced)} module(s) replaced, {len(self.not_replaced)} not replaced"]
        lines += [f"  fused        {name}: {what}" for name, what in self.fused]
        lines += [f"  replaced     {name}: {what}" for name, what in self.replaced]
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


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _fuse_sequential_pairs(seq: nn.Sequential, prefix: str, backend) -> None:
    """GroupNorm directly followed by SiLU in `seq` -> one GroupNormSiLU (the SiLU entry removed)."""
    items = list(seq.named_children())
    kept, i = [], 0
    while i < len(items):
        name, child = items[i]
        nxt = items[i + 1] if i + 1 < len(items) else None
        if isinstance(child, nn.GroupNorm) and nxt is not None and isinstance(nxt[1], nn.SiLU):
            what = f"GroupNorm -> SiLU (the SiLU was {_join(prefix, nxt[0])}): one fused GroupNormSiLU"
            kept.append((name, GroupNormSiLU.sharing(child, True, backend, what)))
            i += 2
            continue
        kept.append((name, child))
        i += 1
    if len(kept) != len(items):
        for name, _ in items:
            delattr(seq, name)
        for name, child in kept:
            seq.add_module(name, child)


def _swap(module: nn.Module, prefix: str, backend, adapter) -> None:
    if isinstance(module, FUSABLE):
        return
    if isinstance(module, nn.Sequential):
        _fuse_sequential_pairs(module, prefix, backend)
    for name, child in list(module.named_children()):
        if adapter is not None and adapter.transform(module, name, child, backend):
            continue
        if isinstance(child, nn.GroupNorm):
            setattr(module, name, GroupNormSiLU.sharing(child, False, backend, (
                "GroupNorm: fused GroupNormSiLU(silu=False); a SiLU applied by the parent's forward code (if "
                "any) stays a separate op")))
        else:
            _swap(child, _join(prefix, name), backend, adapter)


def _describe(name: str, module: nn.Module, adapter, report: OptimizeReport) -> None:
    """Report `module` and its subtree as they are now, each module at most once."""
    shown = name or "(root)"
    entry = adapter.describe(module) if adapter is not None else None
    if entry is not None:
        kind, what, descend = entry
        getattr(report, kind).append((shown, what))
        if not descend:
            return
    elif isinstance(module, GroupNormSiLU) and getattr(module, "replaced", None):
        report.replaced.append((shown, module.replaced))
    elif isinstance(module, FUSABLE):
        report.fused.append((shown, f"{type(module).__name__} on backend {module.backend!r}"))
    elif isinstance(module, nn.MultiheadAttention) or "attention" in type(module).__name__.lower():
        report.not_replaced.append((shown, f"{type(module).__name__}: only fastdiff.nn.AttentionBlock and "
                                           "diffusers Attention / FluxAttention are fused"))
    for child_name, child in module.named_children():
        _describe(_join(name, child_name), child, adapter, report)


def _adapter_for(model: nn.Module):
    """The diffusers adapter when `model` contains diffusers modules, else None (diffusers is
    imported only then)."""
    if any(type(m).__module__.startswith("diffusers.") for m in model.modules()):
        from fastdiff.integrations.diffusers import models

        return models
    return None


MEMORY_FORMATS = (torch.contiguous_format, torch.channels_last)


def check_memory_format(memory_format) -> None:
    """None, torch.contiguous_format or torch.channels_last; else ValueError naming memory_format."""
    if memory_format is not None and not any(memory_format is f for f in MEMORY_FORMATS):
        raise ValueError(f"memory_format: expected None, torch.contiguous_format or torch.channels_last, got "
                         f"{memory_format!r}")


def optimize(model: nn.Module, backend: str = "auto", *, inplace: bool = True, verbose: bool = False,
             memory_format: Optional[torch.memory_format] = None) -> nn.Module:
    """Swap fusable blocks of `model` for fused ones (see the module docstring). Returns the
    model (a deep copy when inplace=False); `optimize_report(model)` says what changed.

    memory_format: None keeps the weights' layout; torch.channels_last converts the model's 4-D
    weights (convolutions) to NHWC, the layout GPU convolutions prefer, so feature maps stay NHWC
    from a channels_last input on (give the sampler channels_last noise: its state follows the
    noise's layout); torch.contiguous_format converts back."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(backend, str):
        raise TypeError(f"backend: expected a backend name (auto, cuda, triton, cpu, reference), got {backend!r}")
    check_memory_format(memory_format)
    if not inplace:
        model = copy.deepcopy(model)
    if memory_format is not None:
        model.to(memory_format=memory_format)
    adapter = _adapter_for(model)
    if adapter is None or not adapter.transform(None, "", model, backend):
        _swap(model, "", backend, adapter)
    set_backend(model, backend)
    report = OptimizeReport()
    _describe("", model, adapter, report)
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
