"""PNG plots for the benchmark report, only when matplotlib is installed."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import List, Optional, Sequence

from .markdown import SAMPLE_OPS, _natural_key, _unique
from .runs import Entry, _num
from .tables import _providers

PLOTS_SKIPPED = "plots skipped: matplotlib is not installed (pip install 'fastdiff[plots]')"


def _have_matplotlib() -> bool:
    try:
        import matplotlib  # noqa: F401, PLC0415
    except ImportError:
        return False
    return True


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", text).strip("_") or "plot"


def _save(fig, ax, path: Path) -> Path:
    """Legend, layout, write and close one figure; -> its path."""
    import matplotlib.pyplot as plt  # noqa: PLC0415

    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


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
        written.append(_save(fig, ax, outdir / f"{_slug(op)}_time_vs_size.png"))

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
        written.append(_save(fig, ax, outdir / f"sample_{_slug(str(size))}_ms_per_image_vs_steps.png"))
    return written
