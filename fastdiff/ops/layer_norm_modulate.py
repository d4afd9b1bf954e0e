"""`fastdiff::layer_norm_modulate`: LayerNorm without affine, then adaLN modulation, in one op.

The normalisation of SD3 / Flux transformer blocks (diffusers' AdaLayerNormZero,
AdaLayerNormZeroSingle, AdaLayerNormContinuous), for x of shape (B, L, C):

    xn  = (x - mean_c(x)) / sqrt(var_c(x) + eps)      per token, biased variance over C
    out = xn * (1 + scale[b]) + shift[b]              scale, shift (B, C): one row per sample

Storage fp32/fp16/bf16; statistics and arithmetic in fp32, rounded once to x's dtype. Eager
diffusers runs it as LayerNorm, `1 + scale`, a multiply and an add: four kernels, each reading
and writing a (B, L, C) tensor but the second; this op reads x once and writes out once.

This module holds the specification (`layer_norm_modulate_reference`, float64-capable plain
PyTorch) and the op. Kernel: `kernels/layer_norm_modulate.py` (Triton). The "cpu" backend is
composed of ATen's own CPU kernels (F.layer_norm in fp32, then the modulation): there is no C++
kernel of ours for it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from fastdiff.ops import _dispatch
from fastdiff.ops._dispatch import BackendUnavailableError  # noqa: F401  (re-exported)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def layer_norm_modulate_reference(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    eps: float = 1e-6,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The specification, computed in `compute_dtype` (float64 for test oracles), returned as a
    new contiguous tensor in x's dtype."""
    f = compute_dtype
    xf = x.to(f)
    var, mean = torch.var_mean(xf, dim=-1, unbiased=False, keepdim=True)
    y = (xf - mean) * torch.rsqrt(var + eps)
    return (y * (1 + scale.to(f)[:, None, :]) + shift.to(f)[:, None, :]).to(x.dtype).contiguous()


# =============================================================================================
# The op: validation, backends, torch.library registration.
#
#   layer_norm_modulate(x, scale, shift, *, eps=1e-6, out=None, backend="auto") -> out
#
# allocates `out` (contiguous) when not given and calls the registered op
#
#   torch.ops.fastdiff.layer_norm_modulate(x, scale, shift, eps, out, backend) -> ()
#
# which writes `out` in place, has a fake implementation and dispatches: triton -> cpu ->
# reference (no CUDA kernel of ours: on CUDA tensors Triton is the kernel).
#
# x, scale and shift may have any strides (scale and shift are usually column slices of one
# (B, k * C) projection); out must be contiguous and must not overlap any input.
# =============================================================================================


def _fail(exc, msg):
    return exc(f"fastdiff.layer_norm_modulate: {msg}")


def _check_eps(eps) -> None:
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 3.4e38:  # NaN fails too
        raise _fail(ValueError, f"eps must be a finite number > 0 (a float32), got {eps!r}")


def check_layer_norm_modulate_args(x, scale, shift, eps, out) -> None:
    """Raise TypeError/ValueError naming the offending argument; reads metadata only (fake
    tensors too), so it runs at trace time as well as before every launch."""
    for name, t in (("x", x), ("scale", scale), ("shift", shift), ("out", out)):
        if not isinstance(t, torch.Tensor):
            raise _fail(TypeError, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dtype not in DTYPES:
        raise _fail(TypeError, f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() != 3:
        raise _fail(ValueError, f"x must have shape (B, L, C), got {tuple(x.shape)}")
    _check_eps(eps)
    b, _, c = x.shape
    for name, t in (("scale", scale), ("shift", shift), ("out", out)):
        if t.device != x.device:
            raise _fail(ValueError, f"{name} must be on x's device {x.device}, got {t.device}")
    for name, t in (("scale", scale), ("shift", shift)):
        if tuple(t.shape) != (b, c):
            raise _fail(ValueError, f"{name} must have shape (B, C) = ({b}, {c}) (one row per sample, broadcast "
                                    f"over the tokens), got {tuple(t.shape)}")
        if t.dtype not in (torch.float32, x.dtype):
            raise _fail(TypeError, f"{name} must be float32 or x's dtype {x.dtype}, got {t.dtype}")
    if out.dtype != x.dtype:
        raise _fail(TypeError, f"out must have x's dtype {x.dtype}, got {out.dtype}")
    if out.shape != x.shape:
        raise _fail(ValueError, f"out must have x's shape {tuple(x.shape)}, got {tuple(out.shape)}")
    if not out.is_contiguous():
        raise _fail(ValueError, f"out must be contiguous, got strides {out.stride()}")


def _check_overlaps(x, scale, shift, out) -> None:
    """One program writes a row of out while others still read x: no shared memory at all."""
    name = _dispatch.overlapped_input(out, (("x", x), ("scale", scale), ("shift", shift)))
    if name is not None:
        raise _fail(ValueError, f"out overlaps {name} in memory; out must be a separate buffer")


@dataclass(slots=True)
class LayerNormModulateArgs:
    """Validated arguments, as the providers see them."""

    x: torch.Tensor
    scale: torch.Tensor
    shift: torch.Tensor
    eps: float
    out: torch.Tensor

    @property
    def device_type(self) -> str:
        return self.x.device.type


@dataclass
class _Example:
    """What `supports` reads, for fastdiff.info()."""

    device_type: str


def _triton_supports(a) -> Optional[str]:
    return _dispatch.triton_unsupported(a.device_type)


def _cpu_supports(a) -> Optional[str]:
    if a.device_type != "cpu":
        return f"the inputs are {a.device_type} tensors; the cpu backend (ATen's CPU kernels) runs CPU tensors only"
    return None


def _run_triton(a: LayerNormModulateArgs) -> None:
    _dispatch.import_kernel("layer_norm_modulate").layer_norm_modulate_triton(a.x, a.scale, a.shift, a.eps, a.out)


def _run_aten(a: LayerNormModulateArgs) -> None:
    y = F.layer_norm(a.x.float(), (a.x.shape[-1],), eps=a.eps)
    a.out.copy_(torch.addcmul(a.shift.float()[:, None], y, 1 + a.scale.float()[:, None]))


def _run_reference(a: LayerNormModulateArgs) -> None:
    a.out.copy_(layer_norm_modulate_reference(a.x, a.scale, a.shift, a.eps, torch.float32))


DISPATCH = _dispatch.register(_dispatch.Dispatcher(
    "layer_norm_modulate",
    [
        _dispatch.Provider("triton", _triton_supports, _run_triton),
        _dispatch.Provider("cpu", _cpu_supports, _run_aten),
        _dispatch.Provider("reference", lambda a: None, _run_reference),
    ],
    example=_Example,
))


_LIB = torch.library.Library("fastdiff", "FRAGMENT")  # noqa: TOR901 (kept alive at module scope)
_LIB.define("layer_norm_modulate(Tensor x, Tensor scale, Tensor shift, float eps, Tensor(a!) out, str backend) -> ()")


def _impl(x, scale, shift, eps, out, backend):
    # validate once, run many (as group_norm_silu): a known signature goes straight to its backend
    key = (tuple(map(_dispatch.tensor_key, (x, scale, shift, out))), eps, backend, _dispatch.signature_env())
    provider = DISPATCH.known(key)
    args = LayerNormModulateArgs(x, scale, shift, float(eps), out)
    if provider is None:
        check_layer_norm_modulate_args(x, scale, shift, eps, out)
        _check_overlaps(x, scale, shift, out)
        provider = DISPATCH.select(args, backend)  # a forced backend that cannot run fails even for empty inputs
        DISPATCH.learn(key, provider)
    if out.numel():
        provider.run(args)


_LIB.impl("layer_norm_modulate", _impl, "CompositeExplicitAutograd")


@torch.library.register_fake("fastdiff::layer_norm_modulate", lib=_LIB)
def _fake(x, scale, shift, eps, out, backend):
    check_layer_norm_modulate_args(x, scale, shift, eps, out)
    DISPATCH.select(LayerNormModulateArgs(x, scale, shift, float(eps), out), backend)
    return None


def layer_norm_modulate(
    x: torch.Tensor,
    scale: torch.Tensor,
    shift: torch.Tensor,
    *,
    eps: float = 1e-6,
    out: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """`LayerNorm(x) * (1 + scale[:, None]) + shift[:, None]` (LayerNorm without affine) in one
    op; returns `out` (allocated contiguous if None).

    x        (B, L, C), float32/float16/bfloat16, any strides; statistics per token in fp32.
    scale    (B, C), float32 or x's dtype, any strides.
    shift    (B, C), float32 or x's dtype, any strides.
    eps      > 0, added to the variance (diffusers' adaLN norms: 1e-6).
    out      contiguous (B, L, C) buffer in x's dtype, overlapping no input.
    backend  "auto" | "triton" | "cpu" | "reference"; a forced backend that cannot run raises
             BackendUnavailableError.

    All checks run before any write.
    """
    _check_eps(eps)  # before torch's schema check, with our messages
    if not all(isinstance(t, torch.Tensor) for t in (x, scale, shift, out if out is not None else x)) or \
            x.dtype not in DTYPES:
        check_layer_norm_modulate_args(x, scale, shift, eps, x if out is None else out)
    if out is None:
        out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    call = _impl if _dispatch.direct(x, scale, shift, out) else torch.ops.fastdiff.layer_norm_modulate
    call(x, scale, shift, float(eps), out, backend)
    return out
