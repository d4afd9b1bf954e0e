"""`fastdiff::group_norm_silu`: GroupNorm (+ time-embedding add, + SiLU, + residual) in one op.

The computation (the ResBlock's normalisation, DESIGN.md section 1), for x of shape
(N, C, *spatial) split into G = num_groups groups of C / G channels:

    h   = x + temb[:, :, None, ...]              only when temb (N, C) is given
    hn  = (h - mean_g(h)) / sqrt(var_g(h) + eps) statistics per (sample, group), biased
                                                 variance, over C/G channels x all positions
    y   = hn * weight[c] + bias[c]               only the parts that are given (affine)
    y   = y * sigmoid(y)                         only when silu=True
    out = y + residual                           only when residual is given

Storage fp32/fp16/bf16; statistics and arithmetic in fp32 whatever the storage dtype.

Numerics. GroupNorm is invariant to a constant shift of each group, and the kernels use that:
every statistic is taken of `d = (x - x0) + (temb[c] - temb0)`, where x0 is the first element of
the group and temb0 the group's first time-embedding entry. Both differences are exact in
floating point when the operands are close (Sterbenz), so a group whose values sit far from
zero (1e3 + N(0, 1) in fp32) keeps its full precision: no catastrophic cancellation in the
variance, and none in `x - mean` either (a mean of ~1e3 rounded to fp32 would alone cost
3e-5 absolute). The reductions are two-level: each tile (or vector, or block of elements) of a
group gets an exact two-pass mean/M2 in registers, and tiles are merged with Chan's parallel
formula (count, mean, M2) -- never a sum of squares. The output is one FMA per element,
`(x - x0) * scale[c] + shift[c]`, with scale = rstd * weight and
shift = bias + (temb[c] - temb0 - mean_d) * scale.

Large groups (the SD-1.5 U-Net at 512x512: 2x320x64x64 with 32 groups is 64 groups of 40960
elements -- too few groups to fill a GPU) are split over several programs/blocks: a partial-
statistics pass writes (count, mean, M2, x0) per chunk to a small fp32 workspace, and a
normalise pass merges the group's partials and writes its chunk. That reads x twice (the second
read mostly from L2 on a GPU). Groups that fit one program are done in one kernel and, when
they fit on chip, one read. `num_splits` chooses: 0 = each backend's heuristic, 1 = one
program/block per group, k > 1 = split every group into at most k chunks (tests force the
split path with it on small shapes).

This module holds the specification (`group_norm_silu_reference`, float64-capable plain
PyTorch) and the op. Kernels: `kernels/group_norm_silu.py` (Triton), `csrc/group_norm_silu/`
(CUDA + CPU).
"""
from __future__ import annotations

import math
from typing import Optional

import torch


def group_norm_silu_reference(
    x: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    eps: float = 1e-5,
    silu: bool = True,
    temb: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The specification of `group_norm_silu`, in plain PyTorch; returns a new (contiguous)
    tensor in x's dtype.

    Arithmetic happens in `compute_dtype` (float64 for test oracles). Each group is shifted by
    its first element, and temb by the group's first entry, before the statistics (exactly as
    the kernels do; GroupNorm is invariant to it), which keeps fp32 statistics accurate for
    groups far from zero.
    """
    f = compute_dtype
    n, c = x.shape[0], x.shape[1]
    cpg = c // num_groups
    # d = (x - x0) + (temb[c] - temb0) per group, as the kernels compute it
    xg = x.to(f).reshape(n, num_groups, cpg, math.prod(x.shape[2:]))
    d = xg - xg[:, :, :1, :1] if xg.numel() > 0 else xg
    if temb is not None:
        tg = temb.to(f).reshape(n, num_groups, cpg, 1)
        d = d + (tg - tg[:, :, :1])
    var, mean = torch.var_mean(d, dim=(2, 3), unbiased=False, keepdim=True)
    y = ((d - mean) * torch.rsqrt(var + eps)).reshape(x.shape)
    shape = (1, c) + (1,) * (x.dim() - 2)
    if weight is not None:
        y = y * weight.to(f).reshape(shape)
    if bias is not None:
        y = y + bias.to(f).reshape(shape)
    if silu:
        y = y * torch.sigmoid(y)
    if residual is not None:
        y = y + residual.to(f)
    return y.to(x.dtype)


# =============================================================================================
# The op `fastdiff::group_norm_silu`: validation, backends, torch.library registration.
#
#   group_norm_silu(x, num_groups, weight=None, bias=None, *, eps=1e-5, silu=True, temb=None,
#                   residual=None, out=None, backend="auto", num_splits=0) -> out
#
# is the convenience function; it allocates `out` (x's layout) when not given and calls the
# registered op
#
#   torch.ops.fastdiff.group_norm_silu(x, num_groups, weight, bias, eps, silu, temb, residual,
#                                      num_splits, out, backend) -> ()
#
# which writes `out` in place (static buffers: CUDA-graph friendly), has a fake implementation
# (torch.compile / meta) and dispatches to a backend: cuda -> triton -> cpu -> reference
# (fastdiff/ops/_dispatch.py).
#
# Memory layout: x must be contiguous (N, C, *spatial) or channels-last (C innermost, then the
# spatial dims in order, N outermost: torch.channels_last / channels_last_3d), and residual and
# out must share x's layout. Anything else -- a non-contiguous view, a residual in the other
# layout -- is an error naming the argument, never a silent copy (call .contiguous() or
# .contiguous(memory_format=...) first). temb (N, C) may have any strides (a column slice of a
# larger projection is fine); weight and bias are 1-D (C,) with any stride.
#
# Aliasing: out may be x itself or residual itself (in-place); any other overlap of out with an
# input is an error.
# =============================================================================================
from dataclasses import dataclass  # noqa: E402
from typing import List  # noqa: E402

from fastdiff import _ext  # noqa: E402
from fastdiff.ops import _dispatch  # noqa: E402
from fastdiff.ops._dispatch import BackendUnavailableError  # noqa: E402,F401  (re-exported)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# The CUDA kernel keeps 3 fp32 per channel of a group in shared memory (48 KiB without opt-in);
# must match kCudaMaxChannelsPerGroup in csrc/group_norm_silu/group_norm_silu.cuh.
CUDA_MAX_CHANNELS_PER_GROUP = 4000


def _fail(exc, msg):
    return exc(f"fastdiff.group_norm_silu: {msg}")


def channels_last_strides(shape) -> List[int]:
    """Strides of a dense channels-last tensor of `shape` (N, C, *spatial)."""
    n_dim = len(shape)
    strides = [0] * n_dim
    acc = 1
    strides[1] = acc
    acc *= shape[1]
    for d in range(n_dim - 1, 1, -1):
        strides[d] = acc
        acc *= shape[d]
    strides[0] = acc
    return strides


def _matches(shape, strides, expected) -> bool:
    # strides of size-1 dimensions never address memory: ignore them
    return all(st == ex for n, st, ex in zip(shape, strides, expected) if n != 1)


def layout_of(x: torch.Tensor) -> Optional[str]:
    """"ncs" (contiguous), "nsc" (channels-last) or None. Metadata only (fake tensors too).
    A tensor that is both (no spatial extent, or one channel) counts as "ncs"."""
    if x.dim() < 2:
        return None
    if x.is_contiguous():
        return "ncs"
    if _matches(x.shape, x.stride(), channels_last_strides(x.shape)):
        return "nsc"
    return None


def _same_layout(t: torch.Tensor, x: torch.Tensor) -> bool:
    return t.stride() == x.stride() or _matches(x.shape, t.stride(), x.stride())


def _check_scalars(num_groups, eps, silu, num_splits) -> None:
    if not isinstance(num_groups, int) or isinstance(num_groups, bool):
        raise _fail(TypeError, f"num_groups must be an int, got {type(num_groups).__name__}")
    if num_groups < 1:
        raise _fail(ValueError, f"num_groups must be a positive divisor of the channel count C, got {num_groups}")
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps < 3.4e38:  # NaN fails too
        raise _fail(ValueError, f"eps must be a finite number > 0 (a float32), got {eps!r}")
    if not isinstance(silu, bool):
        raise _fail(TypeError, f"silu must be a bool, got {silu!r}")
    if not isinstance(num_splits, int) or isinstance(num_splits, bool) or not 0 <= num_splits < 2**30:
        raise _fail(ValueError, f"num_splits must be an int >= 0 (0 = automatic, 1 = one program per group, "
                                f"k = at most k programs per group), got {num_splits!r}")


def check_group_norm_silu_args(x, num_groups, weight, bias, eps, silu, temb, residual, num_splits, out) -> None:
    """Raise TypeError/ValueError naming the offending argument; touches no data.

    Works on fake/meta tensors too (it only reads metadata), so it runs at trace time under
    torch.compile as well as before every kernel launch.
    """
    for name, t in (("x", x), ("out", out)):
        if not isinstance(t, torch.Tensor):
            raise _fail(TypeError, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("weight", weight), ("bias", bias), ("temb", temb), ("residual", residual)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise _fail(TypeError, f"{name} must be a torch.Tensor or None, got {type(t).__name__}")
    if x.dtype not in DTYPES:
        raise _fail(TypeError, f"x must be float32, float16 or bfloat16, got {x.dtype}")
    if x.dim() < 2:
        raise _fail(ValueError, f"x must have shape (N, C, *spatial) with at least 2 dimensions, got "
                                f"{tuple(x.shape)}")
    if layout_of(x) is None:
        raise _fail(ValueError, f"x must be contiguous or channels_last (dense, C innermost), got shape "
                                f"{tuple(x.shape)} with strides {x.stride()}; call .contiguous() or "
                                f".contiguous(memory_format=torch.channels_last) first")
    c = x.shape[1]
    _check_scalars(num_groups, eps, silu, num_splits)
    if c % num_groups != 0:
        raise _fail(ValueError, f"num_groups must be a positive divisor of the channel count C = {c}, got "
                                f"{num_groups}")

    def same_device(name, t):
        if t.device != x.device:
            raise _fail(ValueError, f"{name} must be on x's device {x.device}, got {t.device}")

    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        same_device(name, t)
        if t.dim() != 1 or t.shape[0] != c:
            raise _fail(ValueError, f"{name} must have shape (C,) = ({c},), got {tuple(t.shape)}")
        if t.dtype not in (torch.float32, x.dtype):
            raise _fail(TypeError, f"{name} must be float32 or x's dtype {x.dtype}, got {t.dtype}")
    if temb is not None:
        same_device("temb", temb)
        if temb.dim() != 2 or tuple(temb.shape) != (x.shape[0], c):
            raise _fail(ValueError, f"temb must have shape (N, C) = ({x.shape[0]}, {c}) (it is broadcast over the "
                                    f"spatial dimensions), got {tuple(temb.shape)}")
        if temb.dtype not in (torch.float32, x.dtype):
            raise _fail(TypeError, f"temb must be float32 or x's dtype {x.dtype}, got {temb.dtype}")

    def like_x(name, t):
        same_device(name, t)
        if t.dtype != x.dtype:
            raise _fail(TypeError, f"{name} must have x's dtype {x.dtype}, got {t.dtype}")
        if t.shape != x.shape:
            raise _fail(ValueError, f"{name} must have x's shape {tuple(x.shape)}, got {tuple(t.shape)}")
        if not _same_layout(t, x):
            raise _fail(ValueError, f"{name} must have the same memory layout as x (all contiguous, or all "
                                    f"channels_last): strides {t.stride()} vs x {x.stride()}")

    if residual is not None:
        like_x("residual", residual)
    like_x("out", out)


def _check_overlaps(x, weight, bias, temb, residual, out) -> None:
    """out may be exactly x or exactly residual (elementwise in-place); no other overlap."""
    if out.numel() == 0:
        return

    def span(t):
        # [lo, hi) bytes touched by t (any strides)
        if t.numel() == 0:
            return None
        lo = hi = t.data_ptr()
        for n, st in zip(t.shape, t.stride()):
            off = (n - 1) * st * t.element_size()
            if off >= 0:
                hi += off
            else:
                lo += off
        return lo, hi + t.element_size()

    o = None
    storage = out.untyped_storage().data_ptr()
    for name, t in (("x", x), ("residual", residual), ("temb", temb), ("weight", weight), ("bias", bias)):
        if t is None or t.device != out.device or t.untyped_storage().data_ptr() != storage:
            continue  # separate allocations never overlap
        o = o or span(out)
        s = span(t)
        if s is None or s[0] >= o[1] or o[0] >= s[1]:
            continue
        if name in ("x", "residual") and t.data_ptr() == out.data_ptr() and _same_layout(t, out):
            continue  # exact alias: every element is read before it is written, by one program
        raise _fail(ValueError, f"out overlaps {name} in memory; the only aliasing allowed is out=x or "
                                f"out=residual")


@dataclass(slots=True)
class GroupNormSiluArgs:
    """Validated arguments, as the providers see them."""

    x: torch.Tensor
    num_groups: int
    weight: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    eps: float
    silu: bool
    temb: Optional[torch.Tensor]
    residual: Optional[torch.Tensor]
    num_splits: int
    out: torch.Tensor

    @property
    def device_type(self) -> str:
        return self.x.device.type

    @property
    def channels_per_group(self) -> int:
        return self.x.shape[1] // self.num_groups


@dataclass
class _Example:
    """What `supports` reads, for fastdiff.info(): typical inputs on a device type."""

    device_type: str
    channels_per_group: int = 10  # SD-1.5: 320 channels, 32 groups


def _cuda_supports(a) -> Optional[str]:
    if a.device_type != "cuda":
        return f"the inputs are {a.device_type} tensors; the cuda backend runs CUDA tensors only"
    why = _ext.missing_reason("group_norm_silu", "CUDA") or (
        None if torch.cuda.is_available() else "CUDA is not available (no GPU or no driver)")
    if why is None and a.channels_per_group > CUDA_MAX_CHANNELS_PER_GROUP:
        why = (f"{a.channels_per_group} channels per group; the CUDA kernel takes at most "
               f"{CUDA_MAX_CHANNELS_PER_GROUP}")
    return why


def _triton_supports(a) -> Optional[str]:
    return _dispatch.triton_unsupported(a.device_type)


def _cpu_supports(a) -> Optional[str]:
    if a.device_type != "cpu":
        return f"the inputs are {a.device_type} tensors; the cpu backend runs CPU tensors only"
    return _ext.missing_reason("group_norm_silu", "CPU")


def _run_compiled(a: GroupNormSiluArgs) -> None:
    torch.ops.fastdiff_C.group_norm_silu(a.x, a.num_groups, a.weight, a.bias, a.eps, a.silu, a.temb, a.residual,
                                         a.num_splits, a.out)


def _run_triton(a: GroupNormSiluArgs) -> None:
    _dispatch.import_kernel("group_norm_silu").group_norm_silu_triton(
        a.x, a.num_groups, a.weight, a.bias, a.eps, a.silu, a.temb, a.residual, a.num_splits, a.out)


def _run_reference(a: GroupNormSiluArgs) -> None:
    if a.x.numel() == 0:
        return
    res = group_norm_silu_reference(a.x, a.num_groups, a.weight, a.bias, a.eps, a.silu, a.temb, a.residual,
                                    compute_dtype=torch.float32)
    a.out.copy_(res)


_C = _ext.C  # the compiled extension: its fast path for calls checked before (csrc/common/known_calls.h)

DISPATCH = _dispatch.register(_dispatch.Dispatcher(
    "group_norm_silu",
    [
        _dispatch.Provider("cuda", _cuda_supports, _run_compiled),
        _dispatch.Provider("triton", _triton_supports, _run_triton),
        _dispatch.Provider("cpu", _cpu_supports, _run_compiled),
        _dispatch.Provider("reference", lambda a: None, _run_reference),
    ],
    example=_Example,
))


# Low-level torch.library API (as solver_step): a custom_op wrapper costs ~10x the dispatch.
_LIB = torch.library.Library("fastdiff", "FRAGMENT")  # noqa: TOR901 (kept alive at module scope)
_LIB.define(
    "group_norm_silu(Tensor x, int num_groups, Tensor? weight, Tensor? bias, float eps, bool silu, "
    "Tensor? temb, Tensor? residual, int num_splits, Tensor(a!) out, str backend) -> ()"
)


def _run(x, num_groups, weight, bias, eps, silu, temb, residual, num_splits, out, backend, new_out=False):
    """The op; returns the provider that ran. Validate once, run many (as solver_step): a known
    signature goes straight to its backend. `new_out`: the wrapper allocated `out` for this
    call, so it overlaps nothing and the key leaves the pointers out (a U-Net's activations sit
    at new addresses every call)."""
    key_of = _dispatch.metadata_key if new_out else _dispatch.tensor_key
    key = (new_out, tuple(map(key_of, (x, weight, bias, temb, residual, out))), num_groups, eps, silu,
           num_splits, backend, _dispatch.signature_env())
    provider = DISPATCH.known(key)
    args = GroupNormSiluArgs(x, num_groups, weight, bias, float(eps), silu, temb, residual, num_splits, out)
    if provider is None:
        check_group_norm_silu_args(x, num_groups, weight, bias, eps, silu, temb, residual, num_splits, out)
        if not new_out:
            _check_overlaps(x, weight, bias, temb, residual, out)
        provider = DISPATCH.select(args, backend)
        DISPATCH.learn(key, provider)
    provider.run(args)
    return provider


def _impl(x, num_groups, weight, bias, eps, silu, temb, residual, num_splits, out, backend) -> None:
    _run(x, num_groups, weight, bias, eps, silu, temb, residual, num_splits, out, backend)


_LIB.impl("group_norm_silu", _impl, "CompositeExplicitAutograd")


@torch.library.register_fake("fastdiff::group_norm_silu", lib=_LIB)
def _fake(x, num_groups, weight, bias, eps, silu, temb, residual, num_splits, out, backend):
    check_group_norm_silu_args(x, num_groups, weight, bias, eps, silu, temb, residual, num_splits, out)
    # a forced backend that cannot run fails at trace time too
    DISPATCH.select(GroupNormSiluArgs(x, num_groups, weight, bias, float(eps), silu, temb, residual, num_splits,
                                      out), backend)
    return None


def group_norm_silu(
    x: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor] = None,
    bias: Optional[torch.Tensor] = None,
    *,
    eps: float = 1e-5,
    silu: bool = True,
    temb: Optional[torch.Tensor] = None,
    residual: Optional[torch.Tensor] = None,
    out: Optional[torch.Tensor] = None,
    backend: str = "auto",
    num_splits: int = 0,
) -> torch.Tensor:
    """`residual + act(GroupNorm(x + temb[:, :, None, None]))` in one op; returns `out`
    (allocated in x's layout if None).

    x          (N, C, *spatial), float32/float16/bfloat16, contiguous or channels_last.
    num_groups G, a divisor of C; statistics per (sample, group) in fp32, biased variance.
    weight     (C,) per-channel scale, float32 or x's dtype (None: 1).
    bias       (C,) per-channel shift, float32 or x's dtype (None: 0).
    eps        > 0, added to the variance.
    silu       apply SiLU after the affine transform.
    temb       (N, C) per-(sample, channel) add BEFORE the statistics (the ResBlock's
               time-embedding add), float32 or x's dtype, any strides.
    residual   added after the activation; x's shape, dtype and layout.
    out        output buffer like x; may be x or residual itself (in-place).
    backend    "auto" | "cuda" | "triton" | "cpu" | "reference"; a forced backend that cannot run
               raises BackendUnavailableError.
    num_splits 0: automatic; 1: one program/block per group; k > 1: split every group over at
               most k programs/blocks (two passes: partial statistics, then normalise).

    All checks run before any write.
    """
    call = (x, num_groups, weight, bias, eps, silu, temb, residual, num_splits, out, backend)
    if _C is not None and not torch.compiler.is_compiling():  # compile traces the registered op
        done = _C.group_norm_silu_known(*call)  # a call checked before, in C++; None otherwise
        if done is not None:
            return done
    _check_scalars(num_groups, eps, silu, num_splits)  # before torch's schema check, with our messages
    new_out = out is None
    if new_out:
        if not isinstance(x, torch.Tensor) or layout_of(x) is None or x.dtype not in DTYPES:
            check_group_norm_silu_args(x, num_groups, weight, bias, eps, silu, temb, residual, num_splits, x)
        out = torch.empty_like(x)  # keeps x's dense layout (contiguous or channels_last)
    if _dispatch.direct(x, weight, bias, temb, residual, out):
        provider = _run(x, num_groups, weight, bias, float(eps), silu, temb, residual, num_splits, out, backend,
                        new_out)
        if _C is not None and provider.run is _run_compiled:
            _C.group_norm_silu_learn(*call)  # the call as given: the next such call runs from the top
    else:  # the registered op: torch.compile, modes, fake tensors
        torch.ops.fastdiff.group_norm_silu(x, num_groups, weight, bias, float(eps), silu, temb, residual,
                                           num_splits, out, backend)
    return out
