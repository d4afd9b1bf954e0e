"""`python -m fastdiff <command>`: the parser and the commands are in `fastdiff.cli`."""
from __future__ import annotations

import sys

from fastdiff.cli import CPU_HEAVY, main

if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in CPU_HEAVY:
        from fastdiff.demo._env import reexec_with_passive_omp

        reexec_with_passive_omp("fastdiff")
    sys.exit(main())
