#!/usr/bin/env bash
# The Triton kernels compiled offline for sm_90a and sm_80 (no spills, shared memory within a
# block's limit: the `compiles_for_gpus` tests, tests/gpu_compile.py) under the GPU machine's
# triton (benchmarks/gpu_stack.py: 3.6.0), as CI's test run does under the pinned one:
#
#     bash benchmarks/check_gpu_triton.sh
#
# That triton alone (no torch: an offline compile to a GPUTarget needs neither torch nor a GPU;
# the tests' torch is the installed one) is pip-installed into a temporary folder put first on
# PYTHONPATH (~640 MB, ~10 s), and the tests run from a cold Triton cache, failing rather than
# skipping when that triton cannot compile offline (CI=true). ~80 s on 2 cores; .ci/run runs it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
TRITON=$(python3 benchmarks/gpu_stack.py get triton)
DIR=$(mktemp -d "${TMPDIR:-/tmp}/fastdiff-triton-$TRITON.XXXXXX")
trap 'rm -rf "$DIR"' EXIT
python3 -m pip install -q --no-deps --target "$DIR/site" "triton==$TRITON" 2>&1 | { grep -v '^WARNING' || true; }
export PYTHONPATH="$DIR/site${PYTHONPATH:+:$PYTHONPATH}" TRITON_CACHE_DIR="$DIR/cache" CI=true
got=$(python3 -c 'import triton; print(triton.__version__)')
[ "$got" = "$TRITON" ] || { echo "check_gpu_triton.sh: imported triton $got, not $TRITON" >&2; exit 1; }
echo "triton $got from $DIR/site"
# the test files that compile offline (tests/gpu_compile.py's compile_isolated)
mapfile -t FILES < <(grep -l 'compile_isolated(' tests/test_*.py)
python3 -m pytest -q -p no:cacheprovider "${FILES[@]}" -k compiles_for_gpus
