"""`fastdiff::attention`: multi-head softmax attention (no mask), the core of the U-Net block.

    out[b, h] = softmax(scale * q[b, h] @ k[b, h]^T) @ v[b, h]          scale = 1/sqrt(D) by default

q (B, H, Lq, D), k and v (B, H, Lk, D) -> out (B, H, Lq, D). Self-attention over the H*W
tokens of a feature map (Lq = Lk) and cross-attention to context tokens (Lk = 77 for CLIP).
Any strides: q/k/v may be head-split views of one packed QKV projection output, `out` a view
of a (B, L, H*D) buffer (`qkv_attention` / `kv_attention` below build those views).

This module holds the specification (`attention_reference`, float64-capable plain PyTorch),
the classic eager computation used as the accuracy yardstick and benchmark baseline
(`attention_eager`), and the op. The Triton kernel lives in `kernels/attention.py`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from fastdiff import _ext
from fastdiff.ops import _dispatch
from fastdiff.ops._dispatch import BackendUnavailableError  # noqa: F401  (re-exported)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TRITON_MAX_HEAD_DIM = 256  # = kernels.attention.MAX_HEAD_DIM (not imported: Triton is optional)


def default_scale(head_dim: int) -> float:
    return 1.0 / math.sqrt(head_dim)


def attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale: Optional[float] = None,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The specification: softmax(scale * q k^T) v computed in `compute_dtype` (float64 for
    test oracles), returned in q's dtype. Materialises the (Lq, Lk) score matrix."""
    if scale is None:
        scale = default_scale(q.shape[-1])
    f = compute_dtype
    s = torch.matmul(q.to(f), k.to(f).transpose(-2, -1)) * scale
    return torch.matmul(torch.softmax(s, dim=-1), v.to(f)).to(q.dtype)


def attention_eager(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None) -> torch.Tensor:
    """The classic eager attention IN THE INPUT DTYPE (what a U-Net without SDPA runs, e.g.
    diffusers' AttnProcessor): scores rounded to the dtype, softmax in the dtype, P @ V.
    The accuracy yardstick of the tests and the "eager" provider of the benchmark."""
    if scale is None:
        scale = default_scale(q.shape[-1])
    s = torch.matmul(q, k.transpose(-2, -1)) * scale
    return torch.matmul(torch.softmax(s, dim=-1), v)


# =============================================================================================
# The op `fastdiff::attention`: validation, backends, torch.library registration.
#
#   attention(q, k, v, *, scale=None, out=None, backend="auto") -> out
#
# allocates `out` when not given and calls the registered op
#
#   torch.ops.fastdiff.attention(q, k, v, scale, out, backend) -> ()
#
# which writes `out` in place (static buffers: CUDA-graph friendly), has a fake implementation
# (torch.compile / meta) and dispatches to a backend (fastdiff/ops/_dispatch.py):
#
#   cuda       PyTorch SDPA (flash / cuDNN / memory-efficient, whichever PyTorch picks) on CUDA
#              tensors, result copied into `out`. Chosen first on CUDA tensors: the GPU
#              comparison with our kernel is in benchmarks/NOTES.md (no fastdiff CUDA kernel).
#   triton     our flash-attention kernel (kernels/attention.py): CUDA tensors, or CPU tensors
#              under TRITON_INTERPRET=1; head_dim <= 256.
#   cpu        PyTorch SDPA on CPU tensors: ATen's blocked flash kernel (vectorised, multi-
#              threaded, fp32 accumulation for fp16/bf16, O(L) memory). A C++ kernel of ours
#              would only duplicate it; the tests hold it to the same error bound as the others.
#   reference  attention_reference in fp32, over query chunks (bounded memory): the fallback.
# =============================================================================================


def _fail(exc, msg):
    return exc(f"fastdiff.attention: {msg}")


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def _non_overlapping(t: torch.Tensor) -> bool:
    """No two indices address the same element (metadata only; works on fake tensors).
    Sufficient test: sorted by stride, each stride clears the extent of the smaller ones."""
    if t.numel() <= 1:
        return True
    extent = 0  # largest offset reachable with the dims seen so far
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n != 1):
        if stride <= extent:
            return False
        extent += stride * (size - 1)
    return True


def check_attention_args(q, k, v, scale, out) -> None:
    """Raise TypeError/ValueError naming the offending argument; touches no data.

    Metadata only, so it also runs on fake tensors at torch.compile trace time. `out=None`
    skips the checks of `out` (the wrapper allocates it after this).
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise _fail(TypeError, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if out is not None and not isinstance(out, torch.Tensor):
        raise _fail(TypeError, f"out must be a torch.Tensor or None, got {type(out).__name__}")
    if q.dtype not in DTYPES:
        raise _fail(TypeError, f"q must be float32, float16 or bfloat16, got {q.dtype}")
    if q.dim() != 4:
        raise _fail(ValueError, f"q must be 4-D (batch, heads, Lq, head_dim), got shape {tuple(q.shape)}")
    b, h, lq, d = q.shape
    if d == 0:
        raise _fail(ValueError, f"q must have head_dim >= 1, got shape {tuple(q.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.device != q.device:
            raise _fail(ValueError, f"{name} must be on q's device {q.device}, got {t.device}")
        if t.dtype != q.dtype:
            raise _fail(TypeError, f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.dim() != 4 or t.shape[0] != b or t.shape[1] != h or t.shape[3] != d:
            raise _fail(ValueError, f"{name} must have shape ({b}, {h}, Lk, {d}) (q's batch, heads and head_dim), "
                                    f"got {tuple(t.shape)}")
    if v.shape[2] != k.shape[2]:
        raise _fail(ValueError, f"v must have k's number of keys Lk = {k.shape[2]}, got shape {tuple(v.shape)}")
    if k.shape[2] == 0:
        raise _fail(ValueError, f"k must hold at least one key (Lk >= 1): softmax over no keys is undefined; "
                                f"got shape {tuple(k.shape)}")
    if scale is not None and (not _is_number(scale) or not math.isfinite(scale) or scale <= 0):
        raise _fail(ValueError, f"scale must be a finite number > 0 or None (1/sqrt(head_dim)), got {scale!r}")
    if out is not None:
        if out.device != q.device:
            raise _fail(ValueError, f"out must be on q's device {q.device}, got {out.device}")
        if out.dtype != q.dtype:
            raise _fail(TypeError, f"out must have q's dtype {q.dtype}, got {out.dtype}")
        if out.shape != q.shape:
            raise _fail(ValueError, f"out must have q's shape {tuple(q.shape)}, got {tuple(out.shape)}")
        if not _non_overlapping(out):
            raise _fail(ValueError, f"out must not overlap itself (no expanded/broadcast strides), got strides "
                                    f"{out.stride()} for shape {tuple(out.shape)}")


def _check_overlaps(q, k, v, out) -> None:
    """out is written while q, k, v are read by other programs: it may not share memory with them."""
    name = _dispatch.overlapped_input(out, (("q", q), ("k", k), ("v", v)))
    if name is not None:
        raise _fail(ValueError, f"out overlaps {name} in memory; out must be a separate buffer")


@dataclass
class AttentionArgs:
    """Validated arguments, as the providers see them (scale resolved)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    scale: float
    out: Optional[torch.Tensor]  # None: the provider returns a new heads-last result (`_out`)

    @property
    def device_type(self) -> str:
        return self.q.device.type

    @property
    def dtype(self) -> torch.dtype:
        return self.q.dtype

    @property
    def head_dim(self) -> int:
        return self.q.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.q.device


@dataclass
class _Example:
    """What `supports` reads, for fastdiff.info(): typical inputs on a device type."""

    device_type: str
    dtype: torch.dtype = torch.float16
    head_dim: int = 64

    @property
    def device(self) -> torch.device:
        return torch.device(self.device_type)


def _cuda_supports(a) -> Optional[str]:
    if a.device_type != "cuda":
        return f"the inputs are {a.device_type} tensors; the cuda backend (PyTorch SDPA) runs CUDA tensors only"
    return None if torch.cuda.is_available() else "CUDA is not available (no GPU or no driver)"


def _triton_supports(a) -> Optional[str]:
    why = _dispatch.triton_unsupported(a.device_type)
    if why is None and a.device_type == "cuda" and a.dtype == torch.bfloat16 and \
            torch.cuda.get_device_capability(a.device) < (8, 0):
        why = "bfloat16 tl.dot needs compute capability >= 8.0 (Ampere)"
    if why is None and a.head_dim > TRITON_MAX_HEAD_DIM:
        why = f"head_dim {a.head_dim} > {TRITON_MAX_HEAD_DIM} (the kernel keeps a whole head row in registers)"
    if why is None and a.device_type == "cuda":
        why = _dispatch.import_kernel("attention").gpu_unsupported(
            a.dtype, a.head_dim, torch.cuda.get_device_capability(a.device))
    return why


def _cpu_supports(a) -> Optional[str]:
    if a.device_type != "cpu":
        return f"the inputs are {a.device_type} tensors; the cpu backend (PyTorch SDPA on CPU) runs CPU tensors only"
    return None


def heads_last_empty(q: torch.Tensor) -> torch.Tensor:
    """An uninitialised (B, H, Lq, D) result over (B, Lq, H, D) memory: `.transpose(1, 2)` of
    it is contiguous, i.e. the (B, Lq, H*D) tokens the output projection reads."""
    b, h, lq, d = q.shape
    return torch.empty((b, lq, h, d), dtype=q.dtype, device=q.device).transpose(1, 2)


def is_heads_last(t: torch.Tensor) -> bool:
    return t.transpose(1, 2).is_contiguous()


def _out(a: AttentionArgs) -> torch.Tensor:
    return a.out if a.out is not None else heads_last_empty(a.q)


def _run_sdpa(a: AttentionArgs) -> torch.Tensor:
    o = F.scaled_dot_product_attention(a.q, a.k, a.v, scale=a.scale)
    if a.out is None and is_heads_last(o):
        return o  # SDPA's flash / memory-efficient kernels (CUDA and CPU) write (B, Lq, H, D): no copy
    return _out(a).copy_(o)


def _run_triton(a: AttentionArgs) -> torch.Tensor:
    out = _out(a)
    _dispatch.import_kernel("attention").attention_triton(a.q, a.k, a.v, out, a.scale)
    return out


REFERENCE_CHUNK_ELEMENTS = 1 << 24  # fp32 scores per chunk of queries (64 MiB)


def _run_reference(a: AttentionArgs) -> torch.Tensor:
    out = _out(a)
    b, h, lq, _ = a.q.shape
    lk = a.k.shape[2]
    rows = max(1, REFERENCE_CHUNK_ELEMENTS // max(1, b * h * lk))
    k, v = a.k.float(), a.v.float()
    for i in range(0, lq, rows):
        out[:, :, i:i + rows].copy_(attention_reference(a.q[:, :, i:i + rows], k, v, a.scale, torch.float32))
    return out


_C = _ext.C  # the compiled extension: its fast path for calls checked before (csrc/common/known_calls.h)

DISPATCH = _dispatch.register(_dispatch.Dispatcher(
    "attention",
    [
        _dispatch.Provider("cuda", _cuda_supports, _run_sdpa),
        _dispatch.Provider("triton", _triton_supports, _run_triton),
        _dispatch.Provider("cpu", _cpu_supports, _run_sdpa),
        _dispatch.Provider("reference", lambda a: None, _run_reference),
    ],
    example=_Example,
))


_LIB = torch.library.Library("fastdiff", "FRAGMENT")  # noqa: TOR901 (kept alive at module scope)
_LIB.define("attention(Tensor q, Tensor k, Tensor v, float? scale, Tensor(a!) out, str backend) -> ()")
# the functional form: a new result in the heads-last layout (SDPA's own output where it has it)
_LIB.define("attention_heads_last(Tensor q, Tensor k, Tensor v, float? scale, str backend) -> Tensor")


def _resolve_scale(q, scale) -> float:
    return default_scale(q.shape[-1]) if scale is None else float(scale)


def _provider(q, k, v, scale, out, backend) -> _dispatch.Provider:
    """Validate once, run many (as group_norm_silu): the checks and the backend choice run once
    per signature; without `out` (a new result) the key leaves the pointers out, as there is no
    overlap to check and a U-Net's activations sit at new addresses every call. A forced
    backend that cannot run fails even for empty inputs."""
    key_of = _dispatch.metadata_key if out is None else _dispatch.tensor_key
    key = (tuple(map(key_of, (q, k, v, out))), scale, backend, _dispatch.signature_env())
    provider = DISPATCH.known(key)
    if provider is None:
        check_attention_args(q, k, v, scale, out)
        if out is not None:
            _check_overlaps(q, k, v, out)
        provider = DISPATCH.select(AttentionArgs(q, k, v, _resolve_scale(q, scale), out), backend)
        DISPATCH.learn(key, provider)
    return provider


def _attend(provider, q, k, v, scale, out) -> torch.Tensor:
    """Run a checked call on its provider: `out`, or without it a new heads-last result."""
    if q.numel() == 0:
        return heads_last_empty(q) if out is None else out
    return provider.run(AttentionArgs(q, k, v, _resolve_scale(q, scale), out))


def _attention_impl(q, k, v, scale, out, backend):
    _attend(_provider(q, k, v, scale, out, backend), q, k, v, scale, out)


def _attention_heads_last_impl(q, k, v, scale, backend):
    return _attend(_provider(q, k, v, scale, None, backend), q, k, v, scale, None)


_LIB.impl("attention", _attention_impl, "CompositeExplicitAutograd")
_LIB.impl("attention_heads_last", _attention_heads_last_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("fastdiff::attention", lib=_LIB)
def _attention_fake(q, k, v, scale, out, backend):
    check_attention_args(q, k, v, scale, out)
    DISPATCH.select(AttentionArgs(q, k, v, _resolve_scale(q, scale), out), backend)
    return None


@torch.library.register_fake("fastdiff::attention_heads_last", lib=_LIB)
def _attention_heads_last_fake(q, k, v, scale, backend):
    check_attention_args(q, k, v, scale, None)
    DISPATCH.select(AttentionArgs(q, k, v, _resolve_scale(q, scale), None), backend)
    return heads_last_empty(q)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: Optional[float] = None,
    out: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """softmax(scale * q k^T) v per (batch, head); returns `out`, or without `out` a new result
    in the heads-last layout ((B, H, Lq, D) over (B, Lq, H, D) memory, what SDPA's fused
    kernels produce, returned as they produce it: no copy).

    q        (B, H, Lq, D) float32/float16/bfloat16, any strides.
    k, v     (B, H, Lk, D), q's dtype and device, any strides (may be views of one buffer); Lk >= 1.
    scale    softmax scale > 0; None = 1/sqrt(D).
    out      (B, H, Lq, D) in q's dtype, any non-overlapping strides; must not share memory
             with q, k or v.
    backend  "auto" | "cuda" (PyTorch SDPA) | "triton" | "cpu" (PyTorch SDPA on CPU) |
             "reference"; a forced backend that cannot run raises BackendUnavailableError.

    All checks run before anything is written. No autograd (inference op).
    """
    call = (q, k, v, scale, out, backend)
    if _C is not None and not torch.compiler.is_compiling():  # compile traces the registered op
        done = _C.attention_known(*call)  # a call checked before, in C++; None otherwise
        if done is not None:
            return done
    if not all(isinstance(t, torch.Tensor) for t in (q, k, v)) or not (
            out is None or isinstance(out, torch.Tensor)) or not (scale is None or _is_number(scale)):
        # before the op's schema would reject it with a less helpful message
        check_attention_args(q, k, v, scale, out)
    scale = None if scale is None else float(scale)
    if _dispatch.direct(q, k, v, out):  # a plain eager call: the implementation, without the round trip
        provider = _provider(q, k, v, scale, out, backend)
        result = _attend(provider, q, k, v, scale, out)
        if _C is not None and provider.run is _run_sdpa:
            _C.attention_learn(*call)  # the call as given: the next such call runs from the top
        return result
    if out is None:  # the registered ops: torch.compile, modes, fake tensors
        return torch.ops.fastdiff.attention_heads_last(q, k, v, scale, backend)
    torch.ops.fastdiff.attention(q, k, v, scale, out, backend)
    return out


# =============================================================================================
# The U-Net block's layouts: one fused projection, heads split by views (no copies).
# =============================================================================================

def _check_heads(fn, heads, features, parts, what):
    if not isinstance(heads, int) or isinstance(heads, bool) or heads < 1:
        raise TypeError(f"fastdiff.{fn}: heads must be a positive int, got {heads!r}")
    if features == 0 or features % (parts * heads):
        raise ValueError(f"fastdiff.{fn}: {what}'s last dim ({features}) must be a positive multiple of "
                         f"{parts} * heads = {parts * heads}")


def _check_tokens(fn, name, t, like=None):
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"fastdiff.{fn}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != 3:
        raise ValueError(f"fastdiff.{fn}: {name} must be 3-D (batch, tokens, features), got shape {tuple(t.shape)}")
    if like is None:
        if t.dtype not in DTYPES:
            raise TypeError(f"fastdiff.{fn}: {name} must be float32, float16 or bfloat16, got {t.dtype}")
    else:
        other, other_name = like
        if t.dtype != other.dtype:
            raise TypeError(f"fastdiff.{fn}: {name} must have {other_name}'s dtype {other.dtype}, got {t.dtype}")
        if t.device != other.device:
            raise ValueError(f"fastdiff.{fn}: {name} must be on {other_name}'s device {other.device}, got {t.device}")


def _attend_tokens(fn, q, k, v, out, like, scale, backend):
    """Attention of (B, H, N, D) head views into (B, N, H*D) tokens: into `out` when given, else
    the heads-last result viewed as tokens (no copy)."""
    b, heads, n, d = q.shape
    if out is None:
        return attention(q, k, v, scale=scale, backend=backend).transpose(1, 2).reshape(b, n, heads * d)
    _check_tokens(fn, "out", out, like=(like, "q" if fn == "kv_attention" else "qkv"))
    if tuple(out.shape) != (b, n, heads * d):
        raise ValueError(f"fastdiff.{fn}: out must have shape ({b}, {n}, {heads * d}), got {tuple(out.shape)}")
    attention(q, k, v, scale=scale, out=out.unflatten(-1, (heads, d)).transpose(1, 2), backend=backend)
    return out


def qkv_attention(
    qkv: torch.Tensor,
    heads: int,
    *,
    scale: Optional[float] = None,
    out: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Self-attention from one fused QKV projection: (B, L, 3*H*D) -> (B, L, H*D).

    The features of `qkv` are ordered [q | k | v], each split into `heads` heads of D
    contiguous features (a (B, L, 3, H, D) layout: what `nn.Linear(C, 3C)` produces with the
    weight rows stacked q, k, v). q, k and v are passed to the kernel as strided (B, H, L, D)
    views of `qkv`; the result is written straight into `out` viewed as (B, H, L, D), or
    without `out` is the attention's heads-last result viewed as (B, L, H*D) (SDPA's own output
    on its fused kernels): ready for the output projection, no transpose or copy.
    `out` (B, L, H*D) in qkv's dtype may be given (e.g. a static buffer).
    """
    _check_tokens("qkv_attention", "qkv", qkv)
    f = qkv.shape[-1]
    _check_heads("qkv_attention", heads, f, 3, "qkv")
    d = f // (3 * heads)
    q, k, v = (t.transpose(1, 2) for t in qkv.unflatten(-1, (3, heads, d)).unbind(2))
    return _attend_tokens("qkv_attention", q, k, v, out, qkv, scale, backend)


def kv_attention(
    q: torch.Tensor,
    kv: torch.Tensor,
    heads: int,
    *,
    scale: Optional[float] = None,
    out: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """Cross-attention of queries (B, Lq, H*D) over a fused KV projection (B, Lk, 2*H*D),
    features ordered [k | v] (each `heads` x D): -> (B, Lq, H*D). Views only, like
    `qkv_attention`."""
    _check_tokens("kv_attention", "q", q)
    _check_tokens("kv_attention", "kv", kv, like=(q, "q"))
    b, _, f = q.shape
    _check_heads("kv_attention", heads, f, 1, "q")
    d = f // heads
    if kv.shape[0] != b or kv.shape[2] != 2 * f:
        raise ValueError(f"fastdiff.kv_attention: kv must have shape ({b}, Lk, {2 * f}) (q's batch, 2 * q's "
                         f"features), got {tuple(kv.shape)}")
    qh = q.unflatten(-1, (heads, d)).transpose(1, 2)
    k, v = (t.transpose(1, 2) for t in kv.unflatten(-1, (2, heads, d)).unbind(2))
    return _attend_tokens("kv_attention", qh, k, v, out, q, scale, backend)
