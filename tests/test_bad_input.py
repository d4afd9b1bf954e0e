"""The bad-input catalogue: one row per bad argument of sample()/Sampler()/optimize()/UNetConfig.

Each row asserts the exception type, that the message names the argument, that the model was
never called before the error (where the error can be known before a call), and that the
caller's tensors are unchanged. New arguments get new rows here. The CLIs have their own
catalogue (tests/test_cli_errors.py).
"""
from __future__ import annotations

import pytest
import torch

import fastdiff
from fastdiff.nn import UNetConfig


class Spy:
    """A model that counts its calls."""

    def __init__(self, fn=None):
        self.calls, self.fn = 0, fn

    def __call__(self, x, t, **kw):
        self.calls += 1
        return self.fn(x, t) if self.fn else 0.1 * torch.tanh(x)


def _noise(*shape):
    return torch.randn(*(shape or (2, 3, 4, 4)), generator=torch.Generator().manual_seed(0))


def _meta_gen():
    try:
        return torch.Generator("meta")
    except RuntimeError:
        pytest.skip("this torch cannot make a meta generator")


_SHARED_GENERATOR = torch.Generator()

# (id, kwargs for fastdiff.sample besides model/noise, exception, text the message must contain)
# a kwarg "noise" replaces the default noise; "model" replaces the spy's function.
SAMPLE_ROWS = [
    # plan
    ("solver-misspelled", dict(solver="dpmpp2m"), ValueError, "solver: .*did you mean 'dpmpp_2m'"),
    ("spacing-misspelled", dict(spacing="trailng"), ValueError, "spacing: .*did you mean 'trailing'"),
    ("prediction-misspelled", dict(prediction="epsilonn"), ValueError, "prediction: .*did you mean 'epsilon'"),
    ("schedule-unknown", dict(schedule="scaled_lin"), ValueError, "schedule"),
    ("steps-zero", dict(steps=0), ValueError, "steps"),
    ("steps-float", dict(steps=2.5), ValueError, "steps"),
    ("eta-string", dict(solver="ddim", eta="0.5"), ValueError, "eta"),
    ("eta-wrong-solver", dict(solver="dpmpp_2m", eta=0.5), ValueError, "eta"),
    ("rho-zero", dict(spacing="karras", rho=0), ValueError, "rho"),
    ("variance-wrong-solver", dict(solver="dpmpp_2m", variance="large"), ValueError, "variance"),
    ("order-wrong-solver", dict(solver="dpmpp_2m", order=2), ValueError, "order: only 'unipc'"),
    ("variant-wrong-solver", dict(solver="ddim", variant="bh2"), ValueError, "variant: only 'unipc'"),
    ("corrector-wrong-solver", dict(corrector=False), ValueError, "corrector: only 'unipc'"),
    ("order-zero", dict(solver="unipc", order=0), ValueError, "order: expected 1, 2 or 3"),
    ("order-four", dict(solver="unipc", order=4), ValueError, "order: expected 1, 2 or 3"),
    ("order-float", dict(solver="unipc", order=2.0), ValueError, "order"),
    ("order-bool", dict(solver="unipc", order=True), ValueError, "order"),
    ("variant-misspelled", dict(solver="unipc", variant="BH2"), ValueError, "variant: .*did you mean 'bh2'"),
    ("corrector-string", dict(solver="unipc", corrector="no"), ValueError, "corrector: expected True or False"),
    ("steps_offset-fraction", dict(spacing="leading", steps_offset=2.5), ValueError, "steps_offset"),
    ("sigma_min-with-trailing", dict(spacing="trailing", sigma_min=0.1), ValueError, "sigma_min"),
    ("sigma_max-beyond-schedule", dict(spacing="karras", sigma_max=1e9, schedule="scaled_linear"), ValueError,
     "sigma_max"),
    ("leading-final-min-collapses", dict(spacing="leading", steps=4, final="min"), ValueError, "final='min'"),
    ("clamp-negative", dict(clamp=-1.0), ValueError, "clamp"),
    ("clamped_model_output-wrong-solver", dict(solver="heun", clamp=1.0, clamped_model_output=True), ValueError,
     "clamped_model_output: only 'ddim'"),
    ("clamped_model_output-string", dict(solver="ddim", clamped_model_output="yes"), ValueError,
     "clamped_model_output: expected True or False"),
    ("backend-unknown", dict(backend="gpu"), ValueError, "backend"),
    ("s_churn-wrong-solver", dict(solver="dpmpp_2m", s_churn=1.0), ValueError, "s_churn: only 'heun'"),
    ("s_noise-wrong-solver", dict(solver="euler", s_noise=1.003), ValueError, "s_noise: only 'heun'"),
    ("s_churn-negative", dict(solver="heun", s_churn=-1.0), ValueError, "s_churn: expected a number >= 0"),
    ("s_churn-string", dict(solver="heun", s_churn="1"), ValueError, "s_churn"),
    ("s_churn-inf", dict(solver="heun", s_churn=float("inf")), ValueError, "s_churn: expected a finite"),
    ("s_tmax-nan", dict(solver="heun", s_tmax=float("nan")), ValueError, "s_tmax"),
    ("s_tmin-above-s_tmax", dict(solver="heun", s_tmin=2.0, s_tmax=1.0), ValueError, "s_tmin/s_tmax"),
    # trailing starts at the schedule's top: any churn of step 0 would leave the schedule
    ("s_churn-above-schedule", dict(solver="heun", s_churn=1.0), ValueError, "s_churn: step 0 .*above"),
    ("s_churn-with-round_timesteps", dict(solver="heun", s_churn=1.0, round_timesteps=True, spacing="karras",
                                          sigma_max=10.0), ValueError, "s_churn: .*round_timesteps"),
    ("heun-at-zero-snr", dict(solver="heun", zero_terminal_snr=True, prediction="v"), ValueError,
     "solver: 'heun' works in sigma/alpha"),
    ("noise_scale-zero", dict(noise_scale=0.0), ValueError, "noise_scale: expected a finite number > 0"),
    ("noise_scale-nan", dict(noise_scale=float("nan")), ValueError, "noise_scale"),
    ("noise_scale-string", dict(noise_scale="1"), ValueError, "noise_scale"),
    ("output_scale-negative", dict(output_scale=-2.0), ValueError, "output_scale: expected a finite number > 0"),
    ("output_scale-inf", dict(output_scale=float("inf")), ValueError, "output_scale"),
    ("output_scale-bool", dict(output_scale=True), ValueError, "output_scale"),
    ("d2_weight-wrong-solver", dict(solver="dpmpp_2m", d2_weight=1.0), ValueError, "d2_weight: only 'dpmpp_3m'"),
    ("d2_weight-negative", dict(solver="dpmpp_3m", d2_weight=-1.0), ValueError, "d2_weight: expected a finite"),
    ("first_step-too-large", dict(first_step=4), ValueError, "first_step: expected an integer in \\[0, 4\\)"),
    ("first_step-negative", dict(first_step=-1), ValueError, "first_step"),
    ("first_step-float", dict(first_step=1.0), ValueError, "first_step"),
    ("first_step-bool", dict(first_step=True), ValueError, "first_step"),
    ("last_step-zero", dict(last_step=0), ValueError, "last_step: expected an integer in \\[1, 4\\]"),
    ("last_step-beyond-first_step", dict(first_step=2, last_step=3), ValueError, "last_step: .*after first_step"),
    ("last_step-float", dict(last_step=2.0), ValueError, "last_step"),
    ("mid_timesteps-wrong-solver", dict(solver="euler", mid_timesteps=[1.0]), ValueError,
     "mid_timesteps: only \\['kdpm2', 'kdpm2_ancestral'\\] take it"),
    ("mid_timesteps-count", dict(solver="kdpm2", mid_timesteps=[500.0]), ValueError,
     "mid_timesteps: expected 3 finite model times"),
    ("prev_timesteps-wrong-solver", dict(solver="dpmpp_2m", prev_timesteps=[800.0, 500.0, 200.0, -1.0]), ValueError,
     "prev_timesteps: only \\['ddim', 'pndm', 'pndm_prk'\\] take it"),
    ("prev_timesteps-count", dict(solver="ddim", prev_timesteps=[800.0]), ValueError,
     "prev_timesteps: expected 4 model times"),
    ("prev_timesteps-not-below", dict(solver="ddim", prev_timesteps=[999.0, 500.0, 200.0, -1.0]), ValueError,
     "prev_timesteps: each step must end below"),
    ("prev_timesteps-nan", dict(solver="pndm", prev_timesteps=[800.0, float("nan"), 200.0, -1.0]), ValueError,
     "prev_timesteps: expected a 1-D sequence"),
    ("pndm_prk-too-few-steps", dict(solver="pndm_prk", steps=3), ValueError, "steps: 'pndm_prk' runs 3 Runge-Kutta steps"),
    ("pndm-on-flow", dict(solver="pndm", schedule="flow", prediction="flow", spacing="linspace"), ValueError,
     "solver: 'pndm' transfers along a variance-preserving"),
    ("tcd-eta-above-1", dict(solver="tcd", eta=1.5), ValueError, "eta: expected a number in \\[0, 1\\]"),
    ("kdpm2-at-zero-snr", dict(solver="kdpm2", zero_terminal_snr=True, prediction="v"), ValueError,
     "solver: 'kdpm2' works in sigma/alpha"),
    ("kdpm2-eta", dict(solver="kdpm2", eta=0.5), ValueError, "eta: only .* not 'kdpm2'"),
    ("kdpm2_ancestral-eta-above-1", dict(solver="kdpm2_ancestral", eta=2.0), ValueError, "eta: expected a number in"),
    ("kdpm2_ancestral-at-zero-snr", dict(solver="kdpm2_ancestral", zero_terminal_snr=True, prediction="v"),
     ValueError, "solver: 'kdpm2_ancestral' works in sigma/alpha"),
    # guidance
    ("guidance-nan", dict(guidance_scale=float("nan"), uncond={}), ValueError, "guidance_scale"),
    ("guidance-inf", dict(guidance_scale=float("inf"), uncond={}), ValueError, "guidance_scale"),
    ("guidance-string-number", dict(guidance_scale="3", uncond={}), ValueError, "guidance_scale"),
    ("guidance-string", dict(guidance_scale="high"), ValueError, "guidance_scale"),
    ("guidance-none", dict(guidance_scale=None), ValueError, "guidance_scale"),
    ("guidance-tensor", dict(guidance_scale=torch.tensor([3.0, 4.0]), uncond={}), ValueError, "guidance_scale"),
    ("guidance-without-uncond", dict(guidance_scale=3.0), ValueError, "uncond"),
    ("cond-tensor", dict(cond=torch.ones(2)), TypeError, "cond"),
    ("cond-list", dict(cond=[torch.ones(2)]), TypeError, "cond"),
    ("cond-batch-plain", dict(cond={"shift": torch.ones(3)}), ValueError, "cond\\['shift'\\]"),
    ("cond-batch-separate", dict(cond={"shift": torch.ones(3)}, uncond={"shift": torch.ones(3)}, guidance_scale=2.0,
                                 cfg="separate"), ValueError, "cond\\['shift'\\]"),
    ("uncond-keys", dict(cond={"shift": torch.ones(2)}, uncond={}, guidance_scale=2.0), ValueError, "uncond"),
    ("cfg-unknown", dict(cfg="both"), ValueError, "cfg"),
    # call
    ("model_dtype-string", dict(model_dtype="float16"), ValueError, "model_dtype"),
    ("model_dtype-int", dict(model_dtype=torch.int32), ValueError, "model_dtype"),
    ("callback-not-callable", dict(callback=5), TypeError, "callback"),
    ("progress-not-callable", dict(progress="yes"), TypeError, "progress: expected True, False or a callable"),
    ("x0-shape", dict(x0=_noise(1, 3, 4, 4)), ValueError, "x0: expected the noise's shape"),
    ("x0-int", dict(x0=torch.ones(2, 3, 4, 4, dtype=torch.int64)), TypeError, "x0: expected a floating-point"),
    ("generator-int", dict(generator=0), TypeError, "generator"),
    ("generator-meta", dict(generator="META"), ValueError, "generator"),
    ("generator-list-short", dict(generator=[torch.Generator()]), ValueError, "generator: .*one generator per image"),
    ("generator-list-int", dict(generator=[torch.Generator(), 3]), TypeError, "generator: .*in the list"),
    ("generator-list-one-object-twice", dict(generator=[_SHARED_GENERATOR] * 2), ValueError,
     "generator: .*one generator object for several images"),
    ("shape-int", dict(noise=None, shape=5), ValueError, "shape"),
    ("shape-mismatch", dict(shape=(1, 3, 4, 4)), ValueError, "noise"),
    ("noise-meta", dict(noise=torch.empty(2, 3, 4, 4, device="meta")), ValueError, "noise"),
    ("noise-int", dict(noise=torch.ones(2, 3, 4, 4, dtype=torch.int64)), TypeError, "noise"),
    ("noise-transposed", dict(noise=_noise(2, 3, 4, 4).transpose(2, 3)), ValueError, "noise"),
    ("device-bogus", dict(noise=None, shape=(2, 3, 4, 4), device="gpu0"), ValueError, "device"),
    ("dtype-half", dict(dtype=torch.float16), ValueError, "dtype"),
    ("cuda_graph-string", dict(cuda_graph="yes"), ValueError, "cuda_graph"),
    ("cuda_graph-on-cpu", dict(cuda_graph=True), ValueError, "cuda_graph"),
]


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("row", SAMPLE_ROWS, ids=[r[0] for r in SAMPLE_ROWS])
def test_sample_rejects_bad_input_before_any_model_call(row, backend):
    name, kw, exc, pattern = row
    kw = dict(kw)
    if kw.get("generator") == "META":
        kw["generator"] = _meta_gen()
    noise = kw.pop("noise", _noise())
    given = noise.clone() if isinstance(noise, torch.Tensor) and noise.device.type != "meta" else None
    kw.setdefault("backend", backend)
    if kw["backend"] != backend and backend == "reference":
        pytest.skip("the row sets its own backend")
    spy = Spy()
    with pytest.raises(exc, match=pattern):
        fastdiff.sample(spy, noise, steps=kw.pop("steps", 4), **kw)
    assert spy.calls == 0, f"{name}: the model ran before the error"
    if given is not None:
        assert torch.equal(noise, given), f"{name}: the caller's noise was modified"


# Errors that can only be seen once the model has answered: raised at the first call, before
# any solver step writes the state, and the caller's noise stays as it was.
MODEL_ROWS = [
    ("output-float64", lambda x, t: x.double(), TypeError, "model: returned torch.float64"),
    ("output-int", lambda x, t: x.long(), TypeError, "model: returned torch.int64"),
    ("output-shape", lambda x, t: x[:1], ValueError, "model: expected an output of shape"),
    ("output-dict", lambda x, t: {"sample": x}, TypeError, "model: returned builtins.dict; expected a tensor"),
    ("output-empty-tuple", lambda x, t: (), TypeError, "model: returned builtins.tuple; expected a tensor"),
    ("output-tuple-of-list", lambda x, t: ([x],), TypeError, "model: returned builtins.tuple; expected a tensor"),
    ("output-sample-shape", lambda x, t: (x[:1],), ValueError, "model: expected an output of shape"),
    ("mutates-input", lambda x, t: x.mul_(0), RuntimeError, "model: modified its input x in place"),
]


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("row", MODEL_ROWS, ids=[r[0] for r in MODEL_ROWS])
def test_bad_model_outputs_fail_at_the_first_call(row, backend):
    name, fn, exc, pattern = row
    noise = _noise()
    given = noise.clone()
    spy = Spy(fn)
    with pytest.raises(exc, match=pattern):
        fastdiff.sample(spy, noise, steps=4, backend=backend)
    assert spy.calls == 1 and torch.equal(noise, given)


def test_a_model_mutating_its_input_cannot_corrupt_the_state_in_any_cfg_mode():
    """The contract: the model may not write into x. Where fastdiff passes the state itself
    that is an error; where it passes a copy anyway (CFG doubling, model_dtype), the result is
    the same as with a well-behaved model."""
    def rude(x, t, shift=None):
        out = 0.1 * torch.tanh(x) + (0 if shift is None else shift.view(-1, 1, 1, 1))
        x.mul_(0)
        return out

    def polite(x, t, shift=None):
        return 0.1 * torch.tanh(x) + (0 if shift is None else shift.view(-1, 1, 1, 1))

    c, u = {"shift": torch.full((2,), 0.2)}, {"shift": torch.zeros(2)}
    for backend in ("auto", "cpu", "reference"):
        kw = dict(steps=4, backend=backend)
        with pytest.raises(RuntimeError, match="modified its input"):
            fastdiff.sample(rude, _noise(), **kw)
        with pytest.raises(RuntimeError, match="modified its input"):
            fastdiff.sample(rude, _noise(), guidance_scale=3.0, cond=c, uncond=u, cfg="separate", **kw)
        batched = dict(kw, guidance_scale=3.0, cond=c, uncond=u, cfg="batched")
        assert torch.equal(fastdiff.sample(rude, _noise(), **batched), fastdiff.sample(polite, _noise(), **batched))


@pytest.mark.parametrize("backend", ["auto", "cpu", "reference"])
def test_a_callback_mutating_its_argument_changes_nothing(backend):
    model = Spy()
    clean = fastdiff.sample(model, _noise(), steps=4, backend=backend)
    rude = fastdiff.sample(model, _noise(), steps=4, backend=backend, callback=lambda i, x: x.mul_(0))
    assert torch.equal(clean, rude)


def test_channels_last_noise_works_with_history_and_sde_solvers():
    noise = _noise(2, 3, 4, 4).contiguous(memory_format=torch.channels_last)
    for solver in ("dpmpp_2m", "dpmpp_2m_sde", "euler_ancestral", "dpmpp_3m"):
        a = fastdiff.sample(Spy(), noise, solver=solver, steps=4, generator=torch.Generator().manual_seed(1))
        b = fastdiff.sample(Spy(), noise.contiguous(), solver=solver, steps=4,
                            generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


OPTIMIZE_ROWS = [
    ("model-not-module", dict(model=lambda x: x), TypeError, "model"),
    ("backend-not-string", dict(backend=3), TypeError, "backend"),
    ("memory-format-unknown", dict(memory_format=torch.channels_last_3d), ValueError, "memory_format"),
    ("memory-format-not-a-format", dict(memory_format="channels_last"), ValueError, "memory_format"),
]


@pytest.mark.parametrize("row", OPTIMIZE_ROWS, ids=[r[0] for r in OPTIMIZE_ROWS])
def test_optimize_rejects_bad_input(row):
    name, kw, exc, pattern = row
    model = kw.pop("model", torch.nn.Sequential(torch.nn.GroupNorm(2, 4), torch.nn.SiLU()))
    with pytest.raises(exc, match=pattern):
        fastdiff.optimize(model, **kw)


CONFIG_ROWS = [("in_channels", 0), ("out_channels", 0), ("sample_size", -16), ("base_channels", 1.5),
               ("num_res_blocks", -1), ("channel_mults", ()), ("groups", 0)]


@pytest.mark.parametrize("field,value", CONFIG_ROWS, ids=[r[0] for r in CONFIG_ROWS])
def test_unet_config_rejects_bad_fields(field, value):
    with pytest.raises(ValueError, match=field):
        UNetConfig(**{field: value})
