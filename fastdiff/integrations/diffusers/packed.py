"""Packed projection weights for fastdiff's attention processors (U-Net `models`, SD3/Flux
`transformer_models`): several nn.Linear of one attention module side by side in one buffer, for
one GEMM per call, the parameters themselves views of it (see `PackedProjections`)."""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F


def _slots(linears) -> tuple:
    """What each projection's weight and bias are now: (data_ptr, shape, dtype, device) or None."""
    return tuple((t.data_ptr(), t.shape, t.dtype, t.device) if t is not None else None
                 for lin in linears for t in (lin.weight, lin.bias))


class PackedProjections:
    """The weights (and biases) of several nn.Linear of one Attention, side by side in one buffer
    ([q | k | v] or [k | v] rows), for one GEMM per call.

    The parameters themselves become views of the buffer (each a contiguous block of rows), so any
    in-place write to them (`param.add_`, `param.data += delta` as peft's LoRA merge does,
    load_state_dict's copy_) lands in the buffer: nothing to detect. A parameter replaced by a
    new tensor (`.to()`, `weight.data = new`, fuse_lora assigning a new weight,
    load_state_dict(assign=True)) no longer points at its slot: the next call packs again, once.
    Per call: one comparison of data pointers, shapes, dtypes and devices.

    Not copied by deepcopy or pickling (the copy's parameters are separate clones: it packs anew)."""

    def __init__(self):
        self.weight = self.bias = self.slots = None

    def __deepcopy__(self, memo):
        return PackedProjections()

    def __reduce__(self):
        return PackedProjections, ()

    def get(self, linears) -> Optional[Tuple[torch.Tensor, Optional[torch.Tensor]]]:
        """(weight, bias) of the packed projections; None where they cannot share one buffer
        (different dtypes or devices)."""
        if self.slots != _slots(linears) and not self.pack(linears):
            return None
        return self.weight, self.bias

    def pack(self, linears) -> bool:
        if len({(p.dtype, p.device) for lin in linears for p in lin.parameters()}) != 1:
            self.weight = self.bias = self.slots = None
            return False
        with torch.no_grad():
            weight = torch.cat([lin.weight.detach() for lin in linears])
            bias = None
            if any(lin.bias is not None for lin in linears):
                bias = torch.cat([lin.bias.detach() if lin.bias is not None else weight.new_zeros(lin.out_features)
                                  for lin in linears])
        row = 0
        for lin in linears:  # the parameters become views of their rows
            rows = slice(row, row + lin.weight.shape[0])
            lin.weight.data = weight[rows]
            if lin.bias is not None:
                lin.bias.data = bias[rows]
            row = rows.stop
        self.weight, self.bias, self.slots = weight, bias, _slots(linears)
        return True


_PACKED = "_fastdiff_packed_projections"


def packed_projections(attn: nn.Module, stream: str = "") -> PackedProjections:
    """The attention module's packed projections (created on first use); `stream` names another
    set of them (SD3/Flux: "context", the add_q/k/v projections)."""
    packed = attn.__dict__.get(_PACKED + stream)
    if packed is None:
        packed = attn.__dict__[_PACKED + stream] = PackedProjections()
    return packed


def packed_linear(x: torch.Tensor, packed: PackedProjections, *linears: nn.Linear) -> torch.Tensor:
    """One GEMM for several projections of x, outputs side by side ([q | k | v], [k | v]), on the
    packed weights. When autograd records into the parameters, the weights are concatenated
    instead (differentiable: gradients reach each projection's own parameters)."""
    wb = None
    if not (torch.is_grad_enabled() and any(p.requires_grad for lin in linears for p in lin.parameters())):
        wb = packed.get(linears)
    if wb is None:
        wb = (torch.cat([lin.weight for lin in linears]),
              None if all(lin.bias is None for lin in linears) else
              torch.cat([lin.bias if lin.bias is not None else lin.weight.new_zeros(lin.out_features)
                         for lin in linears]))
    return F.linear(x, *wb)
