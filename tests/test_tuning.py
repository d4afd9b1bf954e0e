"""fastdiff.tune_grid: grids tuned to the model against a many-step run of the same solver, on
the analytic Gaussian-mixture model."""
import json

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.testing import GaussianMixture
from fastdiff.tuning import STARTS, _Search

SCHEDULE = fastdiff.get_schedule("scaled_linear")


def _problem(components, seed=0):
    gm = GaussianMixture.random(shape=(2, 4, 4), components=components, seed=seed, std_range=(0.1, 0.5))
    return gm, gm.model(SCHEDULE, "epsilon", dtype=torch.float64)


def _noise(batch, seed):
    return torch.randn(batch, 2, 4, 4, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _plan(steps=4, spacing="logsnr", solver="dpmpp_2m", **kw):
    return fastdiff.Sampler(solver=solver, steps=steps, schedule="scaled_linear", spacing=spacing,
                            backend="reference", **kw)


def _rms(a, b):
    return float((a - b).pow(2).mean().sqrt())


class CountingModel:
    def __init__(self, model):
        self.model, self.calls = model, 0

    def __call__(self, x, t, **kw):
        self.calls += 1
        return self.model(x, t, **kw)


def test_tuned_grid_is_never_worse_than_any_starting_spacing_on_the_calibration_batch():
    _, model = _problem(components=3)
    noise = _noise(8, 1)
    tuned = fastdiff.tune_grid(model, _plan(), 4, noise, reference_steps=30, max_model_calls=200,
                               progress=False, dtype=torch.float64)
    reference = _plan(30).sample(model, noise, dtype=torch.float64)
    err = {sp: _rms(_plan(4, sp).sample(model, noise, dtype=torch.float64), reference) for sp in STARTS}
    mine = _rms(fastdiff.Sampler(solver="dpmpp_2m", schedule="scaled_linear", sigmas=tuned, backend="reference")
                .sample(model, noise, dtype=torch.float64), reference)
    assert mine <= min(err.values()), (mine, err)


@pytest.mark.parametrize("plan_kw", [dict(), dict(final="min"), dict(solver="unipc", order=3)])
def test_with_no_budget_left_for_the_search_the_best_starting_spacing_is_returned_exactly(plan_kw):
    """The budget pays for the reference and one run per start: the answer is the start with the
    least error, laid out exactly as that spacing's own grid (trailing, linspace: as the schedule
    lays them out, not re-spaced)."""
    _, model = _problem(components=3)
    noise = _noise(4, 3)
    plan = _plan(5, **plan_kw)
    reference = _plan(25, **plan_kw).sample(model, noise, dtype=torch.float64)
    fixed = {sp: _plan(5, sp, **plan_kw) for sp in STARTS}
    err = {sp: _rms(p.sample(model, noise, dtype=torch.float64), reference) for sp, p in fixed.items()}
    levels = fastdiff.tune_grid(model, plan, 5, noise, reference_steps=25, max_model_calls=25 + 4 * 5,
                                progress=False, dtype=torch.float64)
    best = min(err, key=err.get)
    np.testing.assert_allclose(levels, fixed[best].grid.karras_sigma, rtol=1e-9, err_msg=f"{best} expected, errors {err}")


@pytest.mark.parametrize("plan_kw", [
    dict(schedule="scaled_linear"), dict(schedule="linear", final="min"),
    dict(schedule="flow", solver="flow_euler", prediction="flow", shift=3.0),
    dict(schedule="linear", zero_terminal_snr=True, prediction="v"),
])
def test_every_starting_spacing_is_laid_out_as_its_own_grid(plan_kw):
    """Each start whose spacing has the plan's ends is exactly that spacing's grid: the mapping of
    trailing/linspace onto the free parameters loses nothing."""
    kw = dict(dict(solver="dpmpp_2m", steps=6), **plan_kw)
    plan = fastdiff.Sampler(spacing="linspace", **kw)
    search = _Search(plan, 6, 20, 1 / 64)
    got = [search.levels(search.lam(z)) for z in search.starts(plan, 6)]
    flow = plan.schedule.kind == "flow"
    expected = []
    for sp in STARTS:
        try:
            g = fastdiff.Sampler(spacing=sp, **kw).grid
        except ValueError:  # e.g. trailing on a flow schedule; logsnr/karras from zero SNR
            continue
        levels, ends = g.sigma if flow else g.karras_sigma, [0, int(g.alpha[0] == 0), -1]
        if np.array_equal(levels[ends], (plan.grid.sigma if flow else plan.grid.karras_sigma)[ends]):
            expected.append(levels)
    assert len(got) >= len(expected) >= 1
    for levels in expected:
        assert any(np.allclose(levels, mine, rtol=1e-9) for mine in got), (levels, got)


@pytest.mark.parametrize("steps", [4, 6])
def test_tuned_grid_beats_every_fixed_spacing_on_held_out_noise(steps):
    # measured (Gaussian data, calibration 16, held-out 64, 100-step reference, 1000 calls): 4.7x (4), 5.7x (6)
    # below the best fixed spacing; asserted: 2x
    gm, model = _problem(components=1)
    tuned = fastdiff.tune_grid(model, _plan(steps), steps, _noise(16, 1), reference_steps=60, max_model_calls=600,
                               progress=False, dtype=torch.float64)
    held = _noise(32, 2)
    plan = _plan(steps)
    exact = gm.ode_solution(held, plan.grid.alpha[0], plan.grid.sigma[0], 1.0, 0.0, step=2e-2)
    fixed = {sp: _rms(_plan(steps, sp).sample(model, held, dtype=torch.float64), exact)
             for sp in ("logsnr", "karras", "trailing", "linspace")}
    mine = _rms(fastdiff.Sampler(solver="dpmpp_2m", schedule="scaled_linear", sigmas=tuned, backend="reference")
                .sample(model, held, dtype=torch.float64), exact)
    assert mine < 0.5 * min(fixed.values()), (mine, fixed)


def test_same_seed_same_grid_and_the_list_round_trips_through_json():
    gm, model = _problem(components=2)
    noise = _noise(4, 3)
    plan = _plan(5, solver="unipc")
    runs = [fastdiff.tune_grid(model, plan, 5, noise, reference_steps=20, max_model_calls=120, seed=7,
                               progress=False, dtype=torch.float64) for _ in range(2)]
    assert runs[0] == runs[1]
    levels = json.loads(json.dumps(runs[0]))
    assert levels == runs[0] and all(type(v) is float for v in levels) and len(levels) == 6
    s = fastdiff.Sampler(solver="unipc", schedule="scaled_linear", sigmas=levels)
    assert s.steps == 5 and levels[0] == plan.grid.karras_sigma[0] and levels[-1] == 0.0
    assert np.all(np.diff(levels) < 0)
    # the saved list drives the default (fused) backend too
    assert s.sample(gm.model(SCHEDULE, "epsilon"), noise.float()).shape == noise.shape


@pytest.mark.parametrize("budget", [20 + len(STARTS) * 4, 20 + len(STARTS) * 4 + 13])
def test_model_call_budget_is_respected_and_the_progress_bar_counts_it(budget, capsys):
    _, model = _problem(components=2)
    counting = CountingModel(model)
    levels = fastdiff.tune_grid(counting, _plan(), 4, _noise(2, 4), reference_steps=20, max_model_calls=budget,
                                dtype=torch.float64)
    assert budget - 4 < counting.calls <= budget and len(levels) == 5
    err = capsys.readouterr().err
    assert f"{counting.calls}/{budget}" in err and err.endswith("\n")


@pytest.mark.parametrize("kwargs,error,match", [
    (dict(plan="dpmpp_2m"), TypeError, "plan: expected a fastdiff.Sampler"),
    (dict(plan=_plan(solver="euler_ancestral")), ValueError, "plan: 'euler_ancestral' with these options draws"),
    (dict(plan=_plan(solver="ddim", eta=0.5)), ValueError, "plan: 'ddim' with these options draws"),
    (dict(plan=_plan(round_timesteps=True)), ValueError, "plan: round_timesteps=True"),
    (dict(steps=1), ValueError, "steps: expected an integer >= 2"),
    (dict(steps=4.0), ValueError, "steps: expected an integer"),
    (dict(reference_steps=4), ValueError, r"reference_steps: expected an integer > steps \(4\)"),
    (dict(max_model_calls=10), ValueError, "max_model_calls: 10 cannot pay for the reference run"),
    (dict(max_model_calls=-1), ValueError, "max_model_calls: expected an integer >= 0"),
    (dict(seed=1.5), ValueError, "seed: expected an integer"),
    (dict(noise=np.zeros((2, 2, 4, 4))), TypeError, "noise: expected a floating-point tensor"),
    (dict(model="unet"), TypeError, "model: expected a callable"),
    (dict(min_step=0), ValueError, r"min_step: expected a number in \(0, 0.5\]"),
    (dict(progress="yes"), ValueError, "progress: expected True or False"),
])
def test_bad_input_is_named_before_any_model_call(kwargs, error, match):
    counting = CountingModel(_problem(components=2)[1])
    args = dict(model=counting, plan=_plan(), steps=4, noise=_noise(2, 5), reference_steps=20, max_model_calls=100)
    args.update(kwargs)
    with pytest.raises(error, match=match):
        fastdiff.tune_grid(args.pop("model"), args.pop("plan"), args.pop("steps"), args.pop("noise"), **args)
    assert counting.calls == 0


@pytest.mark.parametrize("plan_kw", [
    dict(schedule="flow", solver="flow_euler", prediction="flow", spacing="linspace"),
    dict(schedule="linear", zero_terminal_snr=True, prediction="v", spacing="trailing"),
    dict(schedule="linear", final="min", spacing="karras"),
])
def test_flow_zero_snr_and_final_min_plans_keep_their_ends(plan_kw):
    plan = fastdiff.Sampler(steps=4, backend="reference", **plan_kw)
    gm = GaussianMixture.random(shape=(2, 4, 4), components=2, seed=1)
    model = gm.model(plan.schedule, plan.prediction, dtype=torch.float64)
    levels = fastdiff.tune_grid(model, plan, 5, _noise(2, 6), reference_steps=15, max_model_calls=60,
                                progress=False, dtype=torch.float64)
    mine = fastdiff.Sampler(sigmas=levels, **{k: v for k, v in plan_kw.items() if k not in ("spacing", "final")})
    ends = (plan.grid.sigma, mine.grid.sigma) if plan.schedule.kind == "flow" else \
        (plan.grid.karras_sigma, mine.grid.karras_sigma)
    assert len(levels) == 6 and ends[0][0] == ends[1][0] and ends[0][-1] == ends[1][-1]
    if plan.grid.alpha[0] == 0:  # zero SNR: the first finite level is kept too
        assert ends[0][1] == ends[1][1]
