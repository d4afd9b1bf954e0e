"""Registers, spills and shared memory of every CUDA kernel, from ptxas, for each SASS target of
the default arch list (csrc/build_flags.py: sm_80, sm_90a), with the project's nvcc flags.

Fails on any spill, or when a kernel's static shared memory plus the largest dynamic shared
memory its launcher can ask for exceeds the 48 KiB a launch gets without opting in (the
kernels do not opt in). The table goes to build/cuda_resources.json and the test output.
"""
from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import cuda_on_cpu
from conftest import ROOT, load_build_flags, need
from fastdiff.ops.group_norm_silu import CUDA_MAX_CHANNELS_PER_GROUP
from test_cuda_kernels_on_cpu import gn_case, run_gn

SMEM_PER_BLOCK = 48 * 1024

ENTRY = re.compile(r"Compiling entry function '(\w+)' for '(\w+)'")
SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
USED = re.compile(r"Used (\d+) registers(?:.*?(\d+) bytes smem)?")


def ptxas_report(src: str, flags: list) -> list:
    """-> [{kernel, arch, registers, stack, spill_stores, spill_loads, smem}] for one .cu."""
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.run(["nvcc", *flags, "-Xptxas", "-v", "-c", src, "-o", os.path.join(tmp, "k.o")],
                           capture_output=True, text=True)
    assert proc.returncode == 0, f"nvcc {src}:\n{proc.stderr}"
    rows, cur = [], None
    for line in proc.stderr.splitlines():
        if m := ENTRY.search(line):
            cur = {"kernel": m.group(1), "arch": m.group(2)}
            rows.append(cur)
        elif (m := SPILL.search(line)) and cur is not None:
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif (m := USED.search(line)) and cur is not None:
            cur.update(registers=int(m.group(1)), smem=int(m.group(2) or 0))
    names = subprocess.run(["c++filt"], input="\n".join(r["kernel"] for r in rows), capture_output=True,
                           text=True).stdout.splitlines() if shutil.which("c++filt") else []
    for row, name in zip(rows, names):
        row["kernel"] = cuda_on_cpu.short_name(name)
    return rows


def max_dynamic_smem(op: str) -> int:
    """The largest dynamic shared memory op's launcher asks for, read from an emulated launch at
    the op's limit (tests/cuda_on_cpu.py); 0 for kernels without it."""
    if op != "group_norm_silu":
        return 0
    driver = cuda_on_cpu.Driver(cuda_on_cpu.build())
    try:
        case = gn_case((1, CUDA_MAX_CHANNELS_PER_GROUP, 1, 1), 1, torch.float32, False, 0)
        _, reply = run_gn(driver, case)
    finally:
        driver.close()
    return max(launch["smem"] for launch in reply["launches"])


def test_no_spills_and_shared_memory_fits():
    need(shutil.which("nvcc") is not None, "nvcc not found (the CUDA kernels' resource check needs it)")
    need(shutil.which("g++") is not None, "g++ not found (needed for the emulated launch)")
    bf = load_build_flags()
    sass = [a for a in bf.arch_names(bf.DEFAULT_CUDA_ARCHS) if a.startswith("sm_")]
    flags = bf.nvcc_flags(";".join(sass))  # the PTX-only target has no ptxas report
    sources = sorted(glob.glob(os.path.join(ROOT, "csrc", "*", "*.cu")))
    with ThreadPoolExecutor(2) as pool:
        reports = dict(zip(sources, pool.map(lambda s: ptxas_report(s, flags), sources)))
    table = []
    for src, rows in reports.items():
        op = os.path.basename(os.path.dirname(src))
        dyn = max_dynamic_smem(op)
        assert {r["arch"] for r in rows} == set(sass), f"{op}: ptxas reports for {sass} expected"
        for r in rows:
            table.append(dict(r, op=op, dynamic_smem_max=dyn))
    os.makedirs(os.path.join(ROOT, "build"), exist_ok=True)
    with open(os.path.join(ROOT, "build", "cuda_resources.json"), "w") as f:
        json.dump(table, f, indent=1)
    text = "\n".join(f"{r['arch']:7} regs {r['registers']:3} stack {r['stack']:4} spill {r['spill_stores']}/"
                     f"{r['spill_loads']} smem {r['smem']}+{r['dynamic_smem_max']}  {r['kernel']}" for r in table)
    print(text)
    bad = [r for r in table if r["spill_stores"] or r["spill_loads"] or r["smem"] + r["dynamic_smem_max"] > SMEM_PER_BLOCK]
    assert not bad, "spills or shared memory over 48 KiB per block:\n" + text
    assert len(table) >= 2 * len(sass), "fewer kernels than expected in the ptxas report"


@pytest.mark.parametrize("line,expect", [
    ("    0 bytes stack frame, 8 bytes spill stores, 4 bytes spill loads", (0, 8, 4)),
    ("    16 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads", (16, 0, 0)),
])
def test_spill_line_parses(line, expect):
    """The spill check rests on this pattern matching ptxas' wording."""
    m = SPILL.search(line)
    assert m and tuple(int(g) for g in m.groups()) == expect


def test_used_line_parses():
    assert USED.search("ptxas info    : Used 64 registers, used 1 barriers, 552 bytes cmem[0]").groups() == ("64", None)
    assert USED.search("ptxas info    : Used 40 registers, used 1 barriers, 1024 bytes smem, 552 bytes cmem[0]"
                       ).groups() == ("40", "1024")
