"""The checkout never shadows an installed package, and CI installs exactly the tested versions.

`python -m pytest` (and any `python -m ...` or script run from the repository root) puts the
root first on sys.path, where the top-level kernels/ folder sits beside the installed package of
the same name that transformers imports (kernels/__init__.py hands such an import on).
constraints.txt pins every package the README's install command brings, direct and indirect.
"""
import importlib.metadata
import importlib.util
import os
import re
import subprocess
import sys

import pytest

from conftest import IN_CI, ROOT

CONSTRAINTS = os.path.join(ROOT, "constraints.txt")
EXTRAS = ("test", "triton", "demo", "diffusers")  # the README's install command


def _run_from_root(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def test_transformers_and_diffusers_import_from_the_repo_root():
    if importlib.util.find_spec("diffusers") is None:
        reason = "needs diffusers (pip install 'fastdiff[diffusers]')"
        if IN_CI:
            pytest.fail(f"{reason} (CI=true: every extra must be installed)", pytrace=False)
        pytest.skip(reason)
    code = ("import transformers.integrations.hub_kernels, diffusers.loaders.peft, kernels\n"
            "print(kernels.__file__)")
    proc = _run_from_root("-c", code)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = os.path.realpath(proc.stdout.strip().splitlines()[-1])
    assert not found.startswith(os.path.join(os.path.realpath(ROOT), "kernels")), found


def test_top_level_kernels_is_never_ours():
    # -S: no site-packages, so no installed `kernels`; the root is still first on sys.path.
    proc = _run_from_root("-S", "-c", "import kernels")
    assert proc.returncode != 0
    assert "ModuleNotFoundError: No module named 'kernels'" in proc.stderr, proc.stderr[-3000:]


def test_fastdiff_kernels_imports_from_the_repo_root():
    proc = _run_from_root("-c", "import fastdiff.kernels.solver_step as m; print(m.__name__)")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split() == ["fastdiff.kernels.solver_step"]


def _pins() -> dict:
    pins = {}
    with open(CONSTRAINTS) as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                name, sep, version = line.partition("==")
                assert sep and version, f"constraints.txt: {line!r} is not 'name==version'"
                pins[_canonical(name)] = version
    return pins


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirements(dist: str, extras: tuple = ()) -> set:
    """Names of the installed distributions that `dist[extras]` requires, transitively."""
    from packaging.requirements import Requirement

    seen, todo = set(), [(dist, tuple(extras))]
    while todo:
        name, wanted = todo.pop()
        for text in importlib.metadata.requires(name) or []:
            req = Requirement(text)
            if req.marker is not None and not any(
                    req.marker.evaluate({"extra": e}) for e in (wanted or ("",))):
                continue
            key = _canonical(req.name)
            if key not in seen:
                seen.add(key)
                todo.append((req.name, tuple(req.extras)))
    return seen


def test_constraints_pin_every_package_the_install_brings():
    pins = _pins()
    needed = _requirements("fastdiff", EXTRAS) | {"torch", "setuptools", "wheel", "ninja"}
    assert sorted(needed - set(pins)) == [], "not pinned in constraints.txt (refresh it: README, Tested versions)"


def test_installed_versions_are_the_pinned_ones():
    if not IN_CI:
        pytest.skip("only CI installs with constraints.txt; a developer's environment may differ")
    pins = _pins()
    wrong = {}
    for name in _requirements("fastdiff", EXTRAS) | {"torch"}:
        have = importlib.metadata.version(name)
        if have.split("+")[0] != pins[name]:
            wrong[name] = (have, pins[name])
    assert wrong == {}
