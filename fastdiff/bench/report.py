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
module uses the standard library only (matplotlib optionally).
"""
from __future__ import annotations

import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

PROVIDER_ORDER = ("eager", "compile", "reference", "cpu", "triton", "cuda", "fused", "graph")
# Ops reported as end-to-end sampling (ms/image, images/s, it/s), each under its own heading.
SAMPLE_OPS = {"sample": "End-to-end sampling",
              "sample_diffusers": "End-to-end sampling: a diffusers U-Net, diffusers' own loop vs fastdiff"}
MISSING = "–"
PLOTS_SKIPPED = "plots skipped: matplotlib is not installed (pip install 'fastdiff[plots]')"


# --------------------------------------------------------------------------- formatting


def fmt_num(x: Optional[float], digits: int = 4) -> str:
    """`digits` significant digits, no exponent for everyday magnitudes; '–' for None/NaN."""
    if x is None or (isinstance(x, float) and (math.isnan(x) or math.isinf(x))):
        return MISSING
    if x == 0:
        return "0"
    mag = math.floor(math.log10(abs(x)))
    if mag >= 6 or mag < -4:
        return f"{x:.{digits - 1}e}"
    decimals = max(0, digits - 1 - mag)
    return f"{x:.{decimals}f}"


def fmt_speedup(x: Optional[float]) -> str:
    """Speed-up as shown in the report: two decimals and a multiplication sign (``1.73×``)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return MISSING
    return f"{x:.2f}×"


def fmt_pct(x: Optional[float]) -> str:
    """A fraction as a percentage with one decimal (``0.873`` -> ``87.3%``)."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return MISSING
    return f"{100.0 * x:.1f}%"


def _md_table(header: Sequence[str], rows: Iterable[Sequence[str]], align_right_from: int = 1) -> str:
    header = [str(h) for h in header]
    lines = ["| " + " | ".join(header) + " |"]
    lines.append("| " + " | ".join("---" if i < align_right_from else "---:" for i in range(len(header))) + " |")
    for row in rows:
        lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in row) + " |")
    return "\n".join(lines)


def _natural_key(value: Any) -> Tuple:
    if isinstance(value, bool):
        return (2, str(value))
    if isinstance(value, (int, float)):
        return (0, float(value))
    parts = re.split(r"(\d+(?:\.\d+)?)", str(value))
    return (1, tuple((0, float(p)) if i % 2 else (1, p) for i, p in enumerate(parts) if p != ""))


def _provider_key(provider: str, first_seen: Dict[str, int]) -> Tuple:
    if provider in PROVIDER_ORDER:
        return (0, PROVIDER_ORDER.index(provider), "")
    return (1, first_seen.get(provider, 0), provider)


def _quantile(data: Sequence[float], q: float) -> float:
    s = sorted(data)
    pos = q * (len(s) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


# --------------------------------------------------------------------------- loading


@dataclass
class Entry:
    """One benchmark of one run, with everything the tables need."""

    name: str
    source: str
    op: str
    provider: str
    size: Any
    variant: str
    median_s: float
    p20_s: Optional[float]
    p80_s: Optional[float]
    rounds: Optional[int]
    iterations: Optional[int]
    timer: str
    bytes_moved: Optional[float]
    flops: Optional[float]
    images: Optional[float]
    copy_gbps: Optional[float]
    extra: Dict[str, Any] = field(default_factory=dict)

    @property
    def median_ms(self) -> float:
        return self.median_s * 1e3

    @property
    def gbps(self) -> Optional[float]:
        return self.bytes_moved / self.median_s / 1e9 if self.bytes_moved and self.median_s > 0 else None

    @property
    def frac_copy(self) -> Optional[float]:
        g = self.gbps
        return g / self.copy_gbps if g is not None and self.copy_gbps else None

    @property
    def tflops(self) -> Optional[float]:
        return self.flops / self.median_s / 1e12 if self.flops and self.median_s > 0 else None

    @property
    def images_per_s(self) -> Optional[float]:
        return self.images / self.median_s if self.images and self.median_s > 0 else None

    @property
    def ms_per_image(self) -> Optional[float]:
        return self.median_s * 1e3 / self.images if self.images else None


@dataclass
class Run:
    path: str
    machine_info: Dict[str, Any]
    commit_info: Dict[str, Any]
    datetime: str
    version: str
    entries: List[Entry]

    @property
    def hw(self) -> Dict[str, Any]:
        return self.machine_info.get("fastdiff") or {}


def _num(v: Any) -> Optional[float]:
    try:
        f = float(v)
    except (TypeError, ValueError):
        return None
    return f if math.isfinite(f) else None


def load_run(path: str | os.PathLike) -> Run:
    """Read one pytest-benchmark JSON file (as written by ``--benchmark-json``)."""
    with open(path) as f:
        doc = json.load(f)
    if not isinstance(doc, dict) or "benchmarks" not in doc:
        raise ValueError(f"{path}: not a pytest-benchmark JSON file (no 'benchmarks' key)")
    machine_info = doc.get("machine_info") or {}
    hw = machine_info.get("fastdiff") or {}
    entries = []
    for b in doc["benchmarks"]:
        stats = b.get("stats") or {}
        median = _num(stats.get("median"))
        if median is None:
            continue
        ei = b.get("extra_info") or {}
        data = [d for d in (stats.get("data") or []) if _num(d) is not None]
        if data:
            p20, p80 = _quantile(data, 0.2), _quantile(data, 0.8)
        else:
            p20 = _num(ei.get("p20_ms"))
            p80 = _num(ei.get("p80_ms"))
            p20 = p20 / 1e3 if p20 is not None else None
            p80 = p80 / 1e3 if p80 is not None else None
        group = b.get("group") or ""
        op = ei.get("op") or (group.split(":")[0] if group else b.get("name", "?"))
        provider = ei.get("provider") or b.get("param") or b.get("name", "?")
        known = {
            "op", "provider", "size", "variant", "bytes_moved", "flops", "images", "copy_gbps",
            "median_ms", "p20_ms", "p80_ms", "gbps", "frac_copy", "tflops", "images_per_s",
            "ms_per_image", "timer", "rounds", "iterations", "warmup_rounds", "device",
        }
        entries.append(
            Entry(
                name=b.get("fullname") or b.get("name", "?"),
                source=os.path.basename(str(path)),
                op=str(op),
                provider=str(provider),
                size=ei.get("size", MISSING),
                variant=str(ei.get("variant", "") or ""),
                median_s=median,
                p20_s=p20,
                p80_s=p80,
                rounds=stats.get("rounds"),
                iterations=stats.get("iterations"),
                timer=str(ei.get("timer") or (b.get("options") or {}).get("timer") or ""),
                bytes_moved=_num(ei.get("bytes_moved")),
                flops=_num(ei.get("flops")),
                images=_num(ei.get("images")),
                copy_gbps=_num(ei.get("copy_gbps")) or _num(hw.get("copy_gbps")),
                extra={k: v for k, v in ei.items() if k not in known},
            )
        )
    return Run(
        path=str(path),
        machine_info=machine_info,
        commit_info=doc.get("commit_info") or {},
        datetime=str(doc.get("datetime") or ""),
        version=str(doc.get("version") or ""),
        entries=entries,
    )


# --------------------------------------------------------------------------- sections


def _unique(values: Iterable[Any]) -> List[Any]:
    out: List[Any] = []
    for v in values:
        if v is not None and v != "" and v not in out:
            out.append(v)
    return out


def _joined(values: Iterable[Any]) -> str:
    u = _unique(values)
    return " / ".join(str(v) for v in u) if u else MISSING


def _commit_text(run: Run) -> str:
    ci = run.commit_info
    cid = str(ci.get("id") or "")
    dirty = ci.get("dirty")
    if not cid or cid in ("unknown", "unversioned"):
        cid = str(run.hw.get("commit") or "unknown")
        dirty = run.hw.get("dirty")
    text = cid[:12] if re.fullmatch(r"[0-9a-f]{13,}", cid) else cid
    if dirty:
        text += " (dirty)"
    branch = ci.get("branch")
    if branch and branch != "(unknown)":
        text += f" on {branch}"
    return text


def machine_section(runs: Sequence[Run]) -> str:
    rows = []

    def add(label: str, values: Iterable[Any]) -> None:
        rows.append((label, _joined(values)))

    def device_text(hw: Dict[str, Any]) -> Optional[str]:
        if not hw:
            return None
        text = f"{hw.get('device_name', '?')} ({hw.get('device', '?')})"
        bits = []
        if hw.get("capability"):
            bits.append(f"sm_{str(hw['capability']).replace('.', '')}")
        if hw.get("sm_count"):
            bits.append(f"{hw['sm_count']} SMs")
        if hw.get("l2_bytes"):
            bits.append(f"{'L2' if hw.get('device') == 'cuda' else 'LLC'} {hw['l2_bytes'] / 2**20:.0f} MiB")
        if hw.get("mem_bytes"):
            bits.append(f"{hw['mem_bytes'] / 2**30:.0f} GiB")
        if hw.get("cpu_threads"):
            bits.append(f"{hw['cpu_threads']} threads")
        return text + (": " + ", ".join(bits) if bits else "")

    add("device", (device_text(r.hw) for r in runs))
    add("torch", (r.hw.get("torch") for r in runs))
    add("triton", (r.hw.get("triton") for r in runs))
    add("CUDA", (r.hw.get("cuda") or ("none" if r.hw else None) for r in runs))
    add("driver", (r.hw.get("driver") for r in runs))
    add("commit", (_commit_text(r) for r in runs))
    add("date", (r.datetime for r in runs))
    add(
        "copy bandwidth",
        (
            f"{fmt_num(r.hw['copy_gbps'])} GB/s (copy_ of {r.hw.get('copy_bytes', 0) / 2 / 2**20:.0f} MiB, bytes read + written)"
            for r in runs
            if r.hw.get("copy_gbps")
        ),
    )
    add(
        "GEMM rate",
        (
            f"{fmt_num(r.hw['gemm_tflops'])} TFLOP/s ({r.hw.get('gemm_dtype', '?')}, {r.hw.get('gemm_n', '?')}³)"
            for r in runs
            if r.hw.get("gemm_tflops")
        ),
    )
    add("CPU", ((r.machine_info.get("cpu") or {}).get("brand_raw") for r in runs))
    add("python", (r.machine_info.get("python_version") or r.hw.get("python") for r in runs))
    add("pytest-benchmark", (r.version for r in runs))
    add("timer", (e.timer for r in runs for e in r.entries))
    add("results", (os.path.basename(r.path) for r in runs))
    if any(r.hw.get("quick") for r in runs):
        rows.append(("note", "quick sizes (FASTDIFF_BENCH_QUICK=1 or no GPU): not representative"))
    if not any(r.hw for r in runs):
        rows.append(("note", "no machine_info['fastdiff'] in the JSON: run through benchmarks/conftest.py"))
    return "## Machine\n\n" + _md_table(["", ""], rows, align_right_from=2)


def _by_key(entries: Iterable[Entry], key) -> Dict[Any, Entry]:
    out: Dict[Any, Entry] = {}
    for e in entries:
        out[key(e)] = e  # later runs win
    return out


def _duplicates(entries: Sequence[Entry], key) -> List[str]:
    seen: Dict[Any, str] = {}
    dups = []
    for e in entries:
        k = key(e)
        if k in seen:
            dups.append(f"{e.name} ({e.source}) replaces {seen[k]}")
        seen[k] = f"{e.name} ({e.source})"
    return dups


def _providers(entries: Sequence[Entry]) -> List[str]:
    first_seen: Dict[str, int] = {}
    for i, e in enumerate(entries):
        first_seen.setdefault(e.provider, i)
    return sorted(first_seen, key=lambda p: _provider_key(p, first_seen))


def op_table(op: str, entries: Sequence[Entry]) -> str:
    """The markdown table of one op: rows = (size, variant), columns = per-provider numbers."""
    providers = _providers(entries)
    has_bytes = any(e.bytes_moved for e in entries)
    has_flops = any(e.flops for e in entries)
    has_variant = any(e.variant for e in entries)
    cell = _by_key(entries, lambda e: (e.size, e.variant, e.provider))
    rows_keys = sorted({(e.size, e.variant) for e in entries}, key=lambda k: (_natural_key(k[0]), _natural_key(k[1])))

    header = ["size"] + (["variant"] if has_variant else [])
    for p in providers:
        header.append(f"{p} ms")
        if has_bytes:
            header += [f"{p} GB/s", f"{p} % copy"]
        if has_flops:
            header.append(f"{p} TFLOP/s")
        if "eager" in providers and p != "eager":
            header.append(f"{p} × eager")
        if "compile" in providers and p != "compile":
            header.append(f"{p} × compile")

    rows = []
    for size, variant in rows_keys:
        row = [str(size)] + ([variant or MISSING] if has_variant else [])
        base = {b: cell.get((size, variant, b)) for b in ("eager", "compile")}
        for p in providers:
            e = cell.get((size, variant, p))
            row.append(fmt_num(e.median_ms) if e else MISSING)
            if has_bytes:
                row += [fmt_num(e.gbps) if e else MISSING, fmt_pct(e.frac_copy) if e else MISSING]
            if has_flops:
                row.append(fmt_num(e.tflops) if e else MISSING)
            for b in ("eager", "compile"):
                if b in providers and p != b:
                    row.append(fmt_speedup(base[b].median_s / e.median_s) if e and base[b] else MISSING)
        rows.append(row)
    return _md_table(header, rows, align_right_from=2 if has_variant else 1)


def sample_table(entries: Sequence[Entry]) -> str:
    """End-to-end sampling: solver, steps, size, provider, ms/image, images/s, ms/call, it/s
    (denoising steps per second of one call, as diffusers' progress bar counts), speed-ups."""
    providers = _providers(entries)

    def ident(e: Entry) -> Tuple:
        return (str(e.extra.get("solver", MISSING)), e.extra.get("steps", MISSING), e.size, e.variant)

    cell = _by_key(entries, lambda e: ident(e) + (e.provider,))
    keys = sorted(
        {ident(e) for e in entries},
        key=lambda k: (str(k[0]), _natural_key(k[1]), _natural_key(k[2]), k[3]),
    )
    has_variant = any(e.variant for e in entries)
    header = ["solver", "steps", "size"] + (["variant"] if has_variant else []) + [
        "provider", "ms/image", "images/s", "ms/call", "it/s", "× eager", "× compile",
    ]
    rows = []
    for k in keys:
        eager, compiled = cell.get(k + ("eager",)), cell.get(k + ("compile",))
        for p in providers:
            e = cell.get(k + (p,))
            if e is None:
                continue
            rows.append(
                [str(k[0]), str(k[1]), str(k[2])] + ([k[3] or MISSING] if has_variant else []) + [
                    p,
                    fmt_num(e.ms_per_image),
                    fmt_num(e.images_per_s),
                    fmt_num(e.median_ms),
                    fmt_num(_num(k[1]) / e.median_s) if _num(k[1]) is not None else MISSING,
                    fmt_speedup(eager.median_s / e.median_s) if eager and p != "eager" else MISSING,
                    fmt_speedup(compiled.median_s / e.median_s) if compiled and p != "compile" else MISSING,
                ]
            )
    return _md_table(header, rows, align_right_from=5 if has_variant else 4)


def details_table(entries: Sequence[Entry]) -> str:
    rows = []
    for e in entries:
        rounds = f"{e.rounds} × {e.iterations}" if e.rounds is not None else MISSING
        rows.append(
            [
                e.name, e.op, e.provider, str(e.size) + (f" {e.variant}" if e.variant else ""),
                fmt_num(e.median_ms),
                fmt_num(e.p20_s * 1e3) if e.p20_s is not None else MISSING,
                fmt_num(e.p80_s * 1e3) if e.p80_s is not None else MISSING,
                rounds, e.timer or MISSING,
            ]
        )
    return _md_table(
        ["benchmark", "op", "provider", "size", "median ms", "p20 ms", "p80 ms", "rounds × iterations", "timer"],
        rows, align_right_from=4,
    )


# --------------------------------------------------------------------------- plots


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "plot"


def make_plots(entries: Sequence[Entry], outdir: str | os.PathLike) -> Optional[List[Path]]:
    """Write PNGs into `outdir`; None when matplotlib is not installed."""
    if not _have_matplotlib():
        return None
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    written: List[Path] = []
    ops = _unique(e.op for e in entries if e.op not in SAMPLE_OPS)
    for op in ops:
        es = [e for e in entries if e.op == op]
        sizes = sorted({e.size for e in es}, key=_natural_key)
        numeric = all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in sizes)
        xpos = {s: (float(s) if numeric else i) for i, s in enumerate(sizes)}
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for variant in sorted({e.variant for e in es}):
            for p in _providers(es):
                pts = sorted(
                    ((xpos[e.size], e.median_ms) for e in es if e.provider == p and e.variant == variant),
                )
                if pts:
                    label = p + (f" ({variant})" if variant else "")
                    ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
        if numeric:
            ax.set_xscale("log", base=2)
        else:
            ax.set_xticks(range(len(sizes)))
            ax.set_xticklabels([str(s) for s in sizes], rotation=30, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_xlabel("size")
        ax.set_ylabel("median time (ms)")
        ax.set_title(f"{op}: time vs size")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = outdir / f"{_slug(op)}_time_vs_size.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    samples = [e for e in entries if e.op in SAMPLE_OPS and e.ms_per_image is not None]
    for size in sorted({e.size for e in samples}, key=_natural_key):
        es = [e for e in samples if e.size == size]
        fig, ax = plt.subplots(figsize=(7, 4.5))
        lines = sorted({(str(e.extra.get("solver", "?")), e.provider, e.variant) for e in es})
        for solver, p, variant in lines:
            pts = sorted(
                (float(e.extra["steps"]), e.ms_per_image)
                for e in es
                if str(e.extra.get("solver", "?")) == solver and e.provider == p and e.variant == variant
                and _num(e.extra.get("steps")) is not None
            )
            if pts:
                label = f"{solver} {p}" + (f" ({variant})" if variant else "")
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=label)
        ax.set_xlabel("steps")
        ax.set_ylabel("ms / image")
        ax.set_title(f"sampling, size {size}: ms/image vs steps")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = outdir / f"sample_{_slug(str(size))}_ms_per_image_vs_steps.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


# --------------------------------------------------------------------------- the report


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
