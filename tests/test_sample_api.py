"""`fastdiff.sample()` / `Sampler`: classifier-free guidance, reproducibility, errors."""
import json

import pytest
import torch

import fastdiff
from fastdiff.testing import GaussianMixture

SHAPE = (3, 2, 4, 4)


class TwoWayModel(torch.nn.Module):
    """A conditional toy denoiser: the output depends on x, t and a class embedding."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.emb = torch.nn.Parameter(torch.randn(5, 2, generator=g))
        self.calls = 0

    def forward(self, x, t, labels=None, scale=1.0):
        self.calls += 1
        out = 0.5 * torch.tanh(x) + 1e-3 * t.view(-1, 1, 1, 1)
        if labels is not None:
            out = out + scale * self.emb[labels].view(-1, 2, 1, 1)
        return out


def _noise(seed=0):
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def test_doctest_example_runs():
    gm = GaussianMixture.random(shape=(2, 4, 4), seed=0)
    model = gm.model(fastdiff.get_schedule("linear"), prediction="epsilon")
    x0 = fastdiff.sample(model, torch.randn(8, 2, 4, 4), solver="dpmpp_2m", steps=10)
    assert x0.shape == (8, 2, 4, 4) and x0.dtype == torch.float32 and torch.isfinite(x0).all()


def test_guidance_one_equals_the_conditional_model_alone_with_one_call_per_step():
    m = TwoWayModel()
    c, u = {"labels": torch.tensor([1, 2, 3])}, {"labels": torch.tensor([0, 0, 0])}
    guided = fastdiff.sample(m, _noise(), steps=6, guidance_scale=1.0, cond=c, uncond=u)
    assert m.calls == 6
    assert torch.equal(guided, fastdiff.sample(m, _noise(), steps=6, cond=c))


def test_guidance_zero_equals_the_unconditional_model():
    m = TwoWayModel()
    c, u = {"labels": torch.tensor([1, 2, 3])}, {"labels": torch.tensor([0, 0, 0])}
    guided = fastdiff.sample(m, _noise(), steps=6, guidance_scale=0.0, cond=c, uncond=u, cfg="separate")
    torch.testing.assert_close(guided, fastdiff.sample(m, _noise(), steps=6, cond=u), rtol=0, atol=0)


@pytest.mark.parametrize("w", [3.0, 7.5])
def test_batched_cfg_equals_two_separate_calls(w):
    m = TwoWayModel()
    c = {"labels": torch.tensor([1, 2, 3]), "scale": 2.0}
    u = {"labels": torch.tensor([0, 0, 0]), "scale": 2.0}
    batched = fastdiff.sample(m, _noise(), steps=5, guidance_scale=w, cond=c, uncond=u, cfg="batched")
    assert m.calls == 5
    separate = fastdiff.sample(m, _noise(), steps=5, guidance_scale=w, cond=c, uncond=u, cfg="separate")
    assert m.calls == 15
    torch.testing.assert_close(batched, separate, rtol=1e-6, atol=1e-6)
    # and it is the formula m_u + w (m_c - m_u), checked on one step against the model itself
    s = fastdiff.Sampler(solver="dpmpp_1m", steps=1, spacing="trailing", prediction="sample")
    x = _noise()
    t = torch.full((3,), float(s.grid.model_time[0]))
    mu, mc = m(x, t, **u), m(x, t, **c)
    expect = mu + w * (mc - mu)  # x0 prediction, one step to sigma = 0 returns it
    torch.testing.assert_close(s.sample(m, x, guidance_scale=w, cond=c, uncond=u), expect, rtol=1e-6, atol=1e-6)


def test_sde_solvers_reproduce_with_the_same_generator_and_differ_otherwise():
    m = TwoWayModel()
    run = lambda seed: fastdiff.sample(m, _noise(), steps=5, solver="dpmpp_2m_sde",  # noqa: E731
                                       generator=torch.Generator().manual_seed(seed))
    assert torch.equal(run(1), run(1))
    assert not torch.allclose(run(1), run(2))


def test_sampler_plans_once_and_reuses():
    s = fastdiff.Sampler(solver="dpmpp_3m", steps=8)
    m = TwoWayModel()
    a, b = s.sample(m, _noise(1)), s.sample(m, _noise(1))
    assert torch.equal(a, b) and s.steps == 8


def test_shape_and_generator_draw_the_noise():
    m = TwoWayModel()
    a = fastdiff.sample(m, shape=SHAPE, generator=torch.Generator().manual_seed(4), steps=3)
    b = fastdiff.sample(m, _noise(4), steps=3)
    assert torch.equal(a, b)


def test_model_dtype_casts_the_model_input_but_the_state_stays_fp32():
    seen = []

    def model(x, t):
        seen.append(x.dtype)
        return x * 0.5

    out = fastdiff.sample(model, _noise(), steps=3, model_dtype=torch.bfloat16)
    assert set(seen) == {torch.bfloat16} and out.dtype == torch.float32


def test_the_callers_noise_is_not_modified():
    noise = _noise()
    keep = noise.clone()
    fastdiff.sample(TwoWayModel(), noise, steps=4)
    assert torch.equal(noise, keep)


def test_progress_bar_and_callback(capsys):
    seen = []
    fastdiff.sample(TwoWayModel(), _noise(), steps=4, progress=True, callback=lambda i, x: seen.append(i))
    assert seen == [0, 1, 2, 3]
    assert "4/4" in capsys.readouterr().err


@pytest.mark.parametrize("kwargs, match", [
    (dict(solver="heunn"), "solver"), (dict(schedule="quadratic"), "schedule"), (dict(spacing="uniform"), "spacing"),
    (dict(steps=0), "steps"), (dict(steps=1001), "steps"), (dict(prediction="score"), "prediction"),
    (dict(model_time="sigma"), "model_time"), (dict(backend="opencl"), "backend"),
    (dict(solver="dpmpp_2m", eta=0.5), "eta"), (dict(solver="ddim", eta=2.0), "eta"),
    (dict(solver="flow_euler"), "solver"), (dict(prediction="flow"), "prediction"),
    (dict(variance="medium"), "variance"), (dict(clamp=-1.0), "clamp"),
])
def test_bad_plan_arguments_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        fastdiff.Sampler(**kwargs)


def test_bad_sample_arguments_name_the_argument():
    m = TwoWayModel()
    with pytest.raises(ValueError, match="noise"):
        fastdiff.sample(m, _noise(), shape=(1, 2, 4, 4), steps=2)
    with pytest.raises(ValueError, match="noise"):
        fastdiff.sample(m, steps=2)
    with pytest.raises(TypeError, match="noise"):
        fastdiff.sample(m, torch.zeros(SHAPE, dtype=torch.int64), steps=2)
    with pytest.raises(ValueError, match="uncond"):
        fastdiff.sample(m, _noise(), steps=2, guidance_scale=5.0, cond={"labels": torch.tensor([1, 2, 3])})
    with pytest.raises(ValueError, match="cfg"):
        fastdiff.sample(m, _noise(), steps=2, guidance_scale=5.0, cond={}, uncond={}, cfg="fused")
    with pytest.raises(ValueError, match="model"):
        fastdiff.sample(lambda x, t: x[:1], _noise(), steps=2)
    with pytest.raises(TypeError, match="model"):
        fastdiff.sample("unet", _noise(), steps=2)
    with pytest.raises(ValueError, match="dtype"):
        fastdiff.sample(m, _noise(), steps=2, dtype=torch.bfloat16)


def test_non_finite_model_output_is_caught_when_checking():
    def broken(x, t):
        return torch.where(t.view(-1, 1, 1, 1) < 500, torch.full_like(x, float("nan")), x)

    with pytest.raises(FloatingPointError, match="model.*step"):
        fastdiff.sample(broken, _noise(), steps=4, check_finite=True)


def test_sample_needs_no_autograd_off_from_the_caller():
    """Sampling is inference: a model with trainable parameters and out= ops (as the fused
    U-Net blocks use) runs inside sample() without the caller wrapping it in no_grad."""

    class OutOp(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = torch.nn.Parameter(torch.tensor(0.5))

        def forward(self, x, t):
            return torch.mul(x, self.scale, out=torch.empty_like(x))  # fails under autograd

    assert torch.is_grad_enabled()
    for backend in ("auto", "reference"):
        out = fastdiff.sample(OutOp(), torch.randn(2, 3, 4, 4), steps=3, backend=backend)
        assert not out.requires_grad
    assert torch.is_grad_enabled()


def test_four_threads_sharing_a_sampler_equal_single_threaded_results():
    """Shared Sampler, fused CPU kernel, batched CFG, SDE noise: threads change nothing, and
    grad mode in the workers does not matter (sample() runs without autograd itself)."""
    import threading

    s = fastdiff.Sampler(solver="dpmpp_2m_sde", steps=5, backend="auto")
    c, u = {"shift": torch.full((2,), 0.3)}, {"shift": torch.zeros(2)}

    def model(x, t, shift):
        return 0.2 * torch.tanh(x) + shift.view(-1, 1, 1, 1) + 1e-4 * t.view(-1, 1, 1, 1)

    def one(k):
        noise = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(k))
        return s.sample(model, noise, guidance_scale=4.0, cond=c, uncond=u,
                        generator=torch.Generator().manual_seed(100 + k))

    expected = [one(k) for k in range(4)]
    got = [[] for _ in range(4)]

    def work(k):
        with torch.enable_grad():
            for _ in range(3):
                got[k].append(one(k))

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(4):
        assert len(got[k]) == 3 and all(torch.equal(g, expected[k]) for g in got[k])


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m", "unipc", "euler", "dpmpp_3m", "kdpm2"])
def test_first_step_with_x0_equals_the_plan_of_the_remaining_grid(solver, backend):
    """img2img / SDEdit: first_step=k on an N-step grid runs what a plan made for grid points
    k..N alone runs (the multistep warm-up starts at point k), from alpha_k x0 + sigma_k noise."""
    k, n = 3, 8
    full = fastdiff.Sampler(solver=solver, steps=n, schedule="scaled_linear", spacing="karras", backend=backend)
    cut = fastdiff.Sampler(solver=solver, steps=n, schedule="scaled_linear", spacing="karras", backend=backend,
                           first_step=k)
    rest = fastdiff.Sampler(solver=solver, schedule="scaled_linear", backend=backend,
                            sigmas=full.grid.karras_sigma[k:], timesteps=full.grid.model_time[k:])
    assert cut.steps == rest.steps == n - k and cut.model_calls == rest.model_calls
    x0, noise = _noise(1), _noise(2)
    alpha, sigma = float(full.grid.alpha[k]), float(full.grid.sigma[k])
    ours = cut.sample(TwoWayModel(), noise, x0=x0)
    ref = rest.sample(TwoWayModel(), (alpha * x0.double() + sigma * noise.double()).float())
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(ours, full.sample(TwoWayModel(), noise), atol=1e-3)  # the cut plan is another plan


def test_x0_start_replaces_noise_scale_and_leaves_the_inputs_alone():
    """noise_scale (diffusers' init_noise_sigma for text-to-image) does not apply from x0."""
    x0, noise = _noise(1), _noise(2)
    keep = x0.clone(), noise.clone()
    seen = []

    def model(x, t):
        seen.append(x.clone())
        return 0.1 * x

    plan = dict(solver="euler", steps=4, schedule="scaled_linear", first_step=1)
    fastdiff.sample(model, noise, x0=x0, noise_scale=0.5, **plan)
    grid = fastdiff.Sampler(**plan).grid
    torch.testing.assert_close(seen[0], grid.alpha[0] * x0 + grid.sigma[0] * noise)
    assert torch.equal(x0, keep[0]) and torch.equal(noise, keep[1])


def test_progress_callable_is_called_per_step():
    seen = []
    fastdiff.sample(TwoWayModel(), _noise(), steps=5, first_step=2, progress=lambda done, n: seen.append((done, n)))
    assert seen == [(1, 3), (2, 3), (3, 3)]


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("solver", ["dpmpp_2m", "unipc", "heun", "dpmpp_2m_sde"])
def test_last_step_stops_where_the_whole_plan_passes(solver, backend):
    """last_step=j: the whole plan's state after its step j (its callback's), not a plan ending
    there (lower_order_final still counts to the whole plan's end); with first_step too."""
    plan = dict(solver=solver, steps=7, schedule="scaled_linear", spacing="karras", backend=backend, first_step=1)
    states = []
    seed = dict(generator=torch.Generator().manual_seed(3)) if solver.endswith("sde") else {}
    fastdiff.Sampler(**plan).sample(TwoWayModel(), _noise(), callback=lambda i, x: states.append(x), **seed)
    seed = dict(generator=torch.Generator().manual_seed(3)) if seed else {}
    cut = fastdiff.Sampler(**plan, last_step=4)
    assert cut.steps == 4 and cut.model_calls < fastdiff.Sampler(**plan).model_calls
    torch.testing.assert_close(cut.sample(TwoWayModel(), _noise(), **seed), states[3], rtol=1e-6, atol=1e-6)
    assert not torch.allclose(states[3], states[-1], atol=1e-3)


def test_options_record_explicit_step_ends():
    """options / describe() hold the explicit step ends (prev_timesteps) as given, JSON-ready, and
    a plan made from them again has the same coefficient table."""
    prev = fastdiff.Sampler(steps=9).grid.model_time - 1000 // 9  # diffusers' DDIM: t - T // N
    plan = fastdiff.Sampler(solver="ddim", steps=9, prev_timesteps=prev)
    assert plan.options["prev_timesteps"] == [float(t) for t in prev] and plan.options["mid_timesteps"] is None
    json.loads(json.dumps(plan.describe()))
    again = fastdiff.Sampler(solver="ddim", steps=9, prev_timesteps=plan.options["prev_timesteps"])
    assert (again.table.coef == plan.table.coef).all() and not (
        fastdiff.Sampler(solver="ddim", steps=9).table.coef == plan.table.coef).all()
