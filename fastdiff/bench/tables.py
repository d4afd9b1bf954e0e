"""The report's markdown sections: machine, one table per op, end-to-end sampling, all benchmarks."""
from __future__ import annotations

import os
import re
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

from .markdown import MISSING, _md_table, _natural_key, _provider_key, _unique, fmt_num, fmt_pct, fmt_speedup
from .runs import Entry, Run, _num


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
