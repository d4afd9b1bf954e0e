"""`python -m fastdiff accuracy`: every deterministic solver x spacing x model-call budget,
RMS error against the exact ODE solution of the analytic model, or (--model digits) against a
converged many-step run of the bundled digits model (see `fastdiff.accuracy`)."""
from __future__ import annotations

import argparse
import json
import sys

from fastdiff.cli.common import UsageError, check_output_file


def _names(text: str) -> list:
    return [s for s in text.replace(",", " ").split() if s]


MODELS = ("mixture", "digits")
SCHEDULES = ("linear", "scaled_linear", "cosine")
ONLY_FOR = {"mixture": ("ode_step",), "digits": ("reference_steps", "fd")}  # options that mean nothing for the other


def register(subparsers) -> argparse.ArgumentParser:
    from fastdiff.accuracy import CALLS, DIGITS_REFERENCE, ODE_SOLVERS, SPACINGS, TUNED

    p = subparsers.add_parser("accuracy", help="solver x spacing error table against the exact ODE solution",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="mixture", help="mixture: the analytic Gaussian mixture, against the exact ODE "
                                                      "solution (default); digits: the bundled digits model, against "
                                                      "a many-step run from the same noise and labels")
    p.add_argument("--schedule", default=None, help="noise schedule of the mixture: linear, scaled_linear (default) or "
                                                    "cosine (the digits model's is linear)")
    p.add_argument("--calls", default=",".join(map(str, CALLS)),
                   help="model-call budgets, comma separated (default: %(default)s)")
    p.add_argument("--solvers", default=None, help="deterministic solvers, comma separated (default: all of "
                                                   f"{', '.join(ODE_SOLVERS)}; unipc is bh2 order 2, unipc_bh1 "
                                                   "bh1 order 2, unipc3 bh2 order 3)")
    p.add_argument("--spacings", default=",".join(SPACINGS),
                   help=f"spacings (default: %(default)s), or {TUNED!r}: the logsnr grid tuned by fastdiff.tune_grid "
                        "on separate calibration noise")
    p.add_argument("--calibration", type=int, default=64,
                   help="calibration samples for 'tuned' (default: %(default)s)")
    p.add_argument("--batch", type=int, default=None, help="noise samples (default: 32 for the mixture, 64 for digits)")
    p.add_argument("--ode-step", type=float, default=None,
                   help="mixture: RK4 step in logSNR of the exact solution (default: 0.01, converged to ~1e-8)")
    p.add_argument("--reference-steps", type=int, default=None,
                   help=f"digits: steps of the reference run ({DIGITS_REFERENCE[0]} on logsnr; default: "
                        f"{DIGITS_REFERENCE[1]})")
    p.add_argument("--fd", action="store_true", help="digits: also FD and KID (95 %% bootstrap intervals) of every "
                                                     "entry's samples against the held-out real digits")
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
    if args.model not in MODELS:
        raise UsageError(f"--model {args.model}: expected one of {', '.join(MODELS)}")
    for model, names in ONLY_FOR.items():
        for name in names:
            if args.model != model and getattr(args, name) not in (None, False):
                raise UsageError(f"--{name.replace('_', '-')}: only for --model {model}")
    if args.schedule is not None and args.schedule not in (SCHEDULES if args.model == "mixture" else ("linear",)):
        raise UsageError(f"--schedule {args.schedule}: " + (f"expected one of {', '.join(SCHEDULES)}"
                                                           if args.model == "mixture" else
                                                           "the digits model was trained on the linear schedule"))
    for name in ("batch", "calibration", "reference_steps"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} {getattr(args, name)}: expected an integer >= 1")
    if args.ode_step is not None and not 0 < args.ode_step <= 0.1:
        raise UsageError(f"--ode-step {args.ode_step}: expected a step in (0, 0.1]")
    if args.json:
        check_output_file("--json", args.json)
    return calls, solvers, spacings


def _case(args):
    """The ModelCase the options ask for (unset options: the model's defaults)."""
    from fastdiff import accuracy

    given = {k: v for k, v in (("batch", args.batch), ("calibration", args.calibration)) if v is not None}
    if args.model == "mixture":
        return accuracy.mixture_case(args.schedule or "scaled_linear", ode_step=args.ode_step or 1e-2, **given)
    steps = args.reference_steps or accuracy.DIGITS_REFERENCE[1]
    return accuracy.digits_case(reference=(accuracy.DIGITS_REFERENCE[0], steps), fd=args.fd, **given)


def run(args) -> int:
    from fastdiff.accuracy import accuracy_table, format_quality, format_table

    calls, solvers, spacings = _check(args)
    case = _case(args)

    def progress(done, total):
        sys.stderr.write(f"\r{done}/{total} plans")
        if done == total:
            sys.stderr.write("\n")

    entries = accuracy_table(case, solvers, spacings, calls, progress=progress)
    print(case.title)
    print(format_table(entries, calls))
    if args.fd:
        print("\nFD and KID in the digits classifier's feature space, 95 % bootstrap intervals:")
        print(format_quality(entries))
    if args.json:
        with open(args.json, "w") as f:
            json.dump([e.__dict__ for e in entries], f, indent=1)
    return 0
