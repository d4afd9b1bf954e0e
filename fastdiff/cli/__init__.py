"""The command line, `python -m fastdiff <command>`: the parser (here) and one module per command.

Each command module has a `register(subparsers)` function that adds its parser and sets `func`
(called with the parsed arguments, returns the exit code). To add a command, import its
`register` and append it to `COMMANDS`. A bad argument found after parsing raises
`fastdiff.cli.common.UsageError`: one line on stderr naming the option, exit code 2.
"""
from __future__ import annotations

import os
import sys

from fastdiff.cli.accuracy import register as _register_accuracy
from fastdiff.cli.common import Parser, UsageError
from fastdiff.cli.compare import register as _register_compare
from fastdiff.cli.demo import register as _register_demo
from fastdiff.cli.evaluate import register as _register_evaluate
from fastdiff.cli.generate import register as _register_generate
from fastdiff.cli.profile import register as _register_profile

COMMANDS = [_register_demo, _register_generate, _register_evaluate, _register_compare, _register_profile,
            _register_accuracy]
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
