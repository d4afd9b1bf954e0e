"""`fastdiff::group_norm_silu` on every backend against nn.GroupNorm + F.silu (+ adds) in float64.

Backends (tests/conftest.py): the C++ CPU kernel ("cpu"), Triton under its CPU interpreter
("triton-interp"), the plain-PyTorch fallback ("reference"), and, only with a GPU, the CUDA
kernel ("cuda") and Triton on CUDA ("triton-cuda"). The interpreter runs one program per group
(and per chunk) in Python, so shapes here keep N * groups small.

Non-contiguous inputs are an error (not a silent copy): x must be contiguous or channels_last,
and residual/out must share its layout (test_bad_input_errors).
"""
from __future__ import annotations

import math
import zlib

import pytest
import torch
import torch.nn.functional as F

from fastdiff import _ext
from fastdiff.ops import group_norm_silu as gn
from fastdiff.ops.group_norm_silu import BackendUnavailableError, group_norm_silu, group_norm_silu_reference
from conftest import HAS_CUDA, HAS_TRITON, gpu_test, need, run_without_extension, require
from tolerances import REL_TOL, assert_close, rel_err

OP = "group_norm_silu"  # the compiled kernels the `backend` fixture needs
NAN = float("nan")
F64 = torch.float64
HAS_CPU_KERNEL = _ext.has_kernel(OP, "CPU")
HAS_CUDA_KERNEL = HAS_CUDA and _ext.has_kernel(OP, "CUDA")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _to_layout(t, channels_last):
    if not channels_last:
        return t.contiguous()
    return t.permute(0, *range(2, t.dim()), 1).contiguous().permute(0, t.dim() - 1, *range(1, t.dim() - 1))


def make_case(shape, groups, dtype, device, seed, *, channels_last=False, affine=True, param_dtype=None,
              silu=True, temb=False, temb_dtype=None, residual=False, mean=0.5, std=2.0, eps=1e-5):
    gen = torch.Generator().manual_seed(seed)
    n, c = shape[0], shape[1]

    def rnd(*s, dt=dtype, scale=1.0, offset=0.0):
        return (torch.randn(s, generator=gen, dtype=F64) * scale + offset).to(dt).to(device)

    x = _to_layout(rnd(*shape, scale=std, offset=mean), channels_last)
    pdt = param_dtype or dtype
    case = dict(x=x, groups=groups, eps=eps, silu=silu,
                weight=rnd(c, dt=pdt, scale=0.5, offset=1.0) if affine else None,
                bias=rnd(c, dt=pdt, scale=0.5) if affine else None,
                temb=rnd(n, c, dt=temb_dtype or dtype, scale=1.5) if temb else None,
                residual=_to_layout(rnd(*shape), channels_last) if residual else None)
    return case


def oracle(case):
    """nn.GroupNorm + F.silu + the adds, in float64 from the stored values."""
    x = case["x"].to(F64)
    t = case["temb"]
    if t is not None:
        x = x + t.to(F64).reshape(*t.shape, *([1] * (x.dim() - 2)))
    d = lambda v: None if v is None else v.to(F64)  # noqa: E731
    y = F.group_norm(x, case["groups"], d(case["weight"]), d(case["bias"]), case["eps"])
    if case["silu"]:
        y = F.silu(y)
    if case["residual"] is not None:
        y = y + case["residual"].to(F64)
    return y


def call(case, backend, out=None, num_splits=0):
    return group_norm_silu(case["x"], case["groups"], case["weight"], case["bias"], eps=case["eps"],
                           silu=case["silu"], temb=case["temb"], residual=case["residual"], out=out,
                           backend=backend, num_splits=num_splits)


def check(case, backend, num_splits=0, factor=1.0):
    """Poisoned out, result vs the float64 oracle, inputs untouched."""
    x = case["x"]
    out = torch.empty_like(x).fill_(NAN)
    before = {k: v.clone() for k, v in case.items() if isinstance(v, torch.Tensor)}
    ref = oracle(case)
    res = call(case, backend, out=out, num_splits=num_splits)
    assert res is out and out.stride() == x.stride()
    assert torch.isfinite(out).all(), "out not fully written (NaN poison left) or non-finite"
    assert_close(out, ref, x.dtype, factor=factor, what="out")
    for k, v in before.items():
        assert torch.equal(case[k], v), f"input {k} was modified"
    return out


# -------------------------------------------------------------------------------------------
# the op against nn.GroupNorm in float64
# -------------------------------------------------------------------------------------------

# (shape, groups): C=64 with 1, 32 and C groups; 3 and 5 channels per group (C not a multiple
# of any block); batch 1, CFG-doubled 2, odd 3; odd H*W (7x5)
SHAPES = [((2, 64, 7, 5), 32), ((1, 64, 7, 5), 1), ((1, 64, 7, 5), 64), ((2, 96, 4, 4), 32), ((3, 40, 7, 5), 8)]
MATRIX = [(s, dt, cl) for s in range(len(SHAPES)) for dt in DTYPES for cl in (False, True)]


@pytest.mark.parametrize("si,dtype,cl", MATRIX,
                         ids=[f"{'x'.join(map(str, SHAPES[s][0]))}g{SHAPES[s][1]}-{dt}-{'cl' if cl else 'nchw'}"
                              for s, dt, cl in MATRIX])
def test_matches_nn_group_norm(backend, si, dtype, cl):
    be, device = backend
    shape, groups = SHAPES[si]
    i = MATRIX.index((si, dtype, cl))
    # the options vary deterministically across the matrix so that every value is covered
    dt = DTYPES[dtype]
    case = make_case(shape, groups, dt, device, _seed(si, dtype, cl), channels_last=cl,
                     affine=i % 4 != 3, param_dtype=torch.float32 if i % 2 else None, silu=i % 5 != 4,
                     temb=(i // 2) % 2 == 0, temb_dtype=torch.float32 if i % 3 == 0 else None,
                     residual=(i // 3) % 2 == 1)
    check(case, be)


@pytest.mark.parametrize("dtype", list(DTYPES))
def test_all_options(backend, dtype):
    """Affine + SiLU + temb (a strided column slice of a wider projection) + residual, both
    layouts, fp32 parameters with 16-bit storage."""
    be, device = backend
    dt = DTYPES[dtype]
    for cl in (False, True):
        case = make_case((2, 32, 5, 7), 8, dt, device, _seed("all", dtype, cl), channels_last=cl,
                         param_dtype=torch.float32, temb=True, residual=True)
        wide = torch.randn(2, 3 * 32, dtype=F64).to(dt).to(device)
        case["temb"] = wide[:, 32:64]  # strides (96, 1), storage offset 32
        check(case, be)
        case["temb"] = wide.t().contiguous().t()[:, :32]  # strides (1, 2)
        check(case, be)


@pytest.mark.parametrize("isa", ["baseline", "avx2", "avx512"])
def test_cpu_isa_variants(isa, monkeypatch):
    """The CPU kernel is compiled for SSE2, AVX2+FMA and AVX-512 and picks the widest at run time;
    FASTDIFF_CPU_ISA caps it, so every variant this machine can run is checked here."""
    need(HAS_CPU_KERNEL, f"fastdiff._C not built ({_ext.LOAD_ERROR})")
    monkeypatch.setenv("FASTDIFF_CPU_ISA", isa)
    for dtype in DTYPES.values():
        for cl in (False, True):
            case = make_case((2, 24, 9, 7), 4, dtype, "cpu", _seed("isa", isa, cl), channels_last=cl, temb=True,
                             residual=True, param_dtype=torch.float32, std=4.0)
            check(case, "cpu")
            check(case, "cpu", num_splits=3)
    # the SiLU far in the tails (exp saturating, no overflow, no garbage): silu(-200) = -0,
    # silu(1e30) = 1e30, silu(-80) = -1.4e-33; an infinite weight gives NaN as in torch
    x = torch.tensor([[[-1.0, 1.0]] * 4])
    w = torch.tensor([200.0, 1e30, float("inf"), 80.0])
    out = group_norm_silu(x, 4, w, None, backend="cpu")
    ref = F.silu(F.group_norm(x.double(), 4, w.double()))
    assert torch.equal(out.isnan(), ref.isnan())
    assert torch.allclose(out.double(), ref, rtol=1e-5, atol=1e-37, equal_nan=True)


def test_plain_group_norm(backend):
    """No affine, no SiLU, no adds: F.group_norm itself."""
    be, device = backend
    case = make_case((2, 12, 6, 5), 3, torch.float32, device, _seed("plain"), affine=False, silu=False)
    check(case, be)
    case["eps"] = 0.5  # a large eps is visible in the result
    check(case, be)


@pytest.mark.parametrize("splits", [2, 3, 7])
@pytest.mark.parametrize("cl", [False, True], ids=["nchw", "cl"])
def test_split_path(backend, cl, splits):
    """Groups split over several programs/blocks (partial statistics, then normalise), forced
    with num_splits on a small shape: 1x16x16x20 with 2 groups = 2560 elements per group."""
    be, device = backend
    case = make_case((1, 16, 16, 20), 2, torch.float32, device, _seed("split", cl, splits), channels_last=cl,
                     temb=True, residual=True)
    if be == "triton":
        from fastdiff.kernels import group_norm_silu as kmod

        _, _, _, rows, cols, *_ = kmod.geometry(case["x"], 2, cl)
        p = kmod.plan(rows, cols, 2, splits, on_gpu=device == "cuda")
        assert 1 < p["nsplit"] <= splits, p
    one = check(case, be, num_splits=1)
    split = check(case, be, num_splits=splits)
    assert_close(split, one.to(F64), torch.float32, what="split vs one program")


def test_auto_split_large_group(backend):
    """One group of 65536 elements: the CPU kernel splits it on its own (fewer groups than
    threads), Triton's interpreter runs it as one program of two tiles."""
    be, device = backend
    case = make_case((1, 4, 128, 128), 1, torch.float32, device, _seed("auto"), temb=True)
    check(case, be)


@pytest.mark.parametrize("splits", [1, 3])
def test_large_mean_fp32(backend, splits):
    """fp32 values 1e3 + N(0, 1) (and 1e3 + N(0, 1) time embeddings): the statistics keep full
    precision. A naive E[x^2] - E[x]^2 in fp32 is shown to fail the same check."""
    be, device = backend
    case = make_case((1, 8, 16, 16), 2, torch.float32, device, _seed("mean", splits), mean=1e3, std=1.0)
    ref = oracle(case)
    check(case, be, num_splits=splits)

    # the check has teeth: the textbook fp32 one-pass formula misses by orders of magnitude
    xg = case["x"].cpu().reshape(1, 2, -1)
    m = xg.mean(-1, keepdim=True)
    naive_var = (xg * xg).mean(-1, keepdim=True) - m * m
    naive = ((xg - m) / torch.sqrt(naive_var.clamp_min(0) + 1e-5)).reshape(case["x"].shape)
    naive = naive * case["weight"].cpu().view(1, -1, 1, 1) + case["bias"].cpu().view(1, -1, 1, 1)
    naive = F.silu(naive)
    assert rel_err(naive, ref) > 100 * REL_TOL[torch.float32]

    # a large time embedding instead: x ~ N(0, 1), temb ~ 1e3 + N(0, 1)
    case = make_case((2, 8, 9, 7), 4, torch.float32, device, _seed("temb-mean", splits), temb=True)
    case["temb"] = (case["temb"].double() / 1.5 + 1e3).float()
    check(case, be, num_splits=splits)


def test_in_place(backend):
    """out = x and out = residual, one program per group and split (x0 must not be re-read from
    an x another program has already overwritten)."""
    be, device = backend
    for splits in (1, 3):
        for cl in (False, True):
            case = make_case((1, 8, 12, 10), 2, torch.float16, device, _seed("inplace", splits, cl), channels_last=cl,
                             temb=True, residual=True)
            ref = oracle(case)
            x = case["x"]
            res = call(case, be, out=x, num_splits=splits)
            assert res is x
            assert_close(x, ref, torch.float16, what="out=x")
            case = make_case((1, 8, 12, 10), 2, torch.float16, device, _seed("inplace-r", splits, cl),
                             channels_last=cl, residual=True)
            ref = oracle(case)
            r = case["residual"]
            call(case, be, out=r, num_splits=splits)
            assert_close(r, ref, torch.float16, what="out=residual")


@pytest.mark.parametrize("shape,cl", [((3, 6), False), ((2, 6, 11), False), ((2, 6, 11), True),
                                      ((1, 6, 3, 4, 5), False), ((1, 6, 3, 4, 5), True)],
                         ids=["2d", "3d", "3d-cl", "5d", "5d-cl"])
def test_other_ranks(backend, shape, cl):
    be, device = backend
    case = make_case(shape, 3, torch.float32, device, _seed("rank", shape, cl), channels_last=cl, temb=True,
                     residual=True)
    if cl:
        assert gn.layout_of(case["x"]) == "nsc"
    check(case, be)


def test_nan_stays_in_its_group(backend):
    be, device = backend
    case = make_case((2, 8, 5, 5), 4, torch.float32, device, _seed("nan"))
    case["x"][1, 2, 3, 3] = NAN  # sample 1, group 1
    out = call(case, be)
    nan = out.isnan()
    assert nan[1, 2:4].all() and not nan[1, :2].any() and not nan[1, 4:].any() and not nan[0].any()
    ref = oracle(case)
    assert_close(out[0], ref[0], torch.float32)


def test_empty(backend):
    be, device = backend
    for shape in ((0, 8, 4, 4), (2, 8, 0, 4)):
        x = torch.empty(shape, device=device)
        out = group_norm_silu(x, 4, torch.ones(8, device=device), None, temb=torch.zeros(shape[0], 8, device=device),
                              backend=be)
        assert out.shape == x.shape


def test_reference_is_the_spec():
    """The float64 reference is nn.GroupNorm (+ SiLU + adds) to rounding, in both layouts."""
    for cl in (False, True):
        case = make_case((2, 12, 5, 3), 4, F64, "cpu", _seed("spec", cl), channels_last=cl, temb=True,
                         residual=True, mean=30.0)
        got = group_norm_silu_reference(case["x"], 4, case["weight"], case["bias"], case["eps"], True, case["temb"],
                                        case["residual"], compute_dtype=F64)
        assert_close(got, oracle(case), F64)


# -------------------------------------------------------------------------------------------
# bad inputs: clear errors naming the argument, before any write
# -------------------------------------------------------------------------------------------

def _err_cases():
    cl = torch.channels_last
    return [
        ("groups not a divisor", lambda c: c.update(groups=5), ValueError, r"num_groups must be a positive divisor"),
        ("groups zero", lambda c: c.update(groups=0), ValueError, r"num_groups must be a positive divisor"),
        ("groups float", lambda c: c.update(groups=4.0), TypeError, r"num_groups must be an int"),
        ("eps zero", lambda c: c.update(eps=0.0), ValueError, r"eps must be a finite number > 0"),
        ("eps nan", lambda c: c.update(eps=NAN), ValueError, r"eps must be"),
        ("silu not bool", lambda c: c.update(silu=1), TypeError, r"silu must be a bool"),
        ("num_splits negative", lambda c: c.update(num_splits=-1), ValueError, r"num_splits must be an int >= 0"),
        ("x dtype", lambda c: c.update(x=c["x"].double(), out=None, residual=None), TypeError,
         r"x must be float32, float16 or bfloat16"),
        ("x 1-d", lambda c: c.update(x=torch.randn(8), out=None, residual=None, temb=None), ValueError,
         r"x must have shape \(N, C, \*spatial\)"),
        ("x not dense", lambda c: c.update(x=torch.randn(2, 8, 4, 8)[..., ::2], out=None), ValueError,
         r"x must be contiguous or channels_last"),
        ("x transposed", lambda c: c.update(x=torch.randn(2, 8, 4, 4).transpose(2, 3), out=None), ValueError,
         r"x must be contiguous or channels_last"),
        ("weight shape", lambda c: c.update(weight=c["weight"][:4]), ValueError, r"weight must have shape \(C,\)"),
        ("bias dtype", lambda c: c.update(bias=c["bias"].double()), TypeError, r"bias must be float32 or x's dtype"),
        ("weight half with fp32 x", lambda c: c.update(weight=c["weight"].half()), TypeError,
         r"weight must be float32 or x's dtype"),
        ("weight device", lambda c: c.update(weight=torch.empty(8, device="meta")), ValueError,
         r"weight must be on x's device"),
        ("temb shape", lambda c: c.update(temb=c["temb"][:, :, None, None]), ValueError,
         r"temb must have shape \(N, C\)"),
        ("temb batch", lambda c: c.update(temb=c["temb"][:1]), ValueError, r"temb must have shape \(N, C\) = \(2, 8\)"),
        ("temb dtype", lambda c: c.update(temb=c["temb"].half()), TypeError, r"temb must be float32 or x's dtype"),
        ("residual shape", lambda c: c.update(residual=c["residual"][:1]), ValueError,
         r"residual must have x's shape"),
        ("residual dtype", lambda c: c.update(residual=c["residual"].half()), TypeError,
         r"residual must have x's dtype"),
        ("residual layout", lambda c: c.update(residual=c["residual"].contiguous(memory_format=cl)), ValueError,
         r"residual must have the same memory layout as x"),
        ("out layout", lambda c: c.update(out=torch.empty_like(c["x"], memory_format=cl)), ValueError,
         r"out must have the same memory layout as x"),
        ("out dtype", lambda c: c.update(out=torch.empty_like(c["x"], dtype=torch.float16)), TypeError,
         r"out must have x's dtype"),
        ("out shape", lambda c: c.update(out=torch.empty(2, 8, 4, 5)), ValueError, r"out must have x's shape"),
        ("out overlaps temb", lambda c: c.update(x=torch.randn(2, 8, 1, 1), residual=None,
                                                 out=c["temb"].view(2, 8, 1, 1)), ValueError, r"out overlaps temb"),
        ("out partially overlaps x", lambda c: (lambda buf: c.update(x=buf[:256].view(2, 8, 4, 4),
                                                                     out=buf[8:264].view(2, 8, 4, 4)))(torch.randn(300)),
         ValueError, r"out overlaps x"),
        ("unknown backend", lambda c: c.update(backend="gpu"), ValueError, r"backend must be one of"),
        ("cuda backend on CPU tensors", lambda c: c.update(backend="cuda"), BackendUnavailableError,
         r"backend='cuda' cannot run"),
    ]


ERR_CASES = _err_cases()


def _call_case(case):
    return group_norm_silu(case["x"], case["groups"], case["weight"], case["bias"], eps=case["eps"],
                           silu=case["silu"], temb=case["temb"], residual=case["residual"], out=case["out"],
                           backend=case["backend"], num_splits=case["num_splits"])


@pytest.mark.parametrize("new_out", [False, True], ids=["out", "new-output"])
@pytest.mark.parametrize("warm", [False, True], ids=["cold", "after-a-good-call"])
@pytest.mark.parametrize("name", [c[0] for c in ERR_CASES])
def test_bad_input_errors(name, warm, new_out):
    """warm: a valid call on the very same tensors ran first, so the op knows that signature;
    every error must still be raised. new_out: the call allocates its output (out=None), whose
    signature holds no pointers."""
    _, mutate, exc, pattern = next(c for c in ERR_CASES if c[0] == name)
    case = make_case((2, 8, 4, 4), 4, torch.float32, "cpu", _seed("err"), temb=True, residual=True)
    case.update(out=None if new_out else torch.randn(2, 8, 4, 4), backend="auto", num_splits=0)
    if warm:
        _call_case(case)
    mutate(case)
    if new_out and case["out"] is not None:
        pytest.skip("a case about out")
    snapshot = {k: v.clone() for k, v in case.items() if isinstance(v, torch.Tensor) and v.device.type != "meta"}
    with pytest.raises(exc, match=pattern):
        _call_case(case)
    for k, v in snapshot.items():
        assert torch.equal(case[k].isnan(), v.isnan()) and torch.equal(case[k].nan_to_num(), v.nan_to_num()), \
            f"{k} was modified by a call that raised"


def test_forced_triton_needs_interpreter_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    case = make_case((1, 4, 3, 3), 2, torch.float32, "cpu", _seed("forced"))
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        call(case, "triton")


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="fastdiff._C not built")
def test_binding_checks_inputs():
    """The C++ binding checks what it is given too (for callers of torch.ops.fastdiff_C directly)."""
    op = torch.ops.fastdiff_C.group_norm_silu
    x = torch.randn(2, 8, 4, 4)
    with pytest.raises(RuntimeError, match=r"num_groups must be a positive divisor of C = 8"):
        op(x, 3, None, None, 1e-5, True, None, None, 0, torch.empty_like(x))
    with pytest.raises(RuntimeError, match=r"out must have the same memory layout as x"):
        op(x, 4, None, None, 1e-5, True, None, None, 0, torch.empty_like(x, memory_format=torch.channels_last))
    with pytest.raises(RuntimeError, match=r"temb must have shape \(N, C\)"):
        op(x, 4, None, None, 1e-5, True, torch.randn(2, 4), None, 0, torch.empty_like(x))
    with pytest.raises(RuntimeError, match=r"x must be contiguous or channels_last"):
        op(x.transpose(2, 3), 4, None, None, 1e-5, True, None, None, 0, torch.empty_like(x))


# -------------------------------------------------------------------------------------------
# dispatch, info, no extension
# -------------------------------------------------------------------------------------------

def test_auto_picks_expected_backend(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    x = torch.randn(1, 4, 3, 3)
    args = gn.GroupNormSiluArgs(x, 2, None, None, 1e-5, True, None, None, 0, torch.empty_like(x))
    assert gn.DISPATCH.select(args).name == ("cpu" if HAS_CPU_KERNEL else "reference")
    if HAS_TRITON:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert gn.DISPATCH.select(args).name == "triton"
    # the CUDA kernel's channels-per-group limit sends such groups to Triton
    big = gn._Example("cuda", channels_per_group=gn.CUDA_MAX_CHANNELS_PER_GROUP + 1)
    assert gn._cuda_supports(big) is not None


def test_info():
    import fastdiff

    inf = fastdiff.info()
    plan = inf["ops"]["group_norm_silu"]
    assert plan["backends"] == ["cuda", "triton", "cpu", "reference"]
    assert plan["cpu"]["backend"] in ("cpu", "triton", "reference")
    assert "group_norm_silu" in str(inf)


def test_works_without_extension():
    """FASTDIFF_LOAD_EXT=0 stands in for a build without fastdiff._C."""
    code = r"""
import torch, fastdiff
import torch.nn.functional as F
from fastdiff.ops.group_norm_silu import group_norm_silu, BackendUnavailableError
assert fastdiff.info()["ops"]["group_norm_silu"]["cpu"]["backend"] == "reference"
x = torch.randn(2, 8, 5, 3); w = torch.randn(8); b = torch.randn(8); t = torch.randn(2, 8)
ref = F.silu(F.group_norm(x.double() + t.double()[:, :, None, None], 4, w.double(), b.double(), 1e-5))
out = group_norm_silu(x, 4, w, b, temb=t)
assert float((out.double() - ref).norm() / ref.norm()) < 1e-5
try:
    group_norm_silu(x, 4, w, b, backend="cpu")
    raise SystemExit("forced cpu backend did not raise")
except BackendUnavailableError as e:
    assert "fastdiff._C is not available" in str(e), e
print("ok")
"""
    run_without_extension(code)


# -------------------------------------------------------------------------------------------
# torch.library / torch.compile
# -------------------------------------------------------------------------------------------

# (Not under the Triton interpreter: opcheck's schema-checking dispatch mode and the
# interpreter's patching of triton.language do not mix; the fake impl is backend-independent.)
@pytest.mark.parametrize("be", ["cpu", "reference"])
def test_opcheck(be):
    if be == "cpu":
        need(HAS_CPU_KERNEL, "fastdiff._C not built")
    c = make_case((2, 4, 3, 3), 2, torch.float16, "cpu", _seed("opcheck"), param_dtype=torch.float32, temb=True,
                  residual=True)
    args = (c["x"], 2, c["weight"], c["bias"], 1e-5, True, c["temb"], c["residual"], 0, torch.empty_like(c["x"]), be)
    torch.library.opcheck(torch.ops.fastdiff.group_norm_silu.default, args)


def _block(x, temb, w1, b1, w2, b2, backend):
    # a ResBlock's two normalisations: GN+SiLU, then GN+SiLU with the time embedding, + skip
    h = group_norm_silu(x, 2, w1, b1, backend=backend)
    return group_norm_silu(h, 2, w2, b2, temb=temb, residual=x, backend=backend)


@pytest.mark.parametrize("be", ["cpu", "reference"])
def test_torch_compile_fullgraph(be):
    """fullgraph torch.compile (backend "aot_eager": dynamo + functionalization of the out=
    op; inductor's C++ compile is too slow for this machine)."""
    if be == "cpu":
        need(HAS_CPU_KERNEL, "fastdiff._C not built")
    gen = torch.Generator().manual_seed(_seed("compile"))
    args = (torch.randn(2, 8, 6, 6, generator=gen), torch.randn(2, 8, generator=gen), torch.randn(8, generator=gen),
            torch.randn(8, generator=gen), torch.randn(8, generator=gen), torch.randn(8, generator=gen))
    eager = _block(*args, be)
    torch._dynamo.reset()
    compiled = torch.compile(_block, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(*args, be), eager)


# -------------------------------------------------------------------------------------------
# Triton compiles for a GPU target without a GPU (catches compiled-mode errors the
# interpreter does not see) and vectorises the contiguous case
# -------------------------------------------------------------------------------------------

GPU_COMPILE_CASES = [  # (mode, channels_last, single tile): fused one tile, fused loop, the two split passes
    (0, False, True), (0, True, False), (1, False, False), (2, True, False)]


def gpu_compile_case(mode, cl, single, cc):
    """Run by gpu_compile.compile_isolated in a fresh interpreter: compile one launch variant
    for sm_<cc>; -> a summary of the PTX and the resources."""
    import inspect

    import triton

    from fastdiff.ops import _dispatch
    from gpu_compile import compile_for_gpu

    kmod = _dispatch.import_kernel("group_norm_silu")
    consts = dict(MODE=mode, CL=cl, HAS_W=True, HAS_B=True, HAS_T=True, HAS_R=True, SILU=True,
                  BLOCK_R=1 if not cl else 256, BLOCK_K=4096 if not cl else 16, SINGLE_TILE=single,
                  NSPLIT_P2=1 if mode == 0 else 16)
    sig, attrs = {}, {}
    for i, p in enumerate(inspect.signature(kmod._group_norm_silu_kernel).parameters):
        if p in consts:
            sig[p] = "constexpr"
        elif p.endswith("_ptr"):
            sig[p] = "*fp32" if p == "ws_ptr" else "*fp16"
        elif p in ("group_size", "eps"):
            sig[p] = "fp32"
        else:
            sig[p] = "i64" if p == "SAMPLE_STRIDE" else "i32"
        if p.endswith("_ptr") or p in ("K", "ROW_STRIDE", "SAMPLE_STRIDE", "GROUP_STRIDE"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    k = compile_for_gpu(triton.jit(kmod._group_norm_silu_kernel), sig, consts, attrs, cc, dict(num_warps=8))
    ptx = k.pop("ptx")
    return dict(k, named="_group_norm_silu_kernel" in ptx, vector_loads="ld.global.v4" in ptx)


@pytest.fixture(scope="module")
def gpu_compiled():
    """Every GPU_COMPILE_CASES variant for sm_90a and sm_80, compiled once per module run."""
    from gpu_compile import compile_isolated

    cases = [list(c) + [cc] for cc in (90, 80) for c in GPU_COMPILE_CASES]
    return dict(zip((tuple(c) for c in cases), compile_isolated("test_group_norm_silu", "gpu_compile_case", cases)))


@pytest.mark.parametrize("cc", [90, 80])
@pytest.mark.parametrize("mode,cl,single", GPU_COMPILE_CASES,
                         ids=["fused-one-tile", "fused-loop-cl", "partial-stats", "merge-normalise-cl"])
def test_triton_compiles_for_gpus(mode, cl, single, cc, gpu_compiled):
    """No GPU needed: each launch variant compiles for sm_90a and sm_80 (compiled mode catches
    errors the interpreter does not see), keeps the name Nsight Compute's regex selects,
    loads contiguous rows with 16-byte vectors, spills nothing and fits shared memory."""
    from gpu_compile import SHARED_LIMIT

    k = gpu_compiled[(mode, cl, single, cc)]
    assert k["named"]
    if not cl:  # contiguous rows: 16-byte vector loads of x
        assert k["vector_loads"]
    assert k["stack"] == 0, f"sm_{cc}: {k['regs']} registers and {k['stack']} bytes of stack per thread: spills"
    assert k["shared"] <= SHARED_LIMIT[cc], k


# -------------------------------------------------------------------------------------------
# GPU only
# -------------------------------------------------------------------------------------------

cuda_only = gpu_test(HAS_CUDA_KERNEL, "needs a GPU and fastdiff._C built with CUDA")
gpu_only = gpu_test()


@gpu_only
@pytest.mark.parametrize("be", ["cuda", "triton"])
@pytest.mark.parametrize("dtype", ["fp16", "fp32"])
@pytest.mark.parametrize("shape,cl", [((2, 320, 64, 64), False), ((2, 640, 32, 32), True), ((2, 1280, 16, 16), False),
                                      ((16, 128, 32, 32), False)], ids=["sd64", "sd32-cl", "sd16", "cifar"])
def test_gpu_unet_shapes(be, dtype, shape, cl, monkeypatch):
    """The SD-1.5 shapes with 32 groups (the automatic split path) and a CIFAR-size batch."""
    if be == "cuda":
        need(HAS_CUDA_KERNEL, "fastdiff._C has no CUDA kernels (GPU present but not built with CUDA)")
    else:
        need(HAS_TRITON, "triton is not installed")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    case = make_case(shape, 32, DTYPES[dtype], "cuda", _seed("gpu", shape), channels_last=cl, temb=True,
                     residual=True)
    for splits in (0, 1, 5):
        check(case, be, num_splits=splits)


@cuda_only
@pytest.mark.parametrize("offset", [1, 2, 4])
def test_cuda_unaligned_and_odd_strides(offset):
    """Storage offsets and row lengths that rule out 16-byte vectors (the scalar/narrow paths)."""
    x = torch.randn(2 * 24 * 9 * 7 + offset, device="cuda", dtype=torch.float16)[offset:].view(2, 24, 9, 7)
    case = make_case((2, 24, 9, 7), 8, torch.float16, "cuda", _seed("unaligned", offset), residual=True)
    case["x"] = x
    for splits in (1, 3):
        check(case, "cuda", num_splits=splits)


@gpu_only
@pytest.mark.parametrize("be", ["cuda", "triton"])
def test_gpu_past_2_31_elements(be, monkeypatch):
    """int64 offsets: 2 x 32 x 8192 x 8200 fp16 (2^31.02 elements); the last group of the last
    sample (offsets past 2^31) is checked against float64."""
    if be == "cuda":
        need(HAS_CUDA_KERNEL, "fastdiff._C has no CUDA kernels (GPU present but not built with CUDA)")
    else:
        need(HAS_TRITON, "triton is not installed")
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    shape = (2, 32, 8192, 8200)
    if torch.cuda.get_device_properties(0).total_memory < 3 * 2 * math.prod(shape) + (4 << 30):
        pytest.skip("not enough GPU memory")
    gen = torch.Generator(device="cuda").manual_seed(_seed("2^31"))
    x = torch.randn(shape, device="cuda", dtype=torch.float16, generator=gen)
    temb = torch.randn(2, 32, device="cuda", dtype=torch.float16, generator=gen)
    out = torch.full_like(x, NAN)
    group_norm_silu(x, 8, temb=temb, out=out, backend=be)
    tail = slice(28, 32)  # group 7 of sample 1
    ref = F.silu(F.group_norm((x[1:, tail].double() + temb[1:, tail].double()[:, :, None, None]), 1))
    assert torch.isfinite(out[1:, tail]).all()
    assert_close(out[1:, tail], ref, torch.float16)
    assert torch.isfinite(out[0, :4]).all()


@cuda_only
def test_cuda_graph_capture_and_replay():
    case = make_case((2, 64, 32, 32), 32, torch.float16, "cuda", _seed("graph"), temb=True, residual=True)
    out = torch.empty_like(case["x"])
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        call(case, "cuda", out=out, num_splits=4)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        call(case, "cuda", out=out, num_splits=4)
    for _ in range(2):
        case["x"].copy_(torch.randn_like(case["x"]))
        out.fill_(NAN)
        g.replay()
        torch.cuda.synchronize()
        assert_close(out, oracle(case), torch.float16)


@cuda_only
def test_cuda_runs_on_current_stream():
    case = make_case((4, 64, 32, 32), 32, torch.bfloat16, "cuda", _seed("stream"), temb=True)
    ref = oracle(case)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        out = call(case, "cuda", num_splits=3)
    s.synchronize()
    assert_close(out, ref, torch.bfloat16)


@gpu_only
def test_cuda_many_channels_per_group_goes_to_triton(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    need(HAS_TRITON, "triton is not installed")
    case = make_case((1, 4096 + 8, 2, 2), 1, torch.float32, "cuda", _seed("wide"))
    args = gn.GroupNormSiluArgs(case["x"], 1, None, None, 1e-5, True, None, None, 0, torch.empty_like(case["x"]))
    assert gn.DISPATCH.select(args).name == "triton"
    check(case, "auto")


def test_split_plan_arithmetic():
    """Triton's split planning for the SD-1.5 shapes on an H100-sized GPU (132 SMs)."""
    require("triton", "triton")
    from fastdiff.kernels import group_norm_silu as kmod

    for (c, s), want in (((320, 4096), 10), ((640, 1024), 10), ((1280, 256), 10)):
        p = kmod.plan(c // 32, s, 2 * 32, 0, on_gpu=True, sm_count=132)
        assert p["nsplit"] == want and p["block_r"] * p["block_k"] <= kmod.GPU_TILE, p
        assert p["num_tiles"] == p["nsplit"] * p["tiles_per_chunk"]
    # plenty of groups: one program per group, a group that fits one tile read once
    p = kmod.plan(4, 1024, 128 * 32, 0, on_gpu=True, sm_count=132)
    assert p["nsplit"] == 1 and p["single_tile"]
    # forced splits never exceed the request
    for k in range(2, 12):
        assert kmod.plan(3, 35, 1, k, on_gpu=False)["nsplit"] <= k


def test_a_new_output_per_call_is_checked_once_per_shape(monkeypatch):
    """As a U-Net calls it: new x and a new output at other addresses each call; the checks run
    for the first call of a signature only, an output given by the caller is checked (overlaps)
    at each new address, and the results stay right."""
    checks = []
    check = gn.check_group_norm_silu_args
    monkeypatch.setattr(gn, "check_group_norm_silu_args", lambda *a: checks.append(1) or check(*a))
    w, b = torch.randn(6), torch.randn(6)
    keep = []  # keeps every tensor alive, so each call's tensors sit at new addresses
    for _ in range(3):
        x = torch.randn(3, 6, 5, 7)
        y = group_norm_silu(x, 3, w, b)
        keep += [x, y]
        assert_close(y, group_norm_silu_reference(x, 3, w, b, compute_dtype=torch.float64), torch.float32)
    assert len(checks) == 1
    for _ in range(2):
        x, out = torch.randn(3, 6, 5, 7), torch.empty(3, 6, 5, 7)
        keep += [x, out]
        group_norm_silu(x, 3, w, b, out=out)
    assert len(checks) == 3
