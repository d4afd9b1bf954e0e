"""`fastdiff.generate` and `python -m fastdiff generate | evaluate | compare`: per-image noise,
restartable shards, 1 vs 2 processes (gloo) byte for byte, a killed run resumed, FD/KID with
bootstrap intervals, and one-line errors for bad input."""
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.__main__ import main
from fastdiff.generation import BadArgument, generate, image_generators

from conftest import require

require("safetensors", "demo")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHAPE = (2, 3, 3)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # small in-process models on cores other jobs share: spinning OpenMP threads make them 10x+
    # slower (see tests/test_demo.py); the CLI subprocesses set a passive wait policy instead
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Elementwise(torch.nn.Module):
    """A denoiser whose per-image output cannot depend on the batch (elementwise ops only), so
    any batch dependence of a result comes from how the noise was drawn. Counts its calls."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x, t):
        self.calls += 1
        return 0.7 * torch.tanh(x) + 1e-4 * t.view(-1, 1, 1, 1)


@pytest.mark.parametrize("backend", ["auto", "reference"])
@pytest.mark.parametrize("solver", ["dpmpp_2m", "dpmpp_2m_sde", "ddpm"])
def test_per_image_generators_give_each_image_the_same_noise_in_any_batch(solver, backend):
    sampler = fastdiff.Sampler(solver=solver, steps=5, backend=backend)
    model = Elementwise()

    def run(indices, seed=0):
        return sampler.sample(model, shape=(len(indices),) + SHAPE, generator=image_generators(seed, indices, "cpu"))

    whole = run([0, 1, 2, 3, 4])
    assert torch.equal(torch.cat([run([0, 1]), run([2, 3, 4])]), whole)
    assert torch.equal(run([4, 3, 2, 1, 0]), whole.flip(0))
    assert not torch.equal(run([0, 1, 2, 3, 4], seed=1), whole)
    if solver != "dpmpp_2m":  # the step noise is drawn per image too, not only the initial noise
        noise = torch.stack([torch.randn(SHAPE, generator=g) for g in image_generators(0, range(5), "cpu")])
        shared = sampler.sample(model, noise, generator=torch.Generator().manual_seed(0))
        assert not torch.equal(shared, whole)


def test_a_generator_list_must_have_one_generator_per_image():
    with pytest.raises(ValueError, match="generator: .*one generator per image"):
        fastdiff.sample(Elementwise(), shape=(3,) + SHAPE, generator=image_generators(0, [0, 1], "cpu"), steps=2)


def _generate(out, batch_size, model=None, num_images=7, solver="dpmpp_2m_sde", **kw):
    return generate(model or Elementwise(), fastdiff.Sampler(solver=solver, steps=4), num_images, 3, batch_size,
                    str(out), shape=SHAPE, progress=False, **kw)


def test_generate_is_independent_of_batch_size_and_resumes_without_resampling(tmp_path):
    a, b = _generate(tmp_path / "a", 3), _generate(tmp_path / "b", 7)
    with np.load(a.path) as za, np.load(b.path) as zb:
        assert za["images"].shape == (7,) + SHAPE and za["images"].dtype == np.uint8
        assert np.array_equal(za["images"], zb["images"])
        assert np.ptp(za["images"]) > 0
        assert "dpmpp_2m_sde" in str(za["plan"]) and '"git_commit"' in str(za["meta"])
    model = Elementwise()
    again = _generate(tmp_path / "a", 3, model=model)
    assert again.generated == 0 and model.calls == 0
    assert open(again.path, "rb").read() == open(a.path, "rb").read()


def test_restart_recomputes_a_corrupt_shard_and_ignores_temporary_files(tmp_path):
    first = open(_generate(tmp_path / "ref", 2).path, "rb").read()
    out = tmp_path / "run"
    _generate(out, 2)
    shards = out / "shards"
    (shards / "000001.npz").write_bytes(b"PK\x03\x04 truncated")
    (shards / "000002.npz.123.tmp").write_bytes(b"half a shard")
    with pytest.warns(RuntimeWarning, match="000001.npz: not a finished shard"):
        r = _generate(out, 2)
    assert r.generated == 2 and not list(shards.glob("*.tmp"))
    assert open(r.path, "rb").read() == first


def test_digits_model_differs_across_batch_sizes_only_by_kernel_rounding(tmp_path):
    """The noise is per image; the CPU convolutions round differently for other batch sizes
    (~1e-6), which after uint8 rounding moves at most an occasional pixel by one level."""
    from fastdiff.demo.workload import digits

    w = digits(steps=3, solver="dpmpp_2m_sde")
    res = [generate(w.model, w.sampler, 6, 0, bs, str(tmp_path / str(bs)), shape=w.shape, cond=w.cond,
                    progress=False) for bs in (2, 3)]
    a, b = (np.load(r.path)["images"].astype(int) for r in res)
    assert np.abs(a - b).max() <= 1 and (a != b).mean() < 1e-3
    assert np.array_equal(np.load(res[0].path)["cond_class_labels"], np.arange(6) % 10)


@pytest.mark.parametrize("args, name", [
    (dict(num_images=0), "num_images"), (dict(batch_size=0), "batch_size"), (dict(seed=-1), "seed"),
])
def test_bad_arguments_are_named_before_any_model_call(tmp_path, args, name):
    model = Elementwise()
    kw = {**dict(num_images=4, batch_size=2, seed=0), **args}
    with pytest.raises(BadArgument, match=f"^{name}:"):
        generate(model, fastdiff.Sampler(steps=2), kw["num_images"], kw["seed"], kw["batch_size"], str(tmp_path),
                 shape=SHAPE)
    assert model.calls == 0


def test_unwritable_out_dir_and_a_different_run_in_out_dir_are_refused(tmp_path):
    model = Elementwise()
    (tmp_path / "file").write_text("")
    with pytest.raises(BadArgument, match="^out_dir: .* not a writable directory"):
        _generate(tmp_path / "file" / "sub", 2, model=model)
    _generate(tmp_path / "run", 2)
    with pytest.raises(BadArgument, match=r"^batch_size: out_dir .* another run \(old -> new: batch_size: 2 -> 3\)"):
        _generate(tmp_path / "run", 3, model=model)
    with pytest.raises(BadArgument, match="^sampler"):
        _generate(tmp_path / "run", 2, model=model, solver="ddim")
    assert model.calls == 0


@pytest.mark.parametrize("argv, name", [
    (["generate", "--num-images", "0"], "--num-images"),
    (["generate", "--batch-size", "0"], "--batch-size"),
    (["generate", "--model", "no_colon"], "--model"),
    (["generate", "--model", "no_such_module_xyz:f"], "--model"),
    (["generate", "--model", "fastdiff:no_such_function"], "--model"),
    (["compare", "--configs", "ddim"], "--configs"),
    (["evaluate", "missing.npz"], "SAMPLES"),
])
def test_cli_errors_are_one_line_naming_the_argument_with_exit_code_2(tmp_path, capsys, argv, name):
    assert main(argv + (["--out", str(tmp_path)] if argv[0] != "evaluate" else [])) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and name in err, err


def test_cli_refuses_a_reference_of_other_images_and_a_spec_that_returns_no_workload(tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "tests"))
    assert main(["generate", "--model", "generate_specs:not_a_workload", "--out", str(tmp_path)]) == 2
    assert "--model" in capsys.readouterr().err
    samples = tmp_path / "s.npz"
    np.savez(samples, images=np.zeros((4, 1, 16, 16), np.uint8))
    ref = tmp_path / "r.npz"
    np.savez(ref, images=np.zeros((4, 3, 8, 8), np.uint8))
    assert main(["evaluate", str(samples), "--reference", str(ref)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--reference" in err and "3x8x8" in err


def _env():
    # one thread per process in every run: CPU kernels round differently with other thread counts
    return dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.path.join(ROOT, "tests")]), OMP_NUM_THREADS="1",
                OMP_WAIT_POLICY="PASSIVE")


def _cli(out, nproc, env=None):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] \
        if nproc > 1 else [sys.executable]
    args = ["-m", "fastdiff", "generate", "--model", "generate_specs:digits_dying_at", "--num-images", "11",
            "--batch-size", "2", "--steps", "3", "--solver", "dpmpp_2m_sde", "--seed", "5", "--device", "cpu",
            "--out", str(out)]
    return subprocess.run(launcher + args, cwd=ROOT, env=env or _env(), capture_output=True, text=True, timeout=120)


def test_two_gloo_processes_and_a_killed_resumed_run_write_the_one_process_file(tmp_path):
    """Byte-equal samples.npz: 1 process, 2 processes, and 2 processes SIGKILLed mid-way (image 7)
    then resumed."""
    one = _cli(tmp_path / "one", 1)
    assert one.returncode == 0, one.stderr
    reference = (tmp_path / "one" / "samples.npz").read_bytes()

    two = _cli(tmp_path / "two", 2)
    assert two.returncode == 0, two.stderr
    assert (tmp_path / "two" / "samples.npz").read_bytes() == reference

    killed = _cli(tmp_path / "killed", 2, env=dict(_env(), FASTDIFF_TEST_DIE_AT="7"))
    assert killed.returncode != 0
    done = sorted(p.name for p in (tmp_path / "killed" / "shards").glob("*.npz"))
    assert 0 < len(done) < 6 and "000003.npz" not in done, done  # image 7 lives in shard 3
    assert not (tmp_path / "killed" / "samples.npz").exists()
    resumed = _cli(tmp_path / "killed", 1)  # another process count: the shards do not depend on it
    assert resumed.returncode == 0, resumed.stderr
    sizes = {f"{k:06d}.npz": 2 if k < 5 else 1 for k in range(6)}  # 11 images in shards of 2
    assert f"sampled {sum(n for name, n in sizes.items() if name not in done)} images" in resumed.stdout
    assert (tmp_path / "killed" / "samples.npz").read_bytes() == reference
    with np.load(tmp_path / "one" / "samples.npz") as z:
        assert z["images"].shape == (11, 1, 16, 16) and np.array_equal(z["cond_class_labels"], np.arange(11) % 10)
    assert (tmp_path / "one" / "grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _uint8(x):
    return ((x + 1) * 127.5).round().to(torch.uint8)


def test_evaluate_intervals_tell_real_digits_from_degraded_ones(tmp_path):
    from fastdiff.demo.data import load_split
    from fastdiff.evaluation import Samples, evaluate, load_reference

    train, labels = load_split("train")
    x = train[:200]
    g = torch.Generator().manual_seed(0)
    blurred = torch.nn.functional.avg_pool2d(x, 3, 1, 1) + 0.3 * torch.randn(x.shape, generator=g)
    ref = load_reference("digits")
    good = evaluate(Samples(_uint8(x), labels[:200]), ref, bootstrap=20)
    bad = evaluate(Samples(_uint8(blurred.clamp(-1, 1))), ref, bootstrap=20)
    for r in (good, bad):
        assert r["fd_ci"][0] < r["fd"] < r["fd_ci"][1] and r["kid_ci"][0] < r["kid"] < r["kid_ci"][1]
    assert good["fd_ci"][1] < bad["fd_ci"][0] and good["kid_ci"][1] < bad["kid_ci"][0]
    assert good["acc"] > 0.9 and "acc" not in bad


def test_compare_writes_one_table_row_per_configuration(tmp_path, capsys):
    out = tmp_path / "cmp"
    assert main(["compare", "--configs", "ddim:2", "heun:3", "--num-images", "20", "--batch-size", "10",
                 "--bootstrap", "5", "--perceptual-reference", "ddim:4", "--ppl-pairs", "3", "--out", str(out)]) == 0
    head, *rows = [line for line in (out / "table.md").read_text().splitlines() if line.startswith("| ")]
    assert [c.strip() for c in head.split("|")[1:-1]] == [
        "method", "model calls", "ms per image", "FD", "IS", "KID x1e3", "perceptual distance", "class agreement %",
        "PPL", "precision", "recall"]
    # Heun's 3 steps cost 5 model calls (2N - 1): the table says so
    assert [r.split("|")[1:3] for r in rows] == [[" ddim:2 ", " 2 "], [" heun:3 ", " 5 "]]
    # every metric with its interval
    assert all(c.count("[") == 1 for r in rows for c in r.split("|")[4:-1])
    assert (out / "ddim-2" / "samples.npz").exists()
    assert main(["evaluate", str(out / "ddim-2" / "samples.npz"), "--bootstrap", "5"]) == 0
    assert "FD " in capsys.readouterr().out
