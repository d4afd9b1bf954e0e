"""benchmarks/gpu_stack.py: the wheels carried to the GPU machine, what is installed from them
there, and the package view gpu_check.sh --rehearse runs under."""
import importlib.util
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, require

SPEC = importlib.util.spec_from_file_location("gpu_stack", os.path.join(ROOT, "benchmarks", "gpu_stack.py"))
gpu_stack = importlib.util.module_from_spec(SPEC)
SPEC.loader.exec_module(gpu_stack)


def make_wheel(folder: Path, name: str, version: str, tag: str = "py3-none-any", requires=(), size: int = 0) -> Path:
    """A wheel file with just a METADATA (and `size` bytes of padding)."""
    path = folder / f"{name.replace('-', '_')}-{version}-{tag}.whl"
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name.replace('-', '_')}-{version}.dist-info/METADATA", meta)
        if size:
            z.writestr("pad", os.urandom(size))
    return path


def carried_wheels(folder: Path) -> None:
    for name, version in gpu_stack.pinned().items():
        make_wheel(folder, name, version)


def test_pins_come_from_constraints_and_the_documented_fetch_command_is_the_scripts():
    pins = gpu_stack.pinned()
    constraints = (Path(ROOT) / "constraints.txt").read_text()
    assert f"diffusers=={pins['diffusers']}" in constraints and pins["huggingface-hub"].startswith("1.")
    cmd = gpu_stack.fetch_command()
    assert cmd.startswith("pip download --no-deps --python-version 3.12 ") and "--only-binary=:all: -d .whl" in cmd
    # the command as gpu_check.sh's header and the README print it (wrapped lines joined)
    for doc in ("benchmarks/gpu_check.sh", "README.md"):
        text = re.sub(r"\\\n#?\s*", "", (Path(ROOT) / doc).read_text())
        assert cmd in text, doc


def test_check_wheels(tmp_path, capsys):
    carried_wheels(tmp_path)
    assert gpu_stack.check_wheels(tmp_path) == 0
    assert f"{len(gpu_stack.pinned())} wheels" in capsys.readouterr().out
    extra = make_wheel(tmp_path, "scipy", "1.0")
    with pytest.raises(SystemExit, match="not carried .remove it.: scipy"):
        gpu_stack.check_wheels(tmp_path)
    extra.unlink()
    next(tmp_path.glob("ninja-*")).unlink()
    make_wheel(tmp_path, "ninja", "1.0")
    with pytest.raises(SystemExit, match="ninja: 1.0, want"):
        gpu_stack.check_wheels(tmp_path)
    for p in tmp_path.glob("pillow-*"):
        p.unlink()
    with pytest.raises(SystemExit, match="missing: pillow"):
        gpu_stack.check_wheels(tmp_path)
    with pytest.raises(SystemExit, match="no folder"):
        gpu_stack.check_wheels(tmp_path / "absent")


@pytest.mark.parametrize("tag,ok", [("cp312-cp312-manylinux_2_28_x86_64", True), ("cp39-abi3-manylinux2014_x86_64", True),
                                    ("py3-none-any", True), ("cp311-cp311-manylinux_2_28_x86_64", False),
                                    ("cp312-cp312-macosx_11_0_arm64", False), ("cp312-cp312-manylinux_2_28_aarch64", False)])
def test_wheels_must_install_on_the_gpu_machine(tmp_path, tag, ok):
    make_wheel(tmp_path, "pillow", "13.0.0", tag)
    if ok:
        assert set(gpu_stack._wheels(tmp_path)) == {"pillow"}
    else:
        with pytest.raises(SystemExit, match="does not install on the GPU machine"):
            gpu_stack._wheels(tmp_path)


def test_check_wheels_size_limit(tmp_path, monkeypatch):
    carried_wheels(tmp_path)
    monkeypatch.setattr(gpu_stack, "WHEEL_LIMIT", 100)
    with pytest.raises(SystemExit, match="MiB in all: over"):
        gpu_stack.check_wheels(tmp_path)


def test_install_plan_installs_what_is_missing_or_not_accepted(tmp_path, capsys):
    """Installed here: packaging, pytest. A carried wheel is installed when its package is
    missing, or installed at a version a carried package does not accept."""
    import packaging

    make_wheel(tmp_path, "fastdiff-missing-pkg", "1.0")
    make_wheel(tmp_path, "packaging", "1.0")  # installed and nobody asks for more: stays
    make_wheel(tmp_path, "pytest", "99.0")
    make_wheel(tmp_path, "needs-new-pytest", "1.0", requires=["pytest>=99", f"packaging>={packaging.__version__}"])
    assert gpu_stack.install_plan(tmp_path) == 0
    planned = sorted(Path(p).name.split("-")[0] for p in capsys.readouterr().out.split())
    assert planned == ["fastdiff_missing_pkg", "needs_new_pytest", "pytest"]


def test_view_holds_the_gpu_machines_packages_only(tmp_path):
    """`python -S` on the view imports the GPU stack and the carried packages, not what only
    this machine has (scikit-learn: the demo extra)."""
    require("diffusers", "diffusers")
    require("sklearn", "demo")
    view = tmp_path / "view"
    assert gpu_stack.view(view) == 0
    code = ("import importlib.util as u; import torch, pytest, diffusers, PIL, requests\n"
            "print(u.find_spec('sklearn') is None, u.find_spec('matplotlib') is None)")
    r = subprocess.run([sys.executable, "-S", "-c", code], env=dict(os.environ, PYTHONPATH=str(view)), cwd=tmp_path,
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.split() == ["True", "True"]


def test_cli_usage_errors():
    for argv in ([], ["nope"], ["get"], ["check-wheels"], ["verify", "x"]):
        with pytest.raises(SystemExit) as e:
            gpu_stack.main(argv)
        assert "gpu_stack.py get KEY" in str(e.value)
    with pytest.raises(SystemExit, match="unknown key 'nope'"):
        gpu_stack.main(["get", "nope"])
