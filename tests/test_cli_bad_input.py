"""The CLI bad-input catalogue for generate / evaluate / compare: every bad argument, config and
file gives exit code 2 and exactly one line on stderr naming it, before any model call (no
traceback, nothing sampled first). In-process through `python -m fastdiff`'s `main`, with a
tiny counting model (tests/generate_specs.py:counting)."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fastdiff.__main__ import main

from conftest import require

require("safetensors", "demo")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEC = ["--model", "generate_specs:counting", "--device", "cpu", "--num-images", "2", "--batch-size", "2"]


@pytest.fixture(autouse=True)
def specs(monkeypatch):
    monkeypatch.syspath_prepend(os.path.join(ROOT, "tests"))
    import generate_specs

    generate_specs.Counting.calls = 0
    return generate_specs


@pytest.fixture(autouse=True)
def no_weights(tmp_path, monkeypatch):
    """Empty torch.hub and Hugging Face caches: --features inception|lpips|clip find no weights."""
    from huggingface_hub import constants

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))


def _samples(path, **arrays):
    np.savez(path, **{"images": np.zeros((4, 1, 16, 16), np.uint8), **arrays})
    return str(path)


def _truncated(path):
    _samples(path)
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])
    return str(path)


def _run_dir(tmp, what):
    """An --out directory with one thing broken: its run.json, shards or samples.npz."""
    out = tmp / "out"
    out.mkdir()
    if what == "run.json":
        (out / "run.json").write_text('{"num_images": 2, "se')  # a write cut short
    elif what == "shards":
        (out / "shards").write_text("")
    elif what == "samples.npz":
        (out / "samples.npz").mkdir()
    return str(out)


def _broken_config_dir(tmp, name="ddim-2"):
    """A compare --out whose run directory `name` (a configuration's or the perceptual reference's)
    holds a run.json cut short."""
    (tmp / "out" / name).mkdir(parents=True)
    (tmp / "out" / name / "run.json").write_text("[1, 2")
    return str(tmp / "out")


# (id, argv builder taking tmp_path, the text the one line must contain)
CASES = [
    ("generate-guidance-nan", lambda t: ["generate", *SPEC, "--guidance-scale", "nan", "--out", str(t)],
     "--guidance-scale"),
    ("generate-device-meta", lambda t: ["generate", *SPEC, "--device", "meta", "--out", str(t)], "--device meta"),
    ("generate-num-images-0", lambda t: ["generate", *SPEC, "--num-images", "0", "--out", str(t)], "--num-images"),
    ("generate-out-is-a-file", lambda t: ["generate", *SPEC, "--out", _samples(t / "f.npz")], "--out"),
    ("generate-corrupt-run-json", lambda t: ["generate", *SPEC, "--out", _run_dir(t, "run.json")], "run.json"),
    ("generate-shards-is-a-file", lambda t: ["generate", *SPEC, "--out", _run_dir(t, "shards")], "shards"),
    ("generate-samples-is-a-dir", lambda t: ["generate", *SPEC, "--out", _run_dir(t, "samples.npz")],
     "samples.npz"),
    ("generate-model-without-colon", lambda t: ["generate", "--model", "nocolon", "--out", str(t)], "--model"),
    ("evaluate-missing", lambda t: ["evaluate", str(t / "nope.npz")], "nope.npz"),
    ("evaluate-truncated", lambda t: ["evaluate", _truncated(t / "cut.npz")], "cut.npz"),
    ("evaluate-labels-wrong-length", lambda t: ["evaluate", _samples(t / "s.npz", cond_class_labels=np.arange(3))],
     "cond_class_labels"),
    ("evaluate-meta-not-json", lambda t: ["evaluate", _samples(t / "s.npz", meta=np.str_("{not json"))], "'meta'"),
    ("evaluate-json-is-a-dir", lambda t: ["evaluate", _samples(t / "s.npz"), "--json", str(t)], "--json"),
    ("evaluate-bootstrap-negative", lambda t: ["evaluate", _samples(t / "s.npz"), "--bootstrap", "-1"],
     "--bootstrap"),
    ("evaluate-features-inception", lambda t: ["evaluate", _samples(t / "s.npz"), "--features", "inception"],
     "--features inception: needs"),
    ("evaluate-features-lpips", lambda t: ["evaluate", _samples(t / "s.npz"), "--features", "lpips"],
     "alexnet-owt-7be5be79.pth"),
    ("evaluate-features-clip", lambda t: ["evaluate", _samples(t / "s.npz"), "--features", "clip"],
     "openai/clip-vit-large-patch14 in the Hugging Face cache"),
    ("evaluate-features-unknown", lambda t: ["evaluate", _samples(t / "s.npz"), "--features", "vgg"], "--features"),
    ("evaluate-is-splits-0", lambda t: ["evaluate", _samples(t / "s.npz"), "--is-splits", "0"], "--is-splits"),
    ("evaluate-paired-missing", lambda t: ["evaluate", _samples(t / "s.npz"), "--paired", str(t / "nope.npz")],
     "--paired"),
    ("evaluate-paired-other-count", lambda t: ["evaluate", _samples(t / "s.npz"), "--paired",
                                               _samples(t / "p.npz", images=np.zeros((3, 1, 16, 16), np.uint8))],
     "--paired"),
    ("evaluate-paired-other-labels",
     lambda t: ["evaluate", _samples(t / "s.npz", cond_class_labels=np.arange(4)), "--paired",
                _samples(t / "p.npz", cond_class_labels=np.arange(4) + 1)], "--paired"),
    ("compare-unknown-solver-after-a-good-one",
     lambda t: ["compare", *SPEC, "--configs", "ddim:4", "bogus:8", "--out", str(t)], "bogus"),
    ("compare-one-image", lambda t: ["compare", *SPEC, "--num-images", "1", "--out", str(t)], "--num-images"),
    ("compare-corrupt-run-json-of-the-second-config",
     lambda t: ["compare", *SPEC, "--configs", "ddim:1", "ddim:2", "--out", _broken_config_dir(t)], "run.json"),
    ("compare-model-images-unlike-the-reference", lambda t: ["compare", *SPEC, "--configs", "ddim:1", "--out", str(t)],
     "1x4x4"),
    ("compare-features-inception", lambda t: ["compare", *SPEC, "--features", "inception", "--out", str(t)],
     "weights-inception-2015-12-05-6726825d.pth"),
    ("compare-is-splits-0", lambda t: ["compare", *SPEC, "--is-splits", "0", "--out", str(t)], "--is-splits"),
    ("compare-ppl-pairs-negative", lambda t: ["compare", *SPEC, "--ppl-pairs", "-1", "--out", str(t)],
     "--ppl-pairs"),
    ("compare-perceptual-reference-unknown-solver",
     lambda t: ["compare", *SPEC, "--perceptual-reference", "bogus:3", "--out", str(t)], "--perceptual-reference"),
    ("compare-corrupt-run-json-of-the-perceptual-reference",
     lambda t: ["compare", *SPEC, "--configs", "ddim:1", "--perceptual-reference", "ddim:2", "--out",
                _broken_config_dir(t, "reference-ddim-2")], "reference-ddim-2"),
    ("compare-guidance-inf", lambda t: ["compare", *SPEC, "--guidance-scale", "inf", "--out", str(t)],
     "--guidance-scale"),
]


@pytest.mark.parametrize("argv,text", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_naming_it_before_any_model_call(tmp_path, capsys, specs, argv, text):
    argv = argv(tmp_path)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse's own errors
        code = e.code
    err = capsys.readouterr().err
    assert code == 2, err
    assert len(err.strip().splitlines()) == 1 and text in err, err
    assert "Traceback" not in err and specs.Counting.calls == 0


def test_a_changed_run_names_each_differing_key_with_old_and_new_value(tmp_path, capsys, specs):
    out = str(tmp_path / "run")
    assert main(["generate", *SPEC, "--no-progress", "--out", out]) == 0
    calls = specs.Counting.calls
    capsys.readouterr()
    assert main(["generate", *SPEC, "--seed", "3", "--solver", "euler", "--out", out]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert "seed: 0 -> 3" in err and "plan.solver: 'ddim' -> 'euler'" in err and err.rstrip().endswith("new out_dir")
    assert specs.Counting.calls == calls
    assert json.load(open(os.path.join(out, "run.json")))["seed"] == 0


def test_entry_point_of_a_re_executed_command_prints_one_line(tmp_path):
    # generate/evaluate/compare re-execute themselves (passive OpenMP): the error survives that
    r = subprocess.run([sys.executable, "-m", "fastdiff", "evaluate", _truncated(tmp_path / "cut.npz")], cwd=ROOT,
                       env=dict(os.environ, PYTHONPATH=ROOT), capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().splitlines() == [r.stderr.strip()], r.stderr
    assert "cut.npz" in r.stderr and "Traceback" not in r.stderr
