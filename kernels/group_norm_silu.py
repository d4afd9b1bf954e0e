"""Triton kernel for `fastdiff::group_norm_silu` (contract and numerics: fastdiff/ops/group_norm_silu.py).

A group (sample n, group g) is a 2-D matrix [R, K] whose last dimension is contiguous in memory:

    contiguous    (N, C, S):  R = C/G channels, K = S positions, row stride S
    channels-last (N, S, C):  R = S positions,  K = C/G channels, row stride C

cut into tiles of [BLOCK_R, BLOCK_K] (row-major over the tile grid). One program handles a
chunk of consecutive tiles of one group; the grid is (N * G, chunks), groups varying fastest so
that programs running together touch neighbouring memory (channels-last groups interleave).

One kernel, three modes (constexpr MODE):

    0  fused: the chunk is the whole group. Statistics, then normalise. When the group is one
       tile (SINGLE_TILE) it is read once and kept in registers; otherwise the normalise loop
       reads it again (from L2 on a GPU).
    1  partial statistics of the chunk -> workspace (count, mean, M2, x0) in fp32
    2  merge the group's partials (Chan), normalise the chunk

Split launches run MODE 1 then MODE 2 (x is read twice). Statistics: each tile gets an exact
two-pass mean/M2 in registers of d = (x - x0) + (temb[c] - temb0), tiles are merged with Chan's
formula; the output is (x - x0) * scale[c] + shift[c]. In-place (out = x) is safe: x0 of a
split group comes from the workspace in MODE 2, never from x, and every element is read before
it is written by the same program.

On CPU tensors this runs under the Triton interpreter (TRITON_INTERPRET=1). The @triton.jit
wrapper is created lazily, at the first launch, so that TRITON_INTERPRET is read when the
kernel is used rather than when this module is imported.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl


def _group_norm_silu_kernel(
    x_ptr, w_ptr, b_ptr, t_ptr, r_ptr, out_ptr, ws_ptr,
    G, CPG, R, K, ROW_STRIDE, SAMPLE_STRIDE, GROUP_STRIDE,
    W_S, B_S, T_SN, T_SC,
    TILES_K, NUM_TILES, TILES_PER_CHUNK, NSPLIT,
    group_size, eps,
    MODE: tl.constexpr, CL: tl.constexpr,
    HAS_W: tl.constexpr, HAS_B: tl.constexpr, HAS_T: tl.constexpr, HAS_R: tl.constexpr, SILU: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE_TILE: tl.constexpr, NSPLIT_P2: tl.constexpr,
):
    ng = tl.program_id(0)
    s = tl.program_id(1)
    n = ng // G
    g = ng - n * G
    base = n.to(tl.int64) * SAMPLE_STRIDE + g.to(tl.int64) * GROUP_STRIDE
    c0 = g * CPG
    rr = tl.arange(0, BLOCK_R)
    kk = tl.arange(0, BLOCK_K)
    t_begin = s * TILES_PER_CHUNK
    t_end = tl.minimum(t_begin + TILES_PER_CHUNK, NUM_TILES)
    t_row = t_ptr + n.to(tl.int64) * T_SN
    kt = 0.0
    if HAS_T:
        kt = tl.load(t_row + c0.to(tl.int64) * T_SC).to(tl.float32)
    ws_group = ws_ptr + ng.to(tl.int64) * (NSPLIT * 4)
    if MODE == 2:
        kx = tl.load(ws_group + 3)
    else:
        kx = tl.load(x_ptr + base).to(tl.float32)

    # ------------------------------------------------------------------ statistics
    if MODE == 2:
        idx = tl.arange(0, NSPLIT_P2)
        pmask = idx < NSPLIT
        pc = tl.load(ws_group + idx * 4, mask=pmask, other=0.0)
        pmean = tl.load(ws_group + idx * 4 + 1, mask=pmask, other=0.0)
        pm2 = tl.load(ws_group + idx * 4 + 2, mask=pmask, other=0.0)
        n_acc = tl.sum(pc, axis=0)
        mean_acc = tl.sum(pc * pmean, axis=0) / n_acc
        dm = pmean - mean_acc
        m2_acc = tl.sum(pm2, axis=0) + tl.sum(pc * dm * dm, axis=0)
    elif SINGLE_TILE:
        rmask = rr < R
        kmask = kk < K
        mask = rmask[:, None] & kmask[None, :]
        offs = base + rr.to(tl.int64)[:, None] * ROW_STRIDE + kk[None, :]
        xv = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        d = xv - kx
        if HAS_T:
            if CL:
                tv = tl.load(t_row + (c0 + kk).to(tl.int64) * T_SC, mask=kmask, other=0.0).to(tl.float32) - kt
                d = d + tv[None, :]
            else:
                tv = tl.load(t_row + (c0 + rr).to(tl.int64) * T_SC, mask=rmask, other=0.0).to(tl.float32) - kt
                d = d + tv[:, None]
        d = tl.where(mask, d, 0.0)
        n_acc = group_size
        mean_acc = tl.sum(tl.reshape(d, [BLOCK_R * BLOCK_K]), axis=0) / n_acc
        dc = tl.where(mask, d - mean_acc, 0.0)
        m2_acc = tl.sum(tl.reshape(dc * dc, [BLOCK_R * BLOCK_K]), axis=0)
    else:
        n_acc = 0.0
        mean_acc = 0.0
        m2_acc = 0.0
        for t in range(t_begin, t_end):
            tr = t // TILES_K
            tk = t - tr * TILES_K
            rows = tr * BLOCK_R + rr
            cols = tk * BLOCK_K + kk
            rmask = rows < R
            kmask = cols < K
            mask = rmask[:, None] & kmask[None, :]
            offs = base + rows.to(tl.int64)[:, None] * ROW_STRIDE + cols[None, :]
            xv = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            d = xv - kx
            if HAS_T:
                if CL:
                    tv = tl.load(t_row + (c0 + cols).to(tl.int64) * T_SC, mask=kmask, other=0.0).to(tl.float32) - kt
                    d = d + tv[None, :]
                else:
                    tv = tl.load(t_row + (c0 + rows).to(tl.int64) * T_SC, mask=rmask, other=0.0).to(tl.float32) - kt
                    d = d + tv[:, None]
            d = tl.where(mask, d, 0.0)
            cnt = (tl.minimum(R - tr * BLOCK_R, BLOCK_R) * tl.minimum(K - tk * BLOCK_K, BLOCK_K)).to(tl.float32)
            tmean = tl.sum(tl.reshape(d, [BLOCK_R * BLOCK_K]), axis=0) / cnt
            dc = tl.where(mask, d - tmean, 0.0)
            tm2 = tl.sum(tl.reshape(dc * dc, [BLOCK_R * BLOCK_K]), axis=0)
            # Chan et al.: merge (n_acc, mean_acc, m2_acc) with the tile's (cnt, tmean, tm2)
            n_new = n_acc + cnt
            delta = tmean - mean_acc
            mean_acc = mean_acc + delta * (cnt / n_new)
            m2_acc = m2_acc + tm2 + delta * delta * (n_acc * cnt / n_new)
            n_acc = n_new

    if MODE == 1:
        ws_chunk = ws_group + s * 4
        tl.store(ws_chunk, n_acc)
        tl.store(ws_chunk + 1, mean_acc)
        tl.store(ws_chunk + 2, m2_acc)
        tl.store(ws_chunk + 3, kx)
    else:
        var = tl.maximum(m2_acc / n_acc, 0.0)
        rstd = 1.0 / tl.sqrt(var + eps)
        # ------------------------------------------------------------------ normalise
        if SINGLE_TILE:
            if CL:
                chv = c0 + kk
                chm = kmask
            else:
                chv = c0 + rr
                chm = rmask
            scale = chv.to(tl.float32) * 0.0 + rstd
            if HAS_W:
                scale = scale * tl.load(w_ptr + chv.to(tl.int64) * W_S, mask=chm, other=0.0).to(tl.float32)
            if HAS_T:
                shift = (tl.load(t_row + chv.to(tl.int64) * T_SC, mask=chm, other=0.0).to(tl.float32) - kt
                         - mean_acc) * scale
            else:
                shift = -mean_acc * scale
            if HAS_B:
                shift = shift + tl.load(b_ptr + chv.to(tl.int64) * B_S, mask=chm, other=0.0).to(tl.float32)
            if CL:
                y = (xv - kx) * scale[None, :] + shift[None, :]
            else:
                y = (xv - kx) * scale[:, None] + shift[:, None]
            if SILU:
                y = y / (1.0 + tl.exp(-y))  # y * sigmoid(y); -> -0 as y -> -inf, NaN stays NaN
            if HAS_R:
                y = y + tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)
        else:
            for t in range(t_begin, t_end):
                tr = t // TILES_K
                tk = t - tr * TILES_K
                rows = tr * BLOCK_R + rr
                cols = tk * BLOCK_K + kk
                rmask = rows < R
                kmask = cols < K
                mask = rmask[:, None] & kmask[None, :]
                offs = base + rows.to(tl.int64)[:, None] * ROW_STRIDE + cols[None, :]
                xv = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                if CL:
                    chv = c0 + cols
                    chm = kmask
                else:
                    chv = c0 + rows
                    chm = rmask
                scale = chv.to(tl.float32) * 0.0 + rstd
                if HAS_W:
                    scale = scale * tl.load(w_ptr + chv.to(tl.int64) * W_S, mask=chm, other=0.0).to(tl.float32)
                if HAS_T:
                    shift = (tl.load(t_row + chv.to(tl.int64) * T_SC, mask=chm, other=0.0).to(tl.float32) - kt
                             - mean_acc) * scale
                else:
                    shift = -mean_acc * scale
                if HAS_B:
                    shift = shift + tl.load(b_ptr + chv.to(tl.int64) * B_S, mask=chm, other=0.0).to(tl.float32)
                if CL:
                    y = (xv - kx) * scale[None, :] + shift[None, :]
                else:
                    y = (xv - kx) * scale[:, None] + shift[:, None]
                if SILU:
                    y = y / (1.0 + tl.exp(-y))  # y * sigmoid(y); -> -0 as y -> -inf, NaN stays NaN
                if HAS_R:
                    y = y + tl.load(r_ptr + offs, mask=mask, other=0.0).to(tl.float32)
                tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


_KERNELS: dict = {}


def _kernel():
    """The jitted kernel; a separate one for interpreter mode (decided by TRITON_INTERPRET)."""
    from triton import knobs

    interpret = bool(knobs.runtime.interpret)
    k = _KERNELS.get(interpret)
    if k is None:
        k = _KERNELS[interpret] = triton.jit(_group_norm_silu_kernel)
    return k


# Elements per tile: on a GPU 4096 (16 fp32 per thread at 8 warps); under the interpreter a
# program is interpreted in Python, so few, big tiles.
GPU_TILE = 4096
INTERP_TILE = 1 << 15
# Auto split on a GPU: aim for this many programs per SM, never chunks under MIN_CHUNK elements.
PROGRAMS_PER_SM = 4
MIN_CHUNK = 1024

_SM_COUNT: dict = {}


def _sm_count(device: torch.device) -> int:
    idx = device.index if device.index is not None else torch.cuda.current_device()
    n = _SM_COUNT.get(idx)
    if n is None:
        n = _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return n


def _prev_pow2(v: int) -> int:
    return 1 << (max(1, v).bit_length() - 1)


def plan(rows: int, cols: int, groups: int, num_splits: int, on_gpu: bool, sm_count: int = 132) -> dict:
    """Tile shape and split of one launch (pure arithmetic; exposed for tests and benchmarks).

    rows x cols is one group's matrix (see the module docstring), `groups` = N * G. Returns
    dict(block_r, block_k, tiles_k, num_tiles, tiles_per_chunk, nsplit, single_tile).
    """
    group_size = rows * cols
    tile_max = GPU_TILE if on_gpu else INTERP_TILE
    if num_splits >= 1:
        want = num_splits
    elif on_gpu:
        target = PROGRAMS_PER_SM * sm_count
        want = 1 if groups >= target else max(1, min(triton.cdiv(target, groups), group_size // MIN_CHUNK))
    else:
        want = 1
    want = min(want, 65535)  # grid dimension 1
    tile = tile_max
    if want > 1:
        tile = max(16, min(tile_max, _prev_pow2(group_size // want)))
    block_k = min(triton.next_power_of_2(cols), tile)
    block_r = min(triton.next_power_of_2(rows), max(1, tile // block_k))
    tiles_k = triton.cdiv(cols, block_k)
    num_tiles = triton.cdiv(rows, block_r) * tiles_k
    if want <= 1:
        per_chunk = num_tiles
    elif num_splits > 1:
        per_chunk = triton.cdiv(num_tiles, want)  # forced: at most `want` chunks
    else:
        per_chunk = max(1, num_tiles // want)  # auto: at least `want` chunks
    nsplit = triton.cdiv(num_tiles, per_chunk)
    return dict(block_r=block_r, block_k=block_k, tiles_k=tiles_k, num_tiles=num_tiles, tiles_per_chunk=per_chunk,
                nsplit=nsplit, single_tile=nsplit == 1 and num_tiles == 1)


def geometry(x: torch.Tensor, num_groups: int, channels_last: bool) -> Tuple[int, ...]:
    """(N, C, S, R, K, row_stride, sample_stride, group_stride) of x's group matrices."""
    n, c = x.shape[0], x.shape[1]
    s = x.numel() // max(1, n * c) if n * c else 0
    cpg = c // num_groups
    if channels_last:
        return n, c, s, s, cpg, c, s * c, cpg
    return n, c, s, cpg, s, s, c * s, cpg * s


def group_norm_silu_triton(
    x: torch.Tensor,
    num_groups: int,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float,
    silu: bool,
    temb: Optional[torch.Tensor],
    residual: Optional[torch.Tensor],
    num_splits: int,
    out: torch.Tensor,
) -> None:
    """Launch on x's device (current stream). Inputs must already be validated by
    `fastdiff.ops.group_norm_silu.check_group_norm_silu_args`."""
    if x.numel() == 0:
        return
    from fastdiff.ops.group_norm_silu import layout_of

    cl = layout_of(x) == "nsc"
    n, c, s, rows, cols, row_stride, sample_stride, group_stride = geometry(x, num_groups, cl)
    on_gpu = x.device.type == "cuda"
    groups = n * num_groups
    p = plan(rows, cols, groups, num_splits, on_gpu, _sm_count(x.device) if on_gpu else 132)
    block = p["block_r"] * p["block_k"]
    num_warps = max(1, min(8, block // 512)) if on_gpu else 4
    ws = x  # placeholder when unused (never read: MODE 0)
    if p["nsplit"] > 1:
        ws = torch.empty(groups * p["nsplit"] * 4, dtype=torch.float32, device=x.device)
    kernel = _kernel()
    common = (
        x, weight if weight is not None else x, bias if bias is not None else x, temb if temb is not None else x,
        residual if residual is not None else x, out, ws,
        num_groups, c // num_groups, rows, cols, row_stride, sample_stride, group_stride,
        weight.stride(0) if weight is not None else 0, bias.stride(0) if bias is not None else 0,
        temb.stride(0) if temb is not None else 0, temb.stride(1) if temb is not None else 0,
        p["tiles_k"], p["num_tiles"], p["tiles_per_chunk"], p["nsplit"], float(rows * cols), float(eps),
    )
    flags = dict(CL=cl, HAS_W=weight is not None, HAS_B=bias is not None, HAS_T=temb is not None,
                 HAS_R=residual is not None, SILU=bool(silu), BLOCK_R=p["block_r"], BLOCK_K=p["block_k"],
                 NSPLIT_P2=triton.next_power_of_2(p["nsplit"]), num_warps=num_warps)
    grid = (groups, p["nsplit"])
    with torch.cuda.device(x.device) if on_gpu else nullcontext():
        if p["nsplit"] == 1:
            kernel[grid](*common, MODE=0, SINGLE_TILE=p["single_tile"], **flags)
        else:
            kernel[grid](*common, MODE=1, SINGLE_TILE=False, **flags)
            kernel[grid](*common, MODE=2, SINGLE_TILE=False, **flags)
