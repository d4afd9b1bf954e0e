"""`python -m fastdiff <command>`.

Each command lives in its own module with a `register(subparsers)` function that adds its
parser and sets `func` (called with the parsed arguments, returns the exit code). To add a
command, import its `register` and append it to `COMMANDS`. A bad argument found after parsing
raises `fastdiff._cli.UsageError`: one line on stderr naming the option, exit code 2.
"""
from __future__ import annotations

import os
import sys

from fastdiff._cli import Parser, UsageError
from fastdiff.accuracy_cli import register as _register_accuracy
from fastdiff.demo.cli import register as _register_demo
from fastdiff.generate_cli import register as _register_generate
from fastdiff.profile_cli import register as _register_profile

COMMANDS = [_register_demo, _register_generate, _register_profile, _register_accuracy]
# commands re-executed with a passive OpenMP wait policy (see fastdiff.demo._env)
CPU_HEAVY = {"demo", "generate", "evaluate", "compare"}


def build_parser() -> Parser:
    from fastdiff import __version__

    p = Parser(prog="python -m fastdiff", description="fastdiff: fused few-step diffusion sampling")
    p.add_argument("--version", action="version", version=f"fastdiff {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for register in COMMANDS:
        register(sub)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as e:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank finds the error; one says it
            print(f"python -m fastdiff {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in CPU_HEAVY:
        from fastdiff.demo._env import reexec_with_passive_omp

        reexec_with_passive_omp("fastdiff")
    sys.exit(main())
