"""pytest-benchmark JSON -> a markdown performance report (+ PNG plots when matplotlib is there).

    python -m fastdiff.bench report RESULTS.json [MORE.json ...] [-o report.md] [--plots DIR]

Sections of the report:

1. **Machine**: device, torch / triton / CUDA versions, driver, commit, date, and the ceilings
   measured in the same run (copy GB/s, GEMM TFLOP/s) from ``machine_info["fastdiff"]``
   (written by `benchmarks/conftest.py`).
2. **Ops**: one table per op (every op but ``sample``): rows are sizes, and for each provider
   its median time, GB/s and % of the copy bandwidth (when the benchmark gave `bytes_moved`),
   TFLOP/s (when it gave `flops`), and its speed-up over the `eager` provider and over the
   `compile` provider when those are present.
3. **End-to-end sampling**: benchmarks whose op is ``sample`` (extra_info carries `solver`,
   `steps`, `images`): solver, steps, size, provider, ms/image, images/s, speed-ups.
4. **Plots**: time vs size per provider (one PNG per op), ms/image vs steps for sampling; only
   with matplotlib (``pip install fastdiff[plots]``), otherwise a line says they were skipped.
5. **All benchmarks**: every benchmark with median, p20, p80, rounds x iterations and timer.

Every number derives from the JSON: times are pytest-benchmark's `stats.median` (on a GPU these
are CUDA-event times, see `fastdiff.bench.harness`); p20/p80 are computed from `stats.data`
when present; GB/s, TFLOP/s, images/s and speed-ups are recomputed from the medians. This
module and the ones it reads from (markdown, runs, tables, plots) use the standard library
only (matplotlib optionally).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from .markdown import SAMPLE_OPS, _unique, fmt_num, fmt_pct, fmt_speedup  # noqa: F401  (fmt_*: re-exported)
from .plots import PLOTS_SKIPPED, make_plots
from .runs import Entry, Run, load_run  # noqa: F401  (Entry: re-exported)
from .tables import _duplicates, details_table, machine_section, op_table, sample_table


def render(
    runs: Sequence[Run],
    plots_dir: Optional[str | os.PathLike] = None,
    report_path: Optional[str | os.PathLike] = None,
    title: str = "fastdiff benchmark report",
) -> str:
    """The whole markdown report for `runs` (and the plots, when `plots_dir` is given)."""
    entries = [e for r in runs for e in r.entries]
    parts = [f"# {title}", machine_section(runs)]
    parts.append(
        "Times are medians over rounds (each round: back-to-back calls timed with CUDA events "
        "on a GPU, `perf_counter` on the CPU; see `fastdiff/bench/harness.py`). "
        "GB/s = bytes the op must move (each input read once, each output written once) / median; "
        "% copy = that over the copy bandwidth measured in the same run; "
        "`× eager` / `× compile` = that provider's median / this one's (> 1: faster)."
    )

    ops = _unique(e.op for e in entries if e.op not in SAMPLE_OPS)
    if ops:
        parts.append("## Ops")
        for op in ops:
            es = [e for e in entries if e.op == op]
            parts.append(f"### {op}\n\n" + op_table(op, es))
    for op, title in SAMPLE_OPS.items():
        samples = [e for e in entries if e.op == op]
        if samples:
            parts.append(f"## {title}\n\n" + sample_table(samples))
    if not entries:
        parts.append("No benchmark results in the input.")

    if plots_dir is not None:
        written = make_plots(entries, plots_dir)
        if written is None:
            print(f"fastdiff.bench report: {PLOTS_SKIPPED}", file=sys.stderr)
            parts.append(f"## Plots\n\n{PLOTS_SKIPPED}.")
        elif written:
            base = Path(report_path).resolve().parent if report_path else Path.cwd()
            links = [f"![{p.stem}]({Path(os.path.relpath(p.resolve(), base)).as_posix()})" for p in written]
            parts.append("## Plots\n\n" + "\n\n".join(links))

    dups = _duplicates(entries, lambda e: (e.op, e.size, e.variant, e.provider, str(e.extra.get("solver")), str(e.extra.get("steps"))))
    if dups:
        parts.append("Duplicates (the later result is shown):\n\n" + "\n".join(f"- {d}" for d in dups))
    if entries:
        parts.append("## All benchmarks\n\n" + details_table(entries))
    return "\n\n".join(parts) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    import argparse  # noqa: PLC0415

    ap = argparse.ArgumentParser(
        prog="python -m fastdiff.bench report",
        description="Turn pytest-benchmark JSON (--benchmark-json) into a markdown report.",
    )
    ap.add_argument("results", nargs="+", help="pytest-benchmark JSON file(s); several are merged")
    ap.add_argument("-o", "--output", help="write the markdown here (default: stdout)")
    ap.add_argument("--plots", metavar="DIR", help="write PNG plots into DIR (needs matplotlib)")
    ap.add_argument("--title", default="fastdiff benchmark report")
    args = ap.parse_args(argv)
    runs = []
    for path in args.results:
        try:
            runs.append(load_run(path))
        except (OSError, ValueError) as exc:
            print(f"fastdiff.bench report: cannot read {path}: {exc}", file=sys.stderr)
            return 2
    text = render(runs, plots_dir=args.plots, report_path=args.output, title=args.title)
    if args.output:
        Path(args.output).parent.mkdir(parents=True, exist_ok=True)
        Path(args.output).write_text(text)
    else:
        sys.stdout.write(text)
    return 0
