"""Triton flash-attention forward for `fastdiff::attention` (contract: fastdiff/ops/attention.py).

    out[b, h] = softmax(scale * q[b, h] @ k[b, h]^T) @ v[b, h]       (no causal mask, no dropout)

q (B, H, Lq, D), k and v (B, H, Lk, D), out (B, H, Lq, D), each with ARBITRARY strides: the
kernel takes all 16 strides, so q/k/v can be head-split views of one packed QKV projection
output (B, L, 3, H, D) and `out` a view of a (B, L, H, D) buffer -- nothing is copied or
transposed on the host. Triton specialises strides equal to 1 at compile time, so the usual
contiguous head dimension gets vector loads.

Design (one program = one BLOCK_M tile of queries of one (batch, head)):

* 1-D grid of cdiv(Lq, BLOCK_M) * B * H programs, the query-tile index varying fastest so
  that programs running together read the same head's K/V (L2 reuse); no grid-dim limits.
* The Q tile is loaded once; the loop walks K/V in BLOCK_N tiles: S = Q K^T (tl.dot, fp32
  accumulation), online softmax in base 2 (running row max m of the RAW scores and row sum l
  in fp32; p = exp2((s - m) * scale * log2(e)): the subtraction is exact near the max, so the
  result does not depend on the compiler contracting s * c - m into an FMA -- with large
  scores the uncontracted form loses ~1e-6 in fp32, measurably more than eager),
  acc = acc * alpha + P V with P rounded to the input dtype for the second tl.dot (as every
  flash-attention does), out = acc / l rounded once at the store.
* Masking costs nothing in the steady state: the loop runs over the Lk // BLOCK_N full K/V
  tiles with no key mask; a single masked tail tile (keys >= Lk get score -inf and V rows
  loaded as 0, so 0 * garbage never makes a NaN) follows only when BLOCK_N does not divide Lk.
  Query rows >= Lq are masked at the Q load and the store only.
* Head dims that are not powers of two are split into two power-of-two parts instead of
  being padded to the next power of two: D = D0 + D1 with D0 the largest power of two <= D
  and D1 = max(16, next_pow2(D - D0)) (0 when D is a power of two). Each part has its own
  tl.dot / accumulator; only the part that runs past D is masked. So D = 80 computes on
  64 + 16 columns (not 128), D = 160 on 128 + 32 (not 256), D = 40 on 32 + 16 (not 64):
  37.5 % / 37.5 % / 25 % less tensor-core work and K/V tile traffic than padding. (tl.dot
  needs power-of-two shapes >= 16, hence the split rather than an exact 80.)
* int64 base offsets per (batch, head) and per query tile; per-tile offsets stay small, and
  K/V pointers advance by BLOCK_N rows each step, so tensors past 2^31 elements index right.
* Alignment: the host passes the batch/head/row strides divided by ALIGN (the largest power
  of two <= 16 dividing them all) and the kernel multiplies them back by the constexpr, so the
  compiler knows every tile row starts on an ALIGN-element boundary. Triton's own argument
  specialisation only knows "divisible by 16", which the SD head dims miss (D = 40: strides
  40, 3*8*40, ...): without the hint the loads are scalar, the K/V loads are not software-
  pipelined into shared memory (no cp.async) and the kernel spills (255 registers, 0.8-2.6 KB
  of stack per thread on sm_90a); with it: cp.async multi-buffering, no spills.
* fp32 inputs use input_precision="ieee" for both dots (no TF32: eager fp32 attention is
  full fp32 and the error bound is relative to it); fp16/bf16 use the tensor cores directly.

Tuning: on a GPU the kernel is autotuned over six (BLOCK_M, BLOCK_N, num_warps, num_stages)
configs for Hopper (wgmma: 128-row tiles with 8 warps) and Ampere (mma.sync, cp.async
pipelining with 3-4 stages), pruned by head dim, Lk and GPU generation (`gpu_configs`) to
those that neither spill nor overflow shared memory (CI compiles each allowed config for
sm_90a and sm_80 and reads cuobjdump's resource usage); the key is (Lq, Lk, D, dtype). Autotuning runs on the first call of a
shape: do that call before capturing a CUDA graph. Under the Triton interpreter (CPU tensors,
TRITON_INTERPRET=1) a fixed small config runs instead. FASTDIFF_ATTENTION_AUTOTUNE=0 skips
autotuning on the GPU and uses a per-head-dim heuristic config (fast first call).

The @triton.jit / @triton.autotune wrappers are created lazily at the first launch, so that
TRITON_INTERPRET is read when the kernel is used rather than when this module is imported.
"""
from __future__ import annotations

import functools
import math
import os
from contextlib import nullcontext
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256  # D0 + D1 <= 256: two 128-column parts at most (SDPA's limit too)


def _attention_fwd_kernel(
    Q, K, V, O,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    H, Lq, Lk, qk_scale,
    HEAD_D: tl.constexpr,     # the real head dim D
    BLOCK_D0: tl.constexpr,   # first part of D (power of two)
    BLOCK_D1: tl.constexpr,   # second part (power of two >= 16), 0 when D0 covers D
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_TY: tl.constexpr,     # dtype fed to tl.dot: the input dtype (fp32 for bf16 in the interpreter)
    ALIGN: tl.constexpr,      # the batch/head/row strides are passed divided by ALIGN (see below)
):
    # Multiplying back by the constexpr ALIGN tells the compiler these strides are multiples
    # of ALIGN elements, so every row of every tile starts 16-byte aligned when the tensors
    # allow it (e.g. D = 40 fp16: strides 40, 3*H*40, ... are multiples of 8 but not of 16,
    # and Triton's own specialisation only knows "divisible by 16"). Without it the loads
    # are scalar, nothing is software-pipelined (no cp.async), and the kernel spills.
    stride_qb *= ALIGN
    stride_qh *= ALIGN
    stride_qm *= ALIGN
    stride_kb *= ALIGN
    stride_kh *= ALIGN
    stride_kn *= ALIGN
    stride_vb *= ALIGN
    stride_vh *= ALIGN
    stride_vn *= ALIGN
    stride_ob *= ALIGN
    stride_oh *= ALIGN
    stride_om *= ALIGN
    MASK_D0: tl.constexpr = BLOCK_D0 > HEAD_D
    HAS_D1: tl.constexpr = BLOCK_D1 > 0
    MASK_D1: tl.constexpr = BLOCK_D0 + BLOCK_D1 > HEAD_D

    num_m = tl.cdiv(Lq, BLOCK_M)
    pid = tl.program_id(0)
    pid_m = pid % num_m
    bh = pid // num_m
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    start_m = pid_m * BLOCK_M

    q_base = Q + b * stride_qb + h * stride_qh + start_m.to(tl.int64) * stride_qm
    o_base = O + b * stride_ob + h * stride_oh + start_m.to(tl.int64) * stride_om
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh

    offs_m = tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d0 = tl.arange(0, BLOCK_D0)
    row_ok = offs_m < Lq - start_m

    # ---- Q tile (and its second head-dim part), loaded once
    if MASK_D0:
        dmask0 = offs_d0 < HEAD_D
        q_mask0 = row_ok[:, None] & dmask0[None, :]
    else:
        q_mask0 = row_ok[:, None]
    q0 = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d0[None, :] * stride_qd, mask=q_mask0, other=0.0)
    q0 = q0.to(DOT_TY)
    k_ptrs0 = k_base + offs_n[:, None] * stride_kn + offs_d0[None, :] * stride_kd
    v_ptrs0 = v_base + offs_n[:, None] * stride_vn + offs_d0[None, :] * stride_vd
    acc0 = tl.zeros([BLOCK_M, BLOCK_D0], dtype=tl.float32)
    if HAS_D1:
        offs_d1 = BLOCK_D0 + tl.arange(0, BLOCK_D1)
        if MASK_D1:
            dmask1 = offs_d1 < HEAD_D
            q_mask1 = row_ok[:, None] & dmask1[None, :]
        else:
            q_mask1 = row_ok[:, None]
        q1 = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d1[None, :] * stride_qd, mask=q_mask1, other=0.0)
        q1 = q1.to(DOT_TY)
        k_ptrs1 = k_base + offs_n[:, None] * stride_kn + offs_d1[None, :] * stride_kd
        v_ptrs1 = v_base + offs_n[:, None] * stride_vn + offs_d1[None, :] * stride_vd
        acc1 = tl.zeros([BLOCK_M, BLOCK_D1], dtype=tl.float32)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)

    # ---- full K/V tiles: no key mask
    n_full = Lk // BLOCK_N
    for _ in range(0, n_full):
        if MASK_D0:
            k0 = tl.load(k_ptrs0, mask=dmask0[None, :], other=0.0)
        else:
            k0 = tl.load(k_ptrs0)
        s = tl.dot(q0, tl.trans(k0.to(DOT_TY)), input_precision=DOT_PRECISION)
        if HAS_D1:
            if MASK_D1:
                k1 = tl.load(k_ptrs1, mask=dmask1[None, :], other=0.0)
            else:
                k1 = tl.load(k_ptrs1)
            s = tl.dot(q1, tl.trans(k1.to(DOT_TY)), acc=s, input_precision=DOT_PRECISION)
        # m is the running max of the raw scores (scale > 0, checked by the op, so it is also
        # the max of the scaled ones); the scale multiplies s - m, which is exact near the max
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2((m_i - m_new) * qk_scale)
        p = tl.math.exp2((s - m_new[:, None]) * qk_scale)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        if MASK_D0:
            v0 = tl.load(v_ptrs0, mask=dmask0[None, :], other=0.0)
        else:
            v0 = tl.load(v_ptrs0)
        acc0 = tl.dot(p.to(V.dtype.element_ty).to(DOT_TY), v0.to(DOT_TY), acc=acc0 * alpha[:, None],
                      input_precision=DOT_PRECISION)
        if HAS_D1:
            if MASK_D1:
                v1 = tl.load(v_ptrs1, mask=dmask1[None, :], other=0.0)
            else:
                v1 = tl.load(v_ptrs1)
            acc1 = tl.dot(p.to(V.dtype.element_ty).to(DOT_TY), v1.to(DOT_TY), acc=acc1 * alpha[:, None],
                          input_precision=DOT_PRECISION)
            k_ptrs1 += BLOCK_N * stride_kn
            v_ptrs1 += BLOCK_N * stride_vn
        k_ptrs0 += BLOCK_N * stride_kn
        v_ptrs0 += BLOCK_N * stride_vn

    # ---- the masked tail tile (keys n_full * BLOCK_N .. Lk - 1), only when BLOCK_N does not divide Lk
    n_left = Lk - n_full * BLOCK_N
    if n_left > 0:
        key_ok = offs_n < n_left
        if MASK_D0:
            kv_mask0 = key_ok[:, None] & dmask0[None, :]
        else:
            kv_mask0 = key_ok[:, None]
        k0 = tl.load(k_ptrs0, mask=kv_mask0, other=0.0)
        s = tl.dot(q0, tl.trans(k0.to(DOT_TY)), input_precision=DOT_PRECISION)
        if HAS_D1:
            if MASK_D1:
                kv_mask1 = key_ok[:, None] & dmask1[None, :]
            else:
                kv_mask1 = key_ok[:, None]
            k1 = tl.load(k_ptrs1, mask=kv_mask1, other=0.0)
            s = tl.dot(q1, tl.trans(k1.to(DOT_TY)), acc=s, input_precision=DOT_PRECISION)
        s = tl.where(key_ok[None, :], s, float("-inf"))
        # every row has a finite max: key 0 is valid (Lk >= 1), in this tile or an earlier one
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.math.exp2((m_i - m_new) * qk_scale)
        p = tl.math.exp2((s - m_new[:, None]) * qk_scale)
        l_i = l_i * alpha + tl.sum(p, 1)
        m_i = m_new
        v0 = tl.load(v_ptrs0, mask=kv_mask0, other=0.0)
        acc0 = tl.dot(p.to(V.dtype.element_ty).to(DOT_TY), v0.to(DOT_TY), acc=acc0 * alpha[:, None],
                      input_precision=DOT_PRECISION)
        if HAS_D1:
            v1 = tl.load(v_ptrs1, mask=kv_mask1, other=0.0)
            acc1 = tl.dot(p.to(V.dtype.element_ty).to(DOT_TY), v1.to(DOT_TY), acc=acc1 * alpha[:, None],
                          input_precision=DOT_PRECISION)

    # ---- normalise and store (rows >= Lq and columns >= D masked)
    inv_l = 1.0 / l_i
    out0 = (acc0 * inv_l[:, None]).to(O.dtype.element_ty)
    tl.store(o_base + offs_m[:, None] * stride_om + offs_d0[None, :] * stride_od, out0, mask=q_mask0)
    if HAS_D1:
        out1 = (acc1 * inv_l[:, None]).to(O.dtype.element_ty)
        tl.store(o_base + offs_m[:, None] * stride_om + offs_d1[None, :] * stride_od, out1, mask=q_mask1)


# ---------------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------------

def split_head_dim(d: int) -> Tuple[int, int]:
    """(D0, D1): the two power-of-two tile widths covering head dim `d` (see the module doc)."""
    if d <= 16:
        return 16, 0
    d0 = 1 << (d.bit_length() - 1)  # largest power of two <= d
    rest = d - d0
    if rest == 0:
        return d0, 0
    return d0, max(16, triton.next_power_of_2(rest))


# (BLOCK_M, BLOCK_N, num_warps, num_stages), fp16/bf16. Which of them each GPU may use is decided
# by `gpu_configs` from offline compiles (tests/test_attention.py compiles every config it allows
# for sm_90a and sm_80 and fails on any spill or shared-memory overflow).
GPU_CONFIGS = (
    (128, 64, 8, 3),   # Hopper: two warpgroups of 64 rows each (wgmma)
    (128, 128, 8, 3),  # small D, long Lk: fewer softmax rescales per key
    (128, 64, 4, 3),   # Ampere-style 4 warps x 32 rows; D <= 64 only (spills beyond)
    (64, 64, 4, 3),    # short sequences / few heads: twice the programs
    (128, 32, 8, 4),   # large D (160 -> 128 + 32): small K/V tiles, deeper pipeline
    (64, 32, 4, 4),    # large D on Ampere, and the 77-token cross-attention
)
# Interpreter: one fixed config. Small tiles keep the numpy work per step small and make
# tiny test shapes cover several query tiles, several full K/V tiles and a masked tail.
INTERPRET_CONFIG = (32, 16, 1, 1)


def gpu_configs(d: int, lk: int, cc: int) -> list:
    """The GPU_CONFIGS that head dim `d` may use on compute capability `cc` (major * 10 +
    minor) for fp16/bf16 inputs: none that spills registers or overflows shared memory in the
    offline compiles (sm_90a: 227 KB of shared memory per block, sm_80: 163 KB). Empty: the
    Triton kernel does not run that head dim on that GPU. fp32 inputs have no GPU config: the
    FMA (ieee) dots spill at every tile size tried, down to 16 x 32."""
    d_tile = sum(split_head_dim(d))
    keep = []
    for c in GPU_CONFIGS:
        bm, bn, warps, _ = c
        if bn == 128 and (d_tile > 128 or lk <= 64):
            continue  # K/V tiles 128 x 160 x 3 stages overflow shared memory; Lk <= 64: all tail anyway
        if bm == 128 and warps == 4 and d_tile > 64:
            continue  # a 128-row fp32 accumulator in 4 warps spills for D >= 80
        if d_tile > 160 and (cc < 90 or bn > 32):
            continue  # D = 256: sm_80 spills with every config; sm_90a with 64-key tiles
        if cc < 90 and d_tile > 64 and c != (128, 32, 8, 4):
            continue  # sm_80 at D in 80..160: only this one is spill-free at 80, 128 and 160
        keep.append(c)
    return keep


def _prune(configs, named_args, capability=None, **kwargs):
    """Autotuner hook: GPU_CONFIGS allowed by `gpu_configs` on `capability` (default: the
    current device's)."""
    d = kwargs.get("HEAD_D", named_args.get("HEAD_D"))
    major, minor = capability or torch.cuda.get_device_capability()
    allowed = gpu_configs(int(d), int(named_args["Lk"]), major * 10 + minor)
    return [c for c in configs
            if (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages) in allowed]


def heuristic_config(d: int, lk: int, cc: int) -> Tuple[int, int, int, int]:
    """The config used when autotuning is off (FASTDIFF_ATTENTION_AUTOTUNE=0): a guess among
    `gpu_configs`, not a measurement -- 128-row tiles with 8 warps, K/V tiles narrower for big
    head dims."""
    allowed = gpu_configs(d, lk, cc)
    d_tile = sum(split_head_dim(d))
    guess = (128, 32, 8, 4) if d_tile > 128 else (128, 128, 8, 3) if d_tile <= 64 and lk >= 512 else (128, 64, 8, 3)
    return guess if guess in allowed else allowed[0]


MAX_ALIGN = 16


def stride_alignment(*tensors: torch.Tensor) -> int:
    """The largest power of two (<= MAX_ALIGN) dividing every batch/head/row stride of the
    tensors (dims of size 1 ignored: they are only indexed at 0)."""
    g = 0
    for t in tensors:
        for n, st in zip(t.shape[:3], t.stride()[:3]):
            if n > 1:
                g = math.gcd(g, st)
    if g == 0:
        return MAX_ALIGN
    return min(MAX_ALIGN, g & -g)


_TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32}
_KERNELS: dict = {}


# Integer arguments Triton would otherwise specialise on (== 1, % 16): the strides that ALIGN
# already describes, and the sizes. Not specialising them keeps one compiled kernel per (head
# dim, dtype, ALIGN, config) across shapes and layouts (no recompile for a new resolution or
# layout); the head-dim strides stay specialised (== 1: vector loads).
_NO_SPECIALIZE = [f"stride_{t}{d}" for t in "qkvo" for d in ("b", "h", "n" if t in "kv" else "m")] + ["H", "Lq", "Lk"]


def _jit():
    return triton.jit(_attention_fwd_kernel, do_not_specialize=_NO_SPECIALIZE)


def make_autotuned(do_bench=None, capability=None):
    """A fresh @triton.autotune'd kernel over GPU_CONFIGS (pruned by `_prune`), keyed by
    (Lq, Lk, D, precision) and the dtypes. `do_bench` replaces Triton's benchmarker and
    `capability` the device's (tests run the whole autotuning path under the interpreter with
    stand-ins)."""
    configs = [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s)
               for bm, bn, w, s in GPU_CONFIGS]
    return triton.autotune(configs, key=["Lq", "Lk", "HEAD_D", "DOT_PRECISION"],
                           prune_configs_by={"early_config_prune": functools.partial(_prune, capability=capability)},
                           do_bench=do_bench)(_jit())


def _kernel(kind: str):
    """The jitted kernel: "interpret" (plain jit under the interpreter), "fixed" (plain jit,
    config passed at launch) or "autotune"."""
    k = _KERNELS.get(kind)
    if k is None:
        k = _KERNELS[kind] = make_autotuned() if kind == "autotune" else _jit()
    return k


def _autotune_enabled() -> bool:
    return os.environ.get("FASTDIFF_ATTENTION_AUTOTUNE", "1").strip().lower() not in ("0", "false", "no", "off")


def attention_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    scale: float,
    config: Optional[Tuple[int, int, int, int]] = None,
    *,
    autotuned=None,
) -> None:
    """Launch on q's device (current stream). Inputs must already be validated by
    `fastdiff.ops.attention.check_attention_args` (shapes, dtypes, devices, scale > 0, no
    overlap of out with the inputs). `config` = (BLOCK_M, BLOCK_N, num_warps, num_stages)
    forces one config (tests); by default: autotuned on a GPU, INTERPRET_CONFIG on the CPU.
    `autotuned` (from `make_autotuned`) forces that autotuner (tests)."""
    from triton import knobs

    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if out.numel() == 0:
        return
    d0, d1 = split_head_dim(D)
    if d0 + d1 > MAX_HEAD_DIM:
        raise ValueError(f"attention_triton: head dim {D} > {MAX_HEAD_DIM}")
    interpret = bool(knobs.runtime.interpret)
    if q.device.type == "cpu" and not interpret:
        raise RuntimeError("attention_triton: CPU tensors need the Triton interpreter (TRITON_INTERPRET=1)")
    if q.device.type == "cuda":
        why = gpu_unsupported(q.dtype, D, torch.cuda.get_device_capability(q.device))
        if why:
            raise ValueError(f"attention_triton: {why}")
    precision = "ieee" if q.dtype == torch.float32 else "tf32"  # "tf32" is ignored for 16-bit inputs
    align = stride_alignment(q, k, v, out)
    strides = []
    for t in (q, k, v, out):
        st = t.stride()
        # size-1 dims are only ever indexed at 0: their stride is irrelevant (pass 0)
        strides += [st[i] // align if t.shape[i] > 1 else 0 for i in range(3)] + [st[3]]
    args = (q, k, v, out, *strides, H, Lq, Lk, float(scale) * LOG2E)
    # The interpreter stores bf16 as uint16 and its tl.dot multiplies the bit patterns
    # (triton-lang/triton#11584; its debugging guide: no bf16 arithmetic, cast to fp32). There
    # the bf16 operands (P already rounded to bf16) are widened to fp32 first, which gives the
    # same products (bf16 x bf16 is exact in fp32) with fp32 accumulation.
    dot_ty = tl.float32 if (interpret and q.dtype == torch.bfloat16) else _TL_DTYPES[q.dtype]
    meta = dict(HEAD_D=D, BLOCK_D0=d0, BLOCK_D1=d1, DOT_PRECISION=precision, DOT_TY=dot_ty, ALIGN=align,
                # explicit: FMA contraction on (Triton 3.10 turns its default off); the numerics do not
                # rely on it (see the module doc), the speed does a little
                enable_fp_fusion=True)
    if autotuned is None:
        if config is None and interpret:
            config = INTERPRET_CONFIG
        if config is None and not _autotune_enabled():
            major, minor = torch.cuda.get_device_capability(q.device)
            config = heuristic_config(D, Lk, major * 10 + minor)
    with torch.cuda.device(q.device) if q.device.type == "cuda" else nullcontext():
        if config is not None:
            bm, bn, warps, stages = config
            grid = (triton.cdiv(Lq, bm) * B * H,)
            _kernel("interpret" if interpret else "fixed")[grid](
                *args, **meta, BLOCK_M=bm, BLOCK_N=bn, num_warps=warps, num_stages=stages)
        else:
            grid = lambda meta_: (triton.cdiv(Lq, meta_["BLOCK_M"]) * B * H,)  # noqa: E731
            (autotuned or _kernel("autotune"))[grid](*args, **meta)


def gpu_unsupported(dtype: torch.dtype, d: int, capability: Tuple[int, int]) -> Optional[str]:
    """Why the kernel does not run `dtype` inputs of head dim `d` on a GPU of this compute
    capability, or None."""
    if dtype == torch.float32:
        return "float32 inputs do not run on a GPU (the FMA dots spill registers at every tile size)"
    cc = capability[0] * 10 + capability[1]
    if not gpu_configs(d, 4096, cc):
        return f"head dim {d} on sm_{cc}: every tile config spills registers"
    return None


def flops(batch: int, heads: int, lq: int, lk: int, head_dim: int) -> int:
    """Useful floating-point operations of one forward: 2 GEMMs of 2*Lq*Lk*D each."""
    return 4 * batch * heads * lq * lk * head_dim


__all__ = ["attention_triton", "make_autotuned", "split_head_dim", "stride_alignment", "heuristic_config",
           "gpu_configs", "gpu_unsupported", "GPU_CONFIGS", "INTERPRET_CONFIG", "MAX_HEAD_DIM", "flops"]
