#!/usr/bin/env bash
# fastdiff: the one-call GPU check (DESIGN.md section 8; results naming: benchmarks/results/README.md).
#
# On a bare GPU machine with no network (its stack: benchmarks/gpu_stack.py -- Python 3.12,
# torch 2.11.0+cu130, triton 3.6.0, transformers, pytest, pytest-benchmark, hypothesis, nvcc,
# compute-sanitizer, ncu), from anywhere:
#
#     FASTDIFF_COMMIT=<sha of the tree you sent> bash benchmarks/gpu_check.sh [--phases LIST] [--plan] [--rehearse]
#
# What the GPU machine lacks travels as wheels in the ignored folder .whl/ of the working tree
# (diffusers and what importing it needs, ninja; 14.5 MiB, the carry limit is 64 MiB), fetched
# here, before the call, with the command `python3 benchmarks/gpu_stack.py fetch-command` prints:
#
#     pip download --no-deps --python-version 3.12 --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#         --only-binary=:all: -d .whl diffusers==0.42.1 pillow==13.0.0 requests==2.34.2 urllib3==2.8.0 idna==3.21 \
#         charset-normalizer==3.5.3 certifi==2026.10.19.post1 ninja==1.13.2 huggingface-hub==1.33.0
#
# (`python3 benchmarks/gpu_stack.py check-wheels .whl` checks the folder), and the call carries it
# (the device tool's carry: [".whl"]). The build phase installs from it, offline and without
# dependencies, only what the machine is missing (benchmarks/gpu_stack.py install-plan).
#
#   --plan          print the phases that would run, each with its time cap, and a last line
#                   "total budget: N s" (N <= 540: the default run fits one 10-minute call with
#                   room to spare), then exit without running anything
#   --phases LIST   run only these phases (comma or space separated), still in the order below;
#                   a name selects that phase, a prefix selects its default sub-phases ("bench":
#                   every default bench:*, "sanitize": memcheck and racecheck). For a second call
#                   that finishes what the first could not, e.g. on the same machine (still
#                   built): --phases bench:sampling,bench:attention,bench:unet; on a fresh one
#                   add build first.
#   --rehearse      on any machine, no GPU needed (CI runs it): every selected phase's setup with
#                   the GPU work left out, under the GPU machine's packages (Python runs as
#                   `python -S` on links to this machine's packages that the GPU machine has plus
#                   the carried ones: benchmarks/gpu_stack.py view), so that the script cannot fail
#                   on its first real run for a missing file, a wrong path, a bash error or a
#                   missing module: each pytest command runs with --collect-only (an empty
#                   selection, a collection error or a file skipped at import fails), pip with
#                   --dry-run, compute-sanitizer (when it is here) parses its options on
#                   /bin/true, .whl/ is checked when present, the rest (versions, build flags,
#                   fastdiff.info, the carried packages' imports) runs as it is. Results go to
#                   $OUT as in a real run; the GPU is taken to be an H100 (sm_90a).
#
# Phases in priority order, caps in seconds (each runs under `timeout`; a failure, timeout or
# skip is recorded in summary.txt and the script goes on; the reasoning behind each cap:
# benchmarks/NOTES.md, "gpu_check: the plan"):
#
#   setup              GPU probe (torch) and the result's name; always runs                    20
#   versions           nvidia-smi, driver, nvcc, python/torch/triton/CUDA, ncu, compute-sanitizer,
#                      the carried wheels; commit; source hash                                   10
#   build              the wheels .whl/ holds that the machine lacks (pip install --no-index
#                      --no-deps), their check (gpu_stack.py verify), the compile flags, then
#                      pip install --no-build-isolation --no-deps -e . for the detected GPU arch
#                      (FASTDIFF_CUDA_ARCHS=sm_<cc>[a], FASTDIFF_WITH_CUDA=1), fastdiff.info()     90
#   tests              pytest -m gpu -k "not triton": the CUDA-kernel and CUDA-graph tests of
#                      test_solver_step, test_group_norm_silu, test_attention,
#                      test_linear_residual, test_graphs, test_sample_fused, test_fused_unet     45
#   bench:diffusers    the headline: an SD-1.5-config diffusers U-Net (fp16, CFG, batch 1, 64x64
#                      latent) at 8 and 20 steps, diffusers' own loop (eager) vs fastdiff fused vs
#                      fastdiff fused + whole-loop CUDA graph, ms per image and it/s, one process 80
#   sanitize:memcheck  compute-sanitizer memcheck over the CUDA kernels' GPU test cases
#                      (test_solver_step, test_group_norm_silu: -k "cuda and not triton and not
#                      graph"), only fastdiff's kernels instrumented, PyTorch's caching allocator
#                      off (so that every tensor is its own allocation and an overrun is caught) 50
#   sanitize:racecheck compute-sanitizer racecheck, the same for the kernel that shares memory
#                      between threads (test_group_norm_silu)                                    35
#   tests:triton       pytest -m gpu -k triton: the Triton-on-GPU cases, one pytest per file at
#                      once (each cold Triton compile runs on one core)                          60
#   bench:<file>       pytest benchmarks/bench_<file>.py without the torch.compile providers
#                      (FASTDIFF_BENCH_SKIP_PROVIDERS=compile): the memory-bound kernels against
#                      the copy bandwidth (copy 15, solver_step 25, group_norm_silu 25)
#   compile            probe (torch.compile of a tiny function); if it passes, the torch.compile
#                      providers of bench_solver_step, bench_group_norm_silu and bench_attention at
#                      their largest size, one pytest run                                         25
#   ncu                probe (ncu on one trivial kernel, <= 20 s); if it passes, Nsight Compute
#                      (SpeedOfLight + MemoryWorkloadAnalysis + DRAM bytes/throughput) on the
#                      fused solver step and GroupNorm+SiLU kernels via their benchmark files in
#                      profile mode (FASTDIFF_BENCH_PROFILE=1, largest size, NCU_PROVIDERS)       45
#   report             python -m fastdiff.bench report over all JSONs (+ plots when matplotlib
#                      is there) with the phase table and ncu summary appended; always runs,
#                      printed LAST                                                              15
#
# Not in the default run (name them in --phases; a second call):
#   bench:sampling     fastdiff's own U-Net sampling: eager vs fused vs graph                    45
#   bench:attention    attention and linear_residual                                             35
#   bench:unet         U-Net forward: eager vs fused                                             20
#   bench:transformers diffusers SD3 / Flux transformer forward: diffusers vs fastdiff.optimize    45
#   bench:layer_norm_modulate  adaLN LayerNorm + modulation at SD3 / Flux widths: eager vs Triton  20
#   bench:generate     fastdiff.generate vs a plain sample() loop (digits model)                 20
#   compile:unet       torch.compile of the U-Net forward, largest workload (bench_unet)        150
#   compile:sample     torch.compile(mode="max-autotune") sampling, largest workload            390
#
# A probe that fails skips its phase as a whole (the workloads do not run); so does a module
# the phase needs that is not installed (bench:diffusers: diffusers, from .whl/). The whole run
# is also bounded by FASTDIFF_CHECK_BUDGET (default 540 s): a phase gets min(its cap, time left
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
# Knobs: OUT, PYTHON (default python3), FASTDIFF_CHECK_BUDGET, FASTDIFF_COMMIT, FASTDIFF_WHEELS (default .whl),
# NCU_PROVIDERS (default cuda,triton), NCU_REGEX_SOLVER_STEP, NCU_REGEX_GROUP_NORM_SILU,
# COMPUTE_SANITIZER (its path, when not on PATH or in /usr/local/cuda/bin), FASTDIFF_REHEARSE_SCALE
# (--rehearse: caps and budget times this, default 5).

set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.." || exit 1
ROOT=$PWD
PY=${PYTHON:-python3}

# ---------------------------------------------------------------- the plan
# Phases in priority order; DEFAULT=0: only when named in --phases.
PHASES=(versions build tests bench:diffusers sanitize:memcheck sanitize:racecheck tests:triton bench:copy
        bench:solver_step bench:group_norm_silu bench:sampling bench:attention bench:unet bench:transformers
        bench:layer_norm_modulate bench:generate compile compile:unet compile:sample ncu)
declare -A CAP=([setup]=20 [versions]=10 [build]=90 [tests]=45 [bench:diffusers]=80 [sanitize:memcheck]=50
  [sanitize:racecheck]=35 [tests:triton]=60 [bench:copy]=15 [bench:solver_step]=25 [bench:group_norm_silu]=25
  [bench:sampling]=45 [bench:attention]=35 [bench:unet]=20 [bench:transformers]=45 [bench:layer_norm_modulate]=20 [bench:generate]=20 [compile]=25 [compile:unet]=150
  [compile:sample]=390 [ncu]=45 [report]=15)
declare -A DEFAULT=([bench:sampling]=0 [bench:attention]=0 [bench:unet]=0 [bench:transformers]=0
  [bench:layer_norm_modulate]=0 [bench:generate]=0
  [compile:unet]=0 [compile:sample]=0)
declare -A WHAT=([setup]="GPU probe and result naming (always runs)"
  [versions]="driver, toolkit and library versions, carried wheels; commit"
  [build]="carried wheels; pip install -e . with the CUDA kernels for this GPU"
  [tests]="GPU tests: CUDA kernels and CUDA graphs"
  [bench:diffusers]="headline: SD-1.5-config diffusers U-Net, diffusers' loop vs fastdiff fused vs + CUDA graph"
  [sanitize:memcheck]="compute-sanitizer memcheck over the CUDA kernels' GPU tests"
  [sanitize:racecheck]="compute-sanitizer racecheck over the shared-memory kernel's GPU tests"
  [tests:triton]="GPU tests: Triton kernels on the GPU, one pytest per file"
  [bench:copy]="copy/add bandwidth baselines" [bench:solver_step]="fused solver step"
  [bench:group_norm_silu]="fused GroupNorm+SiLU" [bench:sampling]="sampling: eager vs fused vs graph"
  [bench:attention]="attention and linear_residual" [bench:unet]="U-Net forward: eager vs fused"
  [bench:transformers]="diffusers SD3 / Flux transformer forward: diffusers vs fastdiff.optimize"
  [bench:layer_norm_modulate]="fused adaLN LayerNorm + modulation (SD3 / Flux widths)"
  [bench:generate]="fastdiff.generate vs a plain sample() loop (digits model)"
  [compile]="torch.compile providers of the kernel benchmarks, largest size (after a probe)"
  [compile:unet]="torch.compile U-Net forward, largest workload (after a probe)"
  [compile:sample]="max-autotune sampling, largest workload (after a probe)"
  [ncu]="Nsight Compute on solver_step and group_norm_silu (after a probe)"
  [report]="markdown report, plots, phase table (always runs)")
# Python modules a phase imports that the GPU machine gets only from .whl/: without them the
# phase is skipped, saying so (instead of pytest skipping every benchmark quietly).
declare -A NEEDS=([bench:diffusers]=diffusers [bench:transformers]=diffusers)

usage() { sed -n '2,/^$/s/^# \{0,1\}//p' "${BASH_SOURCE[0]}"; }
PLAN_ONLY=0
REHEARSE=0
SELECT=""
while (( $# )); do
  case $1 in
    --plan) PLAN_ONLY=1 ;;
    --rehearse) REHEARSE=1 ;;
    --phases) (( $# > 1 )) || { echo "gpu_check.sh: --phases needs a list of phases" >&2; exit 2; }
              SELECT=$2; shift ;;
    --phases=*) SELECT=${1#--phases=} ;;
    -h|--help) usage; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument '$1' (expected --plan, --phases LIST, --rehearse or --help)" >&2; exit 2 ;;
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
  printf '%-25s %6s  %s\n' phase cap_s what
  for ph in "${ORDER[@]}"; do
    printf '%-25s %6s  %s\n' "$ph" "${CAP[$ph]}" "${WHAT[$ph]}"
    total=$((total + ${CAP[$ph]}))
  done
  (( total > BUDGET )) && echo "note: over FASTDIFF_CHECK_BUDGET=$BUDGET s: the last phases get what is left, or are skipped"
  echo "total budget: $total s"
  exit 0
fi

OUT=${OUT:-$ROOT/out}
if (( REHEARSE )); then
  # A rehearsal checks that every step runs, not how long it takes: a 2-core CPU machine, busy
  # or not, imports and collects several times slower than the 16-core GPU machine, so its caps
  # and budget are scaled (FASTDIFF_REHEARSE_SCALE, default 5; once, a loaded CI machine took
  # more than the 10 s versions cap to import torch and diffusers).
  scale=${FASTDIFF_REHEARSE_SCALE:-5}
  for ph in "${!CAP[@]}"; do CAP[$ph]=$(( CAP[$ph] * scale )); done
  BUDGET=$(( BUDGET * scale ))
fi
START=$(date +%s)
DEADLINE=$((START + BUDGET))
RESERVE=${CAP[report]}   # every phase but the report leaves the report its time
PHASE_END=$DEADLINE
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
mkdir -p "$OUT"

# ---------------------------------------------------------------- setup: naming <date>_<gpu>
TMP=$(mktemp -d "${TMPDIR:-/tmp}/fastdiff_check.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
if (( REHEARSE )); then
  # Python as the GPU machine has it: no site hooks, only the packages it has plus the carried
  # ones (links to this machine's copies), so that a module it lacks fails here.
  real_py=$("$PY" -c 'import sys; print(sys.executable)') && [ -n "$real_py" ] \
    || { echo "gpu_check.sh: --rehearse: $PY does not run" >&2; exit 1; }
  "$PY" benchmarks/gpu_stack.py view "$TMP/gpu-site" >"$TMP/gpu-site.log" 2>&1 \
    || { cat "$TMP/gpu-site.log" >&2; echo "gpu_check.sh: --rehearse: benchmarks/gpu_stack.py view failed" >&2; exit 1; }
  printf '#!/usr/bin/env bash\nPYTHONPATH=%q exec %q -S "$@"\n' "$TMP/gpu-site" "$real_py" >"$TMP/python"
  chmod +x "$TMP/python"
  PY="$TMP/python"
fi
# one torch import: "1 <device name>" when torch sees a GPU, "0" when not
PROBE=$(timeout "${CAP[setup]}" "$PY" -c 'import torch; ok = torch.cuda.is_available(); print(int(ok), torch.cuda.get_device_name(0) if ok else "")' 2>/dev/null)
HAVE_GPU=0; [ "${PROBE%% *}" = 1 ] && HAVE_GPU=1
GPU_NAME=""; [ "$HAVE_GPU" = 1 ] && GPU_NAME=${PROBE#* }
if (( REHEARSE )); then # the GPU work is left out: take the GPU as there
  [ -n "$PROBE" ] || { echo "gpu_check.sh: --rehearse: torch does not import under the GPU machine's packages" >&2; exit 1; }
  HAVE_GPU=1; GPU_NAME=rehearsal
fi
[ -n "$GPU_NAME" ] || GPU_NAME=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n1)
GPU_SLUG=$(echo "${GPU_NAME:-nogpu}" | tr 'A-Z' 'a-z' | sed -e 's/^nvidia //' -e 's/[^a-z0-9]\{1,\}/-/g' -e 's/^-//' -e 's/-$//')
[ -n "$GPU_SLUG" ] || GPU_SLUG=nogpu
RESULT_NAME="$(date -u +%Y-%m-%d)_${GPU_SLUG}"
W="$TMP/$RESULT_NAME"
mkdir -p "$W/bench" "$W/logs" "$W/ncu" "$W/plots"
SUMMARY="$W/summary.txt"
printf '%-26s %-9s %6s %7s  %s\n' phase status "secs" limit note > "$SUMMARY"

record() { # record PHASE STATUS SECS LIMIT NOTE
  printf '%-26s %-9s %6s %7s  %s\n' "$1" "$2" "$3" "$4" "$5" | tee -a "$SUMMARY"
}
record setup "$([ "$HAVE_GPU" = 1 ] && echo ok || echo NOGPU)" $(( $(date +%s) - START )) "${CAP[setup]}" \
  "${GPU_NAME:-torch sees no GPU}$( ((REHEARSE)) && echo " (no GPU used; taken to be an H100, sm_90a)"); phases: ${ORDER[*]}"

# run_step NAME CAP LOG CMD...: CMD under timeout min(CAP, time left in the phase, time left in
# the run less RESERVE), output appended to LOG, recorded in summary.txt; returns CMD's status.
# With --rehearse, CMD's stand-in runs instead (rehearse_cmd, below).
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
  if (( REHEARSE )); then
    timeout -s INT -k 5 "$t" bash -c 'rehearse_cmd "$@"' rehearse "$@" >>"$log" 2>&1
  else
    timeout -s INT -k 5 "$t" "$@" >>"$log" 2>&1
  fi
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

# --rehearse: what runs instead of a phase's command. A GPU tool leading it (ncu,
# compute-sanitizer) parses its options where it is here; then a pytest run collects only
# (failing on a file skipped at import), pip runs with --dry-run, anything else as it is.
rehearse_cmd() {
  local args=("$@") i=0
  while (( i < $# )) && [ "${args[i]}" != env ] && [ "${args[i]}" != "$PY" ]; do i=$((i + 1)); done
  if (( i == $# )); then "$@"; return; fi
  if (( i > 0 )); then rehearse_tool "${args[@]:0:i}" || return; fi
  local rest=("${args[@]:i}")
  case " ${rest[*]} " in
    *" -m pytest "*) rehearse_pytest "${rest[@]}" ;;
    *" -m pip install "*) "${rest[@]}" --dry-run ;;
    *) "${rest[@]}" ;;
  esac
}
rehearse_tool() {
  local out
  if [ "$(basename "$1")" != compute-sanitizer ] || ! command -v "$1" >/dev/null; then
    echo "rehearsal: $(basename "$1"): options not parsed (not on this machine, or no dry run)"
    return 0
  fi
  out=$("$@" /bin/true 2>&1)
  echo "$out"
  grep -q "before first instrumented API call" <<<"$out" || { echo "rehearsal: $1 rejected these options"; return 1; }
}
rehearse_pytest() {
  local out rc
  out=$("$@" --collect-only -rs 2>&1)
  rc=$?
  echo "$out"
  (( rc == 0 )) || return "$rc"
  if grep -q '^SKIPPED' <<<"$out"; then echo "rehearsal: a test file is skipped at import (above)"; return 1; fi
}
export -f rehearse_cmd rehearse_tool rehearse_pytest
export PY

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
  for t in "$W"/logs/tests.log "$W"/logs/sanitize_*.log "$W"/logs/tests_triton_*.log; do
    [ -f "$t" ] && { echo "==> logs/$(basename "$t")"; tail -n 500 "$t"; }
  done >"$OUT/tests.log"
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
SANITIZER=${COMPUTE_SANITIZER:-$(command -v compute-sanitizer 2>/dev/null || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null)}
WHEELS=${FASTDIFF_WHEELS:-.whl}

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
  echo "== compute-sanitizer"; if [ -n "$SANITIZER" ]; then "$SANITIZER" --version 2>&1; else echo "compute-sanitizer: not found"; fi
  echo "== carried wheels ($WHEELS/)"; ls -l "$WHEELS"/*.whl 2>/dev/null || echo "none"
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
for mod in ("triton", "pytest", "pytest_benchmark", "hypothesis", "numpy", "transformers", "huggingface_hub",
            "diffusers", "PIL", "ninja", "pybind11", "matplotlib"):
    try:
        m = __import__(mod)
        print(mod, getattr(m, "__version__", "?"))
    except Exception as exc:
        print(mod, "missing:", type(exc).__name__)
PYEOF
}

phase_versions() {
  export -f versions_cmd; export W RESULT_NAME NCU SANITIZER WHEELS
  run_step versions "${CAP[versions]}" "$W/versions.txt" bash -c versions_cmd
}

# build_wheels LOG: the carried wheels checked against this commit's pins, those the machine
# lacks installed offline without their dependencies (gpu_stack.py install-plan), ninja put on
# PATH, and what the phases import from them checked (gpu_stack.py verify)
build_wheels() {
  local log=$1 plan files scripts
  if [ ! -d "$WHEELS" ]; then
    record build:wheels SKIPPED 0 0 "no $WHEELS/ in the tree (fetch: python3 benchmarks/gpu_stack.py fetch-command)"
  elif run_step build:wheels 20 "$log" "$PY" benchmarks/gpu_stack.py check-wheels "$WHEELS" && (( ! REHEARSE )); then
    # the rehearsal stops at the check: the wheels are for the GPU machine's Python
    if ! plan=$(timeout 20 "$PY" benchmarks/gpu_stack.py install-plan "$WHEELS" 2>>"$log"); then
      record build:install FAILED 0 0 "gpu_stack.py install-plan failed (logs/build.log)"
    elif [ -z "$plan" ]; then
      record build:install ok 0 0 "every carried package was there already"
    else
      mapfile -t files <<<"$plan"
      run_step build:install 60 "$log" "$PY" -m pip install --no-index --no-deps "${files[@]}"
    fi
    scripts=$(timeout 20 "$PY" -c 'import sysconfig; print(sysconfig.get_path("scripts"))') && PATH="$scripts:$PATH"
  fi
  run_step build:verify 30 "$log" "$PY" benchmarks/gpu_stack.py verify
}

phase_build() {
  local log="$W/logs/build.log"
  # The GPU machine's Python may be a distribution's, marked externally managed (PEP 668); the
  # machine is handed back bare after the call, so pip installs into it all the same.
  export PIP_BREAK_SYSTEM_PACKAGES=1
  build_wheels "$log"
  if [ "$HAVE_GPU" = 1 ]; then
    local cc major minor suffix=""
    if (( REHEARSE )); then cc=9.0  # an H100/H200
    else cc=$(timeout 30 "$PY" -c 'import torch; p = torch.cuda.get_device_capability(); print(f"{p[0]}.{p[1]}")' 2>/dev/null)
    fi
    major=${cc%%.*}; minor=${cc##*.}
    [ "${major:-0}" -ge 9 ] && suffix=a     # sm_90a / sm_100a: wgmma, setmaxnreg, TMA
    # setup.py / csrc/build_flags.py read FASTDIFF_CUDA_ARCHS (and FASTDIFF_WITH_CUDA=1 makes a
    # build without the CUDA kernels an error: left out of the rehearsal, whose torch has no
    # CUDA); CUDAARCHS and TORCH_CUDA_ARCH_LIST are the CMake and torch spellings of the same
    # choice, for builds that read those.
    export FASTDIFF_CUDA_ARCHS="sm_${major}${minor}${suffix}"
    (( REHEARSE )) || export FASTDIFF_WITH_CUDA=1
    export CUDAARCHS="${major}${minor}${suffix}" TORCH_CUDA_ARCH_LIST="${major}.${minor}${suffix}"
    echo "build: GPU capability $cc -> FASTDIFF_CUDA_ARCHS=$FASTDIFF_CUDA_ARCHS" | tee -a "$log"
  else
    echo "build: no GPU visible to torch; default arch list, CUDA kernels only if a toolkit is found" | tee -a "$log"
  fi
  export MAX_JOBS=${MAX_JOBS:-$(nproc)}
  run_step build:flags 10 "$log" "$PY" csrc/build_flags.py --print
  run_step build "${CAP[build]}" "$log" "$PY" -m pip install --no-build-isolation --no-deps --no-index -v -e . \
    && run_step "build:info" 20 "$log" "$PY" -c 'import fastdiff; print(fastdiff.info())'
  tail -n 3 "$log"
}

TEST_FILES=(tests/test_solver_step.py tests/test_group_norm_silu.py tests/test_attention.py
            tests/test_linear_residual.py tests/test_graphs.py tests/test_sample_fused.py tests/test_fused_unet.py)
phase_tests() {
  run_step tests "${CAP[tests]}" "$W/logs/tests.log" "$PY" -m pytest "${TEST_FILES[@]}" -m gpu -k "not triton" -q -rs \
    -p no:cacheprovider --durations=15 --junitxml="$W/logs/tests.xml"
  echo "tests: $(tail -n 1 "$W/logs/tests.log" 2>/dev/null)"
}

# The files with Triton-on-GPU cases, one pytest each, all at once: a cold Triton compile runs on
# one core, and these files launch ~250 kernel specialisations (benchmarks/NOTES.md).
TRITON_TEST_FILES=(tests/test_solver_step.py tests/test_group_norm_silu.py tests/test_attention.py
                   tests/test_sample_fused.py tests/test_fused_unet.py tests/test_layer_norm_modulate.py)
phase_tests_triton() {
  local f stem pids=() bad=0 t0
  t0=$(date +%s)
  for f in "${TRITON_TEST_FILES[@]}"; do
    stem=$(basename "$f" .py); stem=${stem#test_}
    run_step "tests:triton:$stem" "${CAP[tests:triton]}" "$W/logs/tests_triton_$stem.log" "$PY" -m pytest "$f" -m gpu \
      -k triton -q -rs -p no:cacheprovider --durations=5 --junitxml="$W/logs/tests_triton_$stem.xml" &
    pids+=($!)
  done
  for f in "${pids[@]}"; do wait "$f" || bad=$((bad + 1)); done
  record tests:triton "$( ((bad)) && echo FAILED || echo ok)" $(( $(date +%s) - t0 )) "${CAP[tests:triton]}" \
    "${#pids[@]} files at once, $bad not ok (rows tests:triton:<file>)"
}

# phase_sanitize NAME TOOL FILE...: the files' CUDA-kernel GPU cases under compute-sanitizer
phase_sanitize() {
  local name=$1 tool=$2
  shift 2
  if [ -z "$SANITIZER" ] && (( ! REHEARSE )); then
    record "$name" SKIPPED 0 0 "compute-sanitizer not found (set COMPUTE_SANITIZER)"; return
  fi
  if [ "$HAVE_GPU" != 1 ]; then record "$name" SKIPPED 0 0 "no GPU visible to torch"; return; fi
  # Only fastdiff's kernels are instrumented (PyTorch's own run at full speed); the caching
  # allocator is off, so that each tensor is an allocation of its own and an overrun is caught
  # (and so the CUDA-graph tests stay out: every allocation is then a cudaMalloc, which stream
  # capture forbids).
  run_step "$name" "${CAP[$name]}" "$W/logs/sanitize_$tool.log" "${SANITIZER:-compute-sanitizer}" --tool "$tool" \
    --kernel-name kns=fastdiff --error-exitcode 86 --print-limit 50 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$PY" -m pytest "$@" -m gpu -k "cuda and not triton and not graph" -q -rs -p no:cacheprovider \
    --junitxml="$W/logs/sanitize_$tool.xml"
  echo "$name: $(tail -n 1 "$W/logs/sanitize_$tool.log" 2>/dev/null)"
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
  if (( REHEARSE )) && [ -z "${PROBED[$name]:-}" ]; then
    record "$name" SKIPPED 0 0 "rehearsal: the probe needs the GPU"
    PROBED[$name]=0
  elif [ -z "${PROBED[$name]:-}" ]; then
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
  (( REHEARSE )) && return
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
  if (( REHEARSE )); then NCU=${NCU:-ncu}; fi
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

# needs_ok PHASE: 0 when the module the phase needs (NEEDS) imports; else the phase is recorded
# as skipped, saying why
needs_ok() {
  local mod=${NEEDS[$1]:-}
  [ -z "$mod" ] && return 0
  timeout 30 "$PY" -c "import $mod" >>"$W/logs/needs.log" 2>&1 && return 0
  record "$1" SKIPPED 0 0 "needs $mod, not installed (carried in $WHEELS/, installed by build; logs/needs.log)"
  return 1
}

for ph in "${ORDER[@]:1}"; do
  PHASE_END=$(( $(date +%s) + ${CAP[$ph]} ))
  needs_ok "$ph" && case $ph in
    versions) phase_versions ;;
    build) phase_build ;;
    tests) phase_tests ;;
    sanitize:memcheck) phase_sanitize sanitize:memcheck memcheck tests/test_solver_step.py tests/test_group_norm_silu.py ;;
    sanitize:racecheck) phase_sanitize sanitize:racecheck racecheck tests/test_group_norm_silu.py ;;
    tests:triton) phase_tests_triton ;;
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
# A rehearsal is a check (CI runs it): any step that failed or ran out of time fails it.
if (( REHEARSE )) && grep -qE '^[^ ]+ +(FAILED|TIMEOUT) ' "$SUMMARY"; then
  echo "gpu_check.sh --rehearse: failed: $(grep -E '^[^ ]+ +(FAILED|TIMEOUT) ' "$SUMMARY" | awk '{print $1}' | tr '\n' ' ')(logs in $OUT/$RESULT_NAME.tar.gz)" >&2
  exit 1
fi
