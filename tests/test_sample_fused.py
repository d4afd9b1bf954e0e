"""Full-loop parity: `sample(backend=X)` (coefficient table + one fused solver_step per step)
equals `sample(backend="reference")` (the textbook solvers, float64) on the analytic model.

This is what proves every solver's coefficient table equal to its paper's formulas. The fp32
bound: the fused loop keeps an fp32 state and takes an fp32 model output; 9-12 steps of a few
fp32 roundings each, amplified at most a few times by the dynamics, stay far below 2e-6
(measured: 3e-8 .. 3e-7)."""
import pytest
import torch

import fastdiff
from fastdiff.testing import GaussianMixture
from tolerances import REL_TOL, rel_err

OP = "solver_step"  # the conftest `backend` fixture: cpu, triton-interp, reference, cuda, triton-cuda

F64 = torch.float64
VP_SOLVERS = ["ddpm", "ddim", "dpmpp_1m", "dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde", "euler", "euler_ancestral",
              "consistency", "unipc", "pndm", "pndm_prk", "lms", "dpmpp_2s", "dpmpp_3s",
              "deis_2m", "deis_3m", "kdpm2", "kdpm2_ancestral", "tcd"]
FLOW_SOLVERS = ["flow_euler", "flow_sde", "flow_heun", "dpmpp_2m", "dpmpp_3m", "unipc"]
LOOP_TOL = 2e-6
# PLMS multiplies the fp32 model outputs' rounding by its Adams-Bashforth weights (sum of |w|
# 6.7 at order 4, against 1-3 for the others' history terms): measured up to 3.1e-6 here
LOOP_TOL_BY_SOLVER = {"pndm": 2 * LOOP_TOL, "pndm_prk": 2 * LOOP_TOL}
# steps ending at t - T // N instead of the next model time (diffusers' DDIM and PNDM; 9 trailing steps)
PREV_9 = fastdiff.Sampler(steps=9).grid.model_time - 1000 // 9


@pytest.fixture(scope="module")
def mixture():
    return GaussianMixture.random(shape=(2, 3, 5), seed=0)


def _pair(mixture, backend_name, device, *, schedule="linear", prediction="epsilon", model_dtype=torch.float32,
          batch=3, **plan):
    sched = fastdiff.get_schedule(schedule)
    model_time = "t" if schedule == "flow" else "timestep"
    ref_model = mixture.model(sched, prediction, model_time=model_time, dtype=F64)
    model = mixture.model(sched, prediction, model_time=model_time, dtype=model_dtype)
    noise = torch.randn(batch, 2, 3, 5, generator=torch.Generator().manual_seed(0))
    plan.setdefault("steps", 9)
    plan.setdefault("spacing", "linspace" if schedule == "flow" else "trailing")
    kw = dict(schedule=schedule, prediction=prediction, model_time=model_time, **plan)
    ref = fastdiff.sample(ref_model, noise, backend="reference", dtype=F64,
                          generator=torch.Generator().manual_seed(1), **kw)
    gen = torch.Generator(device=device).manual_seed(1)
    out = fastdiff.sample(model, noise.to(device), backend=backend_name, generator=gen, **kw)
    return out.cpu(), ref


@pytest.mark.parametrize("prediction", ["epsilon", "v", "sample"])
@pytest.mark.parametrize("solver", VP_SOLVERS)
def test_vp_solvers_match_the_textbook_reference(mixture, backend, solver, prediction):
    be, device = backend
    if device == "cuda" and solver in ("ddpm", "dpmpp_2m_sde", "euler_ancestral", "consistency", "tcd",
                                       "kdpm2_ancestral"):
        pytest.skip("CUDA draws different noise than the CPU generator: stochastic solvers are checked "
                    "on CPU backends")
    out, ref = _pair(mixture, be, device, solver=solver, prediction=prediction)
    assert rel_err(out, ref) < LOOP_TOL_BY_SOLVER.get(solver, LOOP_TOL)


@pytest.mark.parametrize("prediction", ["flow", "v", "sample"])
@pytest.mark.parametrize("solver", FLOW_SOLVERS)
def test_flow_solvers_match_the_textbook_reference(mixture, backend, solver, prediction):
    be, device = backend
    if device == "cuda" and solver == "flow_sde":
        pytest.skip("stochastic: checked on CPU backends")
    out, ref = _pair(mixture, be, device, schedule="flow", solver=solver, prediction=prediction, shift=3.0)
    assert rel_err(out, ref) < LOOP_TOL


@pytest.mark.parametrize("kw", [dict(final="min", spacing="logsnr"), dict(spacing="karras", lower_order_final=False),
                                dict(zero_terminal_snr=True, prediction="v"), dict(clamp=1.0), dict(eta=0.5),
                                # one step from tau = T-1: v, since eps -> x0 there amplifies the fp32
                                # model output's rounding by sigma/alpha = 157 (the model's conditioning)
                                dict(steps=1, prediction="v"), dict(steps=2, solver="dpmpp_3m"),
                                dict(solver="dpmpp_3m", d2_weight=1.0, spacing="karras"),
                                # coarse-to-fine: the 3M history carries across the split point
                                dict(steps=7, spacing=fastdiff.TwoStage(3, 1.0, "linspace", "karras")),
                                # UniPC-3's corrector reads D_{i-3} (b3); zero SNR: the first point is
                                # no multistep point; clamp: the corrector uses the clamped D
                                dict(solver="unipc", order=3, spacing="karras", lower_order_final=False),
                                dict(solver="unipc", order=3, zero_terminal_snr=True, prediction="v"),
                                dict(solver="unipc", clamp=1.0, final="min"), dict(steps=2, solver="unipc", order=3),
                                # EDM's network output F; output_scale folds into the last row
                                dict(prediction="edm"), dict(solver="euler", prediction="edm", output_scale=2.5),
                                dict(solver="pndm", prediction="edm"), dict(solver="dpmpp_2m_sde", output_scale=0.5),
                                dict(solver="ddim", eta=0.5, prev_timesteps=PREV_9),
                                # clamped DDIM: the model's own noise estimate (r), or the clamped x0's
                                dict(solver="ddim", clamp=0.3), dict(solver="ddim", clamp=0.3, eta=0.5),
                                dict(solver="ddim", clamp=0.3, clamped_model_output=True),
                                dict(solver="ddim", clamp=0.3, eta=0.5, clamped_model_output=True,
                                     prev_timesteps=PREV_9),
                                dict(solver="dpmpp_3s", lower_order_final=False, final="min", spacing="karras"),
                                # DDPM's last step from t > 0 adds noise: sqrt(beta) ("large"), beta~ (final="min")
                                dict(solver="ddpm", variance="large"), dict(solver="ddpm", final="min"),
                                dict(solver="pndm", prediction="v", prev_timesteps=PREV_9),
                                dict(solver="pndm_prk", final="min", prev_timesteps=PREV_9)])
def test_plan_options_match_the_reference(mixture, backend, kw):
    be, device = backend
    kw = dict(kw)
    kw.setdefault("solver", "ddim" if "eta" in kw else "dpmpp_3m")
    out, ref = _pair(mixture, be, device, **kw)
    assert rel_err(out, ref) < LOOP_TOL


# Heun on a karras grid below the schedule's top (a churned step 0 must stay under it): "all"
# churns every step (step 0 through the loop's initial noise), "window" only s in [0.5, 4]
HEUN_PLAN = dict(solver="heun", spacing="karras", sigma_max=10.0)
HEUN_CHURN = {"none": {}, "all": dict(s_churn=3.0, s_noise=1.007), "window": dict(s_churn=30.0, s_tmin=0.5, s_tmax=4.0)}


@pytest.mark.parametrize("final", ["zero", "min"])
@pytest.mark.parametrize("churn", list(HEUN_CHURN))
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
def test_heun_matches_the_textbook_reference(mixture, backend, prediction, churn, final):
    be, device = backend
    if device == "cuda" and churn != "none":
        pytest.skip("stochastic: checked on CPU backends")
    out, ref = _pair(mixture, be, device, prediction=prediction, final=final, **HEUN_PLAN, **HEUN_CHURN[churn])
    assert rel_err(out, ref) < LOOP_TOL


@pytest.mark.parametrize("churn", ["none", "all"])
def test_heun_on_a_flow_schedule_matches_the_textbook_reference(mixture, backend, churn):
    """sigma_min > 0: flow's own karras grid ends at sigma/alpha = 0, where the step before the
    end is ~1e-5 and Heun's correction divides by it (fp32 error ~3e-6 even for the textbook loop)."""
    be, device = backend
    if device == "cuda" and churn != "none":
        pytest.skip("stochastic: checked on CPU backends")
    out, ref = _pair(mixture, be, device, schedule="flow", prediction="flow", sigma_min=0.01, **HEUN_PLAN,
                     **HEUN_CHURN[churn])
    assert rel_err(out, ref) < LOOP_TOL


@pytest.mark.parametrize("churn", ["all", "window"])
def test_heun_callbacks_see_each_completed_step_as_the_reference_does(mixture, backend, churn):
    """With churn the fused loop holds the next step's churned state after a step; the callback
    gets the completed step's state (SolverTable.step_state), as the textbook loop gives it."""
    be, device = backend
    if device == "cuda":
        pytest.skip("stochastic: checked on CPU backends")
    model = mixture.model(fastdiff.get_schedule("linear"), "epsilon")
    noise = torch.randn(2, 2, 3, 5, generator=torch.Generator().manual_seed(5))
    seen = {}
    for name, kw in (("ref", dict(backend="reference", dtype=F64)), ("fused", dict(backend=be))):
        states = seen.setdefault(name, [])
        fastdiff.sample(model, noise.to(device), steps=6, generator=torch.Generator(device=device).manual_seed(6),
                        callback=lambda i, x: states.append((i, x.cpu())), **HEUN_PLAN, **HEUN_CHURN[churn], **kw)
    assert [i for i, _ in seen["fused"]] == [i for i, _ in seen["ref"]] == list(range(6))
    for (_, a), (_, b) in zip(seen["fused"], seen["ref"]):
        assert rel_err(a, b) < LOOP_TOL


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("corrector", [True, False])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_matches_the_textbook_reference(mixture, backend, order, variant, corrector, prediction):
    """The table folds UniC into the next row (fastdiff/solvers.py); the reference applies it
    to the stored previous state, as the paper does."""
    be, device = backend
    out, ref = _pair(mixture, be, device, solver="unipc", order=order, variant=variant, corrector=corrector,
                     prediction=prediction)
    assert rel_err(out, ref) < LOOP_TOL


@pytest.mark.parametrize("solver", [dict(solver="dpmpp_2m"), dict(solver="heun"), dict(solver="unipc", order=3)])
@pytest.mark.parametrize("cfg", ["batched", "separate"])
def test_guided_sampling_matches_the_reference(mixture, backend, cfg, solver):
    be, device = backend
    sched = fastdiff.get_schedule("linear")
    base = mixture.model(sched, "epsilon", dtype=F64)

    def model(x, t, shift):
        return (base(x, t) + shift.view(-1, 1, 1, 1)).to(x.dtype)

    noise = torch.randn(3, 2, 3, 5, generator=torch.Generator().manual_seed(2))
    c, u = {"shift": torch.tensor([0.1, -0.2, 0.3])}, {"shift": torch.zeros(3)}
    kw = dict(solver, steps=6, guidance_scale=4.0, cfg=cfg)
    ref = fastdiff.sample(model, noise.double(), backend="reference", dtype=F64, cond=c, uncond=u, **kw)
    to = {k: v.to(device) for k, v in c.items()}, {k: v.to(device) for k, v in u.items()}
    out = fastdiff.sample(model, noise.to(device), backend=be, cond=to[0], uncond=to[1], **kw)
    assert rel_err(out.cpu(), ref) < LOOP_TOL


@pytest.mark.parametrize("model_dtype", [torch.float16, torch.bfloat16])
def test_half_precision_model_output_keeps_an_fp32_state(mixture, backend, model_dtype):
    """The kernel reads the fp16/bf16 output as it is; the error is the output's own rounding
    (one unit roundoff per step, accumulated over 9 steps: bound 9 x REL_TOL[dtype])."""
    be, device = backend
    out, ref = _pair(mixture, be, device, solver="dpmpp_2m", model_dtype=model_dtype)
    assert out.dtype == torch.float32
    assert rel_err(out, ref) < 9 * REL_TOL[model_dtype]


def test_channels_last_model_output_is_accepted(mixture, backend):
    be, device = backend
    sched = fastdiff.get_schedule("linear")
    base = mixture.model(sched, "epsilon")
    noise = torch.randn(2, 2, 3, 5, generator=torch.Generator().manual_seed(3))
    ref = fastdiff.sample(base, noise, backend="reference", steps=4)
    out = fastdiff.sample(lambda x, t: base(x, t).contiguous(memory_format=torch.channels_last), noise.to(device),
                          backend=be, steps=4)
    assert rel_err(out.cpu(), ref) < LOOP_TOL


def test_fused_backends_refuse_a_float64_state(mixture):
    with pytest.raises(ValueError, match="dtype"):
        fastdiff.sample(lambda x, t: x, torch.randn(1, 2), backend="auto", steps=2, dtype=F64)


def test_a_forced_backend_that_cannot_run_is_an_error():
    from fastdiff.ops.solver_step import BackendUnavailableError

    with pytest.raises(BackendUnavailableError, match="cuda"):
        fastdiff.sample(lambda x, t: x, torch.randn(1, 2, 2, 2), backend="cuda", steps=2)


def test_a_model_returning_its_input_does_not_alias_the_state(backend):
    be, device = backend
    noise = torch.randn(2, 2, 3, 5, generator=torch.Generator().manual_seed(4))
    ref = fastdiff.sample(lambda x, t: x, noise, backend="reference", steps=3, prediction="sample")
    out = fastdiff.sample(lambda x, t: x, noise.to(device), backend=be, steps=3, prediction="sample")
    assert rel_err(out.cpu(), ref) < LOOP_TOL


def test_output_scale_scales_the_result_not_the_callbacks(mixture, backend):
    """output_scale folds into the last row of the fused table (no extra pass); callbacks see
    the unscaled states in both loops."""
    be, device = backend
    model = mixture.model(fastdiff.get_schedule("linear"), "epsilon")
    noise = torch.randn(2, 2, 3, 5, generator=torch.Generator().manual_seed(5))
    seen, out = {}, {}
    for name, kw in (("ref", dict(backend="reference", dtype=F64)), ("fused", dict(backend=be))):
        states = seen.setdefault(name, [])
        out[name] = fastdiff.sample(model, noise.to(device), steps=5, solver="dpmpp_2m", output_scale=3.0,
                                    callback=lambda i, x: states.append(x.cpu()), **kw).cpu()
    for a, b in zip(seen["fused"], seen["ref"]):
        assert rel_err(a, b) < LOOP_TOL
    assert rel_err(out["fused"], out["ref"]) < LOOP_TOL
    assert rel_err(out["ref"], 3.0 * seen["ref"][-1]) < 1e-15
