"""Markdown formatting for the benchmark report: numbers, tables, sort orders (standard library only)."""
from __future__ import annotations

import math
import re
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

PROVIDER_ORDER = ("eager", "compile", "reference", "cpu", "triton", "cuda", "fused", "graph")
# Ops reported as end-to-end sampling (ms/image, images/s, it/s), each under its own heading.
SAMPLE_OPS = {"sample": "End-to-end sampling",
              "sample_diffusers": "End-to-end sampling: a diffusers U-Net, diffusers' own loop vs fastdiff"}
MISSING = "–"


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


def _unique(values: Iterable[Any]) -> List[Any]:
    out: List[Any] = []
    for v in values:
        if v is not None and v != "" and v not in out:
            out.append(v)
    return out
