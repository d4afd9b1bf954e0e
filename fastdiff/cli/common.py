"""What the `python -m fastdiff` commands share: one-line usage errors (exit 2, argparse's
convention, no traceback) and the checks of their common options."""
from __future__ import annotations

import argparse
import math
import os


class UsageError(Exception):
    """A bad command-line argument. `python -m fastdiff` prints "<prog>: error: <message>" (one
    line, naming the option) and exits with 2."""


class Parser(argparse.ArgumentParser):
    """argparse with its errors on one line: "<prog>: error: <message> (see --help)"."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def at_least_one(text: str) -> int:
    """argparse `type=` for counts: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {text!r}")
    return value


def pick_device(spec: str):
    """--device: "auto" (cuda when torch sees a GPU, else cpu), "cpu", "cuda" or "cuda:N"."""
    import torch

    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {spec}: expected auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {spec}: torch sees no CUDA device (torch {torch.__version__}, "
                             f"CUDA build: {torch.version.cuda or 'no'})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {spec}: torch sees {torch.cuda.device_count()} CUDA device(s)")
    return device


def make_out_dir(path: str) -> None:
    """--out: create the directory (and parents), or say why not."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise UsageError(f"--out {path}: cannot create the directory ({e.strerror or e})") from None
    if not os.access(path, os.W_OK):
        raise UsageError(f"--out {path}: the directory is not writable")


def check_output_file(option: str, path: str) -> None:
    """An output file the command writes at the end: say now, before any work, if it cannot."""
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path):
        raise UsageError(f"{option} {path}: is a directory, expected a file name")
    if os.path.exists(path) and not os.access(path, os.W_OK):
        raise UsageError(f"{option} {path}: the file is not writable")
    if not os.path.isdir(parent) or not os.access(parent, os.W_OK):
        raise UsageError(f"{option} {path}: {parent} is not a writable directory")


def finite(text: str) -> float:
    """argparse `type=` for scales: a finite number (float() also takes nan and inf)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"expected a finite number, got {text!r}")
    return value
