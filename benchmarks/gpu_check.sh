#!/usr/bin/env bash
# fastdiff: the one-call GPU check (DESIGN.md section 8; results naming: benchmarks/results/README.md).
#
# On a bare GPU machine with no network (torch, triton, nvcc, cmake, ninja, pybind11, pytest,
# pytest-benchmark installed), from anywhere:
#
#     FASTDIFF_COMMIT=<sha of the tree you sent> bash benchmarks/gpu_check.sh [--phases LIST] [--plan]
#
#   --plan          print the phases that would run, each with its time cap, and a last line
#                   "total budget: N s" (N <= 540: the default run fits one 10-minute call with
#                   room to spare), then exit without running anything
#   --phases LIST   run only these phases (comma or space separated), still in the order below;
#                   a name selects that phase, a prefix selects its default sub-phases ("bench":
#                   every bench:*, "tests": tests and tests:triton). For a second call that
#                   finishes what the first could not, e.g. on the same machine (still built):
#                   --phases bench:attention,compile,ncu; on a fresh one add build first.
#
# Phases in priority order, caps in seconds (each runs under `timeout`; a failure, timeout or
# skip is recorded in summary.txt and the script goes on):
#
#   setup              GPU probe (torch) and the result's name; always runs                    25
#   versions           nvidia-smi, driver, nvcc, python/torch/triton/CUDA, ncu; commit; hash    10
#   build              pip install --no-build-isolation --no-deps -e . for the detected GPU arch
#                      (FASTDIFF_CUDA_ARCHS=sm_<cc>[a], FASTDIFF_WITH_CUDA=1), fastdiff.info() 100
#   tests              pytest -m gpu -k "not triton": the CUDA-kernel and CUDA-graph tests of
#                      test_solver_step, test_group_norm_silu, test_attention,
#                      test_linear_residual, test_graphs, test_sample_fused, test_fused_unet     50
#   tests:triton       pytest -m gpu -k triton: the same files' Triton-on-GPU cases (cold
#                      Triton compiles, so after the compiled kernels)                            60
#   bench:<file>       pytest benchmarks/bench_<file>.py without the torch.compile providers
#                      (FASTDIFF_BENCH_SKIP_PROVIDERS=compile): memory-bound kernels first
#                      (copy 20, solver_step 30, group_norm_silu 30), then end-to-end sampling
#                      eager vs fused vs graph (sampling 50), attention 40, unet 20
#   compile            probe (torch.compile of a tiny function, <= 20 s); if it passes, the
#                      torch.compile providers of bench_solver_step, bench_group_norm_silu and
#                      bench_attention at their largest size, one pytest run                       40
#   ncu                probe (ncu on one trivial kernel, <= 20 s); if it passes, Nsight Compute
#                      (SpeedOfLight + MemoryWorkloadAnalysis + DRAM bytes/throughput) on the
#                      fused solver step and GroupNorm+SiLU kernels via their benchmark files in
#                      profile mode (FASTDIFF_BENCH_PROFILE=1, largest size, NCU_PROVIDERS)       45
#   report             python -m fastdiff.bench report over all JSONs (+ plots when matplotlib
#                      is there) with the phase table and ncu summary appended; always runs,
#                      printed LAST                                                              15
#
# Not in the default run (name them in --phases; each exceeds what one call can spare):
#   compile:unet       torch.compile of the U-Net forward, largest workload (bench_unet)         150
#   compile:sample     torch.compile(mode="max-autotune") sampling, largest workload            390
#
# A probe that fails skips its phase as a whole (the workloads do not run). The whole run is
# also bounded by FASTDIFF_CHECK_BUDGET (default 540 s): a phase gets min(its cap, time left
# less the report's cap) and is skipped when that is under 5 s.
#
# $OUT (default ./out) receives 7 files, rewritten after EVERY phase so that a call cut short
# still brings back what ran (the device tool brings back at most 8, no deeper than 2 folders,
# names of letters, digits and ._- only):
#   report.md  summary.txt  versions.txt  tests.log  build.log  ncu_summary.md
#   <YYYY-MM-DD>_<gpu>.tar.gz   the folder <YYYY-MM-DD>_<gpu>/ with everything: raw pytest-benchmark
#                               JSON (bench/), logs (logs/), ncu reports and CSVs (ncu/), plots/,
#                               report.md, summary.txt, versions.txt, commit.txt -- unpack it into
#                               benchmarks/results/ as it is.
#
# Knobs: OUT, PYTHON (default python3), FASTDIFF_CHECK_BUDGET, FASTDIFF_COMMIT,
# NCU_PROVIDERS (default cuda,triton), NCU_REGEX_SOLVER_STEP, NCU_REGEX_GROUP_NORM_SILU.

set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$PWD
PY=${PYTHON:-python3}

# ---------------------------------------------------------------- the plan
# Phases in priority order; DEFAULT=0: only when named in --phases.
PHASES=(versions build tests tests:triton bench:copy bench:solver_step bench:group_norm_silu
        bench:sampling bench:diffusers bench:attention bench:unet bench:generate compile compile:unet compile:sample ncu)
declare -A CAP=([setup]=25 [versions]=10 [build]=100 [tests]=50 [tests:triton]=50 [bench:copy]=15
  [bench:solver_step]=25 [bench:group_norm_silu]=25 [bench:sampling]=45 [bench:diffusers]=40 [bench:attention]=35
  [bench:unet]=20 [bench:generate]=20 [compile]=20 [compile:unet]=150 [compile:sample]=390 [ncu]=45 [report]=15)
declare -A DEFAULT=([compile:unet]=0 [compile:sample]=0)
declare -A WHAT=([setup]="GPU probe and result naming (always runs)"
  [versions]="driver, toolkit and library versions; commit"
  [build]="pip install -e . with the CUDA kernels for this GPU"
  [tests]="GPU tests: CUDA kernels and CUDA graphs"
  [tests:triton]="GPU tests: Triton kernels on the GPU"
  [bench:copy]="copy/add bandwidth baselines" [bench:solver_step]="fused solver step"
  [bench:group_norm_silu]="fused GroupNorm+SiLU" [bench:sampling]="sampling: eager vs fused vs graph"
  [bench:diffusers]="SD-1.5-config diffusers U-Net: diffusers' loop vs fastdiff (optimize + fused + graph)"
  [bench:attention]="attention and linear_residual" [bench:unet]="U-Net forward: eager vs fused"
  [bench:generate]="fastdiff.generate vs a plain sample() loop (digits model)"
  [compile]="torch.compile providers of the kernel benchmarks, largest size (after a probe)"
  [compile:unet]="torch.compile U-Net forward, largest workload (after a probe)"
  [compile:sample]="max-autotune sampling, largest workload (after a probe)"
  [ncu]="Nsight Compute on solver_step and group_norm_silu (after a probe)"
  [report]="markdown report, plots, phase table (always runs)")

usage() { sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }
PLAN_ONLY=0
SELECT=""
while (( $# )); do
  case $1 in
    --plan) PLAN_ONLY=1 ;;
    --phases) (( $# > 1 )) || { echo "gpu_check.sh: --phases needs a list of phases" >&2; exit 2; }
              SELECT=$2; shift ;;
    --phases=*) SELECT=${1#--phases=} ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (expected --plan, --phases LIST or --help)" >&2; exit 2 ;;
  esac
  shift
done

declare -A RUN=()
if [ -z "$SELECT" ]; then
  for ph in "${PHASES[@]}"; do [ "${DEFAULT[$ph]:-1}" = 1 ] && RUN[$ph]=1; done
else
  for want in $(echo "$SELECT" | tr ',' ' '); do
    hit=0
    for ph in "${PHASES[@]}"; do
      if [ "$ph" = "$want" ] || { [[ "$ph" == "$want:"* ]] && [ "${DEFAULT[$ph]:-1}" = 1 ]; }; then
        RUN[$ph]=1; hit=1
      fi
    done
    (( hit )) || { echo "gpu_check.sh: --phases: unknown phase '$want' (phases: ${PHASES[*]})" >&2; exit 2; }
  done
fi
ORDER=(setup)
for ph in "${PHASES[@]}"; do [ -n "${RUN[$ph]:-}" ] && ORDER+=("$ph"); done
ORDER+=(report)
BUDGET=${FASTDIFF_CHECK_BUDGET:-540}

if (( PLAN_ONLY )); then
  total=0
  printf '%-22s %6s  %s\n' phase cap_s what
  for ph in "${ORDER[@]}"; do
    printf '%-22s %6s  %s\n' "$ph" "${CAP[$ph]}" "${WHAT[$ph]}"
    total=$((total + ${CAP[$ph]}))
  done
  (( total > BUDGET )) && echo "note: over FASTDIFF_CHECK_BUDGET=$BUDGET s: the last phases get what is left, or are skipped"
  echo "total budget: $total s"
  exit 0
fi

OUT=${OUT:-$ROOT/out}
START=$(date +%s)
DEADLINE=$((START + BUDGET))
RESERVE=${CAP[report]}   # every phase but the report leaves the report its time
PHASE_END=$DEADLINE
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
mkdir -p "$OUT"

# ---------------------------------------------------------------- setup: naming <date>_<gpu>
# one torch import: "1 <device name>" when torch sees a GPU, "0" when not
PROBE=$(timeout "${CAP[setup]}" "$PY" -c 'import torch; ok = torch.cuda.is_available(); print(int(ok), torch.cuda.get_device_name(0) if ok else "")' 2>/dev/null)
HAVE_GPU=0; [ "${PROBE%% *}" = 1 ] && HAVE_GPU=1
GPU_NAME=""; [ "$HAVE_GPU" = 1 ] && GPU_NAME=${PROBE#* }
[ -n "$GPU_NAME" ] || GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)
GPU_SLUG=$(echo "${GPU_NAME:-nogpu}" | tr 'A-Z' 'a-z' | sed -e 's/^nvidia //' -e 's/[^a-z0-9]\{1,\}/-/g' -e 's/^-//' -e 's/-$//')
[ -n "$GPU_SLUG" ] || GPU_SLUG=nogpu
RESULT_NAME="$(date -u +%Y-%m-%d)_${GPU_SLUG}"
TMP=$(mktemp -d "${TMPDIR:-/tmp}/fastdiff_check.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
W="$TMP/$RESULT_NAME"
mkdir -p "$W/bench" "$W/logs" "$W/ncu" "$W/plots"
SUMMARY="$W/summary.txt"
printf '%-26s %-9s %6s %7s  %s\n' phase status "secs" limit note > "$SUMMARY"

record() { # record PHASE STATUS SECS LIMIT NOTE
  printf '%-26s %-9s %6s %7s  %s\n' "$1" "$2" "$3" "$4" "$5" | tee -a "$SUMMARY"
}
record setup "$([ "$HAVE_GPU" = 1 ] && echo ok || echo NOGPU)" $(( $(date +%s) - START )) "${CAP[setup]}" \
  "${GPU_NAME:-torch sees no GPU}; phases: ${ORDER[*]}"

# run_step NAME CAP LOG CMD...: CMD under timeout min(CAP, time left in the phase, time left in
# the run less RESERVE), output appended to LOG, recorded in summary.txt; returns CMD's status
run_step() {
  local name=$1 cap=$2 log=$3
  shift 3
  local now t
  now=$(date +%s)
  t=$cap
  (( t > PHASE_END - now )) && t=$((PHASE_END - now))
  (( t > DEADLINE - RESERVE - now )) && t=$((DEADLINE - RESERVE - now))
  if (( t < 5 )); then
    record "$name" SKIPPED 0 "$t" "no time left in the phase or the ${BUDGET}s budget"
    return 99
  fi
  local rc dt status note=""
  timeout -s INT -k 5 "$t" "$@" >>"$log" 2>&1
  rc=$?
  dt=$(( $(date +%s) - now ))
  case $rc in
    0) status=ok ;;
    124|137) status=TIMEOUT; note="killed at the ${t}s limit" ;;
    *) status=FAILED; note="exit $rc" ;;
  esac
  record "$name" "$status" "$dt" "$t" "$note${note:+; }log $(basename "$log")"
  return $rc
}

# ---------------------------------------------------------------- collect into $OUT (7 files)
# Called after every phase: what ran so far is in $OUT even if the call is cut short later.
collect() {
  {
    if [ -s "$W/logs/report_body.md" ]; then cat "$W/logs/report_body.md"
    else printf '# fastdiff GPU check: %s\n\nNo benchmark report (yet; see the phase table below).\n' "$RESULT_NAME"; fi
    printf '\n## GPU check phases\n\n```\n'
    cat "$W/commit.txt" "$SUMMARY"
    printf '```\n\n'
    cat "$W/ncu_summary.md"
  } >"$W/report.md"
  cp "$W/report.md" "$SUMMARY" "$W/ncu_summary.md" "$OUT/"
  if [ -f "$W/versions.txt" ]; then cp "$W/versions.txt" "$OUT/"; else cp "$W/commit.txt" "$OUT/versions.txt"; fi
  local t
  for t in tests tests_triton; do [ -f "$W/logs/$t.log" ] && tail -n 1500 "$W/logs/$t.log"; done >"$OUT/tests.log"
  [ -s "$OUT/tests.log" ] || rm -f "$OUT/tests.log"
  [ -f "$W/logs/build.log" ] && tail -n 400 "$W/logs/build.log" >"$OUT/build.log"
  local tarball="$OUT/$RESULT_NAME.tar.gz"
  tar -czf "$tarball.part" -C "$TMP" "$RESULT_NAME" 2>/dev/null
  if [ "$(stat -c %s "$tarball.part" 2>/dev/null || echo 0)" -gt 15000000 ]; then # .ncu-rep can be large
    tar -czf "$tarball.part" -C "$TMP" --exclude='*.ncu-rep' "$RESULT_NAME" 2>/dev/null
  fi
  mv -f "$tarball.part" "$tarball"
}

NCU=$(command -v ncu 2>/dev/null || ls /usr/local/cuda/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -n1)

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
printf '## Nsight Compute summary\n\nNo Nsight Compute profile in this run (see summary.txt for why).\n' >"$W/ncu_summary.md"
collect

# ---------------------------------------------------------------- phases
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

phase_versions() {
  export -f versions_cmd; export W RESULT_NAME NCU PY
  run_step versions "${CAP[versions]}" "$W/versions.txt" bash -c versions_cmd
}

phase_build() {
  local log="$W/logs/build.log"
  if [ "$HAVE_GPU" = 1 ]; then
    local cc major minor suffix=""
    cc=$(timeout 30 "$PY" -c 'import torch; p = torch.cuda.get_device_capability(); print(f"{p[0]}.{p[1]}")' 2>/dev/null)
    major=${cc%%.*}; minor=${cc##*.}
    [ "${major:-0}" -ge 9 ] && suffix=a     # sm_90a / sm_100a: wgmma, setmaxnreg, TMA
    # setup.py / csrc/build_flags.py read FASTDIFF_CUDA_ARCHS (and FASTDIFF_WITH_CUDA=1 makes a
    # build without the CUDA kernels an error); CUDAARCHS and TORCH_CUDA_ARCH_LIST are the CMake
    # and torch spellings of the same choice, for builds that read those.
    export FASTDIFF_CUDA_ARCHS="sm_${major}${minor}${suffix}" FASTDIFF_WITH_CUDA=1
    export CUDAARCHS="${major}${minor}${suffix}" TORCH_CUDA_ARCH_LIST="${major}.${minor}${suffix}"
    echo "build: GPU capability $cc -> FASTDIFF_CUDA_ARCHS=$FASTDIFF_CUDA_ARCHS" | tee -a "$log"
  else
    echo "build: no GPU visible to torch; default arch list, CUDA kernels only if a toolkit is found" | tee -a "$log"
  fi
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  run_step build "${CAP[build]}" "$log" "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e . \
    && run_step "build:info" 20 "$log" "$PY" -c 'import fastdiff; print(fastdiff.info())'
  tail -n 3 "$log"
}

TEST_FILES=(tests/test_solver_step.py tests/test_group_norm_silu.py tests/test_attention.py
            tests/test_linear_residual.py tests/test_graphs.py tests/test_sample_fused.py tests/test_fused_unet.py)
phase_tests() { # phase_tests NAME LOGNAME KEYWORDS
  run_step "$1" "${CAP[$1]}" "$W/logs/$2.log" "$PY" -m pytest "${TEST_FILES[@]}" -m gpu -k "$3" -q -rs \
    -p no:cacheprovider --durations=15 --junitxml="$W/logs/$2.xml"
  echo "$1: $(tail -n 1 "$W/logs/$2.log" 2>/dev/null)"
}

# bench_run NAME JSON FILES...: the benchmark files under pytest-benchmark, JSON kept in bench/
bench_run() {
  local name=$1 json=$2
  shift 2
  run_step "$name" "${CAP[$name]}" "$W/logs/${json}.log" "$PY" -m pytest "$@" -q -p no:cacheprovider \
    --benchmark-json="$W/bench/${json}.json" --benchmark-group-by=group --benchmark-columns=median,iqr,rounds,iterations
}

phase_bench() { # phase_bench FILE-STEM
  local f="benchmarks/bench_$1.py"
  if [ ! -f "$f" ]; then record "bench:$1" SKIPPED 0 0 "$f does not exist"; return; fi
  FASTDIFF_BENCH_SKIP_PROVIDERS=compile bench_run "bench:$1" "bench_$1" "$f"
}

# probe NAME CMD...: run once per script (cached); 0 when CMD succeeded
declare -A PROBED=()
probe() {
  local name=$1
  shift
  if [ -z "${PROBED[$name]:-}" ]; then
    run_step "$name" 20 "$W/logs/$name.log" "$@"
    PROBED[$name]=$?
  fi
  return "${PROBED[$name]}"
}

compile_probe_cmd() {
  "$PY" -c 'import torch
f = torch.compile(lambda x: torch.sin(x) * 2 + 1)
x = torch.randn(4096, device="cuda")
torch.testing.assert_close(f(x), torch.sin(x) * 2 + 1)
print("torch.compile probe: ok")'
}

phase_compile() { # phase_compile NAME JSON FILES...
  local name=$1
  if [ "$HAVE_GPU" != 1 ]; then record "$name" SKIPPED 0 0 "no GPU visible to torch"; return; fi
  export -f compile_probe_cmd; export PY
  if ! probe compile-probe bash -c compile_probe_cmd; then
    record "$name" SKIPPED 0 0 "the torch.compile probe failed (logs/compile-probe.log)"
    return
  fi
  FASTDIFF_BENCH_PROVIDERS=compile FASTDIFF_BENCH_SIZES=largest bench_run "$@"
}

# the metrics fastdiff/bench/ncu.py summarises (NCU_METRICS there), besides the two sections
NCU_METRICS=gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,gpu__compute_memory_throughput.avg.pct_of_peak_sustained_elapsed,sm__throughput.avg.pct_of_peak_sustained_elapsed
ncu_target() { # ncu_target OP REGEX
  local op=$1 regex=$2 f="benchmarks/bench_$1.py" rep="$W/ncu/ncu_$1"
  local common=(--clock-control none --target-processes all --kernel-name "regex:${regex}"
                --section SpeedOfLight --section MemoryWorkloadAnalysis --metrics "$NCU_METRICS" -f)
  local workload=(env FASTDIFF_BENCH_PROFILE=1 FASTDIFF_BENCH_SIZES=largest
                  FASTDIFF_BENCH_PROVIDERS="${NCU_PROVIDERS:-cuda,triton}"
                  "$PY" -m pytest "$f" -q -p no:cacheprovider --benchmark-disable)
  run_step "ncu:$op" 20 "$W/logs/ncu_$op.log" "$NCU" "${common[@]}" --nvtx --nvtx-include "fastdiff_profile/" \
    --launch-count 8 -o "$rep" "${workload[@]}"
  if [ ! -s "$rep.ncu-rep" ]; then # nothing matched inside the NVTX range: retry without it
    run_step "ncu:$op (no NVTX filter)" 15 "$W/logs/ncu_$op.log" "$NCU" "${common[@]}" --launch-count 8 \
      -o "$rep" "${workload[@]}"
  fi
  if [ -s "$rep.ncu-rep" ]; then
    timeout 20 "$NCU" -i "$rep.ncu-rep" --csv --page raw --print-units base >"$W/ncu/$op.csv" 2>>"$W/logs/ncu_$op.log" \
      || timeout 20 "$NCU" -i "$rep.ncu-rep" --csv --page raw >"$W/ncu/$op.csv" 2>>"$W/logs/ncu_$op.log"
    timeout 20 "$NCU" -i "$rep.ncu-rep" --page details >"$W/ncu/${op}_details.txt" 2>>"$W/logs/ncu_$op.log"
  else
    record "ncu:$op" NOREPORT 0 0 "no kernel matched regex:${regex} (logs/ncu_$op.log)"
  fi
}

ncu_probe_cmd() { # a report with one profiled kernel, or failure
  "$NCU" --target-processes all --launch-count 1 -f -o "$W/ncu/probe" \
    "$PY" -c 'import torch; torch.ones(8, device="cuda").add_(1); torch.cuda.synchronize()' && [ -s "$W/ncu/probe.ncu-rep" ]
}

phase_ncu() {
  if [ -z "$NCU" ]; then record ncu SKIPPED 0 0 "ncu (Nsight Compute) not found on this machine"; return; fi
  if [ "$HAVE_GPU" != 1 ]; then record ncu SKIPPED 0 0 "no GPU visible to torch"; return; fi
  export -f ncu_probe_cmd; export NCU W PY
  if ! probe ncu-probe bash -c ncu_probe_cmd; then
    record ncu SKIPPED 0 0 "the ncu probe failed (logs/ncu-probe.log): no profile in this sandbox"
    return
  fi
  rm -f "$W/ncu/probe.ncu-rep"
  ncu_target solver_step "${NCU_REGEX_SOLVER_STEP:-[Ss]olver}"
  ncu_target group_norm_silu "${NCU_REGEX_GROUP_NORM_SILU:-[Gg]roup_?[Nn]orm|gn_silu|[Gg]n[Ss]ilu}"
  shopt -s nullglob
  local csvs=("$W"/ncu/*.csv)
  shopt -u nullglob
  if (( ${#csvs[@]} )); then
    timeout 20 "$PY" -m fastdiff.bench ncu-summary "${csvs[@]}" -o "$W/ncu_summary.md" 2>>"$W/logs/ncu_summary.log" \
      || echo "ncu-summary failed (see logs/ncu_summary.log)" >"$W/ncu_summary.md"
  fi
}

phase_report() {
  RESERVE=0
  shopt -s nullglob
  local jsons=("$W"/bench/*.json)
  shopt -u nullglob
  if (( ${#jsons[@]} )); then
    run_step report "${CAP[report]}" "$W/logs/report.log" "$PY" -m fastdiff.bench report "${jsons[@]}" \
      -o "$W/logs/report_body.md" --plots "$W/plots" --title "fastdiff GPU check: $RESULT_NAME"
  else
    record report SKIPPED 0 0 "no benchmark JSON was written"
  fi
}

for ph in "${ORDER[@]:1}"; do
  PHASE_END=$(( $(date +%s) + ${CAP[$ph]} ))
  case $ph in
    versions) phase_versions ;;
    build) phase_build ;;
    tests) phase_tests tests tests "not triton" ;;
    tests:triton) phase_tests tests:triton tests_triton triton ;;
    bench:*) phase_bench "${ph#bench:}" ;;
    compile) phase_compile compile compile benchmarks/bench_solver_step.py benchmarks/bench_group_norm_silu.py \
               benchmarks/bench_attention.py ;;
    compile:unet) phase_compile compile:unet compile_unet benchmarks/bench_unet.py ;;
    compile:sample) phase_compile compile:sample compile_sample benchmarks/bench_sampling.py ;;
    ncu) phase_ncu ;;
    report) phase_report ;;
  esac
  [ "$ph" = report ] && record total "" $(( $(date +%s) - START )) "$BUDGET" "$RESULT_NAME"
  collect
done

echo
echo "==================== $OUT/report.md ===================="
cat "$OUT/report.md"
