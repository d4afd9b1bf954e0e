"""Offline compiles of the Triton kernels for NVIDIA targets, with no GPU, in a fresh interpreter.

Why a fresh interpreter: Triton builds its standard library for one mode (interpreted or
compiled) when it is first imported, and the tests' own process imports it interpreted on a
machine without a GPU (tests/conftest.py); once the interpreter has run a kernel it has also
patched `triton.language` inside the kernel module's globals. A real compile in that process
fails ("'value' object has no attribute 'dtype'"), or passes only because a warm
`~/.triton/cache` skips the compile. So a test never compiles in its own process: it names a
function of its module that builds one case, and `compile_isolated` runs all cases in one
subprocess with the interpreter off (one torch/triton import for all of them, the compiles
spread over the cores).

A case function takes JSON values and returns a JSON value, usually a summary of
`compile_for_gpu(...)`: the PTX, the registers, the stack frame (spills) and the shared memory.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import need

TESTS = Path(__file__).resolve().parent

# The most shared memory one block may use (bytes, after opting in to more than 48 KB):
# sm_90 (H100/H200) 227 KB, sm_80 (A100) 163 KB -- CUDA programming guide, compute capabilities.
SHARED_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


def compile_for_gpu(fn, signature: dict, constexprs: dict, attrs: dict, cc: int, options: dict) -> dict:
    """triton.compile the @triton.jit `fn` for sm_<cc> (sm_90a for 90). -> {"ptx", "regs",
    "stack", "shared"}: registers per thread and stack bytes per thread (non-zero: spills) from
    cuobjdump, shared memory per block from Triton's metadata."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    k = triton.compile(ASTSource(fn, signature, constexprs, attrs), target=GPUTarget("cuda", cc, 32),
                       options=options)
    regs, stack = _resource_usage(k.asm["cubin"])
    return {"ptx": k.asm["ptx"], "regs": regs, "stack": stack, "shared": int(k.metadata.shared)}


def _resource_usage(cubin: bytes) -> tuple:
    import tempfile

    import triton

    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    if m is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no REG/STACK line:\n{out}")
    return int(m.group(1)), int(m.group(2))


def compile_isolated(module: str, case_fn: str, cases: list, timeout: int = 600) -> list:
    """Run `tests/<module>.py::<case_fn>(*case)` for every case in one fresh interpreter with
    the Triton interpreter off. -> the results, in order. An exception in a case fails the
    calling test with its message; a Triton without the NVIDIA backend or its bundled ptxas
    skips (and fails under CI=true: CI must compile)."""
    need(_has_offline_compiler(), "this Triton has no offline NVIDIA compiler (triton.compiler.ASTSource, "
                                  "triton.backends.compiler.GPUTarget, bundled ptxas/cuobjdump)")
    # Cases run in a pool of forked workers, one per core: the compiles are independent and
    # CPU-bound, and a fork shares the one torch/triton import.
    code = (
        "import json, multiprocessing, os, sys, traceback\n"
        f"sys.path.insert(0, {str(TESTS)!r})\n"
        f"from {module} import {case_fn} as case_fn\n"
        "def run(case):\n"
        "    try:\n"
        "        return {'ok': case_fn(*case)}\n"
        "    except Exception as e:\n"
        "        return {'error': '%s: %s' % (type(e).__name__, e), 'trace': traceback.format_exc()}\n"
        f"cases = json.loads({json.dumps(json.dumps(cases))})\n"
        "with multiprocessing.get_context('fork').Pool(min(len(cases), os.cpu_count() or 1)) as pool:\n"
        "    for row in pool.map(run, cases, chunksize=1):\n"
        "        print('@@' + json.dumps(row), flush=True)\n"
    )
    env = dict(os.environ, TRITON_INTERPRET="0")  # conftest then imports Triton to compile
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout)
    rows = [json.loads(line[2:]) for line in r.stdout.splitlines() if line.startswith("@@")]
    assert r.returncode == 0 and len(rows) == len(cases), f"offline compile subprocess failed:\n{r.stdout}\n{r.stderr}"
    failed = [(case, row) for case, row in zip(cases, rows) if "error" in row]
    assert not failed, "offline compile failed:\n" + "\n".join(f"{c}: {row['trace']}" for c, row in failed)
    return [row["ok"] for row in rows]


def _has_offline_compiler() -> bool:
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:
        return False
    bin_dir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    return (bin_dir / "ptxas").is_file() and (bin_dir / "cuobjdump").is_file()
