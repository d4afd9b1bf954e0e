#!/usr/bin/env bash
# fastdiff: the one-call GPU check (DESIGN.md section 8; results naming: benchmarks/results/README.md).
#
# On a bare GPU machine with no network (torch, triton, nvcc, cmake, ninja, pybind11, pytest,
# pytest-benchmark installed), from anywhere:
#
#     FASTDIFF_COMMIT=<sha of the tree you sent> bash benchmarks/gpu_check.sh
#
# Phases, each under `timeout` (a failure or timeout is recorded and the script goes on):
#
#   versions     nvidia-smi, driver, nvcc, python/torch/triton/CUDA, ncu; commit; source hash   <= 25 s
#   build        pip install --no-build-isolation --no-deps -e . for the detected GPU arch
#                (FASTDIFF_CUDA_ARCHS=sm_<cc>[a], FASTDIFF_WITH_CUDA=1), then fastdiff.info()     <= 170 s
#   tests        pytest tests (the GPU tests run where CUDA is), log kept                        <= 150 s
#   bench:<op>   pytest benchmarks/bench_<op>.py --benchmark-json, one file at a time:
#                copy 45 s, solver_step 90 s, group_norm_silu 75 s, attention 75 s, sample 120 s,
#                any other bench_*.py 60 s; a known op whose file does not exist yet is skipped
#   ncu:<op>     Nsight Compute (SpeedOfLight + MemoryWorkloadAnalysis + DRAM bytes/throughput)
#                on the fused solver step and GroupNorm+SiLU kernels, via the op's benchmark
#                file in profile mode (FASTDIFF_BENCH_PROFILE=1, largest size, providers
#                cuda,triton, NVTX range fastdiff_profile)                                        <= 60 s each
#   report       python -m fastdiff.bench report over all JSONs (+ plots when matplotlib is
#                there), with the phase table and the ncu summary appended; printed LAST        <= 30 s
#
# The whole run is budgeted by FASTDIFF_CHECK_BUDGET (default 560 s) so that it fits one
# 10-minute call: a phase gets min(its cap, time left - a reserve for the phases after it), and
# is skipped when that is under 5 s.
#
# $OUT (default ./out) receives 7 files (the device tool brings back at most 8, no deeper than 2
# folders, names of letters, digits and ._- only):
#   report.md  summary.txt  versions.txt  tests.log  build.log  ncu_summary.md
#   <YYYY-MM-DD>_<gpu>.tar.gz   the folder <YYYY-MM-DD>_<gpu>/ with everything: raw pytest-benchmark
#                               JSON (bench/), logs (logs/), ncu reports and CSVs (ncu/), plots/,
#                               report.md, summary.txt, versions.txt, commit.txt -- unpack it into
#                               benchmarks/results/ as it is.
#
# Knobs: OUT, PYTHON (default python3), FASTDIFF_CHECK_BUDGET, FASTDIFF_CHECK_SKIP (any of
# "versions build tests bench ncu report", space or comma separated), FASTDIFF_COMMIT,
# NCU_PROVIDERS (default cuda,triton), NCU_REGEX_SOLVER_STEP, NCU_REGEX_GROUP_NORM_SILU.

set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$PWD
PY=${PYTHON:-python3}
OUT=${OUT:-$ROOT/out}
BUDGET=${FASTDIFF_CHECK_BUDGET:-560}
SKIP=" $(echo "${FASTDIFF_CHECK_SKIP:-}" | tr ',' ' ') "
START=$(date +%s)
DEADLINE=$((START + BUDGET))
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1

mkdir -p "$OUT"
# ---------------------------------------------------------------- naming: <date>_<gpu>
# one torch import: "1 <device name>" when torch sees a GPU, "0" when not
PROBE=$(timeout 120 "$PY" -c 'import torch; ok = torch.cuda.is_available(); print(int(ok), torch.cuda.get_device_name(0) if ok else "")' 2>/dev/null)
HAVE_GPU=0; [ "${PROBE%% *}" = 1 ] && HAVE_GPU=1
GPU_NAME=""; [ "$HAVE_GPU" = 1 ] && GPU_NAME=${PROBE#* }
[ -n "$GPU_NAME" ] || GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)
GPU_SLUG=$(echo "${GPU_NAME:-nogpu}" | tr 'A-Z' 'a-z' | sed -e 's/^nvidia //' -e 's/[^a-z0-9]\{1,\}/-/g' -e 's/^-//' -e 's/-$//')
[ -n "$GPU_SLUG" ] || GPU_SLUG=nogpu
RESULT_NAME="$(date -u +%Y-%m-%d)_${GPU_SLUG}"
TMP=$(mktemp -d "${TMPDIR:-/tmp}/fastdiff_check.XXXXXX")
W="$TMP/$RESULT_NAME"
mkdir -p "$W/bench" "$W/logs" "$W/ncu" "$W/plots"
SUMMARY="$W/summary.txt"
printf '%-26s %-9s %6s %7s  %s\n' phase status "secs" limit note > "$SUMMARY"

left() { echo $((DEADLINE - $(date +%s))); }
skipped() { [[ "$SKIP" == *" $1 "* ]]; }
record() { # record PHASE STATUS SECS LIMIT NOTE
  printf '%-26s %-9s %6s %7s  %s\n' "$1" "$2" "$3" "$4" "$5" | tee -a "$SUMMARY"
}
# run_phase NAME CAP RESERVE LOG CMD...: CMD under timeout min(CAP, left - RESERVE); never fails
run_phase() {
  local name=$1 cap=$2 reserve=$3 log=$4
  shift 4
  local t=$(( $(left) - reserve ))
  (( t > cap )) && t=$cap
  if (( t < 5 )); then
    record "$name" SKIPPED 0 "$t" "no time left in the ${BUDGET}s budget"
    return 99
  fi
  local t0 rc dt status note=""
  t0=$(date +%s)
  timeout -s INT -k 15 "$t" "$@" >"$log" 2>&1
  rc=$?
  dt=$(( $(date +%s) - t0 ))
  case $rc in
    0) status=ok ;;
    124|137) status=TIMEOUT; note="killed at the ${t}s limit" ;;
    *) status=FAILED; note="exit $rc" ;;
  esac
  note="$note${note:+; }log $(basename "$log")"
  record "$name" "$status" "$dt" "$t" "$note"
  return $rc
}

NCU=$(command -v ncu 2>/dev/null || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n1)

# ---------------------------------------------------------------- versions
COMMIT=${FASTDIFF_COMMIT:-}
if [ -z "$COMMIT" ] && git -C "$ROOT" rev-parse HEAD >/dev/null 2>&1; then
  COMMIT=$(git -C "$ROOT" rev-parse HEAD)
  git -C "$ROOT" diff --quiet HEAD -- 2>/dev/null || COMMIT="$COMMIT (dirty)"
fi
COMMIT=${COMMIT:-unknown}
export FASTDIFF_COMMIT="${COMMIT%% *}"
SRC_HASH=$(find fastdiff csrc kernels benchmarks tests setup.py pyproject.toml CMakeLists.txt \
             -type f \( -name '*.py' -o -name '*.cu' -o -name '*.cuh' -o -name '*.cpp' -o -name '*.h' \
             -o -name '*.hpp' -o -name '*.sh' -o -name '*.toml' -o -name '*.txt' \) \
             -not -path '*/__pycache__/*' -not -path '*/build/*' -not -path 'benchmarks/results/*' \
             2>/dev/null | LC_ALL=C sort | xargs -r sha256sum 2>/dev/null | sha256sum | cut -c1-16)
printf 'commit: %s\nsource sha256 (tracked source files, first 16 hex): %s\nresult: %s\n' \
  "$COMMIT" "$SRC_HASH" "$RESULT_NAME" > "$W/commit.txt"

versions_cmd() {
  echo "== date";       date -u +%Y-%m-%dT%H:%M:%SZ
  echo "== result";     echo "$RESULT_NAME"
  cat "$W/commit.txt"
  echo "== uname";      uname -a
  echo "== nvidia-smi"; nvidia-smi 2>&1 || echo "nvidia-smi: not available"
  nvidia-smi --query-gpu=name,driver_version,memory.total,compute_cap,clocks.sm,clocks.max.sm,clocks.mem,power.limit --format=csv 2>/dev/null || true
  echo "== nvcc";       nvcc --version 2>&1 || echo "nvcc: not found"
  echo "== ncu";        if [ -n "$NCU" ]; then "$NCU" --version 2>&1; else echo "ncu: not found"; fi
  echo "== cmake";      cmake --version 2>&1 | head -n1 || true
  echo "== ninja";      ninja --version 2>&1 || true
  echo "== gcc";        gcc --version 2>&1 | head -n1 || true
  echo "== python"
  "$PY" - <<'PYEOF' 2>&1
import platform, sys
print("python", platform.python_version(), sys.executable)
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "cudnn", torch.backends.cudnn.version())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        print(f"device {p.name} cc {p.major}.{p.minor} sms {p.multi_processor_count} "
              f"L2 {getattr(p, 'L2_cache_size', 0) / 2**20:.0f} MiB mem {p.total_memory / 2**30:.1f} GiB")
    else:
        print("torch sees no CUDA device")
except Exception as exc:
    print("torch import failed:", exc)
for mod in ("triton", "pytest", "pytest_benchmark", "pybind11", "numpy", "matplotlib"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "?"))
    except Exception as exc:
        print(mod, "missing:", type(exc).__name__)
PYEOF
}
if skipped versions; then record versions SKIPPED 0 0 "FASTDIFF_CHECK_SKIP"; else
  export -f versions_cmd; export W RESULT_NAME NCU PY
  run_phase versions 25 400 "$W/versions.txt" bash -c versions_cmd
fi

# ---------------------------------------------------------------- build
if skipped build; then record build SKIPPED 0 0 "FASTDIFF_CHECK_SKIP"
else
  if [ "$HAVE_GPU" = 1 ]; then
    CC=$(timeout 60 "$PY" -c 'import torch; p = torch.cuda.get_device_capability(); print(f"{p[0]}.{p[1]}")' 2>/dev/null)
    MAJOR=${CC%%.*}; MINOR=${CC##*.}
    SUFFIX=""; [ "${MAJOR:-0}" -ge 9 ] && SUFFIX=a     # sm_90a / sm_100a: wgmma, setmaxnreg, TMA
    # setup.py / csrc/build_flags.py read FASTDIFF_CUDA_ARCHS (and FASTDIFF_WITH_CUDA=1 makes a
    # build without the CUDA kernels an error); CUDAARCHS and TORCH_CUDA_ARCH_LIST are the CMake
    # and torch spellings of the same choice, for builds that read those.
    export FASTDIFF_CUDA_ARCHS="sm_${MAJOR}${MINOR}${SUFFIX}" FASTDIFF_WITH_CUDA=1
    export CUDAARCHS="${MAJOR}${MINOR}${SUFFIX}" TORCH_CUDA_ARCH_LIST="${MAJOR}.${MINOR}${SUFFIX}"
    echo "build: GPU capability $CC -> FASTDIFF_CUDA_ARCHS=$FASTDIFF_CUDA_ARCHS" | tee "$W/logs/build_arch.txt"
  else
    echo "build: no GPU visible to torch; default arch list, CUDA kernels only if a toolkit is found" | tee "$W/logs/build_arch.txt"
  fi
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  run_phase build 170 330 "$W/logs/build.log" \
    "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e .
  timeout 60 "$PY" -c 'import fastdiff; f = getattr(fastdiff, "info", None); print(f() if callable(f) else "fastdiff.info() does not exist yet")' \
    >>"$W/logs/build.log" 2>&1 || echo "import fastdiff failed (see build.log)" | tee -a "$W/logs/build.log"
  tail -n 3 "$W/logs/build.log"
fi

# ---------------------------------------------------------------- tests
if skipped tests; then record tests SKIPPED 0 0 "FASTDIFF_CHECK_SKIP"
else
  run_phase tests 150 200 "$W/logs/tests.log" \
    "$PY" -m pytest tests -q -rs -p no:cacheprovider --junitxml="$W/logs/tests.xml"
  echo "tests: $(tail -n 1 "$W/logs/tests.log")"
fi

# ---------------------------------------------------------------- benchmarks
NCU_RESERVE=0
if [ -n "$NCU" ] && [ "$HAVE_GPU" = 1 ] && ! skipped ncu; then NCU_RESERVE=60; fi
declare -A CAP=([copy]=45 [solver_step]=90 [group_norm_silu]=75 [attention]=75 [sample]=120)
KNOWN=(copy solver_step group_norm_silu attention sample)
bench_file() { # the benchmark file of an op, or nothing
  local op=$1
  for f in "benchmarks/bench_${op}.py" $([ "$op" = sample ] && echo benchmarks/bench_sampling.py); do
    [ -f "$f" ] && { echo "$f"; return; }
  done
}
if skipped bench; then record bench SKIPPED 0 0 "FASTDIFF_CHECK_SKIP"
else
  DONE=" "
  for op in "${KNOWN[@]}"; do
    f=$(bench_file "$op")
    if [ -z "$f" ]; then
      record "bench:$op" SKIPPED 0 0 "benchmarks/bench_${op}.py does not exist yet"
      continue
    fi
    DONE+="$f "
    run_phase "bench:$op" "${CAP[$op]}" $((30 + NCU_RESERVE)) "$W/logs/bench_${op}.log" \
      "$PY" -m pytest "$f" -q -p no:cacheprovider --benchmark-json="$W/bench/bench_${op}.json" \
      --benchmark-group-by=group --benchmark-columns=median,iqr,rounds,iterations
  done
  for f in benchmarks/bench_*.py; do
    [ -f "$f" ] || continue
    [[ "$DONE" == *" $f "* ]] && continue
    name=$(basename "$f" .py)
    run_phase "bench:${name#bench_}" 60 $((30 + NCU_RESERVE)) "$W/logs/${name}.log" \
      "$PY" -m pytest "$f" -q -p no:cacheprovider --benchmark-json="$W/bench/${name}.json" \
      --benchmark-group-by=group --benchmark-columns=median,iqr,rounds,iterations
  done
fi

# ---------------------------------------------------------------- Nsight Compute
# the metrics fastdiff/bench/ncu.py summarises (NCU_METRICS there), besides the two sections
NCU_METRICS=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed
ncu_target() { # ncu_target OP REGEX
  local op=$1 regex=$2 f rep
  f=$(bench_file "$op")
  if [ -z "$f" ]; then record "ncu:$op" SKIPPED 0 0 "benchmarks/bench_${op}.py does not exist yet"; return; fi
  rep="$W/ncu/ncu_${op}"
  local common=(--clock-control none --target-processes all --kernel-name "regex:${regex}"
                --section SpeedOfLight --section MemoryWorkloadAnalysis --metrics "$NCU_METRICS" -f)
  local pytest_cmd=("$PY" -m pytest "$f" -q -p no:cacheprovider --benchmark-disable)
  run_phase "ncu:$op" 60 30 "$W/logs/ncu_${op}.log" \
    env FASTDIFF_BENCH_PROFILE=1 FASTDIFF_BENCH_SIZES=largest FASTDIFF_BENCH_PROVIDERS="${NCU_PROVIDERS:-cuda,triton}" \
    "$NCU" "${common[@]}" --nvtx --nvtx-include "fastdiff_profile/" --launch-count 8 -o "$rep" "${pytest_cmd[@]}"
  if [ ! -s "$rep.ncu-rep" ] && (( $(left) > 60 )); then # nothing matched inside the NVTX range: retry without it
    run_phase "ncu:$op (no NVTX filter)" 50 30 "$W/logs/ncu_${op}_nonvtx.log" \
      env FASTDIFF_BENCH_PROFILE=1 FASTDIFF_BENCH_SIZES=largest FASTDIFF_BENCH_PROVIDERS="${NCU_PROVIDERS:-cuda,triton}" \
      "$NCU" "${common[@]}" --launch-count 8 -o "$rep" "${pytest_cmd[@]}"
  fi
  if [ -s "$rep.ncu-rep" ]; then
    timeout 60 "$NCU" -i "$rep.ncu-rep" --csv --page raw --print-units base >"$W/ncu/${op}.csv" 2>>"$W/logs/ncu_${op}.log" \
      || timeout 60 "$NCU" -i "$rep.ncu-rep" --csv --page raw >"$W/ncu/${op}.csv" 2>>"$W/logs/ncu_${op}.log"
    timeout 60 "$NCU" -i "$rep.ncu-rep" --page details >"$W/ncu/${op}_details.txt" 2>>"$W/logs/ncu_${op}.log"
  else
    record "ncu:$op" NOREPORT 0 0 "no kernel matched regex:${regex} (see logs/ncu_${op}.log)"
  fi
}
if skipped ncu; then record ncu SKIPPED 0 0 "FASTDIFF_CHECK_SKIP"
elif [ -z "$NCU" ]; then record ncu SKIPPED 0 0 "ncu (Nsight Compute) not found on this machine"
elif [ "$HAVE_GPU" != 1 ]; then record ncu SKIPPED 0 0 "no GPU visible to torch"
else
  ncu_target solver_step "${NCU_REGEX_SOLVER_STEP:-[Ss]olver}"
  ncu_target group_norm_silu "${NCU_REGEX_GROUP_NORM_SILU:-[Gg]roup_?[Nn]orm|gn_silu|[Gg]n[Ss]ilu}"
fi
shopt -s nullglob
NCU_CSVS=("$W"/ncu/*.csv)
if (( ${#NCU_CSVS[@]} )); then
  timeout 60 "$PY" -m fastdiff.bench ncu-summary "${NCU_CSVS[@]}" -o "$W/ncu_summary.md" 2>>"$W/logs/ncu_summary.log" \
    || echo "ncu-summary failed (see logs/ncu_summary.log)" >"$W/ncu_summary.md"
else
  echo "## Nsight Compute summary" >"$W/ncu_summary.md"
  echo >>"$W/ncu_summary.md"
  echo "No Nsight Compute profile in this run (see summary.txt for why)." >>"$W/ncu_summary.md"
fi

# ---------------------------------------------------------------- report
JSONS=("$W"/bench/*.json)
if skipped report; then record report SKIPPED 0 0 "FASTDIFF_CHECK_SKIP"
elif (( ${#JSONS[@]} )); then
  run_phase report 30 0 "$W/logs/report.log" \
    "$PY" -m fastdiff.bench report "${JSONS[@]}" -o "$W/report.md" --plots "$W/plots" \
    --title "fastdiff GPU check: $RESULT_NAME"
else
  record report SKIPPED 0 0 "no benchmark JSON was written"
fi
[ -s "$W/report.md" ] || printf '# fastdiff GPU check: %s\n\nNo benchmark report (see the phase table below).\n' "$RESULT_NAME" >"$W/report.md"
record total "" $(( $(date +%s) - START )) "$BUDGET" "$RESULT_NAME"
{
  echo
  echo "## GPU check phases"
  echo
  echo '```'
  cat "$W/commit.txt"
  cat "$SUMMARY"
  echo '```'
  echo
  cat "$W/ncu_summary.md"
} >>"$W/report.md"

# ---------------------------------------------------------------- collect into $OUT (7 files)
cp "$W/report.md" "$W/summary.txt" "$W/ncu_summary.md" "$OUT/" 2>/dev/null
[ -f "$W/versions.txt" ] && cp "$W/versions.txt" "$OUT/" || cp "$W/commit.txt" "$OUT/versions.txt"
[ -f "$W/logs/tests.log" ] && tail -n 3000 "$W/logs/tests.log" >"$OUT/tests.log"
[ -f "$W/logs/build.log" ] && tail -n 400 "$W/logs/build.log" >"$OUT/build.log"
tar -czf "$OUT/$RESULT_NAME.tar.gz" -C "$TMP" "$RESULT_NAME" 2>/dev/null
if [ "$(stat -c %s "$OUT/$RESULT_NAME.tar.gz" 2>/dev/null || echo 0)" -gt 15000000 ]; then
  tar -czf "$OUT/$RESULT_NAME.tar.gz" -C "$TMP" --exclude='*.ncu-rep' "$RESULT_NAME" 2>/dev/null
  echo "note: .ncu-rep files left out of the tarball (over 15 MB)" | tee -a "$OUT/summary.txt"
fi
rm -rf "$TMP"

echo
echo "==================== $OUT/report.md ===================="
cat "$OUT/report.md"
