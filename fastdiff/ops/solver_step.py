"""`fastdiff::solver_step`: one sampler step in one pass over memory.

The algebra (DESIGN.md section 4), elementwise over the latent of one step:

    m   = m_u + w * (m_c - m_u)          CFG (only when `uncond` is given)
    D   = p * x + q * m                  data prediction
    Dc  = clamp(D, -k, k)                only when clamp k > 0 (else Dc = D)
    out = a * x + r * D + b0 * Dc + b1 * H[s1] + b2 * H[s2] + b3 * H[s3] + c * z
    H[sw] = Dc                           only when a write slot is given

`x` is the solver state, `m`/`m_u` the model output (conditional / unconditional),
`H` the history ring buffer of earlier data predictions (shape (S, *x.shape)), `z`
the step's noise. `r` weighs the unclamped D (a clamped DDIM step that keeps the model's own
noise estimate, diffusers' default; every other row has r = 0). `coef = (p, q, a, b0, b1, b2,
b3, c, r)` and `slots = (sw, s1, s2, s3)` (-1 = unused) come from a host-side float64 table
built once per plan; the kernels only multiply and add, in fp32 whatever the storage dtype.

This module holds the specification (`solver_step_reference`, float64-capable plain
PyTorch). Kernels live in `kernels/solver_step.py` (Triton) and `csrc/solver_step/`.
"""
from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

NUM_COEFS = 9  # p, q, a, b0, b1, b2, b3, c, r
NUM_SLOTS = 4  # write, read D_{i-1}, D_{i-2}, D_{i-3}


def solver_step_reference(
    x: torch.Tensor,
    model_out: torch.Tensor,
    uncond: Optional[torch.Tensor],
    history: Optional[torch.Tensor],
    noise: Optional[torch.Tensor],
    coef: Sequence[float],
    slots: Sequence[int],
    guidance=1.0,
    clamp: float = 0.0,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """The specification of `solver_step`, in plain PyTorch.

    Returns the next state (in `x.dtype`) and writes the new data prediction into
    `history[slots[0]]` when `slots[0] >= 0`. Arithmetic happens in `compute_dtype`
    (float64 for test oracles).
    """
    p, q, a, b0, b1, b2, b3, c, r = (float(v) for v in coef)
    sw, s1, s2, s3 = (int(v) for v in slots)
    f = compute_dtype
    m = model_out.to(f)
    if uncond is not None:
        m_u = uncond.to(f)
        w = guidance.to(f) if isinstance(guidance, torch.Tensor) else guidance  # a 0-d tensor stays on device
        m = m_u + w * (m - m_u)
    xf = x.to(f)
    d = p * xf + q * m
    dc = d.clamp(-clamp, clamp) if clamp > 0 else d
    out = a * xf + r * d + b0 * dc
    for b, s in ((b1, s1), (b2, s2), (b3, s3)):
        if s >= 0:
            out = out + b * history[s].to(f)
    if noise is not None:
        out = out + c * noise.to(f)
    if sw >= 0:
        history[sw].copy_(dc)
    return out.to(x.dtype)


# =============================================================================================
# The op `fastdiff::solver_step`: validation, backends, torch.library registration.
#
#   solver_step(x, model_out, uncond=None, history=None, noise=None, *, coef, slots,
#               guidance=1.0, clamp=0.0, out=None, backend="auto") -> out
#
# is the convenience function; it splits a CFG-doubled `model_out` (batch 2B: unconditional
# first, then conditional, as diffusers concatenates them), allocates `out` when not given and
# calls the registered op
#
#   torch.ops.fastdiff.solver_step(x, model_out, uncond, history, noise, coef, slots,
#                                  guidance, clamp, out, backend) -> ()
#
# which writes `out` and `history[slots[0]]` in place (static buffers: CUDA-graph friendly),
# has a fake implementation (torch.compile / meta) and dispatches to a backend:
# cuda -> triton -> cpu -> reference (fastdiff/ops/_dispatch.py).
#
# Memory layout: all tensors (and each history slot) must share x's dense layout -- all
# contiguous, or all channels_last -- since the kernels treat the common storage as flat. A
# mismatch is an error, never a silent copy.
# =============================================================================================
import math  # noqa: E402
import numbers  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from typing import List  # noqa: E402

from fastdiff import _ext  # noqa: E402
from fastdiff.ops import _dispatch  # noqa: E402
from fastdiff.ops._dispatch import BackendUnavailableError  # noqa: E402,F401  (re-exported)

MODEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
COEF_NAMES = ("p", "q", "a", "b0", "b1", "b2", "b3", "c", "r")
SLOT_NAMES = ("write", "read D_{i-1}", "read D_{i-2}", "read D_{i-3}")


def _fail(exc, msg):
    return exc(f"fastdiff.solver_step: {msg}")


def _is_dense(t: torch.Tensor) -> bool:
    """Non-overlapping and dense: some order of the dimensions has contiguous strides
    (contiguous, channels_last, ...). Metadata only, so it works on fake tensors."""
    if t.numel() == 0:
        return True
    expected = 1
    for stride, size in sorted((st, n) for n, st in zip(t.shape, t.stride()) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _same_layout(t: torch.Tensor, x: torch.Tensor) -> bool:
    ts, xs = t.stride(), x.stride()
    if ts == xs:
        return True
    # strides of size-1 dimensions never address memory: ignore them
    return all(st == sx for n, st, sx in zip(x.shape, ts, xs) if n != 1)


def check_solver_step_args(x, model_out, uncond, history, noise, coef, slots, guidance, clamp, out,
                           guidance_t=None) -> None:
    """Raise TypeError/ValueError naming the offending argument; touches no data.

    Works on fake/meta tensors too (it only reads metadata), so it runs at trace time under
    torch.compile as well as before every kernel launch.
    """
    _check_tensors(x, model_out, uncond, history, noise, out, guidance_t)
    _check_values(uncond, history, noise, coef, slots, guidance, clamp, guidance_t)


def _check_tensors(x, model_out, uncond, history, noise, out, guidance_t) -> None:
    """The checks that read only the tensors' types, shapes, strides, dtypes and devices."""
    for name, t in (("x", x), ("model_out", model_out), ("out", out)):
        if not isinstance(t, torch.Tensor):
            raise _fail(TypeError, f"{name} must be a torch.Tensor, got {type(t).__name__}")
    for name, t in (("uncond", uncond), ("history", history), ("noise", noise)):
        if t is not None and not isinstance(t, torch.Tensor):
            raise _fail(TypeError, f"{name} must be a torch.Tensor or None, got {type(t).__name__}")

    if model_out.dtype not in MODEL_DTYPES:
        raise _fail(TypeError, f"model_out must be float32, float16 or bfloat16, got {model_out.dtype}")
    if x.dtype not in (torch.float32, model_out.dtype):
        raise _fail(TypeError, f"x (the solver state) must be float32 (the default state dtype) or "
                               f"model_out's dtype {model_out.dtype}, got {x.dtype}")
    if x.dim() == 0:
        raise _fail(ValueError, "x must have at least one dimension, got a 0-d tensor")
    if not _is_dense(x):
        raise _fail(ValueError, f"x must be dense: contiguous or channels_last, got shape {tuple(x.shape)} "
                                f"with strides {x.stride()} (call .contiguous() first)")

    def like_x(name, t, dtype, dtype_what):
        if t.device != x.device:
            raise _fail(ValueError, f"{name} must be on x's device {x.device}, got {t.device}")
        if t.dtype != dtype:
            raise _fail(TypeError, f"{name} must have dtype {dtype} ({dtype_what}), got {t.dtype}")
        if t.shape != x.shape:
            hint = ""
            if name == "model_out" and t.dim() == x.dim() and t.shape[0] == 2 * x.shape[0]:
                hint = (" (a CFG-doubled model_out is split by solver_step() when uncond is None; "
                        "pass either the doubled batch or uncond=, not both)")
            raise _fail(ValueError, f"{name} must have x's shape {tuple(x.shape)}, got {tuple(t.shape)}{hint}")
        if not _same_layout(t, x):
            raise _fail(ValueError, f"{name} must have the same memory layout as x (all tensors contiguous, "
                                    f"or all channels_last): strides {t.stride()} vs x {x.stride()}")

    like_x("model_out", model_out, model_out.dtype, "")
    if uncond is not None:
        like_x("uncond", uncond, model_out.dtype, "model_out's dtype")
    if noise is not None:
        like_x("noise", noise, x.dtype, "the state dtype, x's")
    like_x("out", out, x.dtype, "the state dtype, x's")

    if history is not None:
        if history.dim() != x.dim() + 1 or history.shape[1:] != x.shape:
            raise _fail(ValueError, f"history must have shape (S, *x.shape) = (S, {', '.join(map(str, x.shape))}), "
                                    f"got {tuple(history.shape)}")
        if history.device != x.device:
            raise _fail(ValueError, f"history must be on x's device {x.device}, got {history.device}")
        if history.dtype != x.dtype:
            raise _fail(TypeError, f"history must have the state dtype (x's) {x.dtype}, got {history.dtype}")
        num_slots = history.shape[0]
        if num_slots == 0:
            raise _fail(ValueError, "history must have at least one slot, got shape "
                                    f"{tuple(history.shape)} (pass history=None for no history)")
        if num_slots > 1 and history.stride(0) != x.numel():
            raise _fail(ValueError, f"history slots must be dense and adjacent: history.stride(0) must be "
                                    f"x.numel() = {x.numel()}, got {history.stride(0)}")
        if not all(sh == sx for n, sh, sx in zip(x.shape, history.stride()[1:], x.stride()) if n != 1):
            raise _fail(ValueError, f"history[s] must have the same memory layout as x (all contiguous, or all "
                                    f"channels_last): strides {history.stride()} vs x {x.stride()}")
    if guidance_t is not None:
        if not isinstance(guidance_t, torch.Tensor):
            raise _fail(TypeError, f"guidance_t must be a torch.Tensor or None, got {type(guidance_t).__name__}")
        if guidance_t.numel() != 1 or guidance_t.dtype != torch.float32 or guidance_t.device != x.device:
            raise _fail(ValueError, f"guidance (as a tensor) must be a one-element float32 tensor on x's device "
                                    f"{x.device}, got shape {tuple(guidance_t.shape)} {guidance_t.dtype} on "
                                    f"{guidance_t.device}")


def _check_values(uncond, history, noise, coef, slots, guidance, clamp, guidance_t) -> None:
    """The checks of the numbers (coef, slots, guidance, clamp) and of what they say about the tensors."""
    if not isinstance(coef, (list, tuple)) or len(coef) != len(COEF_NAMES):
        n = len(coef) if hasattr(coef, "__len__") else type(coef).__name__
        raise _fail(ValueError, f"coef must be a sequence of 9 numbers (p, q, a, b0, b1, b2, b3, c, r), got {n}")
    for i, v in enumerate(coef):
        if not isinstance(v, (int, float)) or isinstance(v, bool) or not math.isfinite(v):
            raise _fail(ValueError, f"coef[{i}] ({COEF_NAMES[i]}) must be a finite number, got {v!r}")
    if not isinstance(slots, (list, tuple)) or len(slots) != 4:
        n = len(slots) if hasattr(slots, "__len__") else type(slots).__name__
        raise _fail(ValueError, f"slots must be a sequence of 4 ints (write, read1, read2, read3; -1 = "
                                f"unused), got {n}")
    for k, s in enumerate(slots):
        if not isinstance(s, int) or isinstance(s, bool):
            raise _fail(ValueError, f"slots[{k}] ({SLOT_NAMES[k]}) must be an int, got {s!r}")
    if not isinstance(guidance, (int, float)) or not math.isfinite(guidance):
        raise _fail(ValueError, f"guidance must be a finite number, got {guidance!r}")
    if guidance_t is not None and uncond is None:
        raise _fail(ValueError, "guidance (as a tensor) has no effect without CFG: pass uncond=, or a "
                                "model_out with batch 2*B (unconditional half first)")
    if not isinstance(clamp, (int, float)) or not math.isfinite(clamp) or clamp < 0:
        raise _fail(ValueError, f"clamp must be a finite number >= 0 (0 = no clamp), got {clamp!r}")

    num_slots = 0 if history is None else history.shape[0]
    for k, s in enumerate(slots):
        if s == -1:
            continue
        if history is None:
            raise _fail(ValueError, f"slots[{k}] ({SLOT_NAMES[k]}) = {s} but history is None")
        if not 0 <= s < num_slots:
            raise _fail(ValueError, f"slots[{k}] ({SLOT_NAMES[k]}) = {s} is out of range for history with "
                                    f"{num_slots} slot(s); use -1 for unused")
    for k in (1, 2, 3):
        if slots[k] == -1 and coef[3 + k] != 0:
            raise _fail(ValueError, f"coef[{3 + k}] (b{k}) = {coef[3 + k]!r} is nonzero but slots[{k}] is -1 "
                                    f"(unused): the D_{{i-{k}}} term would be silently dropped")
    if noise is None and coef[7] != 0:
        raise _fail(ValueError, f"coef[7] (c) = {coef[7]!r} is nonzero but noise is None")
    if uncond is None and guidance != 1.0:
        raise _fail(ValueError, f"guidance={guidance!r} has no effect without CFG: pass uncond=, or a "
                                f"model_out with batch 2*B (unconditional half first)")


def _check_overlaps(x, model_out, uncond, history, noise, slots, out) -> None:
    """Writes may alias exactly x (out) or a read slot (history write slot); nothing else."""
    if x.numel() == 0:
        return

    # all tensors are dense (checked), so each covers [data_ptr, data_ptr + nbytes)
    nbytes = x.numel() * x.element_size()
    mbytes = x.numel() * model_out.element_size()
    spans = [("x", x.data_ptr(), nbytes), ("model_out", model_out.data_ptr(), mbytes)]
    if uncond is not None:
        spans.append(("uncond", uncond.data_ptr(), mbytes))
    if noise is not None:
        spans.append(("noise", noise.data_ptr(), nbytes))
    if history is not None:
        h0 = history.data_ptr()
        spans += [(f"history[{s}]", h0 + s * nbytes, nbytes) for s in slots[1:] if s >= 0]
    writes = [("out", out.data_ptr())]
    sw = slots[0]
    if sw >= 0:
        writes.append((f"history[{sw}] (write slot)", history.data_ptr() + sw * nbytes))
        spans.append(writes[1][0:2] + (nbytes,))
    for wn, ws in writes:
        we = ws + nbytes
        for rn, rs, rb in spans:
            if rn == wn or rs >= we or ws >= rs + rb:
                continue
            if rs == ws and rb == nbytes and (
                (wn == "out" and rn == "x") or (wn != "out" and rn == f"history[{sw}]")
            ):
                continue  # exact alias, elementwise: every element is read before it is written
            raise _fail(ValueError, f"{wn} overlaps {rn} in memory; the only aliasing allowed is out=x and "
                                    f"a history write slot equal to a read slot")


@dataclass(slots=True)
class SolverStepArgs:
    """Validated arguments, as the providers see them."""

    x: torch.Tensor
    model_out: torch.Tensor
    uncond: Optional[torch.Tensor]
    history: Optional[torch.Tensor]
    noise: Optional[torch.Tensor]
    coef: List[float]
    slots: List[int]
    guidance: float
    clamp: float
    out: torch.Tensor
    guidance_t: Optional[torch.Tensor] = None  # overrides guidance, read by the kernel at run time

    @property
    def device_type(self) -> str:
        return self.x.device.type

    @property
    def model_dtype(self) -> torch.dtype:
        return self.model_out.dtype

    @property
    def state_dtype(self) -> torch.dtype:
        return self.x.dtype


@dataclass
class _Example:
    """What `supports` reads, for fastdiff.info(): typical inputs on a device type."""

    device_type: str
    model_dtype: torch.dtype = torch.float16
    state_dtype: torch.dtype = torch.float32


def _cuda_supports(a) -> Optional[str]:
    if a.device_type != "cuda":
        return f"the inputs are {a.device_type} tensors; the cuda backend runs CUDA tensors only"
    return _ext.missing_reason("solver_step", "CUDA") or (
        None if torch.cuda.is_available() else "CUDA is not available (no GPU or no driver)")


def _triton_supports(a) -> Optional[str]:
    return _dispatch.triton_unsupported(a.device_type)


def _cpu_supports(a) -> Optional[str]:
    if a.device_type != "cpu":
        return f"the inputs are {a.device_type} tensors; the cpu backend runs CPU tensors only"
    return _ext.missing_reason("solver_step", "CPU")


def _run_compiled(a: SolverStepArgs) -> None:
    torch.ops.fastdiff_C.solver_step(a.x, a.model_out, a.uncond, a.history, a.noise, a.coef, a.slots,
                                     a.guidance, a.guidance_t, a.clamp, a.out)


def _run_triton(a: SolverStepArgs) -> None:
    _dispatch.import_kernel("solver_step").solver_step_triton(
        a.x, a.model_out, a.uncond, a.history, a.noise, a.coef, a.slots,
        a.guidance if a.guidance_t is None else a.guidance_t, a.clamp, a.out)


def _run_reference(a: SolverStepArgs) -> None:
    res = solver_step_reference(a.x, a.model_out, a.uncond, a.history, a.noise, a.coef, a.slots,
                                a.guidance if a.guidance_t is None else a.guidance_t, a.clamp,
                                compute_dtype=torch.float32)
    a.out.copy_(res)


_C = _ext.C  # the compiled extension: its fast path for calls checked before (csrc/common/known_calls.h)

DISPATCH = _dispatch.register(_dispatch.Dispatcher(
    "solver_step",
    [
        _dispatch.Provider("cuda", _cuda_supports, _run_compiled),
        _dispatch.Provider("triton", _triton_supports, _run_triton),
        _dispatch.Provider("cpu", _cpu_supports, _run_compiled),
        _dispatch.Provider("reference", lambda a: None, _run_reference),
    ],
    example=_Example,
))


# The op is defined with the low-level torch.library API: a custom_op wrapper costs ~10x the
# dispatch of a plain definition, which matters to an eager sampling loop.
_LIB = torch.library.Library("fastdiff", "FRAGMENT")  # noqa: TOR901 (kept alive at module scope)
_LIB.define(
    "solver_step(Tensor x, Tensor model_out, Tensor? uncond, Tensor(a!)? history, Tensor? noise, "
    "float[] coef, int[] slots, float guidance, Tensor? guidance_t, float clamp, Tensor(b!) out, str backend) -> ()"
)


def _run(x, model_out, uncond, history, noise, coef, slots, guidance, guidance_t, clamp, out, backend):
    """The op; returns the provider that ran. Validate once, run many: a signature that passed
    the checks and chose a backend before (everything they read: tensor metadata and pointers,
    the numbers) goes straight to it."""
    key = (tuple(map(_dispatch.tensor_key, (x, model_out, uncond, history, noise, out, guidance_t))),
           tuple(coef), tuple(slots), guidance, clamp, backend, _dispatch.signature_env())
    provider = DISPATCH.known(key)
    args = SolverStepArgs(x, model_out, uncond, history, noise, coef, slots, guidance, clamp, out, guidance_t)
    if provider is None:
        check_solver_step_args(x, model_out, uncond, history, noise, coef, slots, guidance, clamp, out, guidance_t)
        _check_overlaps(x, model_out, uncond, history, noise, slots, out)
        provider = DISPATCH.select(args, backend)
        DISPATCH.learn(key, provider)
    provider.run(args)
    return provider


def _solver_step_impl(x, model_out, uncond, history, noise, coef, slots, guidance, guidance_t, clamp, out,
                      backend) -> None:
    _run(x, model_out, uncond, history, noise, coef, slots, guidance, guidance_t, clamp, out, backend)


_LIB.impl("solver_step", _solver_step_impl, "CompositeExplicitAutograd")


@torch.library.register_fake("fastdiff::solver_step", lib=_LIB)
def _solver_step_fake(x, model_out, uncond, history, noise, coef, slots, guidance, guidance_t, clamp, out, backend):
    check_solver_step_args(x, model_out, uncond, history, noise, coef, slots, guidance, clamp, out, guidance_t)
    # a forced backend that cannot run fails at trace time too
    DISPATCH.select(SolverStepArgs(x, model_out, uncond, history, noise, list(coef), list(slots), guidance,
                                   clamp, out, guidance_t), backend)
    return None


def _numbers(name: str, values, n: int, kind):
    try:
        seq = [kind(v) for v in values]
    except (TypeError, ValueError) as e:
        raise _fail(TypeError, f"{name} must be a sequence of {n} numbers, got {values!r} ({e})") from None
    if len(seq) != n:
        what = "(p, q, a, b0, b1, b2, b3, c, r)" if name == "coef" else "(write, read1, read2, read3; -1 = unused)"
        raise _fail(ValueError, f"{name} must have {n} entries {what}, got {len(seq)}")
    if kind is int and any(isinstance(v, float) and v != int(v) for v in values):
        raise _fail(ValueError, f"{name} must hold integers, got {values!r}")
    return seq


def solver_step(
    x: torch.Tensor,
    model_out: torch.Tensor,
    uncond: Optional[torch.Tensor] = None,
    history: Optional[torch.Tensor] = None,
    noise: Optional[torch.Tensor] = None,
    *,
    coef: Sequence[float],
    slots: Sequence[int],
    guidance: Union[float, torch.Tensor] = 1.0,
    clamp: float = 0.0,
    out: Optional[torch.Tensor] = None,
    backend: str = "auto",
) -> torch.Tensor:
    """One solver step in one kernel; returns the next state (`out`, allocated if None).

    x          solver state, shape (B, ...), float32 (default) or the model's dtype; dense
               (contiguous or channels_last -- every tensor must share x's layout).
    model_out  the model output in float32/float16/bfloat16: shape (B, ...), or (2B, ...) for
               CFG with the unconditional half first (diffusers order) when uncond is None.
    uncond     unconditional model output (CFG), same shape/dtype as model_out.
    history    ring buffer of earlier data predictions, shape (S, *x.shape), x's dtype.
    noise      the step's noise (SDE/ancestral solvers), like x.
    coef       (p, q, a, b0, b1, b2, b3, c, r), host floats (a float64 table row); r weighs the
               unclamped data prediction, b0 the clamped one (the same without clamp).
    slots      (write, read D_{i-1}, read D_{i-2}, read D_{i-3}) history slots, -1 = unused; the
               write slot may equal a read slot (it is read first).
    guidance   CFG scale w: m = m_u + w (m_c - m_u). Must be 1.0 without CFG. A Python number
               is baked into the launch; a one-element float32 tensor on x's device is read by
               the kernel when it runs (a CUDA graph replays with its current value).
    clamp      clamp D to [-clamp, clamp] when > 0 (Dc; the history stores Dc).
    out        output buffer like x; may be x itself (in-place update).
    backend    "auto" | "cuda" | "triton" | "cpu" | "reference"; a forced backend that cannot
               run raises BackendUnavailableError.

    Writes history[slots[0]] = Dc_i when slots[0] >= 0. All checks run before any write.
    """
    call = (x, model_out, uncond, history, noise, coef, slots, guidance, clamp, out, backend)
    if _C is not None and not torch.compiler.is_compiling():  # compile traces the registered op
        done = _C.solver_step_known(*call)  # a call checked before, in C++; None otherwise
        if done is not None:
            return done
    if not isinstance(x, torch.Tensor):
        raise _fail(TypeError, f"x must be a torch.Tensor, got {type(x).__name__}")
    if not isinstance(model_out, torch.Tensor):
        raise _fail(TypeError, f"model_out must be a torch.Tensor, got {type(model_out).__name__}")
    coef = _numbers("coef", coef, len(COEF_NAMES), float)
    slots = _numbers("slots", slots, 4, int)
    guidance_t = None
    if isinstance(guidance, torch.Tensor):
        guidance_t, guidance = guidance, 1.0  # read on the device by the kernel, never on the host
    for name, v in (("guidance", guidance), ("clamp", clamp)):
        if isinstance(v, torch.Tensor):
            raise _fail(TypeError, f"{name} must be a Python number (a host scalar baked into the launch), got a "
                                   f"tensor; reading a device tensor would synchronise (and break CUDA graph capture)")
        if type(v) is not float and (not isinstance(v, numbers.Real) or isinstance(v, bool)):
            raise _fail(TypeError, f"{name} must be a Python number, got {type(v).__name__}")
    xs, ms = x.shape, model_out.shape
    if uncond is None and len(ms) == len(xs) >= 1 and xs[0] > 0 and ms[0] == 2 * xs[0] and ms[1:] == xs[1:]:
        uncond, model_out = model_out.chunk(2)  # diffusers order: (uncond, cond)
    if out is None:
        if x.dim() == 0 or not _is_dense(x):  # report it as x's problem, before allocating
            check_solver_step_args(x, model_out, uncond, history, noise, coef, slots, guidance, clamp, x)
        out = torch.empty_like(x)  # keeps x's dense layout (contiguous or channels_last)
    if _dispatch.direct(x, model_out, uncond, history, noise, out, guidance_t):
        provider = _run(x, model_out, uncond, history, noise, coef, slots, float(guidance), guidance_t,
                        float(clamp), out, backend)
        if _C is not None and provider.run is _run_compiled:
            _C.solver_step_learn(*call)  # the call as given: the next such call runs from the top
    else:  # the registered op: torch.compile, modes, fake tensors
        torch.ops.fastdiff.solver_step(x, model_out, uncond, history, noise, coef, slots, float(guidance),
                                       guidance_t, float(clamp), out, backend)
    return out
