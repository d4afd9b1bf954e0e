"""The compiled fast path for calls an op checked before (csrc/common/known_calls.h).

`solver_step()`, `group_norm_silu()` and `attention()` check a call in full the first time they
see its signature and, when they chose the compiled backend (attention: SDPA), teach it to the
extension; the same call again runs from the wrapper's first line in C++. Checked here:
- a learned call gives the reference's result (outputs poisoned first) and does not enter the
  Python implementation (`_run`, spied on);
- a call differing in anything the checks or the backend choice read is checked again;
- tensors the kernels cannot read as plain memory (a negative view, a subclass) and calls under
  a dispatch mode never take the fast path.
Bad input after a learned call still raises: tests/test_bad_input.py and the ops' own
`test_bad_input_errors` ("after-the-same-tensors").
"""
from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from fastdiff import _ext
from fastdiff.ops import attention as att
from fastdiff.ops import group_norm_silu as gns
from fastdiff.ops import solver_step as ss
from conftest import HAS_CUDA, need
from tolerances import assert_close

# the fast path's CUDA branch runs only on a GPU (gpu_check.sh's tests phase: -m gpu)
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a GPU")])]
COEF = [0.9, -0.4, 0.7, 0.2, -0.1, 0.05, 0.0, 0.3, 0.0]  # b1, b2 and c in use
SLOTS = [2, 0, 1, -1]


@pytest.fixture(autouse=True)
def _extension():
    need(_ext.available(), f"fastdiff._C is not available ({_ext.LOAD_ERROR})")


def _spy(monkeypatch, module, name: str = "_run") -> list:
    """Counts the calls that enter `module`'s Python implementation (the full path)."""
    calls, real = [], getattr(module, name)

    def run(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, run)
    return calls


def _assert_learned(calls: list, run, expected, cases: list) -> list:
    """Runs `cases` (one signature) in turn, a given out poisoned first: each result is out (when
    given) and equals the float64 reference, and only the first call may enter the Python
    implementation (none where an earlier test left the signature learned). The results."""
    results = []
    for attempt, case in enumerate(cases):
        if case["out"] is not None:
            case["out"].fill_(float("nan"))
        got = run(case)
        checked = len(calls) if attempt == 0 else checked
        assert len(calls) == checked <= 1, f"call {attempt + 1} entered the Python implementation"
        assert case["out"] is None or got is case["out"]
        assert_close(got, expected(case), torch.float32, what=f"call {attempt + 1}")
        results.append(got)
    return results


class _Passthrough(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


class _Subclass(torch.Tensor):
    pass


# --- solver_step ---------------------------------------------------------------------------------


def _step_case(layout: str = "contiguous", model_dtype=torch.float32, **over) -> dict:
    g = torch.Generator().manual_seed(0)
    shape = (2, 4, 5, 3)

    def r(*s, dtype=torch.float32):
        t = torch.randn(*s, generator=g).to(dtype)
        return t.contiguous(memory_format=torch.channels_last) if layout == "channels_last" and t.dim() == 4 else t

    history = torch.randn(3, *shape, generator=g)
    if layout == "channels_last":  # each slot channels_last, slots adjacent
        history = history.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
    case = dict(x=r(*shape), model_out=r(4, *shape[1:], dtype=model_dtype), uncond=None, history=history,
                noise=r(*shape), coef=list(COEF), slots=list(SLOTS), guidance=7.5, clamp=0.0, out=None,
                backend="auto")
    case.update(over)
    return case


def _step(case):
    return ss.solver_step(case["x"], case["model_out"], case["uncond"], case["history"], case["noise"],
                          coef=case["coef"], slots=case["slots"], guidance=case["guidance"], clamp=case["clamp"],
                          out=case["out"], backend=case["backend"])


def _step_expected(case):
    """(next state, the history after the step) in float64, from copies of the inputs."""
    m, u = case["model_out"], case["uncond"]
    if u is None and m.shape[0] == 2 * case["x"].shape[0]:
        u, m = m.chunk(2)
    history = case["history"].double().cpu()
    g = case["guidance"]
    out = ss.solver_step_reference(case["x"].double().cpu(), m.double().cpu(), None if u is None else u.double().cpu(),
                                   history, case["noise"].double().cpu(), case["coef"], case["slots"],
                                   g.item() if isinstance(g, torch.Tensor) else g, case["clamp"],
                                   compute_dtype=torch.float64)
    return out, history


STEP_VARIANTS = {
    "CFG-doubled model_out, new out": {},
    "uncond given, out given": dict(uncond="split", out="new"),
    "in place (out=x)": dict(out="x"),
    "guidance as a tensor": dict(guidance=torch.tensor([7.5])),
    "clamped, no history reads": dict(clamp=0.5, coef=[0.9, -0.4, 0.7, 0.2, 0.0, 0.0, 0.0, 0.3, 0.1],
                                      slots=[1, -1, -1, -1]),
    "channels_last": dict(layout="channels_last", out="new"),
    "fp16 model output": dict(model_dtype=torch.float16),
}


def _on(case: dict, device: str) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in case.items()}


def _make_step_case(variant: str, device: str) -> dict:
    over = dict(STEP_VARIANTS[variant])
    case = _step_case(over.pop("layout", "contiguous"), over.pop("model_dtype", torch.float32))
    for k, v in over.items():
        if v == "split":
            case["uncond"], case["model_out"] = (t.clone() for t in case["model_out"].chunk(2))
        elif v == "new":
            case[k] = torch.empty_like(case["x"])
        elif v == "x":
            case[k] = case["x"]
        else:
            case[k] = v
    moved = _on(case, device)
    if case["out"] is case["x"]:
        moved["out"] = moved["x"]
    return moved


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("variant", list(STEP_VARIANTS))
def test_solver_step_learned_call_runs_compiled_and_matches_the_reference(variant, device, monkeypatch):
    case = _make_step_case(variant, device)
    calls = _spy(monkeypatch, ss)
    for attempt in range(3):  # the first call is checked in full (unless known already), the others are known
        expected, history = _step_expected(case)
        if case["out"] is not None and case["out"] is not case["x"]:
            case["out"].fill_(float("nan"))  # poisoned: every element must be written
        got = _step(case)
        checked = len(calls) if attempt == 0 else checked  # 0 where an earlier test left it learned
        assert len(calls) == checked <= 1, f"call {attempt + 1} entered the Python implementation"
        if case["out"] is not None:
            assert got is case["out"]
        assert got.stride() == case["x"].stride()
        assert_close(got, expected, case["model_out"].dtype, what=f"state, call {attempt + 1}")
        assert_close(case["history"], history, torch.float32, what=f"history, call {attempt + 1}")


STEP_CHANGES = {
    "another out": lambda c: c.update(out=torch.empty_like(c["x"])),
    "out overlapping the history (an error)": lambda c: c.update(out=c["history"][1]),
    "a coefficient": lambda c: c.update(coef=COEF[:3] + [0.25] + COEF[4:]),
    "the slots": lambda c: c.update(slots=[1, 0, 2, -1]),
    "guidance": lambda c: c.update(guidance=5.0),
    "clamp": lambda c: c.update(clamp=1.0),
    "the backend named": lambda c: c.update(backend="cpu"),
    "the reference backend": lambda c: c.update(backend="reference"),
    "x's dtype (an error)": lambda c: c.update(x=c["x"].double()),
    "x's strides (an error)": lambda c: c.update(x=c["x"].transpose(2, 3).contiguous().transpose(2, 3)),
    "a shape": lambda c: c.update(x=c["x"][:1], model_out=c["model_out"][[0, 2]],
                                  history=c["history"][:, :1].clone(), noise=c["noise"][:1], out=c["out"][:1]),
    "a negative view": lambda c: c.update(noise=torch._neg_view(c["noise"])),
    "a tensor subclass": lambda c: c.update(noise=c["noise"].as_subclass(_Subclass)),
}


def test_solver_step_triton_interpret_is_checked_again(monkeypatch):
    case = _step_case(out=torch.empty(2, 4, 5, 3))
    _step(case)
    calls = _spy(monkeypatch, ss)
    monkeypatch.setenv("TRITON_INTERPRET", "0" if ss._dispatch.triton_interpret() else "1")
    _step(case)
    assert len(calls) == 1, "TRITON_INTERPRET changes what auto chooses: the call must be checked again"


# --- group_norm_silu -----------------------------------------------------------------------------


def _norm_case(layout: str = "contiguous", **over) -> dict:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 8, 5, 3, generator=g) * 3 + 1
    residual = torch.randn(2, 8, 5, 3, generator=g)
    if layout == "channels_last":
        x, residual = (t.contiguous(memory_format=torch.channels_last) for t in (x, residual))
    case = dict(x=x, num_groups=4, weight=torch.randn(8, generator=g), bias=torch.randn(8, generator=g),
                eps=1e-5, silu=True, temb=torch.randn(2, 8, generator=g), residual=residual, num_splits=0, out=None,
                backend="auto")
    case.update(over)
    return case


def _norm(case):
    return gns.group_norm_silu(case["x"], case["num_groups"], case["weight"], case["bias"], eps=case["eps"],
                               silu=case["silu"], temb=case["temb"], residual=case["residual"], out=case["out"],
                               backend=case["backend"], num_splits=case["num_splits"])


def _norm_expected(case):
    d = {k: None if case[k] is None else case[k].double().cpu() for k in ("x", "weight", "bias", "temb", "residual")}
    return gns.group_norm_silu_reference(d["x"], case["num_groups"], d["weight"], d["bias"], case["eps"],
                                         case["silu"], d["temb"], d["residual"], compute_dtype=torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("given_out", [False, True])
def test_group_norm_silu_learned_call_runs_compiled_and_matches_the_reference(layout, given_out, device,
                                                                             monkeypatch):
    calls = _spy(monkeypatch, gns)
    base = _on(_norm_case(layout), device)
    out = torch.empty_like(base["x"]) if given_out else None
    # a new output: the key holds no pointers, so new inputs with the same metadata are known too
    # (a U-Net's activations); a given output: the very same tensors
    cases = [dict(base, out=out) if given_out else dict(base, x=base["x"].clone() + i, out=out) for i in range(3)]
    for got, case in zip(_assert_learned(calls, _norm, _norm_expected, cases), cases):
        assert got.stride() == case["x"].stride()


def _shifted_out(c):
    """residual and out one element apart in one buffer."""
    buf = torch.randn(c["residual"].numel() + 1)
    c.update(residual=buf[:-1].view(c["residual"].shape), out=buf[1:].view(c["residual"].shape))


NORM_CHANGES = {
    "another out": lambda c: c.update(out=torch.empty_like(c["x"])),
    "out overlapping residual, shifted (an error)": lambda c: _shifted_out(c),
    "num_groups": lambda c: c.update(num_groups=2),
    "eps": lambda c: c.update(eps=1e-3),
    "silu": lambda c: c.update(silu=False),
    "num_splits": lambda c: c.update(num_splits=2),
    "no temb": lambda c: c.update(temb=None),
    "the reference backend": lambda c: c.update(backend="reference"),
    "a negative view": lambda c: c.update(residual=torch._neg_view(c["residual"])),
    "a tensor subclass": lambda c: c.update(bias=c["bias"].as_subclass(_Subclass)),
    "num_groups not dividing C (an error)": lambda c: c.update(num_groups=3),
}


# --- attention -----------------------------------------------------------------------------------


def _attn_case(**over) -> dict:
    g = torch.Generator().manual_seed(2)
    qkv = torch.randn(2, 7, 3, 4, 8, generator=g)  # (B, L, 3, H, D): q, k, v strided views, as a U-Net's
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    case = dict(q=q, k=k, v=v, scale=None, out=None, backend="auto")
    case.update(over)
    return case


def _attend(case):
    return att.attention(case["q"], case["k"], case["v"], scale=case["scale"], out=case["out"],
                         backend=case["backend"])


def _attn_expected(case):
    return att.attention_reference(case["q"].double().cpu(), case["k"].double().cpu(), case["v"].double().cpu(),
                                   case["scale"], compute_dtype=torch.float64)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("given_out", [False, True])
def test_attention_learned_call_runs_sdpa_from_cpp_and_matches_the_reference(given_out, device, monkeypatch):
    calls = _spy(monkeypatch, att, "_provider")
    base = _on(_attn_case(scale=0.3), device)
    out = torch.empty(2, 4, 7, 8, device=device) if given_out else None
    # without out the key holds no pointers: new inputs with the same metadata are known too
    cases = [dict(base, out=out) if given_out else dict(base, q=base["q"] + i) for i in range(3)]
    for got in _assert_learned(calls, _attend, _attn_expected, cases):
        assert given_out or got.transpose(1, 2).is_contiguous()  # SDPA's heads-last result, no copy


def _shifted_attn_out(c):
    """out one element past q's start, in q's buffer."""
    buf = torch.randn(2 * 4 * 7 * 8 + 1)
    c.update(q=buf[:-1].view(2, 7, 4, 8).transpose(1, 2), out=buf[1:].view(2, 4, 7, 8))


ATTN_CHANGES = {
    "another out": lambda c: c.update(out=torch.empty(2, 4, 7, 8)),
    "out overlapping q, shifted (an error)": _shifted_attn_out,
    "scale given": lambda c: c.update(scale=0.5),
    "the reference backend": lambda c: c.update(backend="reference"),
    "fewer keys": lambda c: c.update(k=c["k"][:, :, :3], v=c["v"][:, :, :3]),
    "k's dtype (an error)": lambda c: c.update(k=c["k"].double()),
    "a negative view": lambda c: c.update(v=torch._neg_view(c["v"])),
    "a tensor subclass": lambda c: c.update(k=c["k"].as_subclass(_Subclass)),
}


# --- every op: a changed call, a dispatch mode --------------------------------------------------

# op: (a learned call's case, with out given; run it; its float64 result; the module and the
# function of it that a checked call enters; the changes)
OPS = {
    "solver_step": (lambda: _step_case(out=torch.empty(2, 4, 5, 3)), _step, lambda c: _step_expected(c)[0], ss, "_run", STEP_CHANGES),
    "group_norm_silu": (lambda: _norm_case(out=torch.empty(2, 8, 5, 3)), _norm, _norm_expected, gns, "_run",
                        NORM_CHANGES),
    "attention": (lambda: _attn_case(out=torch.empty(2, 4, 7, 8)), _attend, _attn_expected, att, "_provider",
                  ATTN_CHANGES),
}
CHANGES = [(op, change) for op, row in OPS.items() for change in row[5]]


@pytest.mark.parametrize("op,change", CHANGES, ids=[f"{op}: {change}" for op, change in CHANGES])
def test_any_change_is_checked_again(op, change, monkeypatch):
    make, run, expected, module, entry, changes = OPS[op]
    case = make()
    run(case)
    calls = _spy(monkeypatch, module, entry)
    run(case)
    assert not calls, "the learned call itself was not run from the fast path"
    changes[change](case)
    if change.endswith("(an error)"):
        with pytest.raises((TypeError, ValueError)):
            run(case)
    else:
        want = expected(case)  # before the call: the step writes a history slot
        assert_close(run(case), want, torch.float32, what=change)
    assert len(calls) == 1, "a changed call must be checked (and its backend chosen) again"


@pytest.mark.parametrize("op", list(OPS))
def test_a_call_under_a_dispatch_mode_takes_the_registered_op(op, monkeypatch):
    make, run, expected, module, entry, _ = OPS[op]
    case = make()
    run(case)
    calls = _spy(monkeypatch, module, entry)
    want = expected(case)
    with _Passthrough():
        got = run(case)
    assert len(calls) == 1
    assert_close(got, want, torch.float32)
