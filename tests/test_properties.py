"""Property tests: every op on random valid shapes, dtypes and options, against its plain-PyTorch
`*_reference` computed in float64 from the very values the op reads.

Hypothesis draws a case -- shape, dtypes, options and one integer seed, so that a falsifying
example prints in a line -- and a torch.Generator seeded with it makes the tensor values (drawing
element lists would be slow and no better). Properties, on each backend that runs on this
machine's CPU ("cpu", "triton-interp", "reference"; the GPU backends are covered by the per-op
test files):

1. every output, NaN-poisoned before the call, equals the float64 reference element by element
   within tests/tolerances.py's bound for its dtype (`assert_close_each`);
2. the inputs are not modified (bit for bit);
3. `out` aliasing an input, where the op allows it (solver_step out=x, group_norm_silu out=x or
   out=residual, linear_residual out=residual), gives bit for bit the result of a separate out;
4. a valid case broken in one drawn way (wrong dtype, shape, coefficient count, slot, groups,
   eps) raises an error naming the op, with the NaN-poisoned `out` and every input untouched.

Budget: the whole file takes about 15 s on one CPU core (it must stay under a minute); the
Triton interpreter runs each program in Python, so it gets fewer examples (EXAMPLES). The
examples are derandomized and no example database is kept, so every run (CI included) tests the
same cases; a failure is shrunk (minutes under the interpreter) and prints the falsifying case
and the blob that reproduces it.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fastdiff.ops.attention import attention, attention_reference, kv_attention, qkv_attention
from fastdiff.ops.group_norm_silu import group_norm_silu, group_norm_silu_reference
from fastdiff.ops.linear_residual import linear_residual, linear_residual_reference
from fastdiff.ops.solver_step import solver_step, solver_step_reference
from conftest import setup_backend
from tolerances import assert_close_each
from test_attention import LAYOUTS, make_inputs

F64 = torch.float64
NAN = float("nan")
CPU_BACKENDS = ("cpu", "triton-interp", "reference")
EXAMPLES = {"cpu": 150, "reference": 150, "triton": 40}  # by backend (setup_backend's name)

DTYPES = st.sampled_from([torch.float32, torch.float16, torch.bfloat16])
BATCH = st.sampled_from([1, 2, 3])  # 1, the CFG-doubled 2, odd
SIZE = st.integers(1, 9)  # odd and prime extents: no size is a multiple of a vector or block
SEED = st.integers(0, 2**32 - 1)


def run_examples(backend: str, cases: st.SearchStrategy, prop) -> None:
    """prop(backend, case) over the drawn cases (a @given inside the test, so the backend's
    environment from setup_backend holds for every example)."""

    @settings(max_examples=EXAMPLES[backend], deadline=None, derandomize=True, database=None, print_blob=True)
    @given(cases)
    def examples(case):
        prop(backend, case)

    examples()


def shape_of(draw, lead: tuple, min_extra: int, max_extra: int) -> tuple:
    return lead + tuple(draw(SIZE) for _ in range(draw(st.integers(min_extra, max_extra))))


def randn(gen, shape, dtype, std=1.0, mean=0.0):
    return (torch.randn(shape, generator=gen, dtype=F64) * std + mean).to(dtype)


def channels_inner(t: torch.Tensor, channel_dim: int = 1) -> torch.Tensor:
    """t's values in the channels-last layout: `channel_dim` innermost in memory, the other
    dimensions in order (torch.channels_last for 4-D; also any other rank, and history slots)."""
    order = [d for d in range(t.dim()) if d != channel_dim] + [channel_dim]
    inverse = sorted(range(t.dim()), key=order.__getitem__)
    return t.permute(order).contiguous().permute(inverse)


def bits(t: torch.Tensor) -> torch.Tensor:
    """t's storage bits (equal NaNs compare equal; -0.0 != 0.0)."""
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def snapshot(tensors: dict) -> dict:
    return {name: t.clone() for name, t in tensors.items() if isinstance(t, torch.Tensor)}


def assert_unchanged(before: dict, tensors: dict) -> None:
    for name, t0 in before.items():
        assert torch.equal(bits(tensors[name]), bits(t0)), f"input {name} was modified"


def f64(t):
    return t.to(F64) if isinstance(t, torch.Tensor) else t


def poisoned(like: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(like).fill_(NAN)  # empty_like keeps a dense layout


# -------------------------------------------------------------------------------------------
# solver_step
# -------------------------------------------------------------------------------------------

@st.composite
def solver_step_cases(draw):
    model_dtype = draw(DTYPES)
    shape = shape_of(draw, (draw(BATCH),), 0, 4)
    cfg = draw(st.sampled_from(["none", "separate", "doubled"]))
    num_slots = draw(st.integers(0, 4))
    return dict(
        model_dtype=model_dtype, state_dtype=draw(st.sampled_from([torch.float32, model_dtype])), shape=shape,
        channels_last=len(shape) >= 3 and draw(st.booleans()), cfg=cfg,
        guidance_as_tensor=cfg != "none" and draw(st.booleans()), num_slots=num_slots,
        # any slot may be unused (-1) or any of the ring's; the write slot may equal a read slot
        slots=draw(st.lists(st.integers(-1, num_slots - 1), min_size=4, max_size=4)),
        noise=draw(st.booleans()), clamp=draw(st.sampled_from([0.0, 0.5, 2.0])), seed=draw(SEED))


def make_solver_step(spec) -> dict:
    """The op's arguments for a drawn case; history slots that the step does not read are NaN
    (a read would make out NaN; a missed write to the write slot stays NaN)."""
    gen = torch.Generator().manual_seed(spec["seed"])
    shape, slots = spec["shape"], spec["slots"]

    def tensor(dtype, batch=shape[0]):
        t = randn(gen, (batch,) + shape[1:], dtype)
        return channels_inner(t) if spec["channels_last"] else t

    doubled = spec["cfg"] == "doubled"
    case = dict(x=tensor(spec["state_dtype"]), model_out=tensor(spec["model_dtype"], (1 + doubled) * shape[0]),
                uncond=tensor(spec["model_dtype"]) if spec["cfg"] == "separate" else None,
                noise=tensor(spec["state_dtype"]) if spec["noise"] else None, history=None,
                slots=slots, clamp=spec["clamp"], guidance=1.0)
    if spec["num_slots"]:
        history = randn(gen, (spec["num_slots"],) + shape, spec["state_dtype"])
        history = channels_inner(history, channel_dim=2) if spec["channels_last"] else history
        for s in set(range(spec["num_slots"])) - set(slots[1:]):
            history[s] = NAN
        case["history"] = history
    coef = [float(v) for v in torch.empty(9, dtype=F64).uniform_(-1.0, 1.0, generator=gen)]
    for k in (1, 2, 3):
        if slots[k] < 0:
            coef[3 + k] = 0.0  # nonzero b_k without its slot is an error, not a case
    if not spec["noise"]:
        coef[7] = 0.0
    case["coef"] = coef
    if spec["cfg"] != "none":
        w = 1.0 + 6.0 * float(torch.rand((), generator=gen, dtype=F64))
        case["guidance"] = torch.tensor([w]) if spec["guidance_as_tensor"] else w
    return case


def solver_step_expected(case):
    """-> (out, history) in float64: the reference on float64 copies of what the op reads."""
    b = case["x"].shape[0]
    model_out, uncond = case["model_out"], case["uncond"]
    if model_out.shape[0] != b:  # CFG-doubled: unconditional half first
        uncond, model_out = model_out[:b], model_out[b:]
    history = f64(case["history"])
    out = solver_step_reference(f64(case["x"]), f64(model_out), f64(uncond), history, f64(case["noise"]),
                                case["coef"], case["slots"], f64(case["guidance"]), case["clamp"], compute_dtype=F64)
    return out, history


def run_solver_step(case, backend, out):
    return solver_step(case["x"], case["model_out"], case["uncond"], case["history"], case["noise"],
                       coef=case["coef"], slots=case["slots"], guidance=case["guidance"], clamp=case["clamp"],
                       out=out, backend=backend)


def solver_step_property(backend, spec):
    case = make_solver_step(spec)
    x, history, sw = case["x"], case["history"], case["slots"][0]
    before = snapshot(case)
    ref_out, ref_history = solver_step_expected(case)

    out = run_solver_step(case, backend, poisoned(x))
    assert out.stride() == x.stride()
    assert_close_each(out, ref_out, x.dtype, what="out")
    written = None if history is None else history.clone()
    if sw >= 0:
        assert_close_each(history[sw], ref_history[sw], x.dtype, what=f"history[{sw}] (write slot)")
        history[sw] = before["history"][sw]  # every other slot must be untouched
    assert_unchanged(before, case)

    # out=x (with the write slot equal to a read slot where drawn so): the same bits
    again = dict(case, **snapshot(before))
    res = run_solver_step(again, backend, again["x"])
    assert res is again["x"]
    assert torch.equal(bits(res), bits(out)), "out=x differs from a separate out"
    if written is not None:
        assert torch.equal(bits(again["history"]), bits(written)), "history differs with out=x"


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_solver_step(backend, monkeypatch):
    be, _ = setup_backend(backend, "solver_step", monkeypatch)
    run_examples(be, solver_step_cases(), solver_step_property)


# -------------------------------------------------------------------------------------------
# group_norm_silu
# -------------------------------------------------------------------------------------------

@st.composite
def group_norm_cases(draw):
    dtype = draw(DTYPES)
    groups, per_group = draw(st.integers(1, 6)), draw(st.integers(1, 5))  # G = 1 and G = C included
    shape = shape_of(draw, (draw(BATCH), groups * per_group), 0, 3)
    param_dtype = st.sampled_from([None, dtype, torch.float32])  # None: the parameter is not given
    temb_dtype = draw(param_dtype)
    return dict(
        dtype=dtype, shape=shape, num_groups=groups, channels_last=len(shape) >= 3 and draw(st.booleans()),
        weight_dtype=draw(param_dtype), bias_dtype=draw(param_dtype), temb_dtype=temb_dtype,
        temb_strided=temb_dtype is not None and draw(st.booleans()), residual=draw(st.booleans()),
        mean=draw(st.sampled_from([0.0, 3.0, 1e3])),  # groups far from zero: the statistics keep precision
        silu=draw(st.booleans()), eps=draw(st.sampled_from([1e-6, 1e-5, 1e-3, 0.5])),
        num_splits=draw(st.sampled_from([0, 1, 2, 3])), seed=draw(SEED))


def make_group_norm(spec) -> dict:
    gen = torch.Generator().manual_seed(spec["seed"])
    dtype, shape = spec["dtype"], spec["shape"]
    n, c = shape[:2]

    def layout(t):
        return channels_inner(t) if spec["channels_last"] else t

    def param(dtype, **kw):
        return None if dtype is None else randn(gen, (c,), dtype, **kw)

    temb = None
    if spec["temb_dtype"] is not None:
        temb = randn(gen, (n, 3 * c), spec["temb_dtype"], std=1.5)
        temb = temb[:, c:2 * c] if spec["temb_strided"] else temb[:, :c].contiguous()  # a slice of a projection
    return dict(x=layout(randn(gen, shape, dtype, std=2.0, mean=spec["mean"])), num_groups=spec["num_groups"],
                weight=param(spec["weight_dtype"], std=0.5, mean=1.0), bias=param(spec["bias_dtype"], std=0.5),
                temb=temb, residual=layout(randn(gen, shape, dtype)) if spec["residual"] else None,
                **{k: spec[k] for k in ("silu", "eps", "num_splits")})


def run_group_norm(case, backend, out):
    return group_norm_silu(case["x"], case["num_groups"], case["weight"], case["bias"], eps=case["eps"],
                           silu=case["silu"], temb=case["temb"], residual=case["residual"], out=out,
                           backend=backend, num_splits=case["num_splits"])


def group_norm_property(backend, spec):
    case = make_group_norm(spec)
    x = case["x"]
    before = snapshot(case)
    ref = group_norm_silu_reference(*(f64(case[k]) for k in ("x", "num_groups", "weight", "bias", "eps", "silu",
                                                             "temb", "residual")), compute_dtype=F64)
    out = run_group_norm(case, backend, poisoned(x))
    assert out.stride() == x.stride()
    assert_close_each(out, ref, x.dtype, what="out")
    assert_unchanged(before, case)

    # out=x and out=residual (in place): the same bits
    for target in ("x", "residual"):
        if case[target] is not None:
            again = dict(case, **snapshot(before))
            res = run_group_norm(again, backend, again[target])
            assert res is again[target]
            assert torch.equal(bits(res), bits(out)), f"out={target} differs from a separate out"


# the interpreter evaluates SiLU's exp(-y) in numpy, which warns where y < -88 (the result, -0, is right)
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_group_norm_silu(backend, monkeypatch):
    be, _ = setup_backend(backend, "group_norm_silu", monkeypatch)
    run_examples(be, group_norm_cases(), group_norm_property)


# -------------------------------------------------------------------------------------------
# inputs the ops must reject: a clear error, before anything is written
# -------------------------------------------------------------------------------------------

def _last_plus_one(t):
    return torch.cat([t, t[..., :1]], dim=-1)


# (name, how a valid case is broken); every one must raise naming the op and write nothing
SOLVER_STEP_BREAKS = {
    "model_out int": lambda c: c.update(model_out=c["model_out"].to(torch.int32)),
    "model_out shape": lambda c: c.update(model_out=_last_plus_one(c["model_out"])),
    "noise shape": lambda c: c.update(noise=_last_plus_one(c["x"]).float()),
    "coef length": lambda c: c.update(coef=c["coef"][:7]),
    "slot out of range": lambda c: c.update(slots=[c["slots"][0], c["history"].shape[0] if c["history"] is not None
                                                   else 0] + c["slots"][2:], coef=c["coef"][:4] + [0.5] + c["coef"][5:]),
    "x float64": lambda c: c.update(x=c["x"].double()),
}
GROUP_NORM_BREAKS = {
    "groups not dividing C": lambda c: c.update(num_groups=c["x"].shape[1] + 1),
    "weight length": lambda c: c.update(weight=torch.ones(c["x"].shape[1] + 1)),
    "residual shape": lambda c: c.update(residual=_last_plus_one(c["x"])),
    "temb batch": lambda c: c.update(temb=torch.ones(c["x"].shape[0] + 1, c["x"].shape[1])),
    "x int": lambda c: c.update(x=c["x"].to(torch.int32)),
    "eps": lambda c: c.update(eps=-1.0),
}


def rejection_property(make, run, breaks, op_name):
    def prop(backend, drawn):
        spec, broken = drawn
        case = make(spec)
        out = poisoned(case["x"] if case["x"].is_floating_point() else case["x"].float())
        breaks[broken](case)
        before = snapshot(case)
        with pytest.raises((TypeError, ValueError, RuntimeError), match=op_name):
            run(case, backend, out)
        assert torch.isnan(out).all(), f"{broken}: out was written before the error"
        assert_unchanged(before, case)
    return prop


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_solver_step_rejects_bad_inputs_before_writing(backend, monkeypatch):
    be, _ = setup_backend(backend, "solver_step", monkeypatch)
    run_examples(be, st.tuples(solver_step_cases(), st.sampled_from(sorted(SOLVER_STEP_BREAKS))),
                 rejection_property(make_solver_step, run_solver_step, SOLVER_STEP_BREAKS, "solver_step"))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_group_norm_silu_rejects_bad_inputs_before_writing(backend, monkeypatch):
    be, _ = setup_backend(backend, "group_norm_silu", monkeypatch)
    run_examples(be, st.tuples(group_norm_cases(), st.sampled_from(sorted(GROUP_NORM_BREAKS))),
                 rejection_property(make_group_norm, run_group_norm, GROUP_NORM_BREAKS, "group_norm_silu"))


# -------------------------------------------------------------------------------------------
# attention, qkv_attention, kv_attention
# -------------------------------------------------------------------------------------------

HEAD_DIMS = st.sampled_from([16, 40, 64])  # one power-of-two part, 32 + 16 (masked), 64
TOKENS = st.integers(1, 40)  # across the interpreter's 32-query / 16-key tiles: tails, single rows
# the spread of the logits, scale * |q| |k| (None: the default scale 1/sqrt(D), spread 1). Up to
# 4, where the softmax is already peaked: each fp32 logit is rounded to about |logit| * 6e-8,
# and the softmax passes that on as a relative error of the weights, so far larger logits would
# exceed tolerances.py's fp32 row for every fp32 implementation, the reference included
# (test_attention.py's peaked-softmax test holds those to the eager yardstick instead).
LOGIT_SPREADS = st.sampled_from([None, 0.25, 2.0, 4.0])


def scale_for(spread, head_dim):
    return None if spread is None else spread / math.sqrt(head_dim)


def attention_factor(backend, dtype) -> float:
    """The interpreter's fp32 -> bf16 casts truncate instead of rounding to nearest (as GPUs do):
    P and out each lose up to a whole bf16 ulp, all toward zero -- twice the rounding that
    tolerances.py's bf16 row allows for (the kernel's result equals a truncating emulation bit for
    bit, and a rounding one is within the row). Only Triton runs interpreted in this file."""
    return 2.0 if backend == "triton" and dtype == torch.bfloat16 else 1.0


def attention_property(backend, spec):
    q, k, v, out = make_inputs(*(spec[n] for n in ("b", "h", "lq", "lk", "d", "dtype", "layout")), "cpu",
                               spec["seed"])
    scale = scale_for(spec["spread"], spec["d"])
    before = snapshot(dict(q=q, k=k, v=v))
    assert attention(q, k, v, scale=scale, out=out, backend=backend) is out
    assert_close_each(out, attention_reference(f64(q), f64(k), f64(v), scale, compute_dtype=F64), q.dtype,
                      factor=attention_factor(backend, q.dtype))
    assert_unchanged(before, dict(q=q, k=k, v=v))


ATTENTION_CASES = st.fixed_dictionaries(dict(
    b=BATCH, h=st.integers(1, 3), lq=TOKENS, lk=TOKENS, d=HEAD_DIMS, dtype=DTYPES, spread=LOGIT_SPREADS,
    layout=st.sampled_from(LAYOUTS), seed=SEED))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_attention(backend, monkeypatch):
    be, _ = setup_backend(backend, None, monkeypatch)  # cpu = PyTorch SDPA: nothing compiled needed
    run_examples(be, ATTENTION_CASES, attention_property)


def packed_attention_property(backend, spec):
    """qkv_attention (B, L, 3*H*D), or (cross) kv_attention q (B, Lq, H*D), kv (B, Lk, 2*H*D)."""
    gen = torch.Generator().manual_seed(spec["seed"])
    b, heads, lq, d, dtype = (spec[n] for n in ("b", "heads", "lq", "d", "dtype"))
    scale = scale_for(spec["spread"], d)
    if spec["cross"]:
        fused = dict(q=randn(gen, (b, lq, heads * d), dtype), kv=randn(gen, (b, spec["lk"], 2 * heads * d), dtype))
    else:
        fused = dict(qkv=randn(gen, (b, lq, 3 * heads * d), dtype))
    before = snapshot(fused)
    out = torch.full((b, lq, heads * d), NAN, dtype=dtype) if spec["out"] else None

    def split(t, parts):  # (B, L, parts*H*D) -> parts x (B, H, L, D), float64
        return [p.transpose(1, 2) for p in f64(t).unflatten(-1, (parts, heads, d)).unbind(2)]

    if spec["cross"]:
        res = kv_attention(fused["q"], fused["kv"], heads, scale=scale, out=out, backend=backend)
        (q,), (k, v) = split(fused["q"], 1), split(fused["kv"], 2)
    else:
        res = qkv_attention(fused["qkv"], heads, scale=scale, out=out, backend=backend)
        q, k, v = split(fused["qkv"], 3)
    assert out is None or res is out
    ref = attention_reference(q, k, v, scale, compute_dtype=F64).transpose(1, 2).flatten(2)
    assert_close_each(res, ref, dtype, factor=attention_factor(backend, dtype))
    assert_unchanged(before, fused)


PACKED_ATTENTION_CASES = st.fixed_dictionaries(dict(
    b=BATCH, heads=st.integers(1, 3), lq=TOKENS, lk=TOKENS, d=HEAD_DIMS, dtype=DTYPES, spread=LOGIT_SPREADS,
    cross=st.booleans(), out=st.booleans(), seed=SEED))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_packed_attention(backend, monkeypatch):
    be, _ = setup_backend(backend, None, monkeypatch)
    run_examples(be, PACKED_ATTENTION_CASES, packed_attention_property)


# -------------------------------------------------------------------------------------------
# linear_residual (plain PyTorch on every device: one implementation, run on the CPU)
# -------------------------------------------------------------------------------------------

@st.composite
def linear_residual_cases(draw):
    lead = shape_of(draw, (), 0, 2)  # x (*lead, K): rank 1 to 3
    # rows: contiguous; padded: rows of a wider buffer; columns: a (B, N, L) map seen as (B, L, N)
    layouts = ["rows", "padded", "columns"] if len(lead) == 2 else ["rows", "padded"]
    return dict(lead=lead, k=draw(st.integers(1, 24)), n=draw(st.integers(1, 24)), dtype=draw(DTYPES),
                layout=draw(st.sampled_from(layouts)), bias=draw(st.booleans()), out_given=draw(st.booleans()),
                seed=draw(SEED))


def make_linear_residual(spec) -> dict:
    gen = torch.Generator().manual_seed(spec["seed"])
    lead, k, n, dtype = spec["lead"], spec["k"], spec["n"], spec["dtype"]
    if spec["layout"] == "columns":
        residual = randn(gen, (lead[0], n, lead[1]), dtype).transpose(1, 2)
    elif spec["layout"] == "padded":
        residual = randn(gen, lead + (n + 3,), dtype)[..., 1:n + 1]
    else:
        residual = randn(gen, lead + (n,), dtype)
    return dict(x=randn(gen, lead + (k,), dtype), weight=randn(gen, (n, k), dtype, std=k ** -0.5),
                bias=randn(gen, (n,), dtype) if spec["bias"] else None, residual=residual)


def linear_residual_property(backend, spec):
    args = make_linear_residual(spec)
    before = snapshot(args)
    ref = linear_residual_reference(*(f64(t) for t in args.values()), compute_dtype=F64)
    out = torch.full_like(args["residual"], NAN) if spec["out_given"] else None
    res = linear_residual(**args, out=out)
    assert out is None or res is out
    assert_close_each(res, ref, spec["dtype"])
    assert_unchanged(before, args)

    # out=residual (in place): the same bits
    again = dict(args, **snapshot(before))
    assert linear_residual(**again, out=again["residual"]) is again["residual"]
    assert torch.equal(bits(again["residual"]), bits(res)), "out=residual differs from a separate out"


def test_linear_residual():
    run_examples("reference", linear_residual_cases(), linear_residual_property)
