"""`python -m fastdiff accuracy`: every deterministic solver x spacing x model-call budget,
RMS error against the exact ODE solution of the analytic model (see `fastdiff.accuracy`)."""
from __future__ import annotations

import argparse
import json
import sys

from fastdiff._cli import UsageError


def _names(text: str) -> list:
    return [s for s in text.replace(",", " ").split() if s]


def register(subparsers) -> argparse.ArgumentParser:
    from fastdiff.accuracy import CALLS, ODE_SOLVERS, SPACINGS, TUNED

    p = subparsers.add_parser("accuracy", help="solver x spacing error table against the exact ODE solution",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--schedule", default="scaled_linear", choices=("linear", "scaled_linear", "cosine"),
                   help="noise schedule (default: %(default)s)")
    p.add_argument("--calls", default=",".join(map(str, CALLS)),
                   help="model-call budgets, comma separated (default: %(default)s)")
    p.add_argument("--solvers", default=None, help="deterministic solvers, comma separated (default: all of "
                                                   f"{', '.join(ODE_SOLVERS)}; unipc is bh2 order 2, unipc_bh1 "
                                                   "bh1 order 2, unipc3 bh2 order 3)")
    p.add_argument("--spacings", default=",".join(SPACINGS),
                   help=f"spacings (default: %(default)s), or {TUNED!r}: the logsnr grid tuned by fastdiff.tune_grid "
                        "on separate calibration noise")
    p.add_argument("--calibration", type=int, default=64, help="calibration samples for 'tuned' (default: %(default)s)")
    p.add_argument("--batch", type=int, default=32, help="noise samples (default: %(default)s)")
    p.add_argument("--ode-step", type=float, default=1e-2,
                   help="RK4 step in logSNR of the exact solution (default: %(default)s, converged to ~1e-8)")
    p.add_argument("--json", default=None, metavar="FILE", help="also write the entries as JSON")
    p.set_defaults(func=run)
    return p


def _check(args):
    from fastdiff.accuracy import ODE_SOLVERS, SPACINGS, TUNED

    try:
        calls = [int(c) for c in _names(args.calls)]
    except ValueError:
        raise UsageError(f"--calls {args.calls}: expected integers >= 1, comma separated") from None
    if not calls or min(calls) < 1:
        raise UsageError(f"--calls {args.calls}: expected integers >= 1, comma separated")
    solvers = list(ODE_SOLVERS) if args.solvers is None else _names(args.solvers)
    spacings = _names(args.spacings)
    for s in solvers:
        if s not in ODE_SOLVERS:
            raise UsageError(f"--solvers: {s!r} is not a deterministic solver label (expected some of "
                             f"{list(ODE_SOLVERS)})")
    for s in spacings:
        if s not in SPACINGS + (TUNED,):
            raise UsageError(f"--spacings: {s!r}: expected some of {list(SPACINGS + (TUNED,))}")
    for name in ("batch", "calibration"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name} {getattr(args, name)}: expected an integer >= 1")
    if not 0 < args.ode_step <= 0.1:
        raise UsageError(f"--ode-step {args.ode_step}: expected a step in (0, 0.1]")
    return calls, solvers, spacings


def run(args) -> int:
    from fastdiff.accuracy import accuracy_table, format_table

    calls, solvers, spacings = _check(args)

    def progress(done, total):
        sys.stderr.write(f"\r{done}/{total} plans")
        if done == total:
            sys.stderr.write("\n")

    entries = accuracy_table(solvers, spacings, calls, schedule=args.schedule, batch=args.batch,
                             ode_step=args.ode_step, progress=progress, calibration=args.calibration)
    print(f"RMS error against the exact ODE solution (analytic Gaussian mixture, {args.schedule}, "
          f"batch {args.batch}, float64 reference solvers), by model calls:")
    print(format_table(entries, calls))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([e.__dict__ for e in entries], f, indent=1)
    return 0
