"""Bad command-line input: one line on stderr naming the option, exit code 2, no traceback.

In-process through the same `main` functions `python -m fastdiff` and `python -m fastdiff.bench`
call (each case would otherwise pay a torch import); one subprocess checks the real entry point."""
import subprocess
import sys

import pytest
import torch

from fastdiff.cli import build_parser
from fastdiff.__main__ import main as fastdiff_main
from fastdiff.bench.__main__ import main as bench_main

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is valid here")

CASES = [
    # (argv, the option the message must name)
    (["profile", "--model", "gmm", "--device", "cpu", "--graph"], "--graph"),
    (["profile", "--model", "gmm", "--device", "cpu", "--backend", "cuda"], "--backend"),
    pytest.param(["profile", "--model", "gmm", "--device", "cuda"], "--device", marks=NO_CUDA),
    (["profile", "--model", "gmm", "--device", "cuda:99"], "--device"),
    (["profile", "--model", "gmm", "--solver", "nope"], "--solver"),
    (["profile", "--model", "gmm", "--steps", "0"], "--steps"),
    (["profile", "--model", "gmm", "--out", "/proc/nope"], "--out"),
    (["demo", "--no-table", "--out", "/proc/nope"], "--out"),
    (["demo", "--no-table", "--device", "meta"], "--device"),
    (["demo", "--no-table", "--num-images", "0"], "--num-images"),
    (["demo", "--no-table", "--steps", "-1"], "--steps"),
    (["demo", "--no-table", "--guidance-scale", "nan"], "--guidance-scale"),
    (["profile", "--model", "gmm", "--guidance-scale", "inf"], "--guidance-scale"),
    (["accuracy", "--json", "/proc/nope/x.json"], "--json"),
]


def run_main(main, argv):
    """-> the exit code of main(argv), whether it returns it or argparse exits with it."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("argv,option", CASES, ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_bad_option_is_one_line_naming_it(argv, option, capsys):
    assert run_main(fastdiff_main, argv) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert err.startswith(f"python -m fastdiff {argv[0]}: error: ") and option in err, err


def test_profile_refuses_an_output_file_that_is_a_directory_before_sampling(tmp_path, capsys):
    (tmp_path / "trace.json").mkdir()
    assert run_main(fastdiff_main, ["profile", "--model", "gmm", "--device", "cpu", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "trace.json" in err and "profile: warm-up" not in err, err


def test_ncu_summary_of_a_missing_file_fails(tmp_path, capsys):
    missing = tmp_path / "nope.csv"
    assert run_main(bench_main, ["ncu-summary", str(missing)]) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and str(missing) in err, err


def test_entry_point_prints_no_traceback():
    r = subprocess.run([sys.executable, "-m", "fastdiff", "profile", "--model", "gmm", "--device", "cpu",
                        "--backend", "cuda"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "--backend cuda" in r.stderr


def test_profile_help_gives_every_option_help_and_default():
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    profile = sub.choices["profile"]
    options = [a for a in profile._actions if a.dest != "help"]
    assert len(options) >= 10
    for a in options:
        assert a.help and "default" in a.help, a.option_strings
    text = " ".join(profile.format_help().split())  # (argparse wraps long help lines anywhere)
    assert "(default: dpmpp_2m)" in text and "(default: 8)" in text
