"""Builds and talks to the CPU test driver of the CUDA kernels (csrc/cuda_on_cpu/kernel_driver.cc).

The real csrc/*/*.cu sources are compiled as C++ against the CUDA emulation in
csrc/cuda_on_cpu (its include/ replaces cuda_runtime.h, cuda_fp16.h, cuda_bf16.h), with
AddressSanitizer and UBSan, into one executable cached by a hash of the sources and flags. It
runs as a child process (a sanitized library cannot be loaded into Python) that serves kernel
launches over a pipe; a sanitizer report ends it, and the report becomes the test failure.
"""
from __future__ import annotations

import glob
import hashlib
import os
import re
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor

import torch

from conftest import ROOT, load_build_flags

CSRC = os.path.join(ROOT, "csrc")
EMU = os.path.join(CSRC, "cuda_on_cpu")
SANITIZE = ["-fsanitize=address,undefined,float-cast-overflow", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
# kernel code: every load and store a call into ASan, which the race detector hooks (cuda_on_cpu.cc)
TRACKED = ["--param", "asan-instrumentation-with-call-threshold=0"]
DTYPE_CODE = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}  # DType in csrc/<op>/<op>.h


def compile_flags() -> list:
    """The project's host flags (build_flags.CXX_FLAGS), at -O1 -g for the sanitizers, warnings
    as errors as in the CMake kernel build."""
    bf = load_build_flags()
    keep = [f for f in bf.CXX_FLAGS if not f.startswith("-O")]
    return [f"-std=c++{bf.KERNEL_CXX_STD}", "-O1", "-g", *keep, "-Wextra", "-Werror", *SANITIZE,
            "-I", os.path.join(EMU, "include")]


def cache_dir() -> str:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "fastdiff", "cuda-on-cpu")


def _compile_all(jobs):
    """jobs: [(source, object, extra flags)]; two compilers at a time."""
    def one(job):
        src, obj, extra = job
        lang = ["-x", "c++"] if src.endswith(".cu") else []
        tmp = obj + f".tmp{os.getpid()}"
        r = subprocess.run(["g++", *compile_flags(), *extra, "-c", *lang, src, "-o", tmp], capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(f"compiling {src} for the CPU failed:\n{r.stdout}{r.stderr}")
        os.replace(tmp, obj)

    with ThreadPoolExecutor(2) as pool:
        list(pool.map(one, jobs))


def build(replace_source: dict | None = None) -> str:
    """-> path of the driver executable. replace_source: {kernel .cu path: its text} builds a
    variant with that text instead of the file (mutation tests). Objects and executables are
    cached by the hash of what went into them."""
    replace_source = replace_source or {}
    if os.environ.get("FASTDIFF_CUDA_MUTANT"):  # tests/mutants.py: the whole suite on a planted bug
        from mutants import mutated

        replace_source = {**mutated(os.environ["FASTDIFF_CUDA_MUTANT"]), **replace_source}
    sources = sorted(glob.glob(os.path.join(CSRC, "*", "*.cu"))) + sorted(glob.glob(os.path.join(EMU, "*.cc")))
    headers = sorted(p for p in glob.glob(os.path.join(CSRC, "**", "*.*"), recursive=True) if p.endswith((".h", ".cuh")))
    common = hashlib.sha256(" ".join(compile_flags()).encode())
    common.update(subprocess.run(["g++", "--version"], capture_output=True, text=True, check=True).stdout.encode())
    for p in headers:
        common.update(p.encode() + b"\0" + open(p, "rb").read())
    os.makedirs(cache_dir(), exist_ok=True)
    jobs, objects = [], []
    for src in sources:
        text = replace_source[src].encode() if src in replace_source else open(src, "rb").read()
        tracked = TRACKED if src.endswith((".cu", "kernel_driver.cc")) else []  # the driver's self-test kernels
        h = common.copy()
        h.update(src.encode() + b"\0" + " ".join(tracked).encode() + b"\0" + text)
        obj = os.path.join(cache_dir(), f"{os.path.basename(src)}.{h.hexdigest()[:20]}.o")
        objects.append(obj)
        if os.path.exists(obj):
            continue
        if src in replace_source:  # compiled from a copy; its includes still resolve to csrc
            copy = obj[:-2] + os.path.splitext(src)[1]
            with open(copy, "wb") as f:
                f.write(text)
            jobs.append((copy, obj, [*tracked, "-iquote", os.path.dirname(src)]))
        else:
            jobs.append((src, obj, tracked))
    _compile_all(jobs)
    exe = os.path.join(cache_dir(), "kernel_driver." + hashlib.sha256(" ".join(objects).encode()).hexdigest()[:20])
    if not os.path.exists(exe):
        tmp = exe + f".tmp{os.getpid()}"
        subprocess.run(["g++", *SANITIZE, *objects, "-o", tmp], check=True)
        os.replace(tmp, exe)  # atomic: concurrent test runs may share the cache
    return exe


def short_name(demangled: str) -> str:
    """'void fastdiff::op::(anonymous namespace)::k<(fastdiff::op::DType)1, 8>(...)' -> 'k<(DType)1, 8>'."""
    name = re.sub(r"\(anonymous namespace\)::|fastdiff::\w+::", "", demangled)
    return re.sub(r"^void ", "", name).split("(Params")[0].rstrip("(")


def function_symbols(exe: str) -> dict:
    """{offset in exe: short name} of every function defined in it."""
    out = subprocess.run(["nm", "-C", "--defined-only", exe], capture_output=True, text=True, check=True).stdout
    syms = {}
    for line in out.splitlines():
        addr, kind, name = line.split(" ", 2)
        if kind in "tTwW":
            syms[int(addr, 16)] = short_name(name)
    return syms


def kernel_symbols(functions: dict) -> dict:
    """The template kernel instantiations (*_kernel<...>) of function_symbols()."""
    return {off: name for off, name in functions.items() if re.match(r"\w+_kernel<", name)}


def span(t: torch.Tensor) -> torch.Tensor:
    """The flat run of storage elements from t's first element to its last (its memory image)."""
    n = 1 + sum((s - 1) * st for s, st in zip(t.shape, t.stride())) if t.numel() else 0
    return t.as_strided((n,), (1,))


class DriverError(RuntimeError):
    """The driver refused or a launch failed (its message)."""


class Driver:
    """One driver process. `launched`: names of the kernels it has launched."""

    def __init__(self, exe: str):
        self.functions = function_symbols(exe)
        self.kernels = kernel_symbols(self.functions)
        self.launched = set()
        self.stderr = tempfile.TemporaryFile()
        env = dict(os.environ, ASAN_OPTIONS="detect_leaks=0:abort_on_error=0",
                   UBSAN_OPTIONS="print_stacktrace=1:halt_on_error=1")
        self.proc = subprocess.Popen([exe], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.stderr,
                                     env=env)

    def _died(self) -> AssertionError:
        self.proc.wait()
        self.stderr.seek(0)
        return AssertionError(f"kernel driver died (exit {self.proc.returncode}):\n"
                              + self.stderr.read().decode(errors="replace")[-6000:])

    def run(self, op: str, seed: int, params: dict, bufs: dict) -> dict:
        """Launch `op`. bufs: name -> tensor (its memory image is sent, at its own alignment
        modulo 16 bytes, and the kernel's result is copied back into it), "alias:NAME" or None.
        -> the reply's key=value pairs, "launches" as [{grid, block, smem, kernel}];
        DriverError if the launch failed."""
        line = [op, f"seed={seed}"] + [f"{k}={v}" for k, v in params.items()]
        sent = []
        for name, t in bufs.items():
            if isinstance(t, str):
                line.append(f"{name}={t}")
            elif t is not None:
                flat = span(t)
                line.append(f"{name}=buf:{flat.numel() * flat.element_size()}:{t.storage_offset() * t.element_size() % 16}")
                sent.append(flat)
        try:
            self.proc.stdin.write((" ".join(line) + "\n").encode())
            for flat in sent:
                self.proc.stdin.write(flat.contiguous().view(torch.uint8).numpy().tobytes())
            self.proc.stdin.flush()
        except BrokenPipeError:
            raise self._died() from None
        reply = self.proc.stdout.readline().decode()
        if not reply:
            raise self._died()
        if reply.startswith("error"):  # a race report names the kernel by its offset
            raise DriverError(re.sub(r"kernel@(\d+)", lambda m: self.functions.get(int(m[1]), m[0]),
                                     reply[len("error "):].strip()))
        for flat in sent:
            n = flat.numel() * flat.element_size()
            data = self.proc.stdout.read(n)
            if len(data) != n:
                raise self._died()
            flat.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8).view(flat.dtype))
        out = dict(kv.split("=", 1) for kv in reply.split()[1:])
        out["launches"] = [self._launch(x) for x in out.get("launches", "").split(",") if x]
        return out

    def _launch(self, text: str) -> dict:
        """'GXxGYxGZ/BLOCK/SMEM@OFFSET' (kernel_driver.cc) -> {grid, block, smem, kernel}."""
        dims, block, rest = text.split("/")
        smem, off = rest.split("@")
        kernel = self.kernels.get(int(off), f"?@{off}")
        self.launched.add(kernel)
        return dict(grid=tuple(int(v) for v in dims.split("x")), block=int(block), smem=int(smem), kernel=kernel)

    def close(self) -> None:
        self.proc.stdin.close()
        if self.proc.wait() != 0:
            raise self._died()
