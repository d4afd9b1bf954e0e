"""Shared test fixtures: the backend matrix every op test runs over.

Backends: the C++ CPU kernel ("cpu"), Triton under its CPU interpreter ("triton-interp": the
fixture sets TRITON_INTERPRET=1 for the test, so these run in the plain `pytest tests` of CI),
the plain-PyTorch fallback ("reference"), and, only with a GPU, the CUDA kernel ("cuda") and
Triton on CUDA ("triton-cuda"). Under CI=true a backend that should exist here (the compiled
CPU kernel, Triton) fails instead of skipping.

Order: `FASTDIFF_TEST_ORDER=reverse` runs the test files, and the tests inside each file, in
reverse; `FASTDIFF_TEST_ORDER=shuffle:<seed>` in a seeded random order (files shuffled, then the
tests inside each file, so module-scoped fixtures are built once). CI runs one shuffled pass:
the suite must pass in any order (no test may depend on what an earlier one left behind); the
one exception, a test marked `last_in_file` (a check over what its whole file ran), stays last.

A test module that uses the `backend` fixture names its op in a module-level `OP = "<op>"`
(the compiled kernels `fastdiff_C::<op>` the "cpu" and "cuda" backends need). Helpers for the
module itself: `from conftest import need, HAS_TRITON, ...`.

GPU tests carry the marker `gpu` (`pytest -m gpu` runs only them: the GPU check's test phase):
the "cuda" and "triton-cuda" cases of the backend matrix and a `device="cuda"` parameter are
marked here at collection, other GPU-only tests by the `gpu_test(...)` decorator.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import random
import subprocess
import sys

import pytest
import torch

from fastdiff import _ext

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
HAS_TRITON = importlib.util.find_spec("triton") is not None
HAS_CUDA = torch.cuda.is_available()


def _import_triton_for_this_machine() -> None:
    """Triton builds its standard library (tl.sum, tl.zeros, ...) for one mode, from
    TRITON_INTERPRET when it is first imported, and a kernel run in the other mode fails. Without
    a GPU every in-process Triton run is interpreted (GPU compiles run in subprocesses,
    tests/gpu_compile.py), so import it in that mode now, whatever test imports it first; with a
    GPU, in compile mode (the "triton-interp" cases then skip, saying why). A TRITON_INTERPRET
    already set wins (the offline-compile subprocesses set it to 0)."""
    before = os.environ.get("TRITON_INTERPRET")
    if not HAS_TRITON or "triton" in sys.modules or before is not None:
        return
    os.environ["TRITON_INTERPRET"] = "0" if HAS_CUDA else "1"
    try:
        import triton.language  # noqa: F401
    finally:
        del os.environ["TRITON_INTERPRET"]


_import_triton_for_this_machine()


# parameters (name, value) whose test cases run on a GPU
GPU_PARAMS = (("backend", "cuda"), ("backend", "triton-cuda"), ("device", "cuda"))


def pytest_collection_modifyitems(config, items):
    for item in items:
        params = getattr(item, "callspec", None)
        if params is not None and any(params.params.get(k) == v for k, v in GPU_PARAMS):
            item.add_marker(pytest.mark.gpu)
    _arrange(items)


def _arrange(items) -> None:
    """Apply FASTDIFF_TEST_ORDER (see the module doc)."""
    order = os.environ.get("FASTDIFF_TEST_ORDER", "")
    if not order:
        return
    if order == "reverse":
        arrange = list.reverse
    elif order.startswith("shuffle:") and order[len("shuffle:"):].isdigit():
        arrange = random.Random(int(order[len("shuffle:"):])).shuffle
    else:
        raise pytest.UsageError(f"FASTDIFF_TEST_ORDER={order!r}: expected 'reverse' or 'shuffle:<integer seed>'")
    by_file: dict = {}
    for item in items:
        by_file.setdefault(item.path, []).append(item)
    files = list(by_file.values())
    arrange(files)
    for group in files:
        arrange(group)
        group.sort(key=lambda item: item.get_closest_marker("last_in_file") is not None)  # stable
    items[:] = [item for group in files for item in group]


def load_build_flags():
    """csrc/build_flags.py: the one description of the C++/CUDA compile flags (as setup.py loads it)."""
    spec = importlib.util.spec_from_file_location("_fastdiff_build_flags", os.path.join(ROOT, "csrc", "build_flags.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def need(ok: bool, reason: str) -> None:
    """Skip when a backend is missing; in CI the CPU-runnable ones must be there."""
    if not ok:
        if IN_CI and "GPU" not in reason:
            pytest.fail(f"{reason} (CI=true: this backend must run in CI)")
        pytest.skip(reason)


def require(module: str, extra: str):
    """Import an optional test dependency: skip without it, but under CI=true (which installs
    every extra) fail. -> the module."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        reason = f"needs {module} (pip install 'fastdiff[{extra}]'): {e}"
        if IN_CI:
            pytest.fail(f"{reason} (CI=true: every extra must be installed)", pytrace=False)
        pytest.skip(reason, allow_module_level=True)


def gpu_test(ok: bool = HAS_CUDA, reason: str = "needs a GPU"):
    """Decorator for a test that runs only on a GPU: marked `gpu`, skipped where `ok` is false."""

    def mark(fn):
        return pytest.mark.gpu(pytest.mark.skipif(not ok, reason=reason)(fn))

    return mark


# (backend, device)
BACKENDS = {
    "cpu": ("cpu", "cpu"),
    "triton-interp": ("triton", "cpu"),
    "reference": ("reference", "cpu"),
    "cuda": ("cuda", "cuda"),
    "triton-cuda": ("triton", "cuda"),
}


def setup_backend(name: str, op, monkeypatch) -> tuple:
    """Skip (or fail in CI) when backend `name` cannot run `op` here; set TRITON_INTERPRET for
    Triton. `op=None`: the op's cpu/cuda backends need nothing compiled (e.g. attention's SDPA).
    -> (backend, device)."""
    be, device = BACKENDS[name]
    if device == "cuda":
        need(HAS_CUDA, "no GPU")
        if be == "cuda" and op is not None:
            need(_ext.has_kernel(op, "CUDA"), "fastdiff._C has no CUDA kernels (GPU present but not built with CUDA)")
    if be == "cpu" and op is not None:
        need(_ext.has_kernel(op, "CPU"), f"fastdiff._C not built ({_ext.LOAD_ERROR})")
    if be == "triton":
        need(HAS_TRITON, "triton is not installed")
        if device == "cpu":
            monkeypatch.setenv("TRITON_INTERPRET", "1")
        else:
            monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        from fastdiff.ops import _dispatch

        mismatch = _dispatch.triton_mode_mismatch(device == "cpu")
        if mismatch and HAS_CUDA:
            pytest.skip(f"{mismatch} (on a GPU machine the tests import Triton for the GPU)")
        need(mismatch is None, str(mismatch))
    return be, device


@pytest.fixture(params=list(BACKENDS))
def backend(request, monkeypatch):
    """-> (backend name, device) with the environment it needs, for the module's `OP`."""
    op = getattr(request.module, "OP", None)
    if op is None:
        raise RuntimeError(f"{request.module.__name__} uses the `backend` fixture but defines no OP = '<op name>'")
    return setup_backend(request.param, op, monkeypatch)


def run_without_extension(code: str) -> None:
    """Run `code` in a fresh interpreter with fastdiff._C disabled (FASTDIFF_LOAD_EXT=0) and
    Triton's interpreter off; it must exit 0 and print "ok"."""
    env = dict(os.environ, FASTDIFF_LOAD_EXT="0")
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "ok" in r.stdout, r.stdout + r.stderr
