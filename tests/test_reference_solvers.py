"""The textbook reference solvers against the exact probability-flow ODE of a Gaussian mixture,
their exact equivalences, and (for the stochastic ones) the distribution they sample."""
import math

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.testing import GaussianMixture

F64 = torch.float64
STEPS = [40, 80, 160]


@pytest.fixture(scope="module")
def mixture():
    # stds 0.3-0.8: smooth enough that 40-160 steps are in the asymptotic range for every order
    return GaussianMixture.random(shape=(2, 2, 2), components=3, seed=0, std_range=(0.3, 0.8))


@pytest.fixture(scope="module")
def ode_case(mixture):
    """final='min' on a logSNR grid: every N ends at the same point, with no jump to sigma = 0,
    so the measured order is the solver's own (DESIGN/issue: exclude the final jump)."""
    noise = torch.randn(16, 2, 2, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    g = fastdiff.Sampler(steps=10, spacing="logsnr", final="min").grid
    exact = mixture.ode_solution(noise, g.alpha[0], g.sigma[0], g.alpha[-1], g.sigma[-1], step=5e-3)
    return noise, exact


def _rel(a, b):
    return float((a.double() - b).norm() / b.norm())


@pytest.mark.parametrize("prediction", ["epsilon", "v", "sample"])
@pytest.mark.parametrize("solver, lo, hi", [
    # Slope of log(error) vs log(N) over N = 40..160. Bounds: +-0.15 around the order for the
    # one-step methods, wider for 3M whose pre-asymptotic terms are larger (measured 3.1-3.2).
    (dict(solver="ddim"), 0.9, 1.15), (dict(solver="euler"), 0.9, 1.15), (dict(solver="dpmpp_2m"), 1.8, 2.2),
    (dict(solver="dpmpp_3m"), 2.7, 3.5),
    (dict(solver="heun"), 1.7, 2.3),  # Karras et al. 2022 Algorithm 2 (s_churn = 0): second order in its steps
    (dict(solver="dpmpp_2s"), 1.8, 2.2),  # singlestep DPM-Solver++(2S), intermediate points on the grid
    (dict(solver="dpmpp_3s"), 2.7, 3.5),  # and (3S): 2.82 (ends in a shorter block; 2.97 over 42..162)
    (dict(solver="kdpm2"), 1.8, 2.2),  # DPM-Solver-2: Euler to the geometric midpoint, then the full step
    (dict(solver="deis_2m"), 1.8, 2.2), (dict(solver="deis_3m"), 2.7, 3.5),  # DEIS rho-AB 2 and 3
    # UniPC: UniP-p alone has order p, with the corrector p + 1 (measured, eps: UniP-2 2.0, UniP-3
    # 3.26; UniPC-1 2.0, UniPC-2 3.0; UniP-1 is dpmpp_1m, tests/test_unipc.py). UniPC-3: below.
    (dict(solver="unipc", order=1), 1.7, 2.3), (dict(solver="unipc", order=2), 2.7, 3.3),
    (dict(solver="unipc", order=2, variant="bh1"), 2.7, 3.3),
    (dict(solver="unipc", order=2, corrector=False), 1.8, 2.2),
    (dict(solver="unipc", order=3, corrector=False), 2.7, 3.5),
], ids=lambda v: "-".join(f"{k}={x}" for k, x in v.items()) if isinstance(v, dict) else None)
def test_convergence_order_against_the_exact_ode(mixture, ode_case, prediction, solver, lo, hi):
    slope, errs = _observed_order(mixture, *ode_case, prediction, STEPS, **solver)
    assert lo <= slope <= hi, f"{solver}: observed order {slope:.2f}, errors {errs}"


@pytest.mark.parametrize("prediction", ["epsilon", "v", "sample"])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
def test_unipc3_converges_with_order_4(mixture, ode_case, prediction, variant):
    """UniPC-3 (UniP-3 + UniC-3) is fourth order, with a longer pre-asymptotic range than the
    others: successive slopes over 20..640 steps are 4.4, 3.6, 3.3, 3.8, 3.9 (eps), so the order
    is fitted over 160..640 (3.78-3.83; the model's float32 times leave an error floor of ~5e-10,
    a tenth of the error at 640 steps). Its warm-up steps (UniPC-1, UniPC-2) are not what holds
    it back: started from exact values at the first three points instead, the result moves by
    1e-4 of its error (1e-8 of 1.4e-4 at 40 steps, 2e-13 of 5.5e-9 at 640)."""
    slope, errs = _observed_order(mixture, *ode_case, prediction, [160, 320, 640], solver="unipc", order=3,
                                  variant=variant)
    assert 3.7 <= slope <= 4.3, f"UniPC-3 {variant}: observed order {slope:.2f}, errors {errs}"


@pytest.mark.parametrize("solver", ["pndm", "pndm_prk"])
@pytest.mark.parametrize("prediction, lo, hi", [("epsilon", 1.8, 2.2), ("sample", 1.8, 2.2), ("v", 0.85, 1.15)])
def test_pndm_order_as_diffusers_runs_it(mixture, ode_case, prediction, lo, hi, solver):
    """PLMS's fixed Adams-Bashforth weights assume equal steps, so on this logSNR grid the eps
    and x0 forms are second order (measured 2.01 over 40..160; 1.2-2.9 on a linspace grid). The
    v form, as diffusers' PNDMScheduler runs it (outputs combined, then converted to eps with
    the current state and time), mixes outputs of other times into the conversion and is first
    order (0.98, like DDIM): measured, kept, since from_scheduler gives diffusers' result. The
    Runge-Kutta warm-up (pndm_prk) changes three steps only: the same orders (2.01, 2.02, 0.98)."""
    slope, errs = _observed_order(mixture, *ode_case, prediction, STEPS, solver=solver)
    assert lo <= slope <= hi, f"{solver} {prediction}: observed order {slope:.2f}, errors {errs}"


@pytest.mark.parametrize("d", [16, 32])
@pytest.mark.parametrize("prediction", ["epsilon", "sample"])
def test_pndm_runge_kutta_warm_up_is_far_more_accurate_than_ddim(mixture, prediction, d):
    """pndm_prk's first three steps are PNDM's pseudo Runge-Kutta steps (4 model calls each):
    over three steps of d timesteps from t = 500 its error against the exact ODE is 14-19x (eps)
    and 70-80x (x0) below DDIM's on the same grid (measured; the v form converts the combined output at the start, so
    it gains nothing over DDIM, as test_pndm_order_as_diffusers_runs_it finds for PLMS)."""
    sched = fastdiff.get_schedule("linear")
    model = mixture.model(sched, prediction, dtype=F64)
    noise = torch.randn(16, 2, 2, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    taus = 500.0 - d * np.arange(5)
    a, s = sched.alpha_sigma(taus)
    exact = mixture.ode_solution(noise, a[0], s[0], a[3], s[3], step=1e-3)
    errs = {}
    for solver in ("pndm_prk", "ddim"):
        seen = []
        fastdiff.Sampler(solver=solver, sigmas=s / a, timesteps=taus[:4], prediction=prediction,
                         backend="reference").sample(model, noise, dtype=F64, callback=lambda i, x: seen.append(x))
        errs[solver] = _rel(seen[2], exact)  # after step 2: the third Runge-Kutta step
    assert errs["pndm_prk"] < errs["ddim"] / 10, errs


@pytest.mark.parametrize("solver, lo, hi", [("euler", 0.9, 1.15), ("dpmpp_2m", 1.8, 2.2), ("dpmpp_3m", 2.7, 3.5),
                                           ("kdpm2", 1.8, 2.2)])
def test_edm_output_converges_with_the_solvers_order(mixture, ode_case, solver, lo, hi):
    """EDM's network output F (prediction="edm", what EDMEuler / EDMDPMSolverMultistep models give)
    is one more way to the data prediction: each solver keeps its order."""
    slope, errs = _observed_order(mixture, *ode_case, "edm", STEPS, solver=solver)
    assert lo <= slope <= hi, f"{solver} edm: observed order {slope:.2f}, errors {errs}"


@pytest.mark.parametrize("solver", ["euler", "dpmpp_2m", "kdpm2_ancestral"])
def test_edm_output_is_minus_v_on_a_vp_schedule(mixture, solver):
    """With sigma_data = 1 on a VP state EDM's preconditioning is x0 = alpha x + sigma F, and v is
    alpha eps - sigma x0: F = -v. Two independent conversions (to_x0's c_skip/c_out and the
    mixture's own v) agree to rounding."""
    edm = _run(mixture, solver, prediction="edm")
    model = mixture.model(fastdiff.get_schedule("linear"), "v", dtype=F64)
    noise = torch.randn(8, 2, 2, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    minus_v = fastdiff.sample(lambda x, t: -model(x, t), noise, solver=solver, steps=12, prediction="edm",
                              generator=torch.Generator().manual_seed(1), dtype=F64, backend="reference")
    v = fastdiff.sample(model, noise, solver=solver, steps=12, prediction="v",
                        generator=torch.Generator().manual_seed(1), dtype=F64, backend="reference")
    assert _rel(edm, minus_v) < 1e-12 and _rel(edm, v) < 1e-12


@pytest.mark.parametrize("prediction", ["epsilon", "v", "sample"])
def test_lms_converges_with_order_4(mixture, ode_case, prediction):
    """LMS-4 (Lagrange weights in s = sigma/alpha) is fourth order once its three lower-order
    warm-up steps sit at large s, where the ODE is nearly linear: successive slopes over
    20..320 steps are 2.96, 3.46, 3.74, 3.87 (all three outputs), so it is fitted over 80..320."""
    slope, errs = _observed_order(mixture, *ode_case, prediction, [80, 160, 320], solver="lms")
    assert 3.6 <= slope <= 4.3, f"lms {prediction}: observed order {slope:.2f}, errors {errs}"


@pytest.mark.parametrize("prediction", ["flow", "v", "sample"])
def test_flow_heun_converges_with_order_2(mixture, prediction):
    """Heun on dx/dt = v in (x, t) from t = 1 to 0 (its last step, to t = 0, is Euler's):
    measured 2.03 over 40..160 steps, the same for every output type."""
    schedule = fastdiff.get_schedule("flow")
    noise = torch.randn(16, 2, 2, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    exact = mixture.ode_solution(noise, 0.0, 1.0, 1.0, 0.0, step=5e-3)
    model = mixture.model(schedule, prediction, model_time="t", dtype=F64)
    errs = [_rel(fastdiff.sample(model, noise, solver="flow_heun", steps=n, schedule="flow", spacing="linspace",
                                 prediction=prediction, model_time="t", backend="reference", dtype=F64), exact)
            for n in STEPS]
    slope = -np.polyfit(np.log(STEPS), np.log(errs), 1)[0]
    assert 1.85 <= slope <= 2.2, f"flow_heun {prediction}: observed order {slope:.2f}, errors {errs}"


def _observed_order(mixture, noise, exact, prediction, steps, **solver):
    """The slope of log(error) against log(N) over `steps` (logSNR grid, final 'min')."""
    model = mixture.model(fastdiff.get_schedule("linear"), prediction, dtype=F64)
    errs = []
    for n in steps:
        s = fastdiff.Sampler(steps=n, spacing="logsnr", final="min", prediction=prediction, lower_order_final=False,
                             backend="reference", **solver)
        errs.append(_rel(s.sample(model, noise, dtype=F64), exact))
    return -np.polyfit(np.log(steps), np.log(errs), 1)[0], errs


def test_the_exact_ode_solution_is_converged(mixture, ode_case):
    noise, exact = ode_case
    g = fastdiff.Sampler(steps=10, spacing="logsnr", final="min").grid
    coarse = mixture.ode_solution(noise, g.alpha[0], g.sigma[0], g.alpha[-1], g.sigma[-1], step=1e-2)
    assert _rel(coarse, exact) < 1e-8


def test_higher_order_is_more_accurate_at_few_steps_with_the_usual_final_jump(mixture):
    """At 10 steps to sigma = 0 (the default), 2M/3M beat DDIM against the exact ODE limit."""
    noise = torch.randn(16, 2, 2, 2, generator=torch.Generator().manual_seed(2), dtype=F64)
    model = mixture.model(fastdiff.get_schedule("linear"), "epsilon", dtype=F64)
    g = fastdiff.Sampler(steps=10, spacing="logsnr").grid
    exact = mixture.ode_solution(noise, g.alpha[0], g.sigma[0], 1.0, 0.0, step=5e-3)
    err = {s: _rel(fastdiff.sample(model, noise, solver=s, steps=10, spacing="logsnr", dtype=F64,
                                    backend="reference"), exact)
           for s in ("ddim", "dpmpp_2m", "dpmpp_3m")}
    assert err["dpmpp_2m"] < 0.5 * err["ddim"] and err["dpmpp_3m"] < err["ddim"], err


def _run(mixture, solver, prediction="epsilon", schedule="linear", steps=12, seed=0, **kw):
    sched = fastdiff.get_schedule(schedule)
    model = mixture.model(sched, prediction, dtype=F64)
    noise = torch.randn(8, 2, 2, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)
    return fastdiff.sample(model, noise, solver=solver, steps=steps, schedule=schedule, prediction=prediction,
                           generator=torch.Generator().manual_seed(seed + 1), dtype=F64, backend="reference", **kw)


@pytest.mark.parametrize("spacing", ["trailing", "karras", "linspace"])
def test_dpmpp_order1_equals_ddim_eta0(mixture, spacing):
    a = _run(mixture, "dpmpp_1m", spacing=spacing)
    b = _run(mixture, "ddim", spacing=spacing)
    assert _rel(a, b) < 1e-12


def test_kdpm2_ancestral_at_eta_0_is_kdpm2(mixture):
    a = _run(mixture, "kdpm2_ancestral", eta=0.0, spacing="karras")
    b = _run(mixture, "kdpm2", spacing="karras")
    assert _rel(a, b) < 1e-12


def test_euler_equals_ddim_eta0(mixture):
    """DDIM is Euler in x/alpha vs sigma/alpha: a known identity that checks both."""
    assert _rel(_run(mixture, "euler"), _run(mixture, "ddim")) < 1e-12


def test_ddpm_small_variance_equals_ddim_eta1_for_the_same_noise(mixture):
    a = _run(mixture, "ddpm", spacing="trailing")
    b = _run(mixture, "ddim", spacing="trailing", eta=1.0)
    # DDPM's last step, to the clean end, adds no noise (beta~ = 0); DDIM(eta=1) none either (sigma' = 0).
    assert _rel(a, b) < 1e-12


def test_ddpm_last_step_noise_follows_the_paper_and_diffusers(mixture):
    """Algorithm 2 (and diffusers' DDPMScheduler) skips the noise only on a step from the first
    training time: a last step from t > 0 adds sqrt(beta_t) with "large" (beta_t = 1 - abar_t
    towards the clean end), nothing with "small" (beta~ = 0 there)."""
    for spacing, variance, noisy in (("trailing", "large", True), ("trailing", "small", False),
                                     ("leading", "large", False)):  # leading: the last model time is 0
        s = fastdiff.Sampler(solver="ddpm", steps=4, spacing=spacing, variance=variance, backend="reference")
        ab = s.grid.alpha[-2] ** 2
        want = math.sqrt(1.0 - ab) if noisy else 0.0
        assert s.new_solver().noise_scale(3) == pytest.approx(want, rel=1e-12)
        assert s.table.coef[3, 7] == pytest.approx(want, rel=1e-12)


@pytest.mark.parametrize("prediction", ["flow", "v", "sample"])  # epsilon: no x0 at t = 1
def test_flow_euler_is_the_textbook_update(mixture, prediction):
    sched = fastdiff.FlowSchedule(shift=3.0)
    model = mixture.model(sched, prediction, model_time="t", dtype=F64)
    velocity = mixture.model(sched, "flow", model_time="t", dtype=F64)
    noise = torch.randn(8, 2, 2, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    s = fastdiff.Sampler(solver="flow_euler", steps=7, schedule=sched, spacing="linspace", prediction=prediction,
                         model_time="t", backend="reference")
    x = noise.clone()
    for i in range(7):
        t, t_next = s.grid.tau[i], s.grid.tau[i + 1]
        x = x + (t_next - t) * velocity(x, torch.full((8,), t))
    # exact for a velocity model; converting v / x0 outputs uses the grid's float64 alpha/sigma
    # while the model saw its float32 time input: agreement to ~1e-8 then.
    tol = 1e-12 if prediction == "flow" else 1e-7
    assert _rel(s.sample(model, noise, dtype=F64), x) < tol
    # and the stochastic flow sampler at eta = 0 is the same update
    sde = fastdiff.sample(model, noise, solver="flow_sde", eta=0.0, steps=7, schedule=sched, spacing="linspace",
                          prediction=prediction, model_time="t", dtype=F64, backend="reference")
    assert _rel(sde, x) < tol


def test_zero_terminal_snr_runs_with_v_prediction_and_rejects_epsilon(mixture):
    x = _run(mixture, "dpmpp_2m", prediction="v", zero_terminal_snr=True, spacing="trailing")
    assert torch.isfinite(x).all()
    with pytest.raises(ValueError, match="prediction"):
        fastdiff.Sampler(solver="dpmpp_2m", prediction="epsilon", zero_terminal_snr=True, spacing="trailing")


def _sliced_w1(a, b, n_proj=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    a, b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    d = torch.randn(a.shape[1], n_proj, generator=g, dtype=F64)
    d = d / d.norm(dim=0)
    pa, pb = (a @ d).sort(0).values, (b @ d).sort(0).values
    return float((pa - pb).abs().mean())


@pytest.mark.parametrize("solver, kw", [
    ("ddpm", {}), ("ddpm", {"variance": "large"}), ("ddim", {"eta": 1.0}), ("dpmpp_2m_sde", {}),
    ("euler_ancestral", {}), ("dpmpp_2m", {}), ("kdpm2_ancestral", {}), ("kdpm2_ancestral", {"eta": 0.5}),
])
def test_samplers_produce_the_mixture(mixture, solver, kw):
    """Moments and sliced Wasserstein-1 distance to fresh exact samples. The bound: 2x the
    distance between two independent exact sample sets of the same size (pure sampling noise,
    about 0.03 here) plus 0.02 for discretisation at 100 steps."""
    n = 2000
    model = mixture.model(fastdiff.get_schedule("linear"), "epsilon")
    g = torch.Generator().manual_seed(5)
    x = fastdiff.sample(model, shape=(n, 2, 2, 2), generator=g, solver=solver, steps=100, spacing="trailing", **kw)
    ref_a, ref_b = mixture.sample(n, torch.Generator().manual_seed(6)), mixture.sample(n, torch.Generator().manual_seed(7))
    noise_floor = _sliced_w1(ref_a, ref_b)
    assert _sliced_w1(x, ref_a) < 2 * noise_floor + 0.02
    mean_err = (x.double().mean(0) - ref_a.mean(0)).abs().max()
    std_err = (x.double().std(0) / ref_a.std(0) - 1).abs().max()
    assert mean_err < 0.1 and std_err < 0.1, (mean_err, std_err)


def test_consistency_sampling_with_an_exact_x0_model_reproduces_the_mixture(mixture):
    """With the ideal denoiser as the 'consistency function', one step samples the posterior
    mean, and more steps (re-noise + denoise) move towards the data distribution's spread."""
    model = mixture.model(fastdiff.get_schedule("linear"), "sample")
    g = torch.Generator().manual_seed(8)
    one = fastdiff.sample(model, shape=(2000, 2, 2, 2), generator=g, solver="consistency", steps=1, prediction="sample",
                          spacing="trailing")
    many = fastdiff.sample(model, shape=(2000, 2, 2, 2), generator=g, solver="consistency", steps=200,
                           prediction="sample", spacing="trailing")
    ref = mixture.sample(2000, torch.Generator().manual_seed(9))
    assert _sliced_w1(many, ref) < _sliced_w1(one, ref)
