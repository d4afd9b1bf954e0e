"""Moved to `fastdiff.cli.common`; `fastdiff.bench.ncu` still imports its Parser from here (bench is
being changed on another branch: drop this module when it imports fastdiff.cli.common)."""
from fastdiff.cli.common import Parser, UsageError  # noqa: F401
