"""The GPU machine's software stack, and the wheels benchmarks/gpu_check.sh carries to it.

One place for what the CPU-side rehearsals of the GPU run check against (DESIGN.md section 8):
the GPU machine has Python 3.12, torch 2.11.0+cu130, triton 3.6.0, transformers 5.17, pytest,
pytest-benchmark and hypothesis, and no network; what else a phase imports travels as wheels in
the ignored folder .whl/ of the working tree (64 MiB in all) and is installed there with
`pip install --no-index --no-deps`. Stdlib and `packaging` only (both are on the GPU machine).

    python3 benchmarks/gpu_stack.py get KEY            python | torch | cuda | triton | sanitizer (see GPU)
    python3 benchmarks/gpu_stack.py fetch-command      the pip command that fills .whl/ (run it here)
    python3 benchmarks/gpu_stack.py check-wheels DIR   DIR holds exactly the carried wheels, each one
                                                       installable on the GPU machine, under 64 MiB
    python3 benchmarks/gpu_stack.py install-plan DIR   (GPU machine) the wheel files of DIR to install:
                                                       those missing there, or there at a version a
                                                       carried package does not accept
    python3 benchmarks/gpu_stack.py verify             (GPU machine) the carried packages are there,
                                                       diffusers' U-Net and scheduler import, ninja is
                                                       on PATH; requirements unmet there are noted
    python3 benchmarks/gpu_stack.py view DIR           (here) DIR: links to this machine's packages that the
                                                       GPU machine has, plus the carried ones, to run
                                                       `python -S` on with PYTHONPATH=DIR (gpu_check.sh
                                                       --rehearse: a missing module fails here first)
"""
from __future__ import annotations

import importlib.metadata as md
import re
import shutil
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version

ROOT = Path(__file__).resolve().parent.parent

# sanitizer: the release of PyPI's nvidia-cuda-sanitizer-api that ships CUDA 13.0's
# compute-sanitizer (CI parses the sanitizer phases' options with it: gpu_check.sh --rehearse).
GPU = {"python": "3.12", "torch": "2.11.0", "cuda": "13.0", "triton": "3.6.0", "sanitizer": "13.0.85"}
# Installed on the GPU machine, with what they require; pip and setuptools come with its Python
# and torch (torch requires setuptools on Python >= 3.12).
STACK = ("torch", "triton", "transformers", "pytest", "pytest-benchmark", "hypothesis", "pip", "setuptools")
# Carried in .whl/: what the phases import beyond the stack -- diffusers (bench:diffusers) and
# what importing its U-Net and scheduler needs: Pillow, and requests (diffusers checks at import
# that it is installed) with what requests imports; diffusers' other requirements are the stack's
# or never imported on Python 3.12 (importlib_metadata) -- and ninja (without it torch's
# BuildExtension compiles one file at a time: the build would not fit its cap). Version None:
# the one constraints.txt pins. `view` (gpu_check.sh --rehearse) shows that this list suffices.
CARRIED = {
    "diffusers": None,
    "pillow": None,
    "requests": None,
    "urllib3": None,
    "idna": None,
    "charset-normalizer": None,
    "certifi": None,
    "ninja": None,
    # The newest release both transformers 5.17 (< 2.0) and diffusers 0.42 (>= 1.32) accept;
    # constraints.txt's 2.x would break transformers there.
    "huggingface-hub": "1.33.0",
}
WHEEL_LIMIT = 64 * 2**20
# Markers evaluated as on the GPU machine.
GPU_MARKERS = {"python_version": GPU["python"], "python_full_version": GPU["python"] + ".3",
               "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64",
               "implementation_name": "cpython", "extra": ""}


def pinned() -> dict:
    """{canonical name: version} of the carried wheels (constraints.txt unless CARRIED says)."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)==(\S+)", line.strip())
        if m:
            pins[canonicalize_name(m.group(1))] = m.group(2)
    out = {}
    for name, version in CARRIED.items():
        if version is None and name not in pins:
            raise SystemExit(f"gpu_stack.py: {name} is carried but constraints.txt pins no version of it")
        out[name] = version or pins[name]
    return out


def fetch_command() -> str:
    pins = " ".join(f"{n}=={v}" for n, v in pinned().items())
    return (f"pip download --no-deps --python-version {GPU['python']} --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 "
            f"--only-binary=:all: -d .whl {pins}")


def _installable_on_gpu(tags) -> bool:
    cp = "cp" + GPU["python"].replace(".", "")
    for t in tags:
        py_ok = t.interpreter in ("py3", cp) or (t.abi == "abi3" and t.interpreter.startswith("cp3")
                                                 and int(t.interpreter[3:]) <= int(cp[3:]))
        plat_ok = t.platform == "any" or (t.platform.endswith("_x86_64")
                                          and t.platform.startswith(("manylinux", "linux")))
        if py_ok and plat_ok and t.abi in ("none", "abi3", cp):
            return True
    return False


def _wheels(folder: Path) -> dict:
    """{canonical name: (version, path)} of the wheels in `folder`."""
    found = {}
    for p in sorted(folder.glob("*.whl")):
        name, version, _, tags = parse_wheel_filename(p.name)
        if name in found:
            raise SystemExit(f"gpu_stack.py: two wheels of {name} in {folder}: {found[name][1].name}, {p.name}")
        if not _installable_on_gpu(tags):
            raise SystemExit(f"gpu_stack.py: {p.name} does not install on the GPU machine (CPython "
                             f"{GPU['python']}, Linux x86_64); fetch with: {fetch_command()}")
        found[name] = (str(version), p)
    return found


def check_wheels(folder: Path) -> int:
    if not folder.is_dir():
        raise SystemExit(f"gpu_stack.py: no folder {folder}; fetch the wheels with: {fetch_command()}")
    want, have = pinned(), _wheels(folder)
    problems = [f"missing: {n}=={v}" for n, v in want.items() if n not in have]
    problems += [f"{n}: {have[n][0]}, want {v}" for n, v in want.items() if n in have and have[n][0] != v]
    problems += [f"not carried (remove it): {have[n][1].name}" for n in have if n not in want]
    size = sum(p.stat().st_size for _, p in have.values())
    if size > WHEEL_LIMIT:
        problems.append(f"{size / 2**20:.1f} MiB in all: over the {WHEEL_LIMIT // 2**20} MiB the GPU call carries")
    if problems:
        raise SystemExit("gpu_stack.py: " + folder.name + ": " + "; ".join(problems)
                         + f"\nfetch with: {fetch_command()}")
    print(f"{folder}: {len(have)} wheels, {size / 2**20:.1f} MiB: " + " ".join(f"{n}=={v}" for n, v in want.items()))
    return 0


def _installed(name: str):
    try:
        return Version(md.version(name))
    except md.PackageNotFoundError:
        return None


def _requirements(dist_requires) -> list:
    reqs = [Requirement(r) for r in dist_requires or ()]
    return [r for r in reqs if r.marker is None or r.marker.evaluate({"extra": ""})]


def _wheel_requires(path: Path) -> list:
    """The Requires-Dist lines of a wheel's METADATA."""
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    return [line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Requires-Dist:")]


def install_plan(folder: Path) -> int:
    """Print the wheels to install, one path a line: a carried package is installed when it is
    missing, or when the installed version does not satisfy what a carried package requires of
    it; the GPU machine's own packages stay otherwise."""
    have = _wheels(folder)
    wanted = {}
    for _, path in have.values():
        for r in _requirements(_wheel_requires(path)):
            wanted.setdefault(canonicalize_name(r.name), []).append(r.specifier)
    for name, (_, path) in have.items():
        installed = _installed(name)
        if installed is None or not all(s.contains(installed, prereleases=True) for s in wanted.get(name, ())):
            print(path)
    return 0


def verify() -> int:
    """On the GPU machine, after the install: what the phases import from the carried wheels
    imports (the hard check), ninja is on PATH; each carried package's version, and requirements
    it declares that the machine does not meet (notes: most are never imported by the phases)."""
    problems = []
    for name in pinned():
        version = _installed(name)
        if version is None:
            problems.append(f"{name} is not installed")
            continue
        unmet = []
        for r in _requirements(md.requires(name)):
            got = _installed(r.name)
            if got is None or not r.specifier.contains(got, prereleases=True):
                unmet.append(f"{r} ({got or 'missing'})")
        print(f"{name} {version}" + (f"  note: requires {', '.join(unmet)}" if unmet else ""))
    try:
        import diffusers

        diffusers.UNet2DConditionModel, diffusers.DPMSolverMultistepScheduler  # lazy: these import the modules
    except Exception as exc:  # noqa: BLE001 - any failure here is the finding
        problems.append(f"diffusers' U-Net and scheduler do not import: {type(exc).__name__}: {exc}")
    if shutil.which("ninja") is None:
        problems.append("ninja is not on PATH (torch's BuildExtension would compile one file at a time)")
    for p in problems:
        print(f"error: {p}", file=sys.stderr)
    return 1 if problems else 0


def _gpu_stack_dists() -> set:
    """Canonical names of the distributions installed here that the GPU machine has: STACK and
    what they require, on the GPU machine's markers. The requirements are those of the versions
    installed here, whose code the rehearsal runs (so `kernels`, which transformers 5.25 requires
    and 5.17 does not, is in)."""
    seen, todo = set(), list(STACK)
    while todo:
        name = canonicalize_name(todo.pop())
        if name in seen:
            continue
        try:
            requires = md.requires(name)
        except md.PackageNotFoundError:
            continue
        seen.add(name)
        todo += [r.name for r in map(Requirement, requires or ()) if r.marker is None or r.marker.evaluate(GPU_MARKERS)]
    return seen


def view(folder: Path) -> int:
    """Link, into `folder`, every top-level entry (packages, modules, .dist-info) of this
    machine's distributions that the GPU machine has (STACK and their requirements, on its
    markers) or gets from .whl/ (the carried ones, without their requirements: pip installs them
    with --no-deps). Versions are this machine's; what counts is which modules exist."""
    allowed = _gpu_stack_dists() | set(pinned())
    folder.mkdir(parents=True, exist_ok=True)
    linked = set()
    for dist in md.distributions():
        name = canonicalize_name(dist.metadata["Name"])
        if name not in allowed or name in linked:
            continue
        if dist.files is None:
            raise SystemExit(f"gpu_stack.py: {name} has no RECORD: cannot tell its files")
        linked.add(name)
        for top in {f.parts[0] for f in dist.files if f.parts[0] != ".."}:
            link = folder / top
            if not link.exists():
                link.symlink_to(Path(dist.locate_file(top)))
    missing = sorted(set(pinned()) - linked)
    if missing:
        raise SystemExit(f"gpu_stack.py: carried but not installed here (pip install -c constraints.txt ...): {missing}")
    print(f"{folder}: {len(linked)} distributions: " + " ".join(sorted(linked)))
    return 0


def get(key: str) -> int:
    if key not in GPU:
        raise SystemExit(f"gpu_stack.py get: unknown key {key!r} (keys: {', '.join(GPU)})")
    print(GPU[key])
    return 0


COMMANDS = {"get": get, "fetch-command": lambda: print(fetch_command()) or 0,
            "check-wheels": lambda d: check_wheels(Path(d)), "install-plan": lambda d: install_plan(Path(d)),
            "verify": verify, "view": lambda d: view(Path(d))}
ARITY = {"get": 1, "fetch-command": 0, "check-wheels": 1, "install-plan": 1, "verify": 0, "view": 1}


def main(argv) -> int:
    if not argv or argv[0] not in COMMANDS or len(argv) - 1 != ARITY[argv[0]]:
        sys.exit(__doc__)
    return COMMANDS[argv[0]](*argv[1:])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
