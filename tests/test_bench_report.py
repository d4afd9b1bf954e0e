"""The benchmark harness, the report tool, the ncu summary and gpu_check.sh (CPU smoke).

Nothing here asserts on timings: values are checked for consistency with the JSON they came
from (speed-ups recomputed from the stored medians), never against expectations of speed.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from fastdiff.bench import ncu, report
from fastdiff.bench.report import fmt_num, fmt_pct, fmt_speedup
from conftest import require

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- helpers


def md_table(md: str, heading: str) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the first markdown table after the line `heading`."""
    lines = md.splitlines()
    i = lines.index(heading)
    while not lines[i].startswith("|"):
        i += 1
    table = []
    while i < len(lines) and lines[i].startswith("|"):
        table.append([c.strip() for c in lines[i].strip().strip("|").split(" | ")])
        i += 1
    return table[0], table[2:]


def cell(header, row, column):
    return row[header.index(column)]


def bench_entry(op, provider, size, median_s, *, data=None, bytes_moved=None, flops=None, images=None,
                copy_gbps=4000.0, rounds=30, iterations=100, **extra):
    """One benchmark as pytest-benchmark 5 writes it, extra_info as run_benchmark fills it."""
    data = list(data) if data is not None else [median_s * f for f in (0.9, 0.95, 1.0, 1.05, 1.2)]
    ei = {"op": op, "provider": provider, "size": size, "device": "cuda", "copy_gbps": copy_gbps,
          "timer": "cuda_event", "rounds": rounds, "iterations": iterations, "warmup_rounds": 3,
          "median_ms": median_s * 1e3}
    ei.update(extra)
    if bytes_moved:
        ei["bytes_moved"] = bytes_moved
    if flops:
        ei["flops"] = flops
    if images:
        ei["images"] = images
    name = f"test_{op}[{size}-{provider}]"
    return {
        "group": f"{op}:{size}",
        "name": name,
        "fullname": f"benchmarks/bench_{op}.py::{name}",
        "params": {"size": size, "provider": provider},
        "param": f"{size}-{provider}",
        "extra_info": ei,
        "options": {"disable_gc": False, "timer": "cuda_event_timer", "min_rounds": 5,
                    "max_time": 1.0, "min_time": 5e-06, "warmup": False},
        "stats": {
            "min": min(data), "max": max(data), "mean": sum(data) / len(data), "stddev": 0.0,
            "rounds": len(data), "median": median_s, "iqr": 0.0, "q1": min(data), "q3": max(data),
            "iqr_outliers": 0, "stddev_outliers": 0, "outliers": "0;0", "ld15iqr": min(data),
            "hd15iqr": max(data), "ops": 1.0 / median_s, "total": sum(data), "data": data,
            "iterations": iterations,
        },
    }


MEDIANS = {  # (op, size, provider) -> seconds
    ("solver_step", "2x4x64x64", "eager"): 180e-6,
    ("solver_step", "2x4x64x64", "compile"): 60e-6,
    ("solver_step", "2x4x64x64", "triton"): 12e-6,
    ("solver_step", "2x4x64x64", "cuda"): 10e-6,
    ("solver_step", "2x4x64x64", "graph"): 8e-6,
    ("solver_step", "16x4x128x128", "eager"): 2.4e-3,
    ("solver_step", "16x4x128x128", "compile"): 0.5e-3,
    ("solver_step", "16x4x128x128", "triton"): 0.21e-3,
    ("solver_step", "16x4x128x128", "cuda"): 0.2e-3,
    ("attention", "B2xH8xL4096xD64", "eager"): 4.0e-3,
    ("attention", "B2xH8xL4096xD64", "cuda"): 1.0e-3,
}
SAMPLES = {  # (solver, steps, provider) -> seconds per call of 4 images
    ("dpmpp_2m", 4, "eager"): 0.080, ("dpmpp_2m", 4, "compile"): 0.050, ("dpmpp_2m", 4, "graph"): 0.020,
    ("dpmpp_2m", 8, "eager"): 0.160, ("dpmpp_2m", 8, "compile"): 0.100, ("dpmpp_2m", 8, "graph"): 0.040,
    ("ddim", 8, "eager"): 0.150, ("ddim", 8, "graph"): 0.038,
}
SOLVER_BYTES = {"2x4x64x64": 2 * 4 * 64 * 64 * 4 * 5, "16x4x128x128": 16 * 4 * 128 * 128 * 4 * 5}
ATTN_FLOPS = 4 * 2 * 8 * 4096 * 4096 * 64


def synthetic_doc() -> dict:
    benches = []
    for (op, size, provider), t in MEDIANS.items():
        if op == "solver_step":
            benches.append(bench_entry(op, provider, size, t, bytes_moved=SOLVER_BYTES[size]))
        else:
            benches.append(bench_entry(op, provider, size, t, flops=ATTN_FLOPS))
    for (solver, steps, provider), t in SAMPLES.items():
        benches.append(bench_entry("sample", provider, "4x4x64x64", t, images=4, solver=solver, steps=steps,
                                   iterations=1))
    return {
        "machine_info": {
            "node": "gpu-box", "processor": "x86_64", "machine": "x86_64", "python_compiler": "GCC 13",
            "python_implementation": "CPython", "python_implementation_version": "3.12.3",
            "python_version": "3.12.3", "python_build": ["main", "Jan 1 2026"], "release": "6.18",
            "system": "Linux", "cpu": {"brand_raw": "Test CPU", "count": 16},
            "fastdiff": {
                "device": "cuda", "device_name": "NVIDIA H200", "capability": "9.0", "sm_count": 132,
                "l2_bytes": 60 << 20, "mem_bytes": 141 << 30, "driver": "580.159.04",
                "copy_bytes": 2 << 30, "copy_gbps": 4000.0, "gemm_n": 8192, "gemm_dtype": "bfloat16",
                "gemm_tflops": 790.0, "torch": "2.11.0+cu130", "triton": "3.6.0", "cuda": "13.0",
                "python": "3.12.3", "commit": "0123456789abcdef0123456789abcdef01234567", "dirty": False,
                "commit_source": "git", "quick": False,
            },
        },
        "commit_info": {"id": "0123456789abcdef0123456789abcdef01234567", "time": "2026-11-20T10:00:00+00:00",
                        "author_time": "2026-11-20T10:00:00+00:00", "dirty": False, "project": "fastdiff",
                        "branch": "main"},
        "benchmarks": benches,
        "datetime": "2026-11-21T08:00:00+00:00",
        "version": "5.2.3",
    }


@pytest.fixture
def synthetic(tmp_path) -> Path:
    path = tmp_path / "results.json"
    path.write_text(json.dumps(synthetic_doc()))
    return path


# --------------------------------------------------------------------------- report on synthetic JSON


def test_machine_header(synthetic):
    md = report.render([report.load_run(synthetic)])
    assert md.startswith("# fastdiff benchmark report\n")
    header, rows = md_table(md, "## Machine")
    info = {r[0]: r[1] for r in rows}
    assert info["device"].startswith("NVIDIA H200 (cuda): sm_90, 132 SMs, L2 60 MiB")
    assert info["torch"] == "2.11.0+cu130"
    assert info["triton"] == "3.6.0"
    assert info["CUDA"] == "13.0"
    assert info["driver"] == "580.159.04"
    assert info["commit"] == "0123456789ab on main"
    assert info["date"] == "2026-11-21T08:00:00+00:00"
    assert info["copy bandwidth"].startswith(f"{fmt_num(4000.0)} GB/s")
    assert info["GEMM rate"] == f"{fmt_num(790.0)} TFLOP/s (bfloat16, 8192³)"
    assert info["timer"] == "cuda_event"


def test_op_table_columns_and_speedups(synthetic):
    md = report.render([report.load_run(synthetic)])
    header, rows = md_table(md, "### solver_step")
    expected = ["size"]
    for p in ("eager", "compile", "triton", "cuda", "graph"):  # eager, compile first; then known order
        expected += [f"{p} ms", f"{p} GB/s", f"{p} % copy"]
        if p != "eager":
            expected.append(f"{p} × eager")
        if p != "compile":
            expected.append(f"{p} × compile")
    assert header == expected
    assert [r[0] for r in rows] == ["2x4x64x64", "16x4x128x128"]  # natural order of sizes
    for row in rows:
        size = row[0]
        for p in ("eager", "compile", "triton", "cuda", "graph"):
            t = MEDIANS.get(("solver_step", size, p))
            if t is None:  # graph was not measured at the large size
                assert cell(header, row, f"{p} ms") == "–"
                continue
            assert cell(header, row, f"{p} ms") == fmt_num(t * 1e3)
            gbps = SOLVER_BYTES[size] / t / 1e9
            assert cell(header, row, f"{p} GB/s") == fmt_num(gbps)
            assert cell(header, row, f"{p} % copy") == fmt_pct(gbps / 4000.0)
            if p != "eager":
                assert cell(header, row, f"{p} × eager") == fmt_speedup(MEDIANS[("solver_step", size, "eager")] / t)
            if p != "compile":
                assert cell(header, row, f"{p} × compile") == fmt_speedup(MEDIANS[("solver_step", size, "compile")] / t)
    # a concrete value, worked by hand: eager 180 us / cuda 10 us
    assert cell(header, rows[0], "cuda × eager") == "18.00×"


def test_flops_table(synthetic):
    md = report.render([report.load_run(synthetic)])
    header, rows = md_table(md, "### attention")
    assert header == ["size", "eager ms", "eager TFLOP/s", "cuda ms", "cuda TFLOP/s", "cuda × eager"]
    assert cell(header, rows[0], "cuda TFLOP/s") == fmt_num(ATTN_FLOPS / 1.0e-3 / 1e12)
    assert cell(header, rows[0], "cuda × eager") == "4.00×"


def test_sampling_table(synthetic):
    md = report.render([report.load_run(synthetic)])
    assert "### sample" not in md  # sampling has its own section, not an op table
    header, rows = md_table(md, "## End-to-end sampling")
    assert header[:7] == ["solver", "steps", "size", "provider", "ms/image", "images/s", "ms/call"]
    assert header[-2:] == ["× eager", "× compile"]
    seen = set()
    for row in rows:
        solver, steps, provider = row[0], int(row[1]), row[3]
        t = SAMPLES[(solver, steps, provider)]
        assert cell(header, row, "ms/image") == fmt_num(t * 1e3 / 4)
        assert cell(header, row, "images/s") == fmt_num(4 / t)
        assert cell(header, row, "it/s") == fmt_num(steps / t)
        eager = SAMPLES.get((solver, steps, "eager"))
        compiled = SAMPLES.get((solver, steps, "compile"))
        want_e = fmt_speedup(eager / t) if provider != "eager" else "–"
        want_c = fmt_speedup(compiled / t) if compiled and provider != "compile" else "–"
        assert cell(header, row, "× eager") == want_e
        assert cell(header, row, "× compile") == want_c
        seen.add((solver, steps, provider))
    assert seen == set(SAMPLES)
    assert [r[0] for r in rows][:1] == ["ddim"]  # sorted by solver, then steps


def test_diffusers_sampling_has_its_own_table(synthetic):
    """bench_diffusers' rows (op sample_diffusers) are reported as sampling, not as an op."""
    doc = json.loads(synthetic.read_text())
    doc["benchmarks"] += [bench_entry("sample_diffusers", p, "sd15-b1", t, images=1, solver="dpmpp_2m", steps=20, cfg=True)
                          for p, t in (("eager", 0.50), ("fused", 0.40), ("graph", 0.25))]
    synthetic.write_text(json.dumps(doc))
    md = report.render([report.load_run(synthetic)])
    assert "### sample_diffusers" not in md
    header, rows = md_table(md, "## " + report.SAMPLE_OPS["sample_diffusers"])
    assert [r[header.index("provider")] for r in rows] == ["eager", "fused", "graph"]
    graph = rows[2]
    assert cell(header, graph, "ms/image") == fmt_num(250.0) and cell(header, graph, "it/s") == fmt_num(80.0)
    assert cell(header, graph, "× eager") == "2.00×"


def test_details_use_stats_data_for_percentiles(synthetic):
    doc = json.loads(synthetic.read_text())
    b = doc["benchmarks"][0]
    b["stats"]["data"] = [1e-6 * v for v in range(1, 11)]  # 1..10 us
    synthetic.write_text(json.dumps(doc))
    md = report.render([report.load_run(synthetic)])
    header, rows = md_table(md, "## All benchmarks")
    row = next(r for r in rows if r[0] == b["fullname"])
    # p20 of 1..10 by linear interpolation: 1 + 0.2 * 9 = 2.8 us
    assert cell(header, row, "p20 ms") == fmt_num(2.8e-3)
    assert cell(header, row, "p80 ms") == fmt_num(8.2e-3)
    assert cell(header, row, "rounds × iterations") == f"{b['stats']['rounds']} × 100"


def test_merge_runs_and_missing_machine_info(tmp_path):
    a, b = synthetic_doc(), synthetic_doc()
    b["machine_info"].pop("fastdiff")
    b["benchmarks"] = [bench_entry("copy", "eager", 1 << 20, 1e-5, bytes_moved=8 << 20)]
    pa, pb = tmp_path / "a.json", tmp_path / "b.json"
    pa.write_text(json.dumps(a))
    pb.write_text(json.dumps(b))
    md = report.render([report.load_run(pa), report.load_run(pb)])
    assert "### solver_step" in md and "### copy" in md
    header, rows = md_table(md, "## Machine")
    info = {r[0]: r[1] for r in rows}
    assert info["results"] == "a.json / b.json"
    # b's benchmark carries its own copy_gbps in extra_info, so % copy still works
    h, r = md_table(md, "### copy")
    assert cell(h, r[0], "eager % copy") == fmt_pct((8 << 20) / 1e-5 / 1e9 / 4000.0)


def test_plots_or_clear_skip(synthetic, tmp_path, capsys):
    plots = tmp_path / "plots"
    out = tmp_path / "report.md"
    md = report.render([report.load_run(synthetic)], plots_dir=plots, report_path=out)
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert report.PLOTS_SKIPPED in md
        assert "matplotlib" in capsys.readouterr().err
        return
    pngs = sorted(p.name for p in plots.glob("*.png"))
    assert "solver_step_time_vs_size.png" in pngs and "attention_time_vs_size.png" in pngs
    assert "sample_4x4x64x64_ms_per_image_vs_steps.png" in pngs
    assert "](plots/solver_step_time_vs_size.png)" in md


def test_cli(synthetic, tmp_path, capsys):
    from fastdiff.bench.__main__ import main

    out = tmp_path / "sub" / "report.md"
    assert main(["report", str(synthetic), "-o", str(out)]) == 0
    assert "## End-to-end sampling" in out.read_text()
    assert main(["report", str(synthetic)]) == 0  # no -o: stdout
    assert "### solver_step" in capsys.readouterr().out
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["report", str(bad)]) == 2
    assert "cannot read" in capsys.readouterr().err
    assert main(["bogus"]) == 2


def test_formatting():
    assert fmt_num(1234.5678) == "1235"
    assert fmt_num(0.012345) == "0.01235"
    assert fmt_num(None) == "–"
    assert fmt_speedup(2.0) == "2.00×"
    assert fmt_pct(0.8734) == "87.3%"


# --------------------------------------------------------------------------- harness helpers


def test_bench_sizes(monkeypatch):
    from fastdiff.bench import harness

    monkeypatch.delenv("FASTDIFF_BENCH_SIZES", raising=False)
    monkeypatch.setenv("FASTDIFF_BENCH_QUICK", "1")
    assert harness.bench_sizes(full=[1, 2, 3], quick=[9]) == [9]
    monkeypatch.setenv("FASTDIFF_BENCH_QUICK", "0")
    want = [9] if not harness.gpu_available() else [1, 2, 3]
    assert harness.bench_sizes(full=[1, 2, 3], quick=[9]) == want
    monkeypatch.setenv("FASTDIFF_BENCH_SIZES", "full")
    assert harness.bench_sizes(full=[1, 2, 3], quick=[9]) == [1, 2, 3]
    monkeypatch.setenv("FASTDIFF_BENCH_SIZES", "bogus")
    with pytest.raises(ValueError, match="FASTDIFF_BENCH_SIZES"):
        harness.bench_sizes(full=[1], quick=[1])


def test_rotating():
    from fastdiff.bench.harness import Rotating, size_label
    from fastdiff.bench.hw import _cache_bytes

    rot = Rotating([(1, 2), (3, 4), 5])
    assert [rot.next() for _ in range(4)] == [(1, 2), (3, 4), (5,), (1, 2)]
    f = Rotating([(1, 2), (3, 4)]).bind(lambda a, b: a + b)
    assert [f(), f(), f()] == [3, 7, 3]
    with pytest.raises(ValueError):
        Rotating([])
    n = Rotating.count(1 << 20, "cpu", max_sets=1000)
    assert n * (1 << 20) >= 3 * _cache_bytes("cpu") and n >= 2
    assert Rotating.count(1 << 30, "cpu", max_bytes=8 << 30) == 2  # larger than the cache: 2 sets
    assert Rotating.count(16, "cpu") == 16  # tiny sets: capped (16 on the CPU, 64 on a GPU)
    assert Rotating.count(16, "cpu", max_sets=64) == 64
    assert size_label((2, 4, 64, 64)) == "2x4x64x64" and size_label(7) == 7


def test_run_benchmark_rejects_reserved_extra_keys():
    from fastdiff.bench.harness import run_benchmark

    class Fake:
        group = None
        extra_info: dict = {}

    with pytest.raises(TypeError, match="median_ms"):
        run_benchmark(Fake(), lambda: None, hw={"device": "cpu"}, op="x", provider="eager", size=1, median_ms=3)


# --------------------------------------------------------------------------- a real quick CPU run


@pytest.fixture(scope="module")
def real_json(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("bench") / "copy.json"
    env = dict(os.environ, FASTDIFF_BENCH_QUICK="1", FASTDIFF_BENCH_ROUNDS="3")
    env.pop("FASTDIFF_BENCH_SIZES", None)
    env.pop("FASTDIFF_BENCH_PROVIDERS", None)
    env.pop("FASTDIFF_BENCH_PROFILE", None)
    env.pop("TRITON_INTERPRET", None)  # benchmarks time real kernels, never the interpreter
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "benchmarks/bench_copy.py", "-q", "-p", "no:cacheprovider",
         f"--benchmark-json={out}"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out


def test_real_json_schema(real_json):
    doc = json.loads(real_json.read_text())
    hw = doc["machine_info"]["fastdiff"]
    for key in ("device", "device_name", "copy_gbps", "gemm_tflops", "torch", "triton", "cuda"):
        assert key in hw
    assert hw["copy_gbps"] > 0 and hw["gemm_tflops"] > 0
    ops = set()
    for b in doc["benchmarks"]:
        ei = b["extra_info"]
        ops.add(ei["op"])
        assert b["group"] == f"{ei['op']}:{ei['size']}"
        for key in ("op", "provider", "size", "median_ms", "p20_ms", "p80_ms", "gbps", "frac_copy", "bytes_moved"):
            assert key in ei, key
        # extra_info is derived from pytest-benchmark's own numbers, not measured separately
        assert ei["median_ms"] == pytest.approx(b["stats"]["median"] * 1e3, rel=1e-9)
        assert ei["p20_ms"] <= ei["median_ms"] <= ei["p80_ms"]
        assert ei["gbps"] == pytest.approx(ei["bytes_moved"] / b["stats"]["median"] / 1e9, rel=1e-9)
        assert ei["frac_copy"] == pytest.approx(ei["gbps"] / hw["copy_gbps"], rel=1e-9)
        assert len(b["stats"]["data"]) == b["stats"]["rounds"] == ei["rounds"]
    assert ops == {"copy", "add"}


def test_real_json_report(real_json, tmp_path):
    doc = json.loads(real_json.read_text())
    med = {(b["extra_info"]["op"], b["extra_info"]["size"], b["extra_info"]["provider"]): b["stats"]["median"]
           for b in doc["benchmarks"]}
    out = tmp_path / "report.md"
    r = subprocess.run([sys.executable, "-m", "fastdiff.bench", "report", str(real_json), "-o", str(out),
                        "--plots", str(tmp_path / "plots")], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    md = out.read_text()
    assert "## Machine" in md and "## Ops" in md and "## All benchmarks" in md
    for op in ("copy", "add"):
        header, rows = md_table(md, f"### {op}")
        assert header[:4] == ["size", "eager ms", "eager GB/s", "eager % copy"]
        assert "alloc ms" in header and "alloc × eager" in header
        sizes = sorted({k[1] for k in med if k[0] == op})
        assert [int(r[0]) for r in rows] == sizes
        for row in rows:
            size = int(row[0])
            for p in {k[2] for k in med if k[0] == op}:
                assert cell(header, row, f"{p} ms") == fmt_num(med[(op, size, p)] * 1e3)
                if p != "eager":
                    assert cell(header, row, f"{p} × eager") == fmt_speedup(med[(op, size, "eager")] / med[(op, size, p)])


# --------------------------------------------------------------------------- the GPU timing path, simulated

FAKE_CUDA_TESTS = """
import time
import torch
from fastdiff.bench import harness

class FakeEvent:  # torch.cuda.Event on a host clock: exercises the GPU code path without a GPU
    created = 0
    def __init__(self, enable_timing=False):
        FakeEvent.created += 1
        self.t = None
    def record(self, stream=None):
        self.t = time.perf_counter()
    def synchronize(self):
        pass
    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3

torch.cuda.Event = FakeEvent
torch.cuda.synchronize = lambda *a, **k: None
HW = {"device": "cuda", "copy_gbps": 100.0}

def test_gpu_path(benchmark):
    x, y = torch.randn(1000), torch.empty(1000)
    harness.run_benchmark(benchmark, lambda: y.copy_(x), hw=HW, op="copy", provider="eager",
                          size=1000, bytes_moved=8000, variant="fp32")
    ei = benchmark.extra_info
    assert ei["timer"] == "cuda_event"
    # every timed and warm-up round read two event stamps
    assert FakeEvent.created >= 2 * (ei["rounds"] + ei["warmup_rounds"])
    assert harness.MIN_ROUNDS <= ei["rounds"] <= harness.DEFAULT_ROUNDS
    assert ei["variant"] == "fp32"

def test_provider_filter(benchmark, monkeypatch):
    monkeypatch.setenv("FASTDIFF_BENCH_PROVIDERS", "cuda,triton")
    harness.run_benchmark(benchmark, lambda: None, hw={"device": "cpu"}, op="x", provider="eager", size=1)

def test_profile_mode(benchmark, monkeypatch):
    monkeypatch.setenv("FASTDIFF_BENCH_PROFILE", "1")
    calls = []
    harness.run_benchmark(benchmark, lambda: calls.append(1), hw={"device": "cpu"}, op="y",
                          provider="cuda", size=2)
    assert len(calls) == 3  # one warm-up, two profiled
"""


def test_gpu_timing_path_simulated(tmp_path):
    """run_benchmark's GPU branch with torch.cuda.Event faked on a host clock: pytest-benchmark's
    own statistics come from the event timer, and extra_info is derived from them."""
    (tmp_path / "test_fake_cuda.py").write_text(FAKE_CUDA_TESTS)
    out = tmp_path / "fake.json"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTDIFF_BENCH_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    r = subprocess.run(
        [sys.executable, "-m", "pytest", "test_fake_cuda.py", "-q", "-p", "no:cacheprovider", "-rs",
         f"--benchmark-json={out}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "2 passed, 1 skipped" in r.stdout and "not in FASTDIFF_BENCH_PROVIDERS" in r.stdout
    doc = json.loads(out.read_text())
    by_op = {b["extra_info"]["op"]: b for b in doc["benchmarks"]}
    gpu = by_op["copy"]
    assert gpu["options"]["timer"] == "cuda_event_timer"  # pytest-benchmark timed with our timer
    assert gpu["group"] == "copy:1000"
    assert gpu["stats"]["iterations"] == gpu["extra_info"]["iterations"] >= 1
    assert len(gpu["stats"]["data"]) == gpu["extra_info"]["rounds"]
    assert gpu["extra_info"]["median_ms"] == pytest.approx(gpu["stats"]["median"] * 1e3, rel=1e-9)
    assert gpu["extra_info"]["frac_copy"] == pytest.approx(gpu["extra_info"]["gbps"] / 100.0, rel=1e-9)
    assert by_op["y"]["extra_info"]["profile"] is True and by_op["y"]["stats"]["rounds"] == 1
    assert "x" not in by_op


BENCH_FILE = """
import pytest

@pytest.mark.parametrize("provider", ["eager", "compile", "fused"])
def test_providers(provider):
    assert provider == "fused", f"the body of {provider} ran"
"""


def test_bench_providers_are_ruled_out_before_the_test_body(tmp_path):
    """benchmarks/conftest.py skips excluded providers at collection: a torch.compile provider's
    set-up (in the test body, before run_benchmark) never runs."""
    (tmp_path / "conftest.py").write_text((ROOT / "benchmarks" / "conftest.py").read_text())
    (tmp_path / "bench_x.py").write_text(BENCH_FILE)
    env = {k: v for k, v in os.environ.items() if not k.startswith("FASTDIFF_BENCH_")}
    env.update(FASTDIFF_BENCH_PROVIDERS="compile,fused", FASTDIFF_BENCH_SKIP_PROVIDERS="compile")
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    r = subprocess.run([sys.executable, "-m", "pytest", "bench_x.py", "-q", "-rs", "-p", "no:cacheprovider",
                        "--benchmark-disable"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    assert "1 passed, 2 skipped" in r.stdout
    assert "'eager' not in FASTDIFF_BENCH_PROVIDERS=compile,fused" in r.stdout
    assert "'compile' in FASTDIFF_BENCH_SKIP_PROVIDERS" in r.stdout


# --------------------------------------------------------------------------- ncu summary


WIDE_CSV = '''"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","dram__bytes_read.sum","dram__bytes_write.sum","dram__throughput.avg.pct_of_peak_sustained_elapsed","gpu__time_duration.sum","sm__throughput.avg.pct_of_peak_sustained_elapsed"
"","","","","","","","","","","","Mbyte","Kbyte","%","usecond","%"
"0","42","python3","localhost","_solver_step_kernel","1","7","(256, 1, 1)","(4096, 1, 1)","0","9.0","1,000.00","500,000.00","88.5","0.50","12.0"
"1","42","python3","localhost","_solver_step_kernel","1","7","(256, 1, 1)","(4096, 1, 1)","0","9.0","1,000.00","500,000.00","89.5","0.50","14.0"
"2","42","python3","localhost","void fastdiff::gn_silu_kernel<float>(const float *, float *, int)","1","7","(256, 1, 1)","(64, 1, 1)","0","9.0","10","20","50","2","5"
'''

LONG_CSV = '''"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size","Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"
"0","42","python3","localhost","solver_step_kernel","1","7","(256, 1, 1)","(64, 1, 1)","0","9.0","GPU Speed Of Light Throughput","DRAM Throughput","%","91.20"
"0","42","python3","localhost","solver_step_kernel","1","7","(256, 1, 1)","(64, 1, 1)","0","9.0","GPU Speed Of Light Throughput","Duration","usecond","12.50"
"0","42","python3","localhost","solver_step_kernel","1","7","(256, 1, 1)","(64, 1, 1)","0","9.0","Memory Workload Analysis","Memory Throughput","Gbyte/second","3,100.00"
'''


def test_ncu_summary_wide_and_long(tmp_path):
    launches = ncu.parse_csv(WIDE_CSV, source="solver_step")
    assert len(launches) == 3
    assert launches[0]["duration_s"] == pytest.approx(0.5e-6)
    assert launches[0]["dram_read_b"] == pytest.approx(1e9)
    assert launches[0]["dram_write_b"] == pytest.approx(5e8)
    text = ncu.summarize(launches)
    row = next(line for line in text.splitlines() if "_solver_step_kernel" in line)
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[2] == "2"  # two launches averaged
    assert cells[6] == format(1.5e9 / 0.5e-6 / 1e9, ".0f")  # DRAM GB/s = bytes / duration
    assert cells[7] == "89.0"
    assert "fastdiff::gn_silu_kernel<float>" in text and "const float" not in text  # args dropped

    long = ncu.parse_csv(LONG_CSV, source="x")
    assert long == [{"kernel": "solver_step_kernel", "source": "x", "dram_pct": 91.2, "duration_s": pytest.approx(12.5e-6)}]
    assert ncu.summarize([]).startswith("No kernels were profiled")

    p = tmp_path / "solver_step.csv"
    p.write_text(WIDE_CSV)
    out = tmp_path / "ncu.md"
    assert ncu.main([str(p), "-o", str(out)]) == 0
    assert "| solver_step | _solver_step_kernel | 2 |" in out.read_text()


# --------------------------------------------------------------------------- gpu_check.sh


def test_gpu_check_script_syntax():
    script = ROOT / "benchmarks" / "gpu_check.sh"
    r = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    # the metrics the script asks ncu for are the ones the summary reads
    m = re.search(r"^NCU_METRICS=(\S+)$", script.read_text(), re.M)
    assert m and m.group(1) == ncu.NCU_METRICS


# A stand-in for python (PYTHON=...), ncu and compute-sanitizer (on PATH): each call is logged
# with the provider environment; the GPU probe sees an H100; a call whose command line contains
# $FAKE_FAIL fails, one containing $FAKE_SKIP prints a skipped file as pytest -rs does; files the
# script expects (benchmark JSON, report, ncu reports, a wheel to install) are written. The
# tests phase snapshots $OUT at its first call, to show what the script had written before it.
FAKE_TOOL = r"""#!/usr/bin/env bash
echo "$(basename "$0") $* | providers=${FASTDIFF_BENCH_PROVIDERS:-} skip=${FASTDIFF_BENCH_SKIP_PROVIDERS:-}" >>"$FAKE_DIR/calls.log"
[ -n "${FAKE_FAIL:-}" ] && [[ "$*" == *"$FAKE_FAIL"* ]] && exit 1
[ -n "${FAKE_SKIP:-}" ] && [[ "$*" == *"$FAKE_SKIP"* ]] && echo "SKIPPED [1] tests/x.py:3: could not import 'x'"
case "$*" in
  *"sys.executable"*) echo "$0" ;;
  *"torch.cuda.is_available()"*) echo "1 NVIDIA H100 80GB HBM3" ;;
  *get_device_capability*) echo "9.0" ;;
  *install-plan*) echo "$FAKE_DIR/diffusers-0.42.1-py3-none-any.whl" ;;
  *"/bin/true") echo "========= Error: Target application terminated before first instrumented API call"; exit 255 ;;
  *"-m gpu"*) if [ ! -f "$FAKE_DIR/summary_during_tests.txt" ]; then
                cp "$OUT/summary.txt" "$FAKE_DIR/summary_during_tests.txt"; ls "$OUT" >"$FAKE_DIR/out_during_tests.txt"
              fi
              echo "3 passed" ;;
esac
for a in "$@"; do
  case $a in
    --benchmark-json=*) echo '{"benchmarks": []}' >"${a#--benchmark-json=}" ;;
  esac
done
prev=""
for a in "$@"; do
  case $prev in
    -o) if [[ "$*" == *"fastdiff.bench"* ]]; then echo "# fake report" >"$a"; else echo rep >"$a.ncu-rep"; fi ;;
  esac
  prev=$a
done
[[ "$*" == *"--csv"* ]] && echo '"ID","Kernel Name"'
exit 0
"""


def run_gpu_check(tmp_path, *args, fail=None, skip=None, timeout=120):
    """gpu_check.sh against the fakes above, with a wheel folder; -> (CompletedProcess, $OUT,
    the logged calls)."""
    fake = tmp_path / "fake"
    fake.mkdir(exist_ok=True)
    for tool in ("python", "ncu", "compute-sanitizer"):
        (fake / tool).write_text(FAKE_TOOL)
        (fake / tool).chmod(0o755)
    (tmp_path / "whl").mkdir(exist_ok=True)
    out = tmp_path / "out"
    env = dict(os.environ, OUT=str(out), PYTHON=str(fake / "python"), FAKE_DIR=str(fake), FASTDIFF_COMMIT="abc123",
               FASTDIFF_WHEELS=str(tmp_path / "whl"), PATH=f"{fake}{os.pathsep}{os.environ['PATH']}")
    env.pop("COMPUTE_SANITIZER", None)
    if fail:
        env["FAKE_FAIL"] = fail
    if skip:
        env["FAKE_SKIP"] = skip
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), *args], cwd=tmp_path, env=env,
                       capture_output=True, text=True, timeout=timeout)
    calls = (fake / "calls.log").read_text().splitlines() if (fake / "calls.log").exists() else []
    return r, out, calls


def plan(*args):
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--plan", *args],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    caps = dict(re.fullmatch(r"(\S+)\s+(\d+)\s+.*", line).groups() for line in lines[1:-1]
                if not line.startswith("note:"))
    total = re.fullmatch(r"total budget: (\d+) s", lines[-1])
    assert total, lines[-1]
    return {k: int(v) for k, v in caps.items()}, int(total.group(1)), r.stdout


def test_gpu_check_plan_fits_one_call():
    caps, total, text = plan()
    assert total == sum(caps.values()) <= 540 and "note:" not in text
    phases = list(caps)
    assert phases[0] == "setup" and phases[-1] == "report"
    # priority order: versions and build, the CUDA tests, the headline, the sanitizers, the
    # Triton tests, the memory-bound kernels, then compile and ncu
    assert phases[1:5] == ["versions", "build", "tests", "bench:diffusers"]
    for a, b in [("bench:diffusers", "sanitize:memcheck"), ("sanitize:racecheck", "tests:triton"),
                 ("tests:triton", "bench:copy"), ("bench:group_norm_silu", "compile"), ("compile", "ncu")]:
        assert phases.index(a) < phases.index(b)
    assert "compile:sample" not in caps and "bench:sampling" not in caps  # --phases only


def test_gpu_check_every_benchmark_file_has_a_phase():
    benches = sorted(f"bench:{f.stem[len('bench_'):]}" for f in (ROOT / "benchmarks").glob("bench_*.py"))
    caps, _, _ = plan("--phases", ",".join(benches))
    assert sorted(p for p in caps if p.startswith("bench:")) == benches


def test_gpu_check_plan_of_a_subset_and_bad_phase():
    caps, total, text = plan("--phases", "bench,compile:sample")
    assert [p for p in caps if not p.startswith("bench:")] == ["setup", "compile:sample", "report"]
    assert total == sum(caps.values()) > 540 and "note: over" in text  # says the run cannot hold all
    assert list(plan("--phases", "sanitize")[0]) == ["setup", "sanitize:memcheck", "sanitize:racecheck", "report"]
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--phases", "tests,nope"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "unknown phase 'nope'" in r.stderr


def check_out_dir(out, gpu="h100-80gb-hbm3"):
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and all(p.is_file() for p in out.iterdir())
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", f) for f in files)
    assert {"report.md", "summary.txt", "versions.txt", "ncu_summary.md"} <= set(files)
    tars = [f for f in files if f.endswith(".tar.gz")]
    assert tars == ["{}_{}.tar.gz".format(tars[0][:10], gpu)] and re.fullmatch(r"\d{4}-\d\d-\d\d", tars[0][:10])
    return files


def status(summary, phase):
    m = re.search(rf"^{re.escape(phase)}\s+(\S+)", summary, re.M)
    return m and m.group(1)


def test_gpu_check_full_run_against_fakes(tmp_path):
    """Every phase of the default run, in order, each writing $OUT before the next starts; the
    benchmark phases leave torch.compile out, the compile phase runs only it; report last."""
    r, out, calls = run_gpu_check(tmp_path)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    check_out_dir(out)
    summary = (out / "summary.txt").read_text()
    caps = plan()[0]
    for phase in caps:
        if phase not in ("compile", "ncu"):  # those record their probe and steps
            assert status(summary, phase) == "ok", (phase, summary)
    assert status(summary, "compile-probe") == "ok" and status(summary, "ncu-probe") == "ok"
    # results were in $OUT before the tests ran: the build's row and the tarball
    during = (tmp_path / "fake" / "summary_during_tests.txt").read_text()
    assert status(during, "build") == "ok" and status(during, "tests") is None
    assert any(f.endswith(".tar.gz") for f in (tmp_path / "fake" / "out_during_tests.txt").read_text().split())
    cuda_tests = [c for c in calls if c.startswith("python ") and "-m gpu -k not triton" in c]
    assert len(cuda_tests) == 1
    assert all(f"tests/{f}" in cuda_tests[0] for f in ("test_solver_step.py", "test_graphs.py", "test_fused_unet.py"))
    triton_tests = [c for c in calls if c.startswith("python ") and "-m gpu -k triton" in c]
    assert len(triton_tests) == 6 and all(c.count("tests/test_") == 1 for c in triton_tests)  # one pytest per file
    sanitize = [c for c in calls if c.startswith("compute-sanitizer --tool ")]
    assert [c.split()[2] for c in sanitize] == ["memcheck", "racecheck"]
    for c in sanitize:
        assert "--kernel-name kns=fastdiff --error-exitcode 86" in c and "env PYTORCH_NO_CUDA_MEMORY_CACHING=1 " in c
        assert "-m gpu -k cuda and not triton" in c and "tests/test_group_norm_silu.py" in c
    assert "tests/test_solver_step.py" in sanitize[0] and "tests/test_solver_step.py" not in sanitize[1]
    # the wheels: checked, what install-plan names installed offline without dependencies, verified
    assert any("gpu_stack.py check-wheels" in c for c in calls) and any("gpu_stack.py verify" in c for c in calls)
    assert any(re.search(r"-m pip install --no-index --no-deps \S+/diffusers-0.42.1-py3-none-any.whl", c) for c in calls)
    assert all(status(summary, s) == "ok" for s in ("build:wheels", "build:install", "build:verify", "build:flags"))
    bench = [c for c in calls if "--benchmark-json" in c]
    assert len(bench) == len([p for p in caps if p.startswith("bench:")]) + 1
    assert all("skip=compile" in c and "providers= " in c for c in bench[:-1])
    assert "providers=compile" in bench[-1] and "bench_sampling" not in bench[-1]
    assert any(c.startswith("ncu ") and "bench_solver_step.py" in c for c in calls)
    assert "abc123" in (out / "versions.txt").read_text()
    report_md = (out / "report.md").read_text()
    assert report_md.startswith("# fake report") and "## GPU check phases" in report_md
    assert r.stdout.rstrip().endswith(report_md.rstrip().splitlines()[-1])


@pytest.mark.parametrize("tool,phase", [("torch.compile", "compile"), ("--launch-count 1", "ncu")])
def test_gpu_check_failed_probe_skips_its_phase(tmp_path, tool, phase):
    r, out, calls = run_gpu_check(tmp_path, "--phases", f"{phase},bench:copy", fail=tool)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    assert status(summary, f"{phase}-probe") == "FAILED"
    assert re.search(rf"^{phase}\s+SKIPPED .*probe failed", summary, re.M), summary
    if phase == "compile":  # no workload ran under the phase
        assert not any("providers=compile" in c for c in calls)
    else:
        assert [c for c in calls if c.startswith("ncu ")] == [c for c in calls if "--launch-count 1 " in c]
    assert status(summary, "bench:copy") == "ok"


def test_gpu_check_phases_subset_runs_only_those(tmp_path):
    r, out, calls = run_gpu_check(tmp_path, "--phases", "tests:triton,bench:solver_step")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    check_out_dir(out)
    summary = (out / "summary.txt").read_text()
    ran = [line.split()[0] for line in summary.splitlines()[1:] if not line.startswith("tests:triton:")]
    assert ran == ["setup", "tests:triton", "bench:solver_step", "report", "total"]
    assert not any("pip install" in c for c in calls)
    assert [c for c in calls if "-m gpu" in c][0].count("-k triton") == 1
    assert [c for c in calls if "--benchmark-json" in c][0].count("bench_solver_step.py") == 1
    assert "tests.log" in {p.name for p in out.iterdir()} and "build.log" not in {p.name for p in out.iterdir()}


def test_gpu_check_phase_without_its_module_is_skipped(tmp_path):
    r, out, calls = run_gpu_check(tmp_path, "--phases", "bench:diffusers,bench:copy", fail="import diffusers")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    assert re.search(r"^bench:diffusers\s+SKIPPED .*needs diffusers, not installed", summary, re.M), summary
    assert not any("bench_diffusers.py" in c for c in calls) and status(summary, "bench:copy") == "ok"


def test_gpu_check_rehearse_against_fakes(tmp_path):
    """--rehearse: Python runs as `python -S` on the package view, every pytest command
    collects only, pip runs dry, compute-sanitizer parses its options on /bin/true, the GPU
    probes and the wheel install do not run, and the run names itself a rehearsal."""
    r, out, calls = run_gpu_check(tmp_path, "--rehearse")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    check_out_dir(out, gpu="rehearsal")
    summary = (out / "summary.txt").read_text()
    assert any("gpu_stack.py view" in c for c in calls)
    python = [c for c in calls if c.startswith("python -S ")]
    pytest_calls = [c for c in python if "-m pytest" in c]
    assert len(pytest_calls) == 1 + 6 + 2 + 4 + 1 + 2  # tests, tests:triton, sanitize, bench, compile, ncu
    assert all(c.split(" | ")[0].endswith("--collect-only -rs") for c in pytest_calls)
    assert [c for c in python if "pip install" in c] == [c for c in python if "-e . --dry-run" in c] != []
    assert not any("torch.compile" in c or "--launch-count 1" in c or "install-plan" in c for c in calls)
    sanitize = [c.split(" | ")[0] for c in calls if c.startswith("compute-sanitizer --tool ")]
    assert len(sanitize) == 2 and all(c.endswith("/bin/true") for c in sanitize)
    assert status(summary, "compile-probe") == "SKIPPED" and status(summary, "sanitize:memcheck") == "ok"


def test_gpu_check_rehearse_fails_on_a_file_skipped_at_import(tmp_path):
    r, out, calls = run_gpu_check(tmp_path, "--rehearse", "--phases", "bench:diffusers,bench:copy", skip="bench_diffusers")
    assert r.returncode == 1 and "failed: bench:diffusers" in r.stderr, r.stdout[-3000:] + r.stderr[-3000:]
    summary = (out / "summary.txt").read_text()
    assert status(summary, "bench:diffusers") == "FAILED" and status(summary, "bench:copy") == "ok"


def test_diffusers_benchmark_quick_cpu_run(tmp_path):
    """benchmarks/bench_diffusers.py's CPU quick variant (tiny diffusers U-Net: diffusers' own
    loop vs fastdiff) runs and reports both providers in the report's schema."""
    require("diffusers", "diffusers")
    out = tmp_path / "diffusers.json"
    env = dict(os.environ, FASTDIFF_BENCH_QUICK="1", FASTDIFF_BENCH_ROUNDS="1")
    for k in ("FASTDIFF_BENCH_SIZES", "FASTDIFF_BENCH_PROVIDERS", "FASTDIFF_BENCH_PROFILE", "TRITON_INTERPRET"):
        env.pop(k, None)
    r = subprocess.run([sys.executable, "-m", "pytest", "benchmarks/bench_diffusers.py", "-q", "-p", "no:cacheprovider",
                        f"--benchmark-json={out}"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    rows = {b["extra_info"]["provider"]: b["extra_info"] for b in json.loads(out.read_text())["benchmarks"]}
    assert set(rows) == {"eager", "fused"}
    for info in rows.values():
        assert info["op"] == "sample_diffusers" and info["ms_per_image"] > 0 and info["steps"] == 4
