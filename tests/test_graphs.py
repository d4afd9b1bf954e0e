"""Whole-loop CUDA graphs. CPU part: argument checks, the cache key and the cache. GPU part:
replay equals the eager fused loop, SDE reproducibility, no re-capture for new guidance or
conditioning, the caller's result is never overwritten, eviction frees memory."""
import gc
import threading
import weakref

import pytest
import torch
from conftest import gpu_test

import fastdiff
from fastdiff.graphs import GraphCache, graph_key
from fastdiff.guidance import ModelCaller
from fastdiff.testing import GaussianMixture
import fake_cuda_graph
from fake_cuda_graph import (FakeCUDAGraph, FreedBufferError, StreamRaceError, fake_graph, fake_graphs,  # noqa: F401
                             graphed as _graphed)

gpu = gpu_test()


def _model(x, t, shift=None):
    out = 0.3 * torch.tanh(x) + 1e-4 * t.view(-1, 1, 1, 1)
    return out if shift is None else out + shift.view(-1, 1, 1, 1)


def test_cuda_graph_true_without_cuda_tensors_is_a_clear_error():
    with pytest.raises(ValueError, match="cuda_graph"):
        fastdiff.sample(_model, torch.randn(2, 3, 4, 4), steps=3, cuda_graph=True)
    with pytest.raises(ValueError, match="cuda_graph"):
        fastdiff.sample(_model, torch.randn(2, 3, 4, 4), steps=3, cuda_graph="yes")


def test_cuda_graph_auto_on_cpu_runs_the_eager_fused_loop():
    noise = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    a = fastdiff.sample(_model, noise, steps=3, cuda_graph="auto")
    b = fastdiff.sample(_model, noise, steps=3)
    assert torch.equal(a, b)


def _key(sampler, model, x, **kw):
    kw.setdefault("guidance_scale", 1.0)
    caller = ModelCaller(model, x, kw.pop("guidance_scale"), kw.pop("cond", None), kw.pop("uncond", None),
                         kw.pop("cfg", "batched"), kw.pop("model_dtype", None), combine=False)
    return graph_key(sampler, model, x, caller)


def test_graph_key_changes_with_what_is_recorded_and_not_with_values():
    s = fastdiff.Sampler(steps=4)
    x = torch.randn(2, 3, 4, 4)
    c, u = {"shift": torch.ones(2)}, {"shift": torch.zeros(2)}
    base = _key(s, _model, x, guidance_scale=5.0, cond=c, uncond=u)
    # values: guidance scale, conditioning values and noise values do not change the key
    assert base == _key(s, _model, torch.randn(2, 3, 4, 4), guidance_scale=2.0, cond={"shift": torch.rand(2)},
                        uncond={"shift": torch.rand(2)})
    assert base == _key(fastdiff.Sampler(steps=4), _model, x, guidance_scale=5.0, cond=c, uncond=u)  # same plan
    different = [
        _key(fastdiff.Sampler(steps=5), _model, x, guidance_scale=5.0, cond=c, uncond=u),
        _key(fastdiff.Sampler(steps=4, solver="dpmpp_3m"), _model, x, guidance_scale=5.0, cond=c, uncond=u),
        _key(s, lambda x, t, shift=None: x, x, guidance_scale=5.0, cond=c, uncond=u),
        _key(s, _model, torch.randn(3, 3, 4, 4), guidance_scale=5.0, cond={"shift": torch.ones(3)},
             uncond={"shift": torch.zeros(3)}),
        _key(s, _model, x.contiguous(memory_format=torch.channels_last), guidance_scale=5.0, cond=c, uncond=u),
        _key(s, _model, x, guidance_scale=5.0, cond=c, uncond=u, cfg="separate"),
        _key(s, _model, x, guidance_scale=1.0, cond=c),  # guidance off
        _key(s, _model, x, guidance_scale=5.0, cond={"shift": torch.ones(2, dtype=torch.float64)},
             uncond={"shift": torch.zeros(2, dtype=torch.float64)}),
        _key(s, _model, x, guidance_scale=5.0, cond=c, uncond=u, model_dtype=torch.float16),
        _key(fastdiff.Sampler(steps=4, backend="cpu"), _model, x, guidance_scale=5.0, cond=c, uncond=u),
    ]
    assert all(k != base for k in different)
    assert len(set(different)) == len(different)


def test_graph_cache_is_a_bounded_lru():
    cache = GraphCache(max_graphs=2)
    cache.put("a", object())
    cache.put("b", object())
    assert cache.get("a") is not None  # a is now the most recent
    cache.put("c", object())
    assert cache.get("b") is None and cache.get("a") is not None and len(cache) == 2
    assert cache.stats()["captures"] == 3
    cache.clear()
    assert len(cache) == 0


@gpu  # the check runs only where a graph would be captured (CUDA tensors)
def test_graph_mode_rejects_host_callbacks():
    with pytest.raises(ValueError, match="cuda_graph"):
        fastdiff.sample(_model, torch.randn(2, 3, 4, 4, device="cuda"), steps=3, cuda_graph=True, progress=True)


# ------------------------------------------------------------------------------ GPU suite
@pytest.fixture
def mixture():
    return GaussianMixture.random(shape=(4, 8, 8), seed=0)


@gpu
@pytest.mark.parametrize("solver", ["ddim", "dpmpp_2m", "dpmpp_3m", "flow_euler", "unipc"])
def test_replay_equals_the_eager_fused_loop_bitwise(mixture, solver):
    fastdiff.clear_graphs()
    flow = solver == "flow_euler"
    sched = fastdiff.get_schedule("flow" if flow else "linear")
    kw = dict(solver=solver, steps=6, schedule="flow" if flow else "linear", spacing="linspace" if flow else "trailing",
              prediction="flow" if flow else "epsilon", model_time="t" if flow else "timestep")
    plan = fastdiff.Sampler(**kw)
    model = mixture.model(sched, kw["prediction"], model_time=kw["model_time"], times=plan.grid.model_time)
    noise = torch.randn(3, 4, 8, 8, device="cuda")
    eager = fastdiff.sample(model, noise, **kw)
    graphed = fastdiff.sample(model, noise, cuda_graph=True, **kw)
    assert torch.equal(eager, graphed)


@gpu
def test_sde_reproduces_under_the_same_seed_and_new_noise_gives_new_results(mixture):
    fastdiff.clear_graphs()
    s = fastdiff.Sampler(solver="dpmpp_2m_sde", steps=6)
    model = mixture.model(fastdiff.get_schedule("linear"), "epsilon", times=s.grid.model_time)
    noise = torch.randn(2, 4, 8, 8, device="cuda")
    run = lambda seed: s.sample(model, noise, cuda_graph=True,  # noqa: E731
                                generator=torch.Generator("cuda").manual_seed(seed))
    first = run(1)
    keep = first.clone()
    assert torch.equal(run(1), first)
    other = run(2)
    assert not torch.equal(other, first)
    assert torch.equal(first, keep), "a later replay overwrote the first caller's tensor"
    assert fastdiff.graph_stats()["captures"] == 1


@gpu
def test_new_guidance_and_conditioning_need_no_recapture():
    fastdiff.clear_graphs()
    s = fastdiff.Sampler(solver="dpmpp_2m", steps=5)
    noise = torch.randn(2, 3, 4, 4, device="cuda")
    results = []
    for w, shift in ((3.0, 0.1), (7.5, 0.1), (7.5, -0.4)):
        c, u = {"shift": torch.full((2,), shift, device="cuda")}, {"shift": torch.zeros(2, device="cuda")}
        graphed = s.sample(_model, noise, guidance_scale=w, cond=c, uncond=u, cuda_graph=True)
        eager = s.sample(_model, noise, guidance_scale=w, cond=c, uncond=u)
        torch.testing.assert_close(graphed, eager, rtol=0, atol=0)
        results.append(graphed)
    assert fastdiff.graph_stats()["captures"] == 1
    assert not torch.equal(results[0], results[1]) and not torch.equal(results[1], results[2])


@gpu
def test_a_model_that_synchronises_cannot_be_captured():
    fastdiff.clear_graphs()

    def syncing(x, t):
        if x.abs().max().item() > 1e9:  # host sync
            raise AssertionError
        return 0.5 * x

    noise = torch.randn(2, 3, 4, 4, device="cuda")
    with pytest.raises(fastdiff.GraphCaptureError, match="cannot be captured"):
        fastdiff.sample(syncing, noise, steps=3, cuda_graph=True)
    with pytest.warns(RuntimeWarning, match="eager"):
        out = fastdiff.sample(syncing, noise, steps=3, cuda_graph="auto")
    torch.testing.assert_close(out, fastdiff.sample(syncing, noise, steps=3), rtol=0, atol=0)


@gpu
def test_eviction_and_clear_free_memory():
    fastdiff.clear_graphs()
    base = torch.cuda.memory_reserved()
    for steps in (3, 4, 5):
        fastdiff.sample(lambda x, t: 0.5 * x, torch.randn(64, 4, 64, 64, device="cuda"), steps=steps, cuda_graph=True)
    assert torch.cuda.memory_reserved() > base
    fastdiff.clear_graphs()
    assert fastdiff.graph_stats()["cached"] == 0
    assert torch.cuda.memory_reserved() <= base + (1 << 20)


@gpu
def test_each_call_of_sample_builds_a_new_plan_and_replays_correctly(mixture):
    """fastdiff.sample() makes a new Sampler per call; the cached graph (keyed by the plan's
    value) must not read the first Sampler's freed buffers."""
    fastdiff.clear_graphs()
    kw = dict(solver="dpmpp_3m", steps=6)
    model = mixture.model(fastdiff.get_schedule("linear"), "epsilon", times=fastdiff.Sampler(**kw).grid.model_time)
    for _ in range(3):
        noise = torch.randn(2, 4, 8, 8, device="cuda")
        graphed = fastdiff.sample(model, noise, cuda_graph=True, **kw)
        torch.cuda.empty_cache()  # freed blocks go back to the driver: a stale read would fault or differ
        assert torch.equal(graphed, fastdiff.sample(model, noise, **kw))
    assert fastdiff.graph_stats()["captures"] == 1


@gpu
def test_replays_from_threads_on_different_streams_do_not_overlap(mixture):
    import threading

    fastdiff.clear_graphs()
    s = fastdiff.Sampler(solver="dpmpp_2m", steps=8)
    model = mixture.model(fastdiff.get_schedule("linear"), "epsilon", times=s.grid.model_time)
    noises = [torch.randn(8, 4, 8, 8, device="cuda") for _ in range(4)]
    expected = [s.sample(model, n) for n in noises]
    got = [None] * 4

    def work(k):
        with torch.cuda.stream(torch.cuda.Stream()):
            for _ in range(5):
                got[k] = s.sample(model, noises[k], cuda_graph=True)
            torch.cuda.current_stream().synchronize()

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for g, e in zip(got, expected):
        assert torch.equal(g, e)


@gpu
def test_inference_mode_capture_does_not_break_a_later_normal_call(mixture):
    fastdiff.clear_graphs()
    noise = torch.randn(2, 3, 4, 4, device="cuda")
    with torch.inference_mode():
        a = fastdiff.sample(_model, noise, steps=3, cuda_graph=True)
    b = fastdiff.sample(_model, noise, steps=3, cuda_graph=True)
    assert torch.equal(a, b) and not b.requires_grad


# ------------------------------------------------- the graph logic on the CPU, with a fake graph
@pytest.mark.parametrize("plan", [dict(solver="dpmpp_3m"), dict(solver="unipc", order=3)])  # unipc: 3 slots read
def test_fake_replay_equals_the_eager_fused_loop_and_needs_one_capture(fake_graphs, plan):
    s = fastdiff.Sampler(steps=5, **plan)
    results = []
    for w, shift in ((3.0, 0.1), (7.5, 0.1), (7.5, -0.4)):
        noise = torch.randn(2, 3, 4, 4)
        c, u = {"shift": torch.full((2,), shift)}, {"shift": torch.zeros(2)}
        out = _graphed(fake_graphs, s, _model, noise, guidance_scale=w, cond=c, uncond=u)
        assert torch.equal(out, s.sample(_model, noise, guidance_scale=w, cond=c, uncond=u))
        results.append(out)
    assert fake_graphs.graph_stats()["captures"] == 1 and fake_graphs.graph_stats()["replays"] == 3
    keep = results[0].clone()
    _graphed(fake_graphs, s, _model, torch.randn(2, 3, 4, 4), guidance_scale=2.0, cond=c, uncond=u)
    assert torch.equal(results[0], keep), "a replay overwrote an earlier result"


def test_fake_replay_without_guidance(fake_graphs):
    s = fastdiff.Sampler(solver="dpmpp_2m", steps=4)
    noise = torch.randn(2, 3, 4, 4)
    assert torch.equal(_graphed(fake_graphs, s, _model, noise), s.sample(_model, noise))


def test_fake_replay_sde_noise_follows_the_generator(fake_graphs):
    s = fastdiff.Sampler(solver="dpmpp_2m_sde", steps=4)
    noise = torch.randn(2, 3, 4, 4)
    run = lambda seed: _graphed(fake_graphs, s, _model, noise,  # noqa: E731
                                generator=torch.Generator().manual_seed(seed))
    a, b, c = run(1), run(1), run(2)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert fake_graphs.graph_stats()["captures"] == 1


def test_fake_replay_per_image_generators_give_an_image_its_noise_in_any_batch(fake_graphs):
    """A list of generators (fastdiff.generate's per-image seeds): the replay refills image b's
    noise for every step from generator b alone, so an image is the same in any batch."""
    s = fastdiff.Sampler(solver="dpmpp_2m_sde", steps=4)
    noise = torch.randn(3, 3, 4, 4)
    gens = lambda seeds: [torch.Generator().manual_seed(sd) for sd in seeds]  # noqa: E731
    whole = _graphed(fake_graphs, s, _model, noise, generator=gens([10, 11, 12]))
    alone = _graphed(fake_graphs, s, _model, noise[2:], generator=gens([12]))
    assert torch.equal(whole[2], alone[0])
    other = _graphed(fake_graphs, s, _model, noise, generator=gens([10, 11, 99]))
    assert torch.equal(other[:2], whole[:2]) and not torch.equal(other[2], whole[2])


@pytest.mark.parametrize("churn", [{}, dict(s_churn=2.0), dict(s_churn=30.0, s_tmin=0.5, s_tmax=4.0)])
def test_fake_replay_of_heun_equals_the_eager_fused_loop_with_the_same_noise(fake_graphs, churn):
    """Two calls per Heun step and, with churn, one noise draw per churned step (the first
    through the loop's initial noise): the replay equals the eager fused loop given the noise
    the replay draws (its static buffer filled by one normal_ from the same generator)."""
    s = fastdiff.Sampler(solver="heun", steps=5, spacing="karras", sigma_max=10.0, **churn)
    noise = torch.randn(2, 3, 4, 4)
    out = _graphed(fake_graphs, s, _model, noise, generator=torch.Generator().manual_seed(3))
    draws = s.table.noise_draws
    assert (draws > 0) == bool(churn)  # the count per churned step: tests/test_heun.py
    buf = torch.empty((draws,) + tuple(noise.shape)).normal_(generator=torch.Generator().manual_seed(3))
    eager, used = noise.clone(), []
    s.run_fused(ModelCaller(_model, eager, 1.0, None, None, "batched", None, combine=False), eager,
                s.new_history(eager), lambda k: used.append(k) or buf[k], 1.0)
    assert torch.equal(out, eager) and used == list(range(draws))
    if not churn:
        assert torch.equal(out, s.sample(_model, noise))


def test_static_noise_over_budget_is_an_error(fake_graphs):
    s = fastdiff.Sampler(solver="ddpm", steps=50)
    with pytest.raises(fastdiff.GraphCaptureError, match="max_noise_bytes"):
        _graphed(fake_graphs, s, _model, torch.randn(2, 3, 4, 4), max_noise_bytes=1024)


def test_capture_failure_raises_or_falls_back_with_auto(fake_graphs, monkeypatch):
    def refuse(run, device):
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(fake_graphs, "_capture", refuse)
    s = fastdiff.Sampler(steps=3)
    with pytest.raises(fastdiff.GraphCaptureError, match="cannot be captured.*not permitted"):
        _graphed(fake_graphs, s, _model, torch.randn(1, 3, 4, 4))
    with pytest.warns(RuntimeWarning, match="eager fused loop"):
        assert _graphed(fake_graphs, s, _model, torch.randn(1, 3, 4, 4), mode="auto") is None


# ------------------------------------------------------------ the fake graph is faithful
def test_fake_graph_keeps_nothing_that_existed_before_capture_and_fails_on_freed_buffers():
    import gc
    import weakref

    x, y = torch.randn(8), torch.empty(8)

    def run():
        torch.mul(x, 2.0, out=y)
        y.add_(torch.ones_like(y))  # a temporary: allocated during capture, owned by the graph

    closure = weakref.ref(run)
    g = FakeCUDAGraph().capture(run)
    del run
    gc.collect()
    assert closure() is None, "the fake graph keeps the recorded closure alive"
    x.copy_(torch.arange(8.0))
    g.replay()
    assert torch.equal(y, 2 * torch.arange(8.0) + 1), "replay did not run on the captured buffers"
    del x
    gc.collect()
    with pytest.raises(FreedBufferError):
        g.replay()


def test_fake_graph_refuses_host_synchronisation():
    x = torch.randn(4)
    with pytest.raises(RuntimeError, match="not permitted when stream is capturing"):
        FakeCUDAGraph().capture(lambda: x.sum().item())


def test_fake_replay_across_calls_of_sample_with_new_plans(fake_graphs):
    """The graph key compares plans by value, so sample() with a new Sampler per call replays
    the first call's graph: that graph must own its history and model times (it read freed
    buffers before)."""
    import gc

    kw = dict(solver="dpmpp_3m", steps=5)
    for _ in range(3):
        noise = torch.randn(2, 3, 4, 4)
        out = _graphed(fake_graphs, fastdiff.Sampler(**kw), _model, noise)
        gc.collect()
        assert torch.equal(out, fastdiff.sample(_model, noise, **kw))
    assert fake_graphs.graph_stats()["captures"] == 1


def test_fake_replay_under_inference_mode_then_normal_mode(fake_graphs):
    s = fastdiff.Sampler(steps=4)
    noise = torch.randn(2, 3, 4, 4)
    with torch.inference_mode():
        a = _graphed(fake_graphs, s, _model, noise)
    b = _graphed(fake_graphs, s, _model, noise)  # its own graph: inference tensors cannot be refilled here
    assert torch.equal(a, b) and fake_graphs.graph_stats()["captures"] == 2


def test_capture_runs_on_a_stream_of_the_tensors_device(monkeypatch):
    """No GPU here: the CUDA calls are recorded to check which device they name."""
    import contextlib

    import fastdiff.graphs as G

    seen = []

    class Stream:
        def __init__(self, device=None):
            seen.append(("stream", device))

    @contextlib.contextmanager
    def device(d):
        seen.append(("device", d))
        yield

    @contextlib.contextmanager
    def graph(g, pool=None, stream=None, capture_error_mode="global"):
        seen.append(("graph", type(stream).__name__, capture_error_mode))
        yield

    monkeypatch.setattr(torch.cuda, "device", device)
    monkeypatch.setattr(torch.cuda, "Stream", Stream)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", graph)
    monkeypatch.setattr(G.CACHE, "_pool", "pool")
    ran = []
    G._capture(lambda: ran.append(1), torch.device("cuda", 1))
    assert ran == [1]
    assert seen == [("device", torch.device("cuda", 1)), ("stream", torch.device("cuda", 1)),
                    ("graph", "Stream", "thread_local")]


def test_a_model_with_its_own_cuda_graphs_is_refused(fake_graphs):
    compiled = torch.compile(torch.nn.Identity(), mode="reduce-overhead")  # compiles lazily: never run here
    s = fastdiff.Sampler(steps=3)
    with pytest.raises(fastdiff.GraphCaptureError, match="reduce-overhead"):
        _graphed(fake_graphs, s, compiled, torch.randn(1, 3, 4, 4))
    holder = torch.nn.Sequential(compiled)  # nested inside a user's module
    with pytest.warns(RuntimeWarning, match="reduce-overhead"):
        assert _graphed(fake_graphs, s, holder, torch.randn(1, 3, 4, 4), mode="auto") is None
    assert fastdiff.graphs.nested_graph_reason(torch.compile(torch.nn.Identity())) is None


def test_fake_replays_from_four_threads_equal_single_threaded_results(fake_graphs):
    import threading

    s = fastdiff.Sampler(solver="dpmpp_2m_sde", steps=4)
    c, u = {"shift": torch.full((2,), 0.3)}, {"shift": torch.zeros(2)}
    noises = [torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(k)) for k in range(4)]

    def one(k):
        return _graphed(fake_graphs, s, _model, noises[k], guidance_scale=4.0, cond=c, uncond=u,
                        generator=torch.Generator().manual_seed(100 + k))

    expected = [one(k) for k in range(4)]
    got = [None] * 4

    def work(k):
        for _ in range(3):
            got[k] = one(k)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(g, e) for g, e in zip(got, expected))


@pytest.mark.parametrize("solver", ["dpmpp_2m_sde", "euler_ancestral"])
@pytest.mark.parametrize("mode", [True, "auto"])
def test_fake_replay_of_a_channels_last_state_with_drawn_noise(fake_graphs, solver, mode):
    """The static noise buffer keeps the state's layout (the fused step reads all tensors in one)."""
    import warnings

    s = fastdiff.Sampler(solver=solver, steps=4)
    noise = torch.randn(2, 3, 4, 5).contiguous(memory_format=torch.channels_last)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "auto" must not fall back
        out = _graphed(fake_graphs, s, _model, noise, generator=torch.Generator().manual_seed(0), mode=mode)
    (rec,) = fake_graphs.CACHE._graphs.values()
    assert all(rec.noise[k].is_contiguous(memory_format=torch.channels_last) for k in range(len(rec.noise)))
    eager = noise.clone()
    s.run_fused(ModelCaller(_model, eager, 1.0, None, None, "batched", None, combine=False), eager,
                s.new_history(eager), lambda k: rec.noise[k], 1.0)  # the noise the replay drew
    assert out.is_contiguous(memory_format=torch.channels_last) and torch.equal(out, eager)


def test_a_failed_warm_up_raises_or_falls_back_with_auto(fake_graphs, monkeypatch):
    def fail(run, device):
        raise RuntimeError("lazy initialisation failed")

    monkeypatch.setattr(fake_graphs, "_warm_up", fail)
    s = fastdiff.Sampler(steps=3)
    with pytest.raises(fastdiff.GraphCaptureError, match=r"warm-up failed\): lazy initialisation"):
        _graphed(fake_graphs, s, _model, torch.randn(1, 3, 4, 4))
    with pytest.warns(RuntimeWarning, match="eager fused loop"):
        assert _graphed(fake_graphs, s, _model, torch.randn(1, 3, 4, 4), mode="auto") is None


def test_a_thread_sampling_eagerly_during_a_capture_breaks_neither(fake_graphs):
    """sample() copies the noise (allocates) before taking the cache lock, so another thread may
    allocate while a capture runs: the capture is thread-local (a global one would fail both)."""
    inside, done, got = threading.Event(), threading.Event(), {}

    def waits_inside_the_capture(x, t):
        if torch.cuda.is_current_stream_capturing() and not inside.is_set():
            inside.set()
            assert done.wait(10)
        return _model(x, t)

    other = torch.randn(2, 3, 4, 4)

    def eager():
        assert inside.wait(10)
        try:
            got["eager"] = fastdiff.sample(_model, other, solver="dpmpp_2m", steps=4)
        except Exception as exc:
            got["eager"] = exc
        done.set()

    worker = threading.Thread(target=eager)
    worker.start()
    noise = torch.randn(2, 3, 4, 4)
    s = fastdiff.Sampler(solver="dpmpp_2m", steps=4)
    out = _graphed(fake_graphs, s, waits_inside_the_capture, noise)
    worker.join()
    assert torch.equal(out, s.sample(_model, noise))
    assert isinstance(got["eager"], torch.Tensor), got["eager"]
    assert torch.equal(got["eager"], s.sample(_model, other))


def test_the_cache_keeps_the_model_whose_parameters_the_graph_reads(fake_graphs):
    """The graph reads the parameters in place; the model's key is its id. Dropping the caller's
    reference must neither free them nor let a new model reuse that id while the graph lives."""
    model = torch.nn.Conv2d(3, 3, 1)
    noise = torch.randn(2, 3, 4, 4)
    s = fastdiff.Sampler(steps=3)
    expected = s.sample(lambda x, t: model(x), noise)

    class Net(torch.nn.Module):
        def __init__(self, conv):
            super().__init__()
            self.conv = conv

        def forward(self, x, t):
            return self.conv(x)

    net = Net(model)
    assert torch.equal(_graphed(fake_graphs, s, net, noise), expected)
    alive, key = weakref.ref(net), next(iter(fake_graphs.CACHE._graphs))
    del net, model
    gc.collect()
    assert alive() is not None, "the cache dropped the model its graph reads"
    rec = fake_graphs.CACHE.get(key)
    out = rec.replay(noise, None, None, 1.0, None)  # FreedBufferError if the weights were freed
    assert torch.equal(out, expected)
    del rec
    fastdiff.clear_graphs()
    gc.collect()
    assert alive() is None


# ------------------------------------ a model that a real capture refuses, in the strict fake
def _side_stream_allocation(x):
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        bias = torch.full((1,), 0.1)  # from the side stream's memory: not the graph's pool
    torch.cuda.current_stream().wait_stream(side)
    return x + bias


def _forked_not_joined(x):
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.mul(x, 2.0)
    return x


CATALOGUE = {
    "item": (lambda x: x * (1.0 + 0 * x.abs().max().item()), "_local_scalar_dense"),
    "cpu": (lambda x: x + 0 * x.cpu(), r"Tensor\.cpu \(a copy between host and device"),
    "tolist": (lambda x: x * len(x.tolist()) / len(x), r"Tensor\.tolist"),
    "numpy": (lambda x: x + 0 * x.numpy().sum(), r"Tensor\.numpy"),
    "nonzero": (lambda x: x + 0 * x.nonzero().shape[0], "aten.nonzero"),
    "boolean mask": (lambda x: x + 0 * x[x > 0].sum(), r"aten\.index\.Tensor"),
    "torch.tensor": (lambda x: x * torch.tensor([1.0]), r"torch\.tensor \(a copy between host and device"),
    "print": (lambda x: print(x.sum()) or x, r"Tensor\.__repr__"),
    "format": (lambda x: f"{x.sum():.3f}" and x, r"Tensor\.__format__"),
    "side stream": (_side_stream_allocation, "outside the capture.*graph's pool"),
    "unjoined fork": (_forked_not_joined, "not joined back"),
}


@pytest.mark.parametrize("name", list(CATALOGUE))
def test_what_a_capture_refuses_is_a_graph_capture_error_naming_it_and_auto_falls_back(fake_graphs, name):
    body, cause = CATALOGUE[name]
    model = lambda x, t: _model(body(x), t)  # noqa: E731
    s = fastdiff.Sampler(steps=3)
    noise = torch.randn(2, 3, 4, 4)
    with pytest.raises(fastdiff.GraphCaptureError, match=f"capture failed.*{cause}"):
        _graphed(fake_graphs, s, model, noise)
    with pytest.warns(RuntimeWarning) as warned:
        assert _graphed(fake_graphs, s, model, noise, mode="auto") is None
    assert len(warned) == 1 and "eager fused loop" in str(warned[0].message)


def test_the_fake_replays_the_kernel_chosen_at_capture_not_the_dispatch(monkeypatch):
    from fastdiff import _ext
    from fastdiff.ops import solver_step as S

    if _ext.missing_reason("solver_step", "CPU"):
        pytest.skip("the compiled CPU kernel is not built")
    x, m = torch.randn(2, 3, 4, 5), torch.randn(2, 3, 4, 5)
    out = torch.full_like(x, float("nan"))
    coef = [0.9, -0.3, 0.5, 0.4, 0.0, 0.0, 0.0, 0.0, 0.0]
    g = FakeCUDAGraph().capture(lambda: S.solver_step(x, m, coef=coef, slots=[-1] * 4, out=out))
    assert [f for f, _, _ in g.tape] == [torch.ops.fastdiff_C.solver_step.default]
    monkeypatch.setattr(S.DISPATCH, "select", lambda *a, **k: pytest.fail("the replay dispatched again"))
    out.fill_(float("nan"))
    g.replay()
    ref = S.solver_step_reference(x.double(), m.double(), None, None, None, coef, [-1] * 4)
    torch.testing.assert_close(out, ref.float(), rtol=1e-6, atol=1e-6)


def test_the_warm_up_runs_on_a_side_stream_that_the_loop_then_waits_for(fake_graphs, monkeypatch):
    streams = []

    def model(x, t):
        streams.append(torch.cuda.current_stream())
        return _model(x, t)

    _graphed(fake_graphs, fastdiff.Sampler(steps=3), model, torch.randn(1, 3, 4, 4))
    warm_up, capture = streams[0], streams[3]
    assert len({warm_up, capture, fake_cuda_graph.DEVICE.default}) == 3

    def unjoined(run, device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()

    monkeypatch.setattr(fake_graphs, "_warm_up", unjoined)
    with pytest.raises(fastdiff.GraphCaptureError, match="without waiting"):  # refilling x races the warm-up
        _graphed(fake_graphs, fastdiff.Sampler(steps=4), model, torch.randn(1, 3, 4, 4))


@pytest.mark.parametrize("mode", ["global", "thread_local"])
def test_the_fake_capture_in_global_mode_fails_when_another_thread_allocates(fake_graphs, mode):
    x, y = torch.randn(8), torch.empty(8)
    inside, done, errors = threading.Event(), threading.Event(), []

    def allocate():
        inside.wait(10)
        try:
            torch.ones(4) + 1
        except RuntimeError as exc:
            errors.append(exc)
        done.set()

    worker = threading.Thread(target=allocate)
    worker.start()

    def run():
        torch.mul(x, 2.0, out=y)
        inside.set()
        done.wait(10)

    try:
        with fake_graph(FakeCUDAGraph(), capture_error_mode=mode):
            run()
    except RuntimeError as exc:
        errors.append(exc)
    worker.join()
    if mode == "global":
        assert [str(e) for e in errors] == [
            "aten.ones.default allocates: operation not permitted when stream is capturing (another thread "
            "captures in capture_error_mode='global')",
            "capture invalidated: aten.ones.default allocates in another thread during a capture in "
            "capture_error_mode='global'"]
    else:
        assert errors == []
