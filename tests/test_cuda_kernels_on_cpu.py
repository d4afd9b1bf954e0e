"""The CUDA kernels themselves (csrc/*/*.cu, every launch variant) run on the CPU.

The sources are compiled as C++ against the CUDA emulation in csrc/cuda_on_cpu, with
AddressSanitizer and UBSan (tests/cuda_on_cpu.py): threads of a block are fibers with a real
__syncthreads barrier and 32-lane warp shuffles, run in a seeded random order between barriers,
and a data race between the threads of a block fails the launch.
Every result is checked, element by element, against the float64 reference of the op; outputs
start as NaN. What this cannot show (timing, races between blocks, the GPU's own __expf/rsqrtf
rounding) needs the GPU tests.
"""
from __future__ import annotations

import os
import re
import shutil
import zlib

import pytest
import torch

import cuda_on_cpu
from conftest import need
from fastdiff.ops.group_norm_silu import group_norm_silu_reference
from test_solver_step import HIST_CASES, make_case as make_step_case, poison, reference as step_reference
from tolerances import assert_close_each

F64 = torch.float64
NAN = float("nan")
DT = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
CODE = cuda_on_cpu.DTYPE_CODE
H100, ONE_SM = 0, 1  # the emulated devices (cuda_on_cpu::kDevices)


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


@pytest.fixture(scope="module")
def exe():
    need(shutil.which("g++") is not None, "g++ not found (needed to build the CUDA kernels for the CPU)")
    return cuda_on_cpu.build()


@pytest.fixture(scope="module")
def driver(exe):
    d = cuda_on_cpu.Driver(exe)
    yield d
    d.close()


def shifted(t: torch.Tensor, elems: int) -> torch.Tensor:
    """t's values and strides, stored `elems` elements into a fresh buffer (misaligned view)."""
    if elems == 0:
        return t
    buf = torch.empty(cuda_on_cpu.span(t).numel() + elems, dtype=t.dtype)
    v = buf.as_strided(t.shape, t.stride(), elems)
    v.copy_(t)
    return v


def bits(t: torch.Tensor) -> torch.Tensor:
    """t's memory image as bytes (NaN-safe equality)."""
    return cuda_on_cpu.span(t).view(torch.uint8)


# -------------------------------------------------------------------------------------------
# the emulation itself
# -------------------------------------------------------------------------------------------

def test_missing_syncthreads_is_caught(driver):
    """Threads write shared memory and read a neighbour's slot: right with the barrier, a race
    report without it."""
    assert driver.run("selftest_barrier", 1, {"sync": 1}, {})["wrong"] == "0"
    with pytest.raises(cuda_on_cpu.DriverError, match=r"data race in neighbour_kernel\(int\*, bool\) on .*: "
                                                       r"thread \(\d+,0,0\) and thread \(\d+,0,0\)"):
        driver.run("selftest_barrier", 1, {"sync": 0}, {})


# mode of race_kernel (kernel_driver.cc) -> the race report, or None
PLANTED_RACES = {
    0: r"dynamic shared memory \+0: thread \((\d+),0,0\) and thread \((\d+),0,0\) \(one writes, the other reads\)",
    1: None,  # the same accumulation with atomicAdd
    2: r"dynamic shared memory \+4: thread \((0|1),0,0\) and thread \((0|1),0,0\) \(one (reads|writes), the other",
    3: None,  # the same with __syncwarp between
    4: r"global memory 0x[0-9a-f]+: thread \((0|1),0,0\) and thread \((0|1),0,0\) \(both write\)",
}


@pytest.mark.parametrize("mode", list(PLANTED_RACES))
@pytest.mark.parametrize("seed", [1, 2])
def test_planted_races_are_reported_with_kernel_address_and_threads(driver, mode, seed):
    """0: every warp leader adds to a shared total without an atomic (the second leader reads
    what the first wrote, unordered); 2: lane 0 writes what lane 1 reads, no __syncwarp; 4: two
    threads write one global int."""
    pattern = PLANTED_RACES[mode]
    if pattern is None:
        assert driver.run("selftest_race", seed, {"mode": mode}, {})["wrong"] == "0"
        return
    race = r"data race in race_kernel\(int\*, int\*, int\) on "
    with pytest.raises(cuda_on_cpu.DriverError, match=race + pattern) as e:
        driver.run("selftest_race", seed, {"mode": mode}, {})
    threads = [int(v) for v in re.findall(r"thread \((\d+),0,0\)", str(e.value))]
    assert threads[0] != threads[1] and (mode != 0 or all(t % 32 == 0 for t in threads))


def test_warp_shuffles(driver):
    assert driver.run("selftest_shuffle", 2, {}, {})["wrong"] == "0"
    with pytest.raises(cuda_on_cpu.DriverError, match="outside the warp"):  # a 16-lane warp, full mask
        driver.run("selftest_shuffle", 2, {"threads": 48}, {})


def test_out_of_bounds_access_is_caught(exe):
    """AddressSanitizer is live: a solver_step told about one element more than its buffers
    hold ends the driver with a heap-buffer-overflow report."""
    d = cuda_on_cpu.Driver(exe)
    x = torch.randn(37)
    with pytest.raises(AssertionError, match="heap-buffer-overflow"):
        d.run("solver_step", 0, {"numel": 38, "c0": 1.0}, {"x": x, "model": x.clone(), "out": torch.empty(37)})


def test_missing_barrier_in_group_norm_is_caught(exe):
    """Mutation test on the real kernel: without block_merge's first __syncthreads, warp 0 reads
    partials that other warps write in the same barrier interval: a race, on shared memory."""
    src = os.path.join(cuda_on_cpu.CSRC, "group_norm_silu", "group_norm_silu.cu")
    text = open(src).read()
    barrier = "    sh[3 * warp + 2] = m2;\n  }\n  __syncthreads();\n"
    assert text.count(barrier) == 1
    d = cuda_on_cpu.Driver(cuda_on_cpu.build({src: text.replace(barrier, "    sh[3 * warp + 2] = m2;\n  }\n")}))
    try:
        case = gn_case((2, 64, 16, 16), 4, torch.float32, False, _seed("mutant"))
        with pytest.raises(cuda_on_cpu.DriverError, match=r"data race in group_norm_silu_fused_kernel<.*> on dynamic "
                                                           r"shared memory \+\d+: thread \(\d+,0,0\) and thread"):
            run_gn(d, case)
    finally:
        d.close()


# -------------------------------------------------------------------------------------------
# solver_step
# -------------------------------------------------------------------------------------------

# (model dtype, state dtype): every kernel instantiation
STEP_DTYPES = [("fp32", "fp32"), ("fp16", "fp16"), ("fp16", "fp32"), ("bf16", "bf16"), ("bf16", "fp32")]
# 105: all tail; 1836: VEC-multiple for fp32 and fp16; 17995 (odd): more than one grid-stride
# pass on the emulated 1-SM device (8 blocks of 256 threads) on the vector path too, plus a tail
STEP_SHAPES = [(1, 3, 7, 5), (3, 4, 17, 9), (1, 5, 61, 59)]
CFGS = ["none", "separate", "doubled"]
STEP_MATRIX = [(dt, s, mis) for dt in range(len(STEP_DTYPES)) for s in range(len(STEP_SHAPES)) for mis in (False, True)]
# which buffer a misaligned case shifts by one element (one is enough for the scalar path)
MISALIGN = ["x", "model", "noise", "out", "hist1"]


def step_buffers(case, out, misalign, in_place):
    """The kernel's pointers, as the binding derives them from the op's tensors; misalign: None,
    the index of one of the present MISALIGN buffers or any buffer's name: that buffer is
    shifted by one element. -> (bufs, (key, original))."""
    x = case["x"]
    b = x.shape[0]
    m, u = case["model_out"], case["uncond"]
    if u is None and m.shape[0] == 2 * b:
        u, m = m[:b], m[b:]
    h, slots = case["history"], case["slots"]
    bufs = {"x": x, "model": m, "uncond": u, "noise": case["noise"], "out": "alias:x" if in_place else out}
    first = {}
    for k, name in ((1, "hist1"), (2, "hist2"), (3, "hist3"), (0, "hist_write")):
        s = slots[k]
        if s >= 0:
            bufs[name] = f"alias:{first[s]}" if s in first else h[s]
            first.setdefault(s, name)
    if misalign is None:
        return bufs, None
    keys = [k for k in MISALIGN if isinstance(bufs.get(k), torch.Tensor)]
    key = misalign if isinstance(misalign, str) else keys[misalign % len(keys)]
    orig = bufs[key]
    bufs[key] = shifted(orig, 1)
    return bufs, (key, orig)


def check_step(driver, case, *, misalign=None, in_place=False, guidance_ptr=False, device=ONE_SM, seed=0):
    """Run solver_step on the emulated `device` and check out, the written history slot, the
    untouched slots and the inputs against the float64 reference. misalign: see step_buffers.
    -> the driver's reply."""
    md, sd = case["model_out"].dtype, case["x"].dtype
    out, untouched = poison(case)
    ref_out, ref_hist = step_reference(case)
    bufs, moved = step_buffers(case, out, misalign, in_place)
    params = {"numel": case["x"].numel(), "model_dtype": CODE[md], "state_dtype": CODE[sd], "device": device,
              "clamp": case["clamp"], **{f"c{k}": v for k, v in enumerate(case["coef"])}}
    if guidance_ptr:  # the CUDA-graph form: the guidance scale read from memory
        bufs["guidance_ptr"] = torch.tensor([case["guidance"]], dtype=torch.float32)
        params["guidance"] = NAN
    else:
        params["guidance"] = case["guidance"]
    inputs = {k: v.clone() for k, v in bufs.items()
              if isinstance(v, torch.Tensor) and k in ("model", "uncond", "noise") + (() if in_place else ("x",))}
    aligned = all(v.storage_offset() * v.element_size() % 16 == 0 for v in bufs.values() if isinstance(v, torch.Tensor))
    hist_before = None if case["history"] is None else case["history"].clone()

    reply = driver.run("solver_step", seed, params, bufs)

    assert reply["vectorized"] == str(int(aligned))
    if moved:  # the kernel wrote the shifted copy; compare through the original
        moved[1].copy_(bufs[moved[0]])
    result = case["x"] if in_place else out
    assert_close_each(result, ref_out, sd, what="out")
    sw = case["slots"][0]
    if sw >= 0:
        assert_close_each(case["history"][sw], ref_hist[sw], sd, what=f"history[{sw}]")
    for s in untouched:
        assert torch.equal(bits(case["history"][s]), bits(hist_before[s])), f"history[{s}] written"
    for k, v in inputs.items():
        assert torch.equal(bufs[k], v), f"input {k} modified"
    return reply


@pytest.mark.parametrize("di,si,mis", STEP_MATRIX,
                         ids=[f"{'-'.join(STEP_DTYPES[d])}-{'x'.join(map(str, STEP_SHAPES[s]))}-{'mis' if m else 'al'}"
                              for d, s, m in STEP_MATRIX])
def test_solver_step(driver, di, si, mis):
    i = STEP_MATRIX.index((di, si, mis))
    md, sd = (DT[n] for n in STEP_DTYPES[di])
    hist = list(HIST_CASES)[i % len(HIST_CASES)]
    case = make_step_case(STEP_SHAPES[si], md, sd, CFGS[i % 3], hist, noise=i % 4 != 1, clamp=i % 5 == 2,
                          channels_last=i % 2 == 1, device="cpu", seed=_seed("step", i))
    check_step(driver, case, misalign=i if mis else None, in_place=i % 7 == 3, guidance_ptr=i % 3 == 1,
               seed=_seed("sched", i))


@pytest.mark.parametrize("slot", ["uncond", "out", "hist1", "hist2", "hist3", "hist_write"])
def test_solver_step_each_misaligned_history_slot_takes_the_scalar_path(driver, slot):
    """Four distinct slot buffers (write 3, read 2, 1, 0), uncond and out, one of them an element
    off: every pointer's alignment is checked (a 16-byte access there would be misaligned)."""
    case = make_step_case((2, 4, 8, 8), torch.float16, torch.float32, "separate", "d3-ring4", noise=True,
                          clamp=False, channels_last=False, device="cpu", seed=_seed("slot", slot))
    check_step(driver, case, misalign=slot, device=H100, seed=_seed("slot-sched", slot))


# (numel, dtype, device, grid): the grid is capped at 8 blocks per SM and grid-strides beyond
STEP_GRIDS = [(2048, "fp32", ONE_SM, 8), (2049, "fp32", ONE_SM, 8), (33792, "fp32", H100, 132),
              (33793, "fp32", H100, 133), (270337, "fp32", H100, 1056), (4 * 270336 + 5, "fp32", H100, 1056)]


@pytest.mark.parametrize("numel,dtype,device,grid", STEP_GRIDS, ids=[f"{n}-{d}-dev{v}" for n, d, v, _ in STEP_GRIDS])
def test_solver_step_grid_on_the_emulated_devices(driver, numel, dtype, device, grid):
    """At and past each grid limit: one block per 256 scalar elements (the first five cases are
    odd-sized or shifted: scalar), at most 8 per SM; the last is vectorised (4 per thread) past
    the H100's 132 x 8 blocks. More blocks than SMs, and grid-stride loops, on both devices."""
    vector = numel > 300000
    case = make_step_case((1, 1, 1, numel), DT[dtype], DT[dtype], "none", "d1-ring2", noise=True, clamp=False,
                          channels_last=False, device="cpu", seed=_seed("grid", numel))
    reply = check_step(driver, case, misalign=None if vector else "x", device=device, seed=numel)
    assert [launch["grid"] for launch in reply["launches"]] == [(grid, 1, 1)]


# -------------------------------------------------------------------------------------------
# group_norm_silu
# -------------------------------------------------------------------------------------------

def gn_case(shape, groups, dtype, cl, seed, *, affine=True, param_dtype=None, silu=True, temb=False,
            temb_dtype=None, residual=False):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*s, dt=dtype, scale=1.0, offset=0.0):
        return (torch.randn(s, generator=gen, dtype=F64) * scale + offset).to(dt)

    def layout(t):
        return t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d) if cl else t

    n, c = shape[0], shape[1]
    pdt = param_dtype or dtype
    wide = rnd(3 * n, c, dt=temb_dtype or dtype, scale=1.5)
    return dict(x=layout(rnd(*shape, scale=2.0, offset=0.5)), groups=groups, cl=cl, eps=1e-5, silu=silu,
                # strided parameters: every other element of a longer vector
                weight=rnd(2 * c, dt=pdt, scale=0.5, offset=1.0)[::2] if affine else None,
                bias=rnd(c, dt=pdt, scale=0.5) if affine else None,
                temb=wide[n:2 * n] if temb == "rows" else wide.t().contiguous().t()[:n] if temb else None,
                residual=layout(rnd(*shape)) if residual else None)


def gn_reference(case):
    d = lambda v: None if v is None else v.to(F64)  # noqa: E731
    return group_norm_silu_reference(d(case["x"]), case["groups"], d(case["weight"]), d(case["bias"]), case["eps"],
                                     case["silu"], d(case["temb"]), d(case["residual"]), compute_dtype=F64)


def run_gn(driver, case, num_splits=0, out="new", seed=0, device=H100, wide_index=False):
    """-> (out, the driver's reply); out="new" (NaN-filled), "x" or "residual" (in place), or
    the tensor to write."""
    x = case["x"]
    given = isinstance(out, torch.Tensor)
    res = out if given else torch.empty_like(x).fill_(NAN) if out == "new" else case[out]
    bufs = {"x": x, "residual": case["residual"], "out": res if given or out == "new" else f"alias:{out}",
            "weight": case["weight"], "bias": case["bias"], "temb": case["temb"]}
    params = {"N": x.shape[0], "C": x.shape[1], "S": x[0, 0].numel(), "groups": case["groups"],
              "layout": int(case["cl"]), "dtype": CODE[x.dtype], "eps": case["eps"], "silu": int(case["silu"]),
              "num_splits": num_splits, "device": device, "wide_index": int(wide_index)}
    for k in ("weight", "bias"):
        if case[k] is not None:
            params.update({f"{k}_dtype": CODE[case[k].dtype], f"{k}_stride": case[k].stride(0)})
    if case["temb"] is not None:
        t = case["temb"]
        params.update({"temb_dtype": CODE[t.dtype], "temb_stride_n": t.stride(0), "temb_stride_c": t.stride(1)})
    return res, driver.run("group_norm_silu", seed, params, bufs)


# (shape, groups) and the variant each reaches (fp16 contiguous, aligned):
GN_SHAPES = [
    ((2, 64, 7, 5), 32),    # odd H*W: scalar accesses; NSC: 2 channels per group (VEC 2)
    ((1, 64, 7, 5), 1),     # one group of 2240: streamed (two reads of x) for VEC 1
    ((1, 64, 7, 5), 64),    # one channel per group
    ((3, 40, 8, 8), 8),     # 5 channels per group, S = 64: 16-byte vectors, cached in registers
    ((1, 32, 32, 40), 2),   # groups of 20480: automatic split on the 1-SM device
    ((2, 48, 16, 16), 4),   # 12 channels per group: NSC VEC 4
    ((1, 6, 5, 3), 3),      # tiny, odd everything
]
GN_MATRIX = [(s, dt, cl) for s in range(len(GN_SHAPES)) for dt in DT for cl in (False, True)]


@pytest.mark.parametrize("si,dtype,cl", GN_MATRIX,
                         ids=[f"{'x'.join(map(str, GN_SHAPES[s][0]))}g{GN_SHAPES[s][1]}-{dt}-{'cl' if cl else 'nchw'}"
                              for s, dt, cl in GN_MATRIX])
def test_group_norm_silu(driver, si, dtype, cl):
    i = GN_MATRIX.index((si, dtype, cl))
    shape, groups = GN_SHAPES[si]
    dt = DT[dtype]
    case = gn_case(shape, groups, dt, cl, _seed("gn", i), affine=i % 4 != 3,
                   param_dtype=torch.float32 if i % 2 else None, silu=i % 5 != 4,
                   temb=["rows", "cols", False][i % 3], temb_dtype=torch.float32 if i % 4 == 0 else None,
                   residual=(i // 3) % 2 == 1)
    if i % 6 == 5:  # a misaligned x: scalar accesses throughout
        case["x"] = shifted(case["x"], 1)
    before = {k: v.clone() for k, v in case.items() if isinstance(v, torch.Tensor)}
    ref = gn_reference(case)
    num_splits = [0, 0, 3, 0, 7][i % 5]
    out, reply = run_gn(driver, case, num_splits=num_splits, seed=_seed("sched", i))
    assert_close_each(out, ref, dt, what="out")
    for k, v in before.items():
        assert torch.equal(case[k], v), f"input {k} modified"
    launches = reply["launches"]
    splits = int(reply["splits"])
    kinds = ["fused"] if splits == 1 else ["stats", "apply"]
    assert [launch["kernel"].split("_kernel")[0].rsplit("_", 1)[1] for launch in launches] == kinds
    assert all(launch["grid"] == (shape[0] * groups, splits, 1) and launch["block"] == 256 for launch in launches)
    if num_splits > 1:
        assert splits > 1
    if si == 4 and num_splits == 0:
        assert splits > 1, "the automatic split should cut these large groups"


# every (dtype, vector width, path) instantiation: S = VEC * odd makes VEC the widest access
GN_VARIANTS = [(dt, vec, path) for dt in DT for vec in (1, 2, 4, 8) if vec * DT[dt].itemsize <= 16
               for path in ("cached", "streamed", "split")]


@pytest.mark.parametrize("dtype,vec,path", GN_VARIANTS, ids=[f"{d}-vec{v}-{p}" for d, v, p in GN_VARIANTS])
def test_group_norm_silu_variants(driver, dtype, vec, path):
    """Groups of 4 channels x S: 9 * VEC elements per channel fit the registers (<= 1024 * VEC per
    group), 257 * VEC do not; the split path cuts 33 * VEC into 3 chunks."""
    w = {"cached": 9, "streamed": 257, "split": 33}[path]
    case = gn_case((2, 8, vec, w), 2, DT[dtype], False, _seed("variant", dtype, vec, path), temb="cols",
                   residual=True)
    out, reply = run_gn(driver, case, num_splits=3 if path == "split" else 1, seed=vec)
    assert_close_each(out, gn_reference(case), DT[dtype], what="out")
    kernels = [launch["kernel"] for launch in reply["launches"]]
    names = {"cached": ["fused_kernel<{}, {}, true>"], "streamed": ["fused_kernel<{}, {}, false>"],
             "split": ["stats_kernel<{}, {}>", "apply_kernel<{}, {}>"]}[path]
    assert kernels == ["group_norm_silu_" + n.format(f"(DType){CODE[DT[dtype]]}", vec) for n in names]


@pytest.mark.parametrize("where", ["x", "residual"])
@pytest.mark.parametrize("splits", [1, 3])
def test_group_norm_silu_in_place(driver, where, splits):
    case = gn_case((2, 32, 9, 9), 4, torch.float16, False, _seed("inplace", where, splits), temb="rows",
                   residual=True)
    ref = gn_reference(case)
    out, _ = run_gn(driver, case, num_splits=splits, out=where, seed=splits)
    assert out is case[where]
    assert_close_each(out, ref, torch.float16, what=f"out={where}")


def test_group_norm_silu_channel_limit(driver):
    """4000 channels per group is the most whose scale/shift/offset fit the 48 KiB of shared
    memory a launch gets without opting in; 4001 is refused before any launch."""
    case = gn_case((1, 4000, 1, 1), 1, torch.float32, False, _seed("cmax"), temb="rows")
    out, reply = run_gn(driver, case)
    assert reply["launches"][0]["smem"] <= 48 * 1024
    assert_close_each(out, gn_reference(case), torch.float32)
    with pytest.raises(cuda_on_cpu.DriverError, match=r"cuda error 1\b"):
        run_gn(driver, gn_case((1, 4001, 1, 1), 1, torch.float32, False, 0))


def kernel_kinds(reply) -> list:
    """The launched group_norm_silu kernels, e.g. ["fused<(DType)0, 4, true>"]."""
    return [launch["kernel"].replace("group_norm_silu_", "").replace("_kernel", "") for launch in reply["launches"]]


# (x shape, groups, dtype, the kernels): a group of 1024 vectors is the most the registers
# cache; one vector more is streamed
GN_CACHE_LIMIT = [((1, 4, 32, 32), 1, "fp32", ["fused<(DType)0, 4, true>"]),
                  ((1, 5, 41, 20), 1, "fp32", ["fused<(DType)0, 4, false>"]),
                  ((2, 8, 32, 64), 2, "fp16", ["fused<(DType)1, 8, true>"]),
                  ((2, 10, 41, 40), 2, "fp16", ["fused<(DType)1, 8, false>"])]


@pytest.mark.parametrize("shape,groups,dtype,kinds", GN_CACHE_LIMIT,
                         ids=[f"{'x'.join(map(str, c[0]))}g{c[1]}-{c[2]}" for c in GN_CACHE_LIMIT])
def test_group_norm_silu_register_cache_limit(driver, shape, groups, dtype, kinds):
    case = gn_case(shape, groups, DT[dtype], False, _seed("cache", shape), temb="rows", residual=True)
    out, reply = run_gn(driver, case, num_splits=1, seed=shape[1])
    assert kernel_kinds(reply) == kinds
    assert_close_each(out, gn_reference(case), DT[dtype], what="out")


@pytest.mark.parametrize("size,splits", [(8191, 1), (8192, 2)])
def test_group_norm_silu_automatic_split_starts_at_two_chunks_of_4096(driver, size, splits):
    """One group on the H100: few groups for 132 SMs, so the split is bounded by the size alone."""
    case = gn_case((1, 1, size, 1), 1, torch.float32, False, _seed("split", size))
    out, reply = run_gn(driver, case, seed=size)
    assert int(reply["splits"]) == splits
    assert_close_each(out, gn_reference(case), torch.float32, what="out")


def test_group_norm_silu_more_groups_than_sms(driver):
    """192 blocks on the 132-SM device, one per group (no split with that many)."""
    case = gn_case((3, 256, 4, 4), 64, torch.bfloat16, True, _seed("many"), temb="cols", residual=True)
    out, reply = run_gn(driver, case, seed=3)
    assert [launch["grid"] for launch in reply["launches"]] == [(192, 1, 1)]
    assert_close_each(out, gn_reference(case), torch.bfloat16, what="out")


@pytest.mark.parametrize("which", ["residual", "out"])
@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
def test_group_norm_silu_misaligned_residual_or_out_takes_scalar_accesses(driver, dtype, which):
    """x aligned, the residual or out one element off: the vector width must follow every
    pointer (a 16-byte access there would be misaligned)."""
    case = gn_case((2, 32, 8, 8), 4, DT[dtype], False, _seed("res", dtype), residual=True)
    out = torch.empty_like(case["x"]).fill_(NAN)
    if which == "residual":
        case["residual"] = shifted(case["residual"], 1)
    else:
        out = shifted(out, 1)
    out, reply = run_gn(driver, case, num_splits=1, seed=5, out=out)
    assert kernel_kinds(reply) == [f"fused<(DType){CODE[DT[dtype]]}, 1, true>"]
    assert_close_each(out, gn_reference(case), DT[dtype], what="out")


@pytest.mark.parametrize("splits", [1, 3])
def test_group_norm_silu_5d_channels_last(driver, splits):
    case = gn_case((2, 24, 3, 5, 4), 6, torch.float16, True, _seed("5d", splits), temb="rows", residual=True)
    out, _ = run_gn(driver, case, num_splits=splits, seed=splits)
    assert out.is_contiguous(memory_format=torch.channels_last_3d)
    assert_close_each(out, gn_reference(case), torch.float16, what="out")


@pytest.mark.parametrize("cl", [False, True])
@pytest.mark.parametrize("splits", [1, 3])
def test_group_norm_silu_64_bit_index_path(driver, cl, splits):
    """Groups of >= 2^31 elements index with 64-bit division instead of the 32-bit fast
    divider; Args.wide_index forces that path here, on shapes whose rows and columns are
    awkward (odd K, partial chunks) so a wrong row/column split shows. (solver_step indexes in
    int64 throughout: it has no second path.)"""
    case = gn_case((3, 12, 7, 5), 4, torch.float32, cl, _seed("wide", cl, splits), temb="rows", residual=True)
    out, _ = run_gn(driver, case, num_splits=splits, seed=splits, wide_index=True)
    assert_close_each(out, gn_reference(case), torch.float32, what="out")


def test_warp_votes_syncwarp_and_atomics(driver):
    for threads in (256, 48, 1024):  # 48: a partial last warp
        reply = driver.run("selftest_warp", threads, {"threads": threads}, {})
        assert (reply["wrong"], reply["total"]) == ("0", str(3 * threads))


def test_the_emulated_devices(driver):
    with pytest.raises(cuda_on_cpu.DriverError, match="no emulated device 2"):
        driver.run("selftest_shuffle", 0, {"device": 2}, {})


@pytest.mark.last_in_file
def test_every_kernel_instantiation_ran(driver, request):
    """Every CUDA kernel template instantiation in the build was launched by the tests above
    (it needs the module's whole matrix: marked to run last in any test order)."""
    ran = [i for i in request.session.items if i.module is request.module]
    if len(ran) < len(STEP_MATRIX) + len(GN_MATRIX):
        pytest.skip("needs the whole module to run (not a -k selection)")
    missing = sorted(set(driver.kernels.values()) - driver.launched)
    assert not missing, f"never launched: {missing}"
