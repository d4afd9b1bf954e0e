"""Schedules and spacings: exact definitions, documented in fastdiff.schedules / fastdiff.grid."""
import math
import warnings

import numpy as np
import pytest

import fastdiff
from fastdiff.grid import TwoStage, make_grid, spacing_points
from fastdiff.schedules import FlowSchedule, VPSchedule


def test_linear_and_scaled_linear_betas_match_their_definitions():
    lin = VPSchedule.linear()
    betas = 1 - lin.alphas_cumprod / np.concatenate([[1.0], lin.alphas_cumprod[:-1]])
    np.testing.assert_allclose(betas, np.linspace(1e-4, 0.02, 1000), rtol=1e-10)
    sl = VPSchedule.scaled_linear()
    betas = 1 - sl.alphas_cumprod / np.concatenate([[1.0], sl.alphas_cumprod[:-1]])
    np.testing.assert_allclose(np.sqrt(betas), np.linspace(0.00085**0.5, 0.012**0.5, 1000), rtol=1e-10)


def test_cosine_follows_squared_cosine_until_the_beta_cap():
    cos = VPSchedule.cosine()
    f = lambda u: math.cos((u + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    for t in (0, 100, 500, 900):
        assert cos.alphas_cumprod[t] == pytest.approx(f((t + 1) / 1000) / f(0), rel=1e-9)
    betas = 1 - cos.alphas_cumprod[1:] / cos.alphas_cumprod[:-1]
    assert betas.max() <= 0.999 + 1e-12


def test_zero_terminal_snr_rescale_keeps_the_first_snr_and_zeroes_the_last():
    base = VPSchedule.scaled_linear()
    z = base.rescale_zero_terminal_snr()
    assert z.alphas_cumprod[-1] == 0.0
    assert z.alphas_cumprod[0] == pytest.approx(base.alphas_cumprod[0], rel=1e-12)
    assert np.all(np.diff(z.alphas_cumprod) < 0)


def test_custom_schedules_and_their_validation():
    s = VPSchedule.from_betas(np.full(50, 0.02))
    assert s.num_train_timesteps == 50
    with pytest.raises(ValueError, match="betas"):
        VPSchedule.from_betas([0.1, -0.1])
    with pytest.raises(ValueError, match="alphas_cumprod"):
        VPSchedule([0.5, 0.9])
    with pytest.raises(ValueError, match="schedule"):
        fastdiff.get_schedule("quadratic")
    with pytest.raises(ValueError, match="shift"):
        fastdiff.get_schedule("linear", shift=3.0)


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_alpha_sigma_and_model_time_round_trip(name):
    s = fastdiff.get_schedule(name)
    tau = np.array([0.0, 1.5, 250.25, 998.0])
    a, sig = s.alpha_sigma(tau)
    np.testing.assert_allclose(a * a + sig * sig, 1.0, atol=1e-12)
    for conv in ("timestep", "t", "karras_sigma"):
        np.testing.assert_allclose(s.time_to_tau(s.model_time(tau, conv), conv), tau, atol=1e-6)
    # exact at integers
    np.testing.assert_allclose(s.alpha_sigma(np.arange(5.0))[0] ** 2, s.alphas_cumprod[:5], rtol=1e-12)


def test_flow_schedule_and_shift():
    f = FlowSchedule(shift=3.0)
    a, s = f.alpha_sigma([0.0, 0.25, 1.0])
    np.testing.assert_allclose(a + s, 1.0)
    assert f.apply_shift(0.5) == pytest.approx(3 * 0.5 / (1 + 2 * 0.5))
    assert f.model_time(0.5, "timestep") == pytest.approx(500.0)
    with pytest.raises(ValueError, match="shift"):
        FlowSchedule(shift=0.0)


def test_spacings_exact_definitions():
    s = VPSchedule.linear()
    np.testing.assert_array_equal(spacing_points(s, "leading", 10)[:-1], np.arange(900, -1, -100))
    np.testing.assert_array_equal(spacing_points(s, "leading", 10, steps_offset=1)[:-1], np.arange(901, 0, -100))
    np.testing.assert_array_equal(spacing_points(s, "trailing", 10)[:-1], np.arange(999, 0, -100))
    # linspace: N+1 points from T-1 to 0 inclusive; the model never runs at tau_min
    lin = spacing_points(s, "linspace", 10)
    np.testing.assert_allclose(lin, np.linspace(999, 0, 11))
    # every spacing ends at tau_min; leading (offset 0) evaluates the model there too
    for sp in ("leading", "trailing", "linspace", "karras", "logsnr"):
        pts = spacing_points(s, sp, 7)
        assert len(pts) == 8 and pts[-1] == pytest.approx(0.0, abs=1e-9)
        assert np.all(np.diff(pts[:-1]) < 0) and (sp == "leading" or pts[-2] > pts[-1])
    with pytest.raises(ValueError, match=r"final='min'.*use final='zero' or steps_offset >= 1"):
        make_grid(s, "leading", 7, final="min")
    assert make_grid(s, "leading", 7, final="min", steps_offset=1).steps == 7
    # logsnr: uniform in lambda; karras: uniform in sigma^(1/7)
    g = make_grid(s, "logsnr", 6, final="min")
    np.testing.assert_allclose(np.diff(g.lam), np.diff(g.lam)[0], rtol=1e-6)
    g = make_grid(s, "karras", 6, final="min")
    np.testing.assert_allclose(np.diff(g.karras_sigma ** (1 / 7)), np.diff(g.karras_sigma ** (1 / 7))[0], rtol=1e-6)


def test_final_zero_moves_only_the_end_point_to_the_clean_limit():
    s = VPSchedule.linear()
    gz = make_grid(s, "trailing", 5, final="zero")
    gm = make_grid(s, "trailing", 5, final="min")
    np.testing.assert_array_equal(gz.tau, gm.tau)
    assert gz.alpha[-1] == 1.0 and gz.sigma[-1] == 0.0 and gz.ends_clean
    assert gm.sigma[-1] == pytest.approx(0.01) and not gm.ends_clean


def test_coinciding_grid_points_are_an_error_naming_the_cause():
    """Never fewer steps than asked: rounding, final='min' and out-of-range sigmas that would
    put two points on one time each raise, saying what happened."""
    s = VPSchedule.linear()
    with pytest.raises(ValueError, match="after rounding to integer timesteps.*round_timesteps=False"):
        make_grid(s, "karras", 200, round_timesteps=True)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert make_grid(s, "karras", 200).steps == 200  # unrounded: no duplicates
        assert make_grid(s, "karras", 20, round_timesteps=True).steps == 20
    with pytest.raises(ValueError, match="final='min'"):
        make_grid(s, "trailing", 1000, final="min")
    with pytest.raises(ValueError, match="sigma_max: 1e\\+09 is above this schedule's largest sigma/alpha"):
        make_grid(VPSchedule.scaled_linear(), "karras", 4, sigma_max=1e9)
    with pytest.raises(ValueError, match="sigma_min: .* is below"):
        make_grid(s, "karras", 4, sigma_min=1e-6)


def test_flow_spacings():
    f = FlowSchedule(shift=2.0)
    g = make_grid(f, "linspace", 4)
    np.testing.assert_allclose(g.tau, f.apply_shift(np.linspace(1, 0, 5)))
    with pytest.raises(ValueError, match="spacing"):
        make_grid(f, "trailing", 4)
    with pytest.raises(ValueError, match="sigma_max"):
        make_grid(f, "karras", 4)
    g = make_grid(f, "karras", 4, sigma_max=80.0)
    assert g.karras_sigma[0] == pytest.approx(80.0)


@pytest.mark.parametrize("bad, match", [
    (dict(spacing="uniform"), "spacing"), (dict(steps=0), "steps"), (dict(steps=1001), "steps"),
    (dict(steps=2.5), "steps"), (dict(final="none"), "final"), (dict(spacing="trailing", steps_offset=1), "steps_offset"),
])
def test_grid_bad_input(bad, match):
    kw = dict(spacing="linspace", steps=10)
    kw.update(bad)
    spacing, steps = kw.pop("spacing"), kw.pop("steps")
    with pytest.raises(ValueError, match=match):
        make_grid(VPSchedule.linear(), spacing, steps, **kw)


@pytest.mark.parametrize("coarse_spacing,fine_spacing", [("logsnr", "karras"), ("karras", "logsnr"),
                                                         ("linspace", "karras")])
def test_two_stage_is_each_stage_spacing_over_its_own_range(coarse_spacing, fine_spacing):
    sch = VPSchedule.scaled_linear()
    steps, coarse, split = 9, 3, 0.8
    pts = spacing_points(sch, TwoStage(coarse, split, coarse_spacing, fine_spacing), steps)
    assert len(pts) == steps + 1 and np.all(np.diff(pts) < 0) and pts[-1] == sch.tau_min
    tau_split = sch.tau_from_karras_sigma(split)
    assert pts[coarse] == pytest.approx(tau_split, rel=1e-12)

    def stage(spacing, n, **rng):  # the single-stage spacing restricted to a sigma range
        if spacing == "linspace":
            hi = sch.tau_max if "sigma_min" in rng else tau_split
            lo = tau_split if "sigma_min" in rng else sch.tau_min
            return np.linspace(hi, lo, n + 1)
        return spacing_points(sch, spacing, n, **rng)

    np.testing.assert_allclose(pts[:coarse + 1], stage(coarse_spacing, coarse, sigma_min=split), rtol=1e-9)
    np.testing.assert_allclose(pts[coarse:], stage(fine_spacing, steps - coarse, sigma_max=split), rtol=1e-9,
                               atol=1e-9)


def test_two_stage_plan_is_described_and_runs_every_solver_across_the_split():
    plan = TwoStage(2, 1.5)
    for solver in ("dpmpp_3m", "dpmpp_2m_sde", "euler_ancestral", "ddim"):
        s = fastdiff.Sampler(solver=solver, steps=6, schedule="scaled_linear", spacing=plan)
        assert s.steps == 6 and s.describe()["spacing"] == plan.as_dict()
        ks = s.grid.karras_sigma
        assert ks[2] == pytest.approx(1.5, rel=1e-9)
        if solver == "dpmpp_3m":  # the row after the split still reads the two earlier predictions
            assert (s.table.slots[3, 1:3] >= 0).all() and s.table.coef[3, 5] != 0.0


@pytest.mark.parametrize("bad,match", [
    (dict(spacing=TwoStage(6, 1.0)), "TwoStage.coarse: 6 coarse steps leave none"),
    (dict(spacing=TwoStage(2, 50.0)), "TwoStage.split_sigma: 50 is not inside"),
    (dict(spacing=TwoStage(2, 1.0), sigma_max=0.5), r"TwoStage.split_sigma: 1 is not inside .*0.5\)"),
    (dict(spacing=TwoStage(2, 1.0), steps_offset=1), "steps_offset"),
    (dict(spacing=TwoStage(2, 1.0, "karras"), zero_terminal_snr=True, prediction="v"), "finite sigma_max"),
])
def test_two_stage_bad_input(bad, match):
    kw = dict(steps=6, schedule="scaled_linear")
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        fastdiff.Sampler(**kw)


@pytest.mark.parametrize("args,match", [
    ((0, 1.0), "TwoStage.coarse: expected an integer >= 1"),
    ((2, float("nan")), "TwoStage.split_sigma"),
    ((2, -1.0), "TwoStage.split_sigma"),
    ((2, 1.0, "trailing"), "TwoStage.coarse_spacing: expected one of"),
    ((2, 1.0, "karras", "karas"), "did you mean 'karras'"),
])
def test_two_stage_rejects_bad_fields(args, match):
    with pytest.raises(ValueError, match=match):
        TwoStage(*args)
def test_explicit_grids_from_sigmas_or_timesteps():
    s = VPSchedule.linear()
    ks = np.array([10.0, 2.0, 0.5, 0.1, 0.0])
    g = fastdiff.Sampler(solver="dpmpp_2m", sigmas=ks, timesteps=[900, 500, 200, 30]).grid
    np.testing.assert_allclose(g.karras_sigma[:-1], ks[:-1], rtol=1e-14)
    np.testing.assert_allclose(g.alpha**2 + g.sigma**2, 1.0, rtol=1e-14)
    np.testing.assert_array_equal(g.model_time, [900, 500, 200, 30])
    assert g.ends_clean and g.steps == 4
    # without timesteps: the schedule's model time at each level
    g = fastdiff.Sampler(sigmas=ks).grid
    np.testing.assert_allclose(s.model_time(g.tau[:-1], "karras_sigma"), ks[:-1], rtol=1e-9)
    # timesteps alone end at tau_min, clean with final="zero", at tau_min with "min"
    g = fastdiff.Sampler(solver="ddim", timesteps=[999, 500, 10], final="min").grid
    np.testing.assert_array_equal(g.tau, [999, 500, 10, 0])
    # flow: sigmas are times t
    g = fastdiff.Sampler(solver="flow_euler", schedule="flow", prediction="flow", sigmas=[1.0, 0.6, 0.2, 0.0]).grid
    np.testing.assert_allclose(g.sigma, [1.0, 0.6, 0.2, 0.0])
    np.testing.assert_allclose(g.model_time, [1000.0, 600.0, 200.0])


@pytest.mark.parametrize("kw, pattern", [
    (dict(sigmas=[5.0, 6.0, 0.0]), "sigmas: expected decreasing"),
    (dict(sigmas=[5.0, 1.0, 1.0, 0.0]), "sigmas: expected decreasing"),
    (dict(sigmas=[5.0, -1.0]), "sigmas: expected finite values >= 0"),
    (dict(sigmas=[5.0]), "sigmas: expected a 1-D sequence of at least 2"),
    (dict(sigmas=[5.0, 1.0, 0.0], timesteps=[900]), "timesteps: expected 2 model times"),
    (dict(sigmas=[5.0, 1.0, 0.0], spacing="karras"), "spacing: belongs to a spacing"),
    (dict(sigmas=[5.0, 1.0, 0.0], steps=4), "steps: 4 differs from the explicit grid's 2"),
    (dict(sigmas=[5.0, 1.0, 0.0], final="min"), "final: with sigmas="),
    (dict(timesteps=[10, 500]), "timesteps: expected decreasing"),
    (dict(lower_order_final=1), "lower_order_final: expected True, False or 'last'"),
    (dict(boundary_scaling=10.0), "boundary_scaling: only 'consistency'"),
    (dict(solver="consistency", boundary_scaling=10.0, clamp=1.0), "clamp: "),
])
def test_explicit_grid_and_option_errors(kw, pattern):
    with pytest.raises(ValueError, match=pattern):
        fastdiff.Sampler(**kw)


def test_a_zero_size_last_step_is_the_identity_for_every_multistep_order():
    """diffusers' Karras + final sigma_min grids end with a step of size zero: first order there."""
    ks = [8.0, 3.0, 1.0, 0.3, 0.1, 0.1]
    for solver in ("dpmpp_2m", "dpmpp_3m", "dpmpp_2m_sde"):
        for lof in (True, False, "last"):
            t = fastdiff.Sampler(solver=solver, sigmas=ks, lower_order_final=lof).table
            p, q, a, b0, b1, b2, b3, c, r = t.coef[-1]
            assert (a, b0, b1, b2, c, r) == (1.0, 0.0, 0.0, 0.0, 0.0, 0.0), (solver, lof)


@pytest.mark.parametrize("final", ["zero", "min"])
def test_karras_and_logsnr_levels_exactly_and_no_model_call_at_sigma_min(final):
    """The N + 1 levels from closed forms over the schedule's own sigma/alpha range; the model
    runs at the first N of them, so its last call is one level above sigma_min (not diffusers'
    Karras grid, which calls the model at sigma_min: see the grid module doc)."""
    s = VPSchedule.scaled_linear()
    ac = s.alphas_cumprod
    lo, hi = math.sqrt((1 - ac[0]) / ac[0]), math.sqrt((1 - ac[-1]) / ac[-1])
    n, i = 10, np.arange(11)
    expect = {"karras": (hi ** (1 / 7) + i / n * (lo ** (1 / 7) - hi ** (1 / 7))) ** 7,
              "logsnr": hi * (lo / hi) ** (i / n)}
    for spacing, levels in expect.items():
        g = make_grid(s, spacing, n, final=final)
        np.testing.assert_allclose(g.karras_sigma[:n], levels[:n], rtol=1e-9)
        assert g.karras_sigma[n - 1] > 1.5 * lo  # one level (a factor >= 1.86 here) above sigma_min
        if final == "zero":
            assert g.ends_clean
        else:
            assert g.karras_sigma[n] == pytest.approx(lo, rel=1e-9)
