"""`python -m fastdiff profile` on the CPU: trace, summary with the NVTX range names, Nsight commands."""
import json
import subprocess
import sys


def test_profile_writes_a_trace_and_a_range_summary(tmp_path):
    out = tmp_path / "prof"
    r = subprocess.run([sys.executable, "-m", "fastdiff", "profile", "--model", "gmm", "--steps", "3", "--batch", "2",
                        "--iters", "2", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    summary = (out / "summary.md").read_text()
    for name in ("fastdiff/sample", "fastdiff/step", "fastdiff/model", "fastdiff/solver_step"):
        assert f"| {name} |" in summary
    assert "| fastdiff/step | 6 |" in summary  # 2 profiled calls x 3 steps
    assert "dpmpp_2m x 3 steps (3 model calls)" in summary.splitlines()[0]
    events = json.loads((out / "trace.json").read_text())["traceEvents"]
    assert any(e.get("name") == "fastdiff/solver_step" for e in events)
    assert "nsys profile" in r.stdout and "ncu --nvtx" in r.stdout and "--nsight" in r.stdout

