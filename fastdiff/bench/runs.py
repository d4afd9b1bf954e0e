"""pytest-benchmark JSON -> `Run`s of `Entry`s, the numbers the report derives (standard library only)."""
from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from .markdown import MISSING, _quantile


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
