"""`fastdiff::solver_step` on every backend against `solver_step_reference` in float64.

Backends: the C++ CPU kernel ("cpu"), Triton under its CPU interpreter ("triton-interp": the
test sets TRITON_INTERPRET=1 for itself, so these run in the plain `pytest tests` of CI), the
plain-PyTorch fallback ("reference"), and, only with a GPU, the CUDA kernel ("cuda") and Triton
on CUDA ("triton-cuda"). Under CI=true a backend that should exist here (the compiled CPU
kernel, Triton) fails instead of skipping. Nothing in this file times anything.
"""
from __future__ import annotations

import itertools
import json
import zlib

import pytest
import torch

from fastdiff import _ext
from fastdiff.ops import _dispatch
from fastdiff.ops import solver_step as ss
from fastdiff.ops.solver_step import BackendUnavailableError, solver_step, solver_step_reference
from conftest import HAS_CUDA, HAS_TRITON, gpu_test, run_without_extension
from conftest import need as _need
from tolerances import assert_close

NAN = float("nan")
OP = "solver_step"  # the compiled kernels the `backend` fixture (tests/conftest.py) needs
HAS_CPU_KERNEL = _ext.has_kernel("solver_step", "CPU")
HAS_CUDA_KERNEL = HAS_CUDA and _ext.has_kernel("solver_step", "CUDA")


# -------------------------------------------------------------------------------------------
# inputs
# -------------------------------------------------------------------------------------------

# name -> (history slots S or None, slots (write, read1, read2, read3))
HIST_CASES = {
    "d0-nohist": (None, (-1, -1, -1, -1)),
    "d0-write": (1, (0, -1, -1, -1)),          # first step of a multistep solver
    "d1-alias": (1, (0, 0, -1, -1)),           # 2M: read D_{i-1} from slot 0, write D_i to slot 0
    "d1-ring2": (2, (1, 0, -1, -1)),
    "d2-alias": (2, (1, 0, 1, -1)),            # 3M, ring of 2: read the oldest, then overwrite it
    "d3-alias": (3, (2, 1, 0, 2)),
    "d3-ring4": (4, (3, 2, 1, 0)),
    "d3-readonly": (3, (-1, 0, 1, 2)),
}
SHAPES = [(1, 3, 7, 5), (3, 4, 17, 9), (2, 4, 8, 8), (1, 4, 32, 33)]
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _rand(shape, dtype, device, gen, channels_last=False):
    t = torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)
    if channels_last and t.dim() == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    elif channels_last and t.dim() == 5:  # history: every slot channels_last
        t = t.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    return t.to(device)


def make_case(shape, model_dtype, state_dtype, cfg, hist, noise, clamp, channels_last, device, seed):
    gen = torch.Generator().manual_seed(seed)
    b = shape[0]
    cl = channels_last
    x = _rand(shape, state_dtype, device, gen, cl)
    uncond = None
    if cfg == "doubled":
        model_out = _rand((2 * b,) + tuple(shape[1:]), model_dtype, device, gen, cl)
    else:
        model_out = _rand(shape, model_dtype, device, gen, cl)
        if cfg == "separate":
            uncond = _rand(shape, model_dtype, device, gen, cl)
    num_slots, slots = HIST_CASES[hist]
    history = _rand((num_slots,) + tuple(shape), state_dtype, device, gen, cl) if num_slots else None
    z = _rand(shape, state_dtype, device, gen, cl) if noise else None
    coef = [float(v) for v in torch.empty(9, dtype=torch.float64).uniform_(-1.0, 1.0, generator=gen)]
    for k in (1, 2, 3):
        if slots[k] < 0:
            coef[3 + k] = 0.0
    if z is None:
        coef[7] = 0.0
    guidance = 1.0 + 6.0 * float(torch.rand((), generator=gen, dtype=torch.float64)) if cfg != "none" else 1.0
    return dict(x=x, model_out=model_out, uncond=uncond, history=history, noise=z, coef=coef,
                slots=list(slots), guidance=guidance, clamp=0.8 if clamp else 0.0)


def reference(case):
    """float64 oracle: (out, history after the step) -- history is a float64 copy."""
    m, u = case["model_out"], case["uncond"]
    b = case["x"].shape[0]
    if u is None and m.shape[0] == 2 * b:
        u, m = m[:b], m[b:]
    d = lambda t: None if t is None else t.to(torch.float64)  # noqa: E731
    hist = None if case["history"] is None else case["history"].to(torch.float64).clone()
    out = solver_step_reference(d(case["x"]), d(m), d(u), hist, d(case["noise"]), case["coef"], case["slots"],
                                case["guidance"], case["clamp"], compute_dtype=torch.float64)
    return out, hist


def call(case, backend, out=None):
    return solver_step(case["x"], case["model_out"], case["uncond"], case["history"], case["noise"],
                       coef=case["coef"], slots=case["slots"], guidance=case["guidance"], clamp=case["clamp"],
                       out=out, backend=backend)


def poison(case):
    """NaN into out, the write slot (unless it is also read) and every slot the step must not
    touch; returns (out, untouched slot indices)."""
    x = case["x"]
    out = torch.empty_like(x).fill_(NAN)
    h = case["history"]
    untouched = []
    if h is not None:
        sw, reads = case["slots"][0], set(s for s in case["slots"][1:] if s >= 0)
        for s in range(h.shape[0]):
            if s not in reads:
                h[s].fill_(NAN)  # a read of it would turn out into NaN; a missed write stays NaN
            if s != sw:
                untouched.append(s)
    return out, untouched


def check_step(case, backend, tol_dtype):
    out, untouched = poison(case)
    ref_out, ref_hist = reference(case)  # from exactly what the kernel will see
    before = {k: case[k].clone() for k in ("x", "model_out", "uncond", "noise") if case[k] is not None}
    hist_before = None if case["history"] is None else case["history"].clone()

    res = call(case, backend, out=out)

    assert res is out
    assert torch.isfinite(out).all(), "out not fully written (NaN poison left) or non-finite"
    assert_close(out, ref_out, tol_dtype, what="out")
    sw = case["slots"][0]
    if sw >= 0:
        hw = case["history"][sw]
        assert torch.isfinite(hw).all(), "history write slot not fully written"
        assert_close(hw, ref_hist[sw], tol_dtype, what=f"history[{sw}]")
    for s in untouched:
        assert torch.equal(case["history"][s].isnan(), hist_before[s].isnan())
        assert torch.allclose(case["history"][s], hist_before[s], equal_nan=True, rtol=0, atol=0), \
            f"history[{s}] was written but is not the write slot"
    for k, v in before.items():
        assert torch.equal(case[k], v), f"input {k} was modified"


# -------------------------------------------------------------------------------------------
# the op against the float64 reference
# -------------------------------------------------------------------------------------------

MATRIX = list(itertools.product(DTYPES, ("none", "separate", "doubled"), HIST_CASES))


@pytest.mark.parametrize("model,cfg,hist", MATRIX, ids=["-".join(p) for p in MATRIX])
def test_matches_reference(backend, model, cfg, hist):
    be, device = backend
    i = MATRIX.index((model, cfg, hist))
    # the remaining options vary deterministically across the matrix so each value is covered
    state = "model" if i % 2 else "fp32"
    noise = (i // 2) % 2 == 1
    clamp = (i // 4) % 2 == 1
    channels_last = (i // 3) % 2 == 1
    shape = SHAPES[i % len(SHAPES)]
    model_dtype = DTYPES[model]
    state_dtype = model_dtype if state == "model" else torch.float32
    case = make_case(shape, model_dtype, state_dtype, cfg, hist, noise, clamp, channels_last, device,
                     _seed(model, cfg, hist))
    # the kernel and the oracle see the same stored values; what differs is the fp32
    # arithmetic and the final rounding to the state dtype
    check_step(case, be, state_dtype)


@pytest.mark.parametrize("state", ["fp32", "model"])
@pytest.mark.parametrize("model", list(DTYPES))
def test_all_options_at_once(backend, model, state):
    be, device = backend
    md = DTYPES[model]
    sd = md if state == "model" else torch.float32
    for cl in (False, True):
        case = make_case((3, 4, 17, 9), md, sd, "doubled", "d3-alias", True, True, cl, device,
                         _seed("all", model, state, cl))
        check_step(case, be, sd)


def test_cfg_forms_agree(backend):
    be, device = backend
    case = make_case((2, 4, 9, 7), torch.float16, torch.float32, "doubled", "d1-alias", True, False, False, device,
                     _seed("cfg"))
    b = case["x"].shape[0]
    h0 = case["history"].clone()
    out_doubled = call(case, be)
    case2 = dict(case, model_out=case["model_out"][b:], uncond=case["model_out"][:b], history=h0)
    out_sep = call(case2, be)
    assert torch.equal(out_doubled, out_sep)
    assert torch.equal(case["history"], h0)


def test_out_aliases_x(backend):
    be, device = backend
    case = make_case((3, 4, 17, 9), torch.bfloat16, torch.float32, "separate", "d1-alias", True, True, True, device,
                     _seed("inplace"))
    ref_out, ref_hist = reference(case)
    x = case["x"]
    res = call(case, be, out=x)
    assert res is x
    assert_close(x, ref_out, torch.float32, what="in-place out")
    assert_close(case["history"][0], ref_hist[0], torch.float32, what="history[0]")


def _offset_view(t, offset=1):
    """The same values in a buffer starting `offset` elements in: misaligned data_ptr."""
    buf = torch.empty(t.numel() + offset, dtype=t.dtype, device=t.device)
    v = buf[offset:].view(t.shape)
    v.copy_(t)
    return v


@pytest.mark.parametrize("model", ["fp32", "fp16"])
def test_unaligned_storage_offset(backend, model):
    """Storage offset 1 on every tensor: the CUDA kernel must take its scalar path."""
    be, device = backend
    md = DTYPES[model]
    case = make_case((3, 4, 17, 9), md, torch.float32, "separate", "d2-alias", True, True, False, device,
                     _seed("offset", model))
    for k in ("x", "model_out", "uncond", "history", "noise"):
        case[k] = _offset_view(case[k])
    assert case["x"].storage_offset() == 1 and case["history"].storage_offset() == 1
    ref_out, ref_hist = reference(case)
    out = _offset_view(torch.full_like(case["x"], NAN))
    call(case, be, out=out)
    assert torch.isfinite(out).all()
    assert_close(out, ref_out, torch.float32, what="out")
    assert_close(case["history"][1], ref_hist[1], torch.float32, what="history[1]")


@pytest.mark.parametrize("shape", [(5,), (2, 33), (2, 3, 4, 5, 6)])
def test_other_ranks(backend, shape):
    be, device = backend
    gen = torch.Generator().manual_seed(_seed("rank", shape))
    x = torch.randn(shape, generator=gen).to(device)
    m = torch.randn(shape, generator=gen).to(device)
    h = torch.randn((2,) + shape, generator=gen).to(device)
    case = dict(x=x, model_out=m, uncond=None, history=h, noise=None, coef=[0.9, -0.4, 0.8, 0.3, -0.2, 0, 0, 0, 0],
                slots=[1, 0, -1, -1], guidance=1.0, clamp=0.0)
    check_step(case, be, torch.float32)


def test_empty(backend):
    be, device = backend
    x = torch.empty(0, 4, 8, 8, device=device)
    out = solver_step(x, torch.empty_like(x), coef=[1, 1, 1, 1, 0, 0, 0, 0, 0], slots=[-1] * 4, backend=be)
    assert out.shape == x.shape


def test_clamp_propagates_nan(backend):
    be, device = backend
    case = make_case((2, 4, 8, 8), torch.float32, torch.float32, "none", "d0-write", False, True, False, device,
                     _seed("nan"))
    case["model_out"].view(-1)[::7] = NAN
    ref_out, ref_hist = reference(case)
    out = call(case, be)
    assert torch.equal(out.isnan(), ref_out.isnan()) and out.isnan().any()
    assert torch.equal(case["history"][0].isnan(), ref_hist[0].isnan())
    fin = ~ref_out.isnan()
    assert_close(out[fin], ref_out[fin], torch.float32)


@pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")  # interpreter: numpy casts to inf
@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_conversions_exact(backend, dtype):
    """Every finite 16-bit value: load -> fp32 -> store round-trips exactly, and fp32 results
    round to nearest even like torch (overflow to inf, subnormals included)."""
    be, device = backend
    if be == "triton" and device == "cpu" and dtype == "bf16":
        pytest.skip("the Triton interpreter rounds fp32->bf16 by truncation (GPU Triton rounds to nearest even)")
    dt = DTYPES[dtype]
    x = torch.arange(-32768, 32768, dtype=torch.int32).to(torch.int16).view(dt)
    x = x[torch.isfinite(x.float())].to(device)
    m = torch.ones_like(x)
    h = torch.empty((1,) + x.shape, dtype=dt, device=device)
    for a in (1.0, 1.2345678, -0.3, 1000.0, 1e-3, 3e-6):
        out = solver_step(x, m, None, h, None, coef=[1.0, 0.0, a, 0.0, 0, 0, 0, 0, 0], slots=[0, -1, -1, -1],
                          backend=be)
        expect = (x.float() * torch.tensor(a, dtype=torch.float32)).to(dt)
        assert torch.equal(h[0], x), "D = x did not round-trip"
        assert torch.equal(out.isnan(), expect.isnan())
        ok = out.isnan() | (out == expect)
        assert ok.all(), f"a={a}: {int((~ok).sum())} values rounded differently from torch"


ISAS = ["baseline", "avx2", "avx512"]


@pytest.mark.parametrize("isa", ISAS)
def test_cpu_isa_variants(isa, monkeypatch):
    """The CPU kernel is compiled for SSE2, AVX2+FMA and AVX-512 and picks the widest at run time;
    FASTDIFF_CPU_ISA caps it, so every variant this machine can run is checked here: all options,
    both layouts, every dtype pair (a shape whose size leaves a vector tail), and the 16-bit
    conversions exhaustively."""
    _need(HAS_CPU_KERNEL, f"fastdiff._C not built ({_ext.LOAD_ERROR})")
    best = _ext.build_info()["cpu_isa"]
    if ISAS.index(isa) > ISAS.index(best):
        pytest.skip(f"this CPU runs at most the {best} variant")
    monkeypatch.setenv("FASTDIFF_CPU_ISA", isa)
    assert _ext.build_info()["cpu_isa"] == isa
    for model, md in DTYPES.items():
        for sd in {torch.float32, md}:
            for cl in (False, True):
                case = make_case((3, 4, 17, 9), md, sd, "doubled", "d3-alias", True, True, cl, "cpu",
                                 _seed("isa", isa, model, sd, cl))
                check_step(case, "cpu", sd)
    for dtype in ("fp16", "bf16"):
        test_conversions_exact(("cpu", "cpu"), dtype)


# -------------------------------------------------------------------------------------------
# bad inputs: clear errors before any write
# -------------------------------------------------------------------------------------------

def _base(device="cpu", state=torch.float32, model=torch.float32):
    return make_case((2, 4, 8, 8), model, state, "separate", "d1-alias", True, False, False, device, _seed("base"))


def _err_cases():
    cl = torch.channels_last
    return [
        ("coef length", lambda c: c.update(coef=c["coef"][:7]), ValueError, r"coef must have 9 entries"),
        ("coef NaN", lambda c: c["coef"].__setitem__(2, NAN), ValueError, r"coef\[2\] \(a\)"),
        ("coef not numbers", lambda c: c.update(coef=["a"] * 9), TypeError, r"coef must be a sequence"),
        ("slots length", lambda c: c.update(slots=[0, 0, -1]), ValueError, r"slots must have 4 entries"),
        ("slot out of range", lambda c: c.update(slots=[0, 3, -1, -1]), ValueError, r"slots\[1\].*out of range"),
        ("write slot out of range", lambda c: c.update(slots=[-2, 0, -1, -1]), ValueError, r"slots\[0\]"),
        ("b nonzero, slot unused", lambda c: c.update(slots=[0, -1, -1, -1]), ValueError,
         r"coef\[4\] \(b1\).*slots\[1\] is -1"),
        ("c nonzero, no noise", lambda c: c.update(noise=None), ValueError, r"coef\[7\] \(c\).*noise is None"),
        ("slot but no history", lambda c: c.update(history=None), ValueError, r"slots\[0\].*history is None"),
        ("history dtype", lambda c: c.update(history=c["history"].half()), TypeError, r"history must have the state dtype"),
        ("history shape", lambda c: c.update(history=c["history"][:, :1]), ValueError, r"history must have shape"),
        ("history no slots", lambda c: c.update(history=c["history"][:0], slots=[-1] * 4,
                                                coef=c["coef"][:4] + [0, 0, 0] + c["coef"][7:]),
         ValueError, r"history must have at least one slot"),
        ("model_out shape", lambda c: c.update(model_out=c["model_out"][:, :3]), ValueError, r"model_out must have x's shape"),
        ("model_out dtype", lambda c: c.update(model_out=c["model_out"].double(), uncond=c["uncond"].double()),
         TypeError, r"model_out must be float32, float16 or bfloat16"),
        ("state dtype", lambda c: c.update(model_out=c["model_out"].bfloat16(), uncond=c["uncond"].bfloat16(),
                                           x=c["x"].half()), TypeError, r"x \(the solver state\)"),
        ("uncond dtype", lambda c: c.update(uncond=c["uncond"].half()), TypeError, r"uncond must have dtype"),
        ("noise shape", lambda c: c.update(noise=c["noise"][:1]), ValueError, r"noise must have x's shape"),
        ("out dtype", lambda c: c.update(out=torch.empty_like(c["x"], dtype=torch.float16)), TypeError, r"out must have dtype"),
        ("out layout", lambda c: c.update(out=torch.empty_like(c["x"], memory_format=cl)), ValueError,
         r"out must have the same memory layout as x"),
        ("model layout", lambda c: c.update(model_out=c["model_out"].contiguous(memory_format=cl)), ValueError,
         r"model_out must have the same memory layout"),
        ("x not dense", lambda c: c.update(x=torch.randn(2, 4, 8, 16)[..., ::2]), ValueError, r"x must be dense"),
        ("device", lambda c: c.update(noise=torch.empty(c["x"].shape, device="meta")), ValueError,
         r"noise must be on x's device"),
        ("guidance without CFG", lambda c: c.update(uncond=None), ValueError, r"guidance=.*no effect without CFG"),
        ("clamp negative", lambda c: c.update(clamp=-1.0), ValueError, r"clamp must be"),
        ("guidance tensor dtype", lambda c: c.update(guidance=torch.tensor(2.0, dtype=torch.float64)), ValueError,
         r"guidance \(as a tensor\) must be a one-element float32 tensor"),
        ("guidance tensor size", lambda c: c.update(guidance=torch.tensor([2.0, 3.0])), ValueError,
         r"guidance \(as a tensor\) must be a one-element"),
        ("guidance tensor without CFG", lambda c: c.update(guidance=torch.tensor(2.0), uncond=None), ValueError,
         r"guidance \(as a tensor\) has no effect without CFG"),
        ("clamp tensor", lambda c: c.update(clamp=torch.tensor(2.0)), TypeError,
         r"clamp must be a Python number.*tensor"),
        ("CFG twice", lambda c: c.update(model_out=torch.cat([c["model_out"], c["model_out"]])), ValueError,
         r"model_out must have x's shape.*CFG-doubled"),
        ("out overlaps model_out", lambda c: c.update(out=c["model_out"]), ValueError, r"out overlaps model_out"),
        ("write slot overlaps x", lambda c: c.update(history=torch.randn((2,) + tuple(c["x"].shape)),
                                                    slots=[1, 0, -1, -1]) or c.update(x=c["history"][1]),
         ValueError, r"history\[1\] \(write slot\) overlaps x"),
        ("out overlaps history", lambda c: c.update(out=c["history"][0]), ValueError, r"out overlaps history"),
        ("unknown backend", lambda c: c.update(backend="gpu"), ValueError, r"backend must be one of"),
        ("cuda backend on CPU tensors", lambda c: c.update(backend="cuda"), BackendUnavailableError, r"backend='cuda'"),
    ]


ERR_CASES = _err_cases()


@pytest.mark.parametrize("warm", ["cold", "after-a-good-call", "after-the-same-tensors"])
@pytest.mark.parametrize("name", [c[0] for c in ERR_CASES])
def test_bad_input_errors(name, warm):
    """warm: a valid call with the same shapes (or the very same tensors) ran first, so the op
    knows that signature; every error must still be raised."""
    _, mutate, exc, pattern = next(c for c in ERR_CASES if c[0] == name)
    case = _base()
    case.update(out=torch.randn_like(case["x"]), backend="auto")
    if warm == "after-a-good-call":
        call(dict(case, history=case["history"].clone()), "auto", out=torch.empty_like(case["x"]))
    elif warm == "after-the-same-tensors":
        call(case, "auto", out=case["out"])
    mutate(case)
    snapshot = {k: v.clone() for k, v in case.items() if isinstance(v, torch.Tensor) and v.device.type != "meta"}
    with pytest.raises(exc, match=pattern):
        solver_step(case["x"], case["model_out"], case["uncond"], case["history"], case["noise"], coef=case["coef"],
                    slots=case["slots"], guidance=case["guidance"], clamp=case["clamp"], out=case["out"],
                    backend=case["backend"])
    for k, v in snapshot.items():
        assert torch.equal(case[k].isnan(), v.isnan()) and torch.equal(case[k].nan_to_num(), v.nan_to_num()), \
            f"{k} was modified by a call that raised"


def test_forced_triton_needs_interpreter_on_cpu(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    case = _base()
    with pytest.raises(BackendUnavailableError, match="TRITON_INTERPRET=1"):
        call(case, "triton")


@pytest.mark.skipif(not HAS_CPU_KERNEL, reason="fastdiff._C not built")
def test_binding_checks_inputs():
    """The C++ binding checks what it is given too (for callers of torch.ops.fastdiff_C directly)."""
    c = _base()
    op = torch.ops.fastdiff_C.solver_step
    args = [c["x"], c["model_out"], c["uncond"], c["history"], c["noise"], c["coef"], c["slots"], c["guidance"], None,
            0.0]
    with pytest.raises(RuntimeError, match=r"slots\[1\] = 5"):
        op(*args[:6], [0, 5, -1, -1], *args[7:], torch.empty_like(c["x"]))
    with pytest.raises(RuntimeError, match=r"out must have the same memory layout as x"):
        op(*args, torch.empty_like(c["x"], memory_format=torch.channels_last))
    with pytest.raises(RuntimeError, match=r"history must have x's dtype"):
        op(*args[:3], c["history"].half(), *args[4:], torch.empty_like(c["x"]))
    with pytest.raises(RuntimeError, match=r"guidance_t must be a one-element float32 tensor"):
        op(*args[:8], torch.ones(2), *args[9:], torch.empty_like(c["x"]))


# -------------------------------------------------------------------------------------------
# dispatch, info, no extension
# -------------------------------------------------------------------------------------------

def test_dispatcher_rules():
    ran = []
    mk = lambda n, ok: _dispatch.Provider(n, lambda a: None if ok else f"{n} unavailable", lambda a: ran.append(n))  # noqa: E731
    d = _dispatch.Dispatcher("toy", [mk("cuda", False), mk("triton", False), mk("cpu", True), mk("reference", True)])
    assert d.run(None) == "cpu" and ran == ["cpu"]
    assert d.run(None, "reference") == "reference"
    with pytest.raises(BackendUnavailableError, match="triton unavailable"):
        d.run(None, "triton")
    with pytest.raises(ValueError, match="backend must be one of"):
        d.select(None, "tpu")
    with pytest.raises(ValueError, match="order"):
        _dispatch.Dispatcher("bad", [mk("cpu", True), mk("cuda", True)])
    assert "solver_step" in _dispatch.registered()


def test_auto_picks_expected_backend(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    c = _base()
    args = ss.SolverStepArgs(c["x"], c["model_out"], c["uncond"], c["history"], c["noise"], c["coef"], c["slots"],
                             c["guidance"], c["clamp"], torch.empty_like(c["x"]))
    assert ss.DISPATCH.select(args).name == ("cpu" if HAS_CPU_KERNEL else "reference")
    if HAS_TRITON:
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert ss.DISPATCH.select(args).name == "triton"


def test_info():
    import fastdiff

    inf = fastdiff.info()
    assert isinstance(inf, dict)
    json.dumps(inf)  # plain data
    assert inf["extension"]["loaded"] == _ext.available()
    plan = inf["ops"]["solver_step"]
    assert plan["backends"] == ["cuda", "triton", "cpu", "reference"]
    assert plan["cpu"]["backend"] in ("cpu", "triton", "reference")
    text = str(inf)
    assert "solver_step" in text and "CPU tensors" in text and "CUDA tensors" in text


def test_works_without_extension():
    """FASTDIFF_LOAD_EXT=0 stands in for a build without fastdiff._C."""
    code = r"""
import torch, fastdiff
from fastdiff.ops.solver_step import solver_step, solver_step_reference, BackendUnavailableError
assert not fastdiff.info()["extension"]["loaded"]
assert fastdiff.info()["ops"]["solver_step"]["cpu"]["backend"] == "reference"
x = torch.randn(2, 4, 5, 3); m = torch.randn(4, 4, 5, 3); h = torch.randn(1, 2, 4, 5, 3)
coef = [0.9, -0.4, 0.8, 0.3, -0.2, 0, 0, 0, 0]
ref = solver_step_reference(x.double(), m[2:].double(), m[:2].double(), h.double().clone(), None, coef,
                            [0, 0, -1, -1], 3.0, 0.0, torch.float64)
out = solver_step(x, m, None, h, coef=coef, slots=[0, 0, -1, -1], guidance=3.0)
assert float((out.double() - ref).norm() / ref.norm()) < 1e-5
try:
    solver_step(x, m, None, h, coef=coef, slots=[0, 0, -1, -1], guidance=3.0, backend="cpu")
    raise SystemExit("forced cpu backend did not raise")
except BackendUnavailableError as e:
    assert "fastdiff._C is not available" in str(e), e
print("ok")
"""
    run_without_extension(code)


# -------------------------------------------------------------------------------------------
# torch.library / torch.compile
# -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("be", ["cpu", "reference"])
def test_opcheck(be):
    if be == "cpu":
        _need(HAS_CPU_KERNEL, "fastdiff._C not built")
    c = make_case((2, 4, 8, 8), torch.float16, torch.float32, "separate", "d1-ring2", True, True, False, "cpu",
                  _seed("opcheck"))
    for guidance_t in (None, torch.tensor(c["guidance"])):
        args = (c["x"], c["model_out"], c["uncond"], c["history"], c["noise"], c["coef"], c["slots"], c["guidance"],
                guidance_t, c["clamp"], torch.empty_like(c["x"]), be)
        torch.library.opcheck(torch.ops.fastdiff.solver_step.default, args)


def _sample_loop(x, model_outs, history, noise, coefs, backend):
    # three 2M-like steps, ring buffer of one slot (read D_{i-1}, then overwrite it)
    for i in range(3):
        slots = [0, -1, -1, -1] if i == 0 else [0, 0, -1, -1]
        x = solver_step(x, model_outs[i], None, history, noise[i], coef=coefs[i], slots=slots, guidance=2.0,
                        backend=backend)
    return x


@pytest.mark.parametrize("be", ["cpu", "reference"])
def test_torch_compile_fullgraph(be):
    """fullgraph torch.compile over a small sampling loop, backend "aot_eager" (dynamo +
    functionalization of the mutating op; inductor's C++ compile is too slow for 2 cores)."""
    if be == "cpu":
        _need(HAS_CPU_KERNEL, "fastdiff._C not built")
    gen = torch.Generator().manual_seed(_seed("compile"))
    x = torch.randn(2, 4, 8, 8, generator=gen)
    model_outs = [torch.randn(4, 4, 8, 8, generator=gen).half() for _ in range(3)]
    noise = [torch.randn(2, 4, 8, 8, generator=gen) for _ in range(3)]
    coefs = [[1.1, -0.3, 0.9, 0.2, 0.0 if i == 0 else -0.1, 0, 0, 0.05, 0] for i in range(3)]
    h_eager = torch.zeros(1, 2, 4, 8, 8)
    h_comp = h_eager.clone()
    eager = _sample_loop(x, model_outs, h_eager, noise, coefs, be)
    torch._dynamo.reset()
    compiled = torch.compile(_sample_loop, fullgraph=True, backend="aot_eager")
    got = compiled(x, model_outs, h_comp, noise, coefs, be)
    assert torch.equal(got, eager)
    assert torch.equal(h_comp, h_eager)  # the history mutation is visible to the caller


# -------------------------------------------------------------------------------------------
# Triton compiles for GPU targets without a GPU (in a fresh interpreter: tests/gpu_compile.py)
# -------------------------------------------------------------------------------------------

def gpu_compile_case(everything, model_dtype, cc):
    """Compile the Triton step as the launcher does on CUDA (BLOCK 2048, 8 warps) for sm_<cc>,
    with every optional input on (CFG from a device scalar, three history reads, noise,
    history write, clamp) or none; -> resources and whether x is read with 16-byte loads."""
    import triton

    kmod = _dispatch.import_kernel("solver_step")
    flags = ("HAS_U", "HAS_WT", "HAS_H1", "HAS_H2", "HAS_H3", "HAS_Z", "HAS_HW", "HAS_CLAMP")
    consts = dict({f: everything for f in flags}, BLOCK=2048)
    fn = triton.jit(kmod._solver_step_kernel)
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = f"*{model_dtype}" if name in ("m_ptr", "u_ptr") else "*fp32"
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "numel":  # Triton specialises numel % 16 == 0 at launch (any latent of 16k elements)
            sig[name], attrs[(i,)] = "i64", [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32"
    from gpu_compile import compile_for_gpu

    k = compile_for_gpu(fn, sig, consts, attrs, cc, {"num_warps": 8})
    ptx = k.pop("ptx")
    return dict(k, named="_solver_step_kernel" in ptx, vector_loads="ld.global.v4" in ptx)


def test_triton_compiles_for_gpus():
    """No GPU needed: the Triton step compiles for sm_90a and sm_80 with all inputs on and off
    and fp16/fp32 model outputs, spills nothing, keeps its name for Nsight Compute's regex,
    reads 16 bytes per load and uses shared memory only to change layouts."""
    _need(HAS_TRITON, "triton is not installed")
    from gpu_compile import compile_isolated

    cases = [[everything, dt, cc] for everything in (True, False) for dt in ("fp16", "fp32") for cc in (90, 80)]
    for case, k in zip(cases, compile_isolated("test_solver_step", "gpu_compile_case", cases)):
        assert k["named"] and k["vector_loads"], case
        assert k["stack"] == 0, (case, k)
        # fp32 needs no shared memory. An fp16 model output is loaded 8 elements per 16-byte
        # load and the fp32 state 4, so Triton converts between the two layouts through
        # shared memory: one BLOCK x fp32 tile (a GPU run will tell whether that costs time).
        assert k["shared"] <= (0 if case[1] == "fp32" else 2048 * 4), (case, k)


# -------------------------------------------------------------------------------------------
# GPU only
# -------------------------------------------------------------------------------------------

cuda_only = gpu_test(HAS_CUDA_KERNEL, "needs a GPU and fastdiff._C built with CUDA")


@cuda_only
def test_cuda_graph_capture_and_replay():
    torch.manual_seed(0)
    x = torch.randn(2, 4, 32, 32, device="cuda")
    m = torch.randn(4, 4, 32, 32, device="cuda", dtype=torch.float16)
    h = torch.randn(1, 2, 4, 32, 32, device="cuda")
    out = torch.empty_like(x)
    coef = [1.1, -0.3, 0.9, 0.2, -0.1, 0, 0, 0, 0]
    args = dict(coef=coef, slots=[0, 0, -1, -1], guidance=3.0, out=out, backend="cuda")
    x0, m0, h0 = x.clone(), m.clone(), h.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm up outside capture
        solver_step(x, m, None, h.clone(), **args)
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        solver_step(x, m, None, h, **args)
    for _ in range(2):  # replay twice: the ring slot advances each time, like a real loop
        ref_out, ref_h = reference(dict(x=x, model_out=m, uncond=None, history=h, noise=None, coef=coef,
                                        slots=[0, 0, -1, -1], guidance=3.0, clamp=0.0))
        g.replay()
        torch.cuda.synchronize()
        assert_close(out, ref_out, torch.float32)
        assert_close(h[0], ref_h[0], torch.float32)
    assert torch.equal(x, x0) and torch.equal(m, m0) and not torch.equal(h, h0)


@cuda_only
def test_cuda_runs_on_current_stream():
    case = make_case((4, 4, 64, 64), torch.bfloat16, torch.float32, "doubled", "d2-alias", True, True, True, "cuda",
                     _seed("stream"))
    ref_out, ref_hist = reference(case)
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        out = call(case, "cuda")
    s.synchronize()
    assert_close(out, ref_out, torch.float32)
    assert_close(case["history"][1], ref_hist[1], torch.float32)


@cuda_only
@pytest.mark.parametrize("offset", [0, 1, 2, 4])
def test_cuda_vector_and_scalar_paths(offset):
    """numel not a multiple of the vector width plus every pointer alignment class."""
    case = make_case((3, 5, 7, 9), torch.float16, torch.float32, "separate", "d3-alias", True, True, False, "cuda",
                     _seed("paths", offset))
    if offset:
        for k in ("x", "model_out", "uncond", "history", "noise"):
            case[k] = _offset_view(case[k], offset)
    check_step(case, "cuda", torch.float32)


@cuda_only
def test_cuda_numel_past_int32():
    """2^31 + 7 elements in fp16 state: the 64-bit indexing of the CUDA kernel."""
    n = 2 ** 31 + 7
    need = n * 2 * 4  # x, model_out, out, history slot in fp16
    free, _ = torch.cuda.mem_get_info()
    if free < need * 1.2:
        pytest.skip(f"needs {need / 2**30:.0f} GiB of free GPU memory")
    x = torch.full((n,), 0.5, device="cuda", dtype=torch.float16)
    m = torch.full((n,), 2.0, device="cuda", dtype=torch.float16)
    h = torch.empty((1, n), device="cuda", dtype=torch.float16)
    x[-1] = 1.0
    m[-1] = -1.0
    out = solver_step(x, m, None, h, coef=[1.0, 0.5, 2.0, 1.0, 0, 0, 0, 0, 0], slots=[0, -1, -1, -1], backend="cuda")
    # D = x + m/2, out = 2x + D
    assert float(out[0]) == 2.5 and float(h[0, 0]) == 1.5
    assert float(out[-1]) == 2.5 and float(h[0, -1]) == 0.5
    assert float(out[2 ** 31]) == 2.5
    del x, m, h, out
    torch.cuda.empty_cache()


def test_guidance_as_a_device_tensor_equals_the_number(backend):
    """A 0-d float32 guidance tensor is read by the kernel (CUDA graphs replay with its current
    value): the result is bit-identical to passing the same number."""
    be, device = backend
    c = make_case((3, 4, 7, 5), torch.float16, torch.float32, "separate", "d1-ring2", True, True, False, device,
                  _seed("guidance-tensor"))
    kw = dict(coef=c["coef"], slots=c["slots"], clamp=c["clamp"], backend=be)
    hist_a, hist_b = c["history"].clone(), c["history"].clone()
    a = solver_step(c["x"], c["model_out"], c["uncond"], hist_a, c["noise"], guidance=c["guidance"], **kw)
    w = torch.tensor(c["guidance"], dtype=torch.float32, device=device)
    b = solver_step(c["x"], c["model_out"], c["uncond"], hist_b, c["noise"], guidance=w, **kw)
    assert torch.equal(a, b) and torch.equal(hist_a, hist_b)
    w.fill_(c["guidance"] + 1.0)  # the kernel reads the tensor's current value
    d = solver_step(c["x"], c["model_out"], c["uncond"], c["history"].clone(), c["noise"], guidance=w, **kw)
    assert not torch.equal(a, d)
