"""Heun (Karras et al. 2022, Algorithm 2) as table rows: how many model calls it makes, when
callbacks fire, and where its churn noise goes. Its values are checked against the textbook
reference in tests/test_sample_fused.py, its order against the exact ODE in
tests/test_reference_solvers.py, its CUDA-graph replay in tests/test_graphs.py."""
import numpy as np
import pytest
import torch

import fastdiff

KARRAS = dict(spacing="karras", sigma_max=10.0)


class Counter:
    """A model that counts its calls and records the times it is called at."""

    def __init__(self):
        self.times = []

    def __call__(self, x, t):
        self.times.append(float(t[0]))
        return 0.2 * torch.tanh(x)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("final, calls", [("zero", lambda n: 2 * n - 1), ("min", lambda n: 2 * n)])
@pytest.mark.parametrize("steps", [1, 2, 5])
def test_model_calls_are_counted_honestly_and_callbacks_fire_once_per_step(backend, final, calls, steps, capsys):
    """A step to sigma = 0 is one Euler call, every other step two calls (EDM's 2N - 1 NFE)."""
    plan = fastdiff.Sampler(solver="heun", steps=steps, final=final, backend=backend)
    model, seen = Counter(), []
    plan.sample(model, torch.randn(2, 3, 4, 4), callback=lambda i, x: seen.append(i), progress=True)
    assert plan.steps == steps and plan.model_calls == calls(steps) == len(model.times)
    assert seen == list(range(steps))
    assert f"{steps}/{steps}" in capsys.readouterr().err


@pytest.mark.parametrize("final", ["zero", "min"])
def test_without_churn_heun_calls_the_model_at_the_grid_points_only(final):
    """Step j calls at point j, then at point j + 1 (not for the step to sigma = 0)."""
    plan = fastdiff.Sampler(solver="heun", steps=4, final=final)
    model = Counter()
    plan.sample(model, torch.randn(1, 2, 2, 2))
    g = plan.grid.tau
    sched = plan.schedule
    expected = [t for j in range(4) for t in ((g[j], g[j + 1]) if final == "min" or j < 3 else (g[j],))]
    np.testing.assert_allclose(model.times, np.float32(sched.model_time(np.array(expected), "timestep")))
    assert plan.table.noise_draws == 0 and plan.table.initial_noise == 0.0


@pytest.mark.parametrize("s_tmin, s_tmax", [(0.0, float("inf")), (0.5, 4.0), (20.0, 30.0)])
def test_churn_draws_one_noise_per_churned_step_and_calls_above_the_grid_point(s_tmin, s_tmax):
    plan = fastdiff.Sampler(solver="heun", steps=6, s_churn=2.0, s_tmin=s_tmin, s_tmax=s_tmax, **KARRAS)
    ks = plan.grid.karras_sigma[:-1]
    churned = (ks >= s_tmin) & (ks <= s_tmax)
    assert plan.table.noise_draws == churned.sum()
    assert (plan.table.initial_noise != 0) == churned[0]
    model = Counter()
    plan.sample(model, torch.randn(1, 2, 2, 2), generator=torch.Generator().manual_seed(0))
    first_calls = np.array(model.times[0::2])  # step j calls at 2j (and 2j + 1 but for the last step)
    called_ks = plan.schedule.model_time(plan.schedule.time_to_tau(first_calls, "timestep"), "karras_sigma")
    gamma = min(2.0 / 6, np.sqrt(2) - 1)
    np.testing.assert_allclose(called_ks, np.where(churned, ks * (1 + gamma), ks), rtol=1e-5)


def test_heun_without_churn_is_deterministic_and_the_churn_follows_the_generator():
    model, noise = Counter(), torch.randn(2, 2, 3, 3)
    det = fastdiff.Sampler(solver="heun", steps=4, **KARRAS)
    assert torch.equal(det.sample(model, noise, generator=torch.Generator().manual_seed(1)),
                       det.sample(model, noise, generator=torch.Generator().manual_seed(2)))
    sto = fastdiff.Sampler(solver="heun", steps=4, s_churn=1.0, **KARRAS)
    run = lambda seed: sto.sample(model, noise, generator=torch.Generator().manual_seed(seed))  # noqa: E731
    assert torch.equal(run(1), run(1)) and not torch.equal(run(1), run(2))


def test_the_plan_describes_every_call():
    plan = fastdiff.Sampler(solver="heun", steps=3, s_churn=1.0, **KARRAS)
    d = plan.describe()
    assert len(d["model_time_values"]) == len(d["coef"]) == len(d["ends_step"]) == plan.model_calls == 5
    assert d["ends_step"] == [False, True, False, True, True] and d["s_churn"] == 1.0
    assert d["initial"][1] > 0


def test_other_solvers_keep_one_call_per_step():
    plan = fastdiff.Sampler(solver="dpmpp_3m", steps=7)
    assert plan.model_calls == plan.steps == 7
    np.testing.assert_array_equal(plan.table.model_time, plan.grid.model_time)
    assert plan.table.ends_step.all()
