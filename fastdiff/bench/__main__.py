"""``python -m fastdiff.bench {report,ncu-summary,hw}``.

  report RESULTS.json [...] [-o report.md] [--plots DIR]   pytest-benchmark JSON -> markdown
  ncu-summary NCU.csv [...] [-o summary.md]                Nsight Compute CSV -> per-kernel table
  hw [--device cuda|cpu] [--quick]                          measure copy GB/s and GEMM TFLOP/s, print JSON
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence


def _hw(argv: Sequence[str]) -> int:
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m fastdiff.bench hw")
    ap.add_argument("--device", default=None)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    from fastdiff.bench.harness import measure_hw

    print(json.dumps(measure_hw(args.device, quick=args.quick or None), indent=2))
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    cmd, rest = argv[0], argv[1:]
    if cmd == "report":
        from fastdiff.bench.report import main as report_main

        return report_main(rest)
    if cmd == "ncu-summary":
        from fastdiff.bench.ncu import main as ncu_main

        return ncu_main(rest)
    if cmd == "hw":
        return _hw(rest)
    print(f"unknown command {cmd!r}\n{__doc__}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
