"""Process set-up for the CPU-heavy demo commands.

With the default (active, spinning) OpenMP wait policy, PyTorch's CPU threads busy-wait at
every barrier; when other processes share the cores (2 cores, several users) that turns a
0.3 s training step into 10-25 s (measured on the 2-core development machine). A passive
policy makes waiting threads sleep instead. libgomp reads the variable once, when it is
loaded (with `import torch`), so setting it later has no effect: `reexec_with_passive_omp`
re-executes the current command once with `OMP_WAIT_POLICY=PASSIVE` unless the user has set
the variable (to anything) themselves.
"""
from __future__ import annotations

import os
import sys


def reexec_with_passive_omp(module: str, argv=None) -> None:
    """Re-exec `python -m module argv...` with OMP_WAIT_POLICY=PASSIVE, unless already set."""
    if "OMP_WAIT_POLICY" in os.environ or os.environ.get("FASTDIFF_NO_REEXEC"):
        return
    argv = list(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, "-m", module, *argv], env)
