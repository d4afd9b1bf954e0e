"""Summarise Nsight Compute CSV exports: one line per kernel with its DRAM traffic and speed of light.

    python -m fastdiff.bench ncu-summary A.csv [B.csv ...] [-o summary.md]

Input: ``ncu --import REPORT.ncu-rep --csv --page raw [--print-units base]`` (wide: one row per
profiled launch, one column per metric, a units row under the header). The long
``--page details --csv`` layout (one row per metric, human-readable names) is understood too,
for the few numbers it names the same way (duration, DRAM throughput, SM / memory throughput).

Per kernel name (launches of the same kernel are averaged): launches, duration, DRAM bytes read
and written, DRAM GB/s (bytes over duration), DRAM throughput as % of peak, and the
speed-of-light memory and SM throughput percentages. Standard library only.
"""
from __future__ import annotations

import csv
import io
import os
import re
import sys
from typing import Dict, List, Optional, Sequence

# metric id -> our key (raw page)
RAW_METRICS = {
    "gpu__time_duration.sum": "duration_s",
    "dram__bytes_read.sum": "dram_read_b",
    "dram__bytes_write.sum": "dram_write_b",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed": "dram_pct",
    "gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed": "mem_sol_pct",
    "sm__throughput.avg.pct_of_peak_sustained_elapsed": "sm_sol_pct",
    "launch__registers_per_thread": "regs",
}
# human-readable name (details page) -> our key, when the unit fits
DETAILS_METRICS = {
    "Duration": "duration_s",
    "DRAM Throughput": "dram_pct",
    "Compute (SM) Throughput": "sm_sol_pct",
    "Memory Throughput": "mem_sol_pct",  # SpeedOfLight gives %, MemoryWorkloadAnalysis GB/s
    "Registers Per Thread": "regs",
}
# The metrics `benchmarks/gpu_check.sh` asks ncu for, besides its sections.
NCU_METRICS = ",".join(k for k in RAW_METRICS if not k.startswith("launch__"))

_SCALE = {
    "": 1.0, "%": 1.0, "byte": 1.0, "bytes": 1.0, "b": 1.0,
    "kbyte": 1e3, "mbyte": 1e6, "gbyte": 1e9, "tbyte": 1e12,
    "kb": 1e3, "mb": 1e6, "gb": 1e9, "tb": 1e12,
    "kib": 2.0**10, "mib": 2.0**20, "gib": 2.0**30,
    "nsecond": 1e-9, "usecond": 1e-6, "msecond": 1e-3, "second": 1.0,
    "ns": 1e-9, "us": 1e-6, "ms": 1e-3, "s": 1.0,
    "register/thread": 1.0,
}


def _value(text: str, unit: str) -> Optional[float]:
    t = (text or "").strip().replace(",", "")
    if not t or t.lower() in ("n/a", "nan"):
        return None
    try:
        v = float(t)
    except ValueError:
        return None
    scale = _SCALE.get((unit or "").strip().lower())
    return None if scale is None else v * scale  # a unit we cannot scale: no number


def short_name(name: str, width: int = 60) -> str:
    """Kernel name without its argument list, trimmed to `width` characters."""
    n = name.strip()
    depth, cut = 0, len(n)
    for i, ch in enumerate(n):  # drop the trailing "(args)" of a demangled signature
        if ch == "<":
            depth += 1
        elif ch == ">":
            depth -= 1
        elif ch == "(" and depth == 0 and i > 0:
            cut = i
            break
    n = n[:cut]
    return n if len(n) <= width else n[: width - 1] + "…"


def parse_csv(text: str, source: str = "") -> List[Dict[str, object]]:
    """Rows of one ncu CSV export -> one dict per profiled launch."""
    rows = list(csv.reader(io.StringIO(text)))
    start = next((i for i, r in enumerate(rows) if "Kernel Name" in r), None)
    if start is None:
        return []
    header = rows[start]
    body = rows[start + 1 :]
    col = {h: i for i, h in enumerate(header)}
    launches: Dict[str, Dict[str, object]] = {}
    if "Metric Name" in col:  # long layout: one row per metric
        for r in body:
            if len(r) < len(header):
                continue
            key = DETAILS_METRICS.get(r[col["Metric Name"]])
            if key is None:
                continue
            unit = r[col["Metric Unit"]] if "Metric Unit" in col else ""
            if key.endswith("_pct") and unit.strip() != "%":
                continue
            lid = r[col["ID"]] if "ID" in col else str(len(launches))
            d = launches.setdefault(lid, {"kernel": r[col["Kernel Name"]], "source": source})
            v = _value(r[col["Metric Value"]], unit)
            if v is not None:
                d[key] = v
        return list(launches.values())
    # wide layout: a units row may follow the header (its 'Kernel Name' cell is empty)
    units = [""] * len(header)
    if body and not body[0][col["Kernel Name"]].strip():
        units = body[0] + [""] * (len(header) - len(body[0]))
        body = body[1:]
    out = []
    for r in body:
        if len(r) <= col["Kernel Name"] or not r[col["Kernel Name"]].strip():
            continue
        d: Dict[str, object] = {"kernel": r[col["Kernel Name"]], "source": source}
        for metric, key in RAW_METRICS.items():
            if metric in col and col[metric] < len(r):
                v = _value(r[col[metric]], units[col[metric]])
                if v is not None:
                    d[key] = v
        out.append(d)
    return out


def _fmt(v: Optional[float], spec: str) -> str:
    return "–" if v is None else format(v, spec)


def summarize(launches: Sequence[Dict[str, object]]) -> str:
    """A markdown table, one row per (source, kernel), launches averaged."""
    if not launches:
        return "No kernels were profiled (check the --kernel-name regex and the NVTX filter).\n"
    groups: Dict[tuple, List[Dict[str, object]]] = {}
    for d in launches:
        groups.setdefault((str(d.get("source", "")), str(d["kernel"])), []).append(d)

    def mean(ds: List[Dict[str, object]], key: str) -> Optional[float]:
        vals = [float(d[key]) for d in ds if d.get(key) is not None]
        return sum(vals) / len(vals) if vals else None

    lines = [
        "| source | kernel | launches | time µs | DRAM read MB | DRAM write MB | DRAM GB/s | DRAM % peak | SOL mem % | SOL SM % | regs |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for (source, kernel), ds in groups.items():
        t = mean(ds, "duration_s")
        rd, wr = mean(ds, "dram_read_b"), mean(ds, "dram_write_b")
        gbps = (rd or 0.0) + (wr or 0.0)
        gbps = gbps / t / 1e9 if t and (rd is not None or wr is not None) else None
        lines.append(
            "| "
            + " | ".join(
                [
                    source,
                    short_name(kernel).replace("|", "\\|"),
                    str(len(ds)),
                    _fmt(t * 1e6 if t is not None else None, ".2f"),
                    _fmt(rd / 1e6 if rd is not None else None, ".2f"),
                    _fmt(wr / 1e6 if wr is not None else None, ".2f"),
                    _fmt(gbps, ".0f"),
                    _fmt(mean(ds, "dram_pct"), ".1f"),
                    _fmt(mean(ds, "mem_sol_pct"), ".1f"),
                    _fmt(mean(ds, "sm_sol_pct"), ".1f"),
                    _fmt(mean(ds, "regs"), ".0f"),
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Optional[Sequence[str]] = None) -> int:
    from fastdiff.cli.common import Parser  # noqa: PLC0415

    ap = Parser(prog="python -m fastdiff.bench ncu-summary", description=__doc__.split("\n")[0])
    ap.add_argument("csv", nargs="+", help="ncu --csv --page raw exports")
    ap.add_argument("-o", "--output", help="write here (default: stdout)")
    args = ap.parse_args(argv)
    launches: List[Dict[str, object]] = []
    notes = []
    for path in args.csv:
        try:
            with open(path, errors="replace") as f:
                text = f.read()
        except OSError as exc:  # a wrong path is an error; a CSV without kernels is a note below
            ap.error(f"{path}: cannot read ({exc.strerror or exc})")
        got = parse_csv(text, source=re.sub(r"\.csv$", "", os.path.basename(path)))
        if not got:
            notes.append(f"- {os.path.basename(path)}: no profiled kernels in it")
        launches.extend(got)
    text = "## Nsight Compute summary\n\n" + summarize(launches)
    if notes:
        text += "\n" + "\n".join(notes) + "\n"
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0
