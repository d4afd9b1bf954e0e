#!/usr/bin/env bash
# fastdiff._C compiled and linked against the GPU machine's torch (benchmarks/gpu_stack.py:
# torch 2.11.0+cu130 on Python 3.12), here, with no GPU and without importing that torch:
#
#     bash benchmarks/check_gpu_torch_build.sh
#
# 1. pip download the torch wheel for Python 3.12 (PyPI's default Linux build of 2.11.0 is the
#    CUDA 13.0 one: torch/version.py inside it is checked) into $FASTDIFF_TORCH_DIR (default
#    ${TMPDIR:-/tmp}/fastdiff-torch-<version>-cp312; kept, ~530 MB: a second run downloads nothing)
#    and unpack its headers and the libraries an extension links to (~1 GB).
# 2. Compile every source setup.py builds (csrc/bindings.cpp, csrc/*/*.cpp with g++, csrc/*/*.cu
#    with nvcc) as torch's BuildExtension does for FASTDIFF_CUDA_ARCHS=sm_90a (what gpu_check.sh
#    builds on an H100/H200): the flags of csrc/build_flags.py, torch's own nvcc flags read from
#    that wheel's torch/utils/cpp_extension.py, its include/ and the Python 3.12 headers (from a
#    python3.12 on PATH or under pyenv; FASTDIFF_PY312_INCLUDE=DIR names them).
# 3. Link the shared object against the wheel's lib/ (c10, torch, torch_cpu, torch_python,
#    c10_cuda, torch_cuda) and the toolkit's cudart, and resolve every symbol it leaves undefined
#    in those libraries, libpython3.12 or the C/C++ runtime.
#
# What this proves: the bindings and kernels compile against torch 2.11's C++ API and headers
# with this nvcc and gcc, and every torch/c10/CUDA/Python symbol they use exists in those
# libraries (an API change is a compile error, an ABI change an unresolved symbol). Not proven:
# that the module loads and runs (that needs that torch imported, i.e. its CUDA libraries, and a
# GPU: gpu_check.sh's build phase), nor the GPU machine's own nvcc/gcc (same nvcc 13.0 there).
# Takes ~2 minutes on 2 cores (download 12 s, unpack 7 s, compile 90 s); not in CI for its ~1.5 GB of disk.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
START=$(date +%s)
TORCH=$(python3 benchmarks/gpu_stack.py get torch)
CUDA=$(python3 benchmarks/gpu_stack.py get cuda)
PYV=$(python3 benchmarks/gpu_stack.py get python)
ARCH=sm_90a
WORK=${FASTDIFF_TORCH_DIR:-${TMPDIR:-/tmp}/fastdiff-torch-$TORCH-cp${PYV/./}}
mkdir -p "$WORK"
die() { echo "check_gpu_torch_build.sh: $*" >&2; exit 1; }

# ---------------------------------------------------------------- the wheel
python3 -m pip download -q --no-deps --python-version "$PYV" --platform manylinux_2_28_x86_64 \
  --only-binary=:all: -d "$WORK" "torch==$TORCH" 2>&1 | { grep -v '^WARNING' || true; }
WHEEL=$(ls "$WORK"/torch-"$TORCH"-cp"${PYV/./}"-*.whl 2>/dev/null | head -n1)
[ -n "$WHEEL" ] || die "no torch $TORCH wheel for Python $PYV in $WORK"
T="$WORK/unpacked/torch"
if [ ! -f "$T/lib/libtorch_cuda.so" ]; then
  rm -rf "$WORK/unpacked"
  unzip -q "$WHEEL" 'torch/include/*' 'torch/version.py' 'torch/utils/cpp_extension.py' 'torch/lib/libc10.so' \
    'torch/lib/libc10_cuda.so' 'torch/lib/libtorch.so' 'torch/lib/libtorch_cpu.so' 'torch/lib/libtorch_cuda.so' \
    'torch/lib/libtorch_python.so' -d "$WORK/unpacked"
fi
WANT="$TORCH+cu${CUDA/./}"
grep -q "^__version__ = '$WANT'$" "$T/version.py" && grep -q "^cuda: Optional\[str\] = '$CUDA'$" "$T/version.py" \
  || die "$WHEEL is not torch $WANT (torch/version.py: $(grep -E '^(__version__|cuda)' "$T/version.py" | tr '\n' ' '))"
echo "torch: $WANT ($(basename "$WHEEL"))"

# ---------------------------------------------------------------- compilers, Python headers
NVCC=$(command -v nvcc) || die "nvcc is not on PATH"
# as torch finds it: CUDA_HOME, else /usr/local/cuda, else nvcc's folder
if [ -z "${CUDA_HOME:-}" ]; then
  CUDA_HOME=/usr/local/cuda; [ -d "$CUDA_HOME" ] || CUDA_HOME=$(dirname "$(dirname "$(readlink -f "$NVCC")")")
fi
[ -f "$CUDA_HOME/include/cuda_runtime_api.h" ] || die "no CUDA headers under CUDA_HOME=$CUDA_HOME"
nvcc_release=$("$NVCC" --version | sed -n 's/.*release \([0-9.]*\),.*/\1/p')
[ "$nvcc_release" = "$CUDA" ] || echo "note: nvcc $nvcc_release here, the GPU machine's torch is built for CUDA $CUDA"
PY_INC=${FASTDIFF_PY312_INCLUDE:-}
PY_LIBDIR=""
if [ -z "$PY_INC" ]; then
  for py in "python$PYV" "$(pyenv root 2>/dev/null)"/versions/"$PYV".*/bin/"python$PYV"; do
    if "$py" -c 'pass' 2>/dev/null; then
      PY_INC=$("$py" -c 'import sysconfig; print(sysconfig.get_paths()["include"])')
      PY_LIBDIR=$("$py" -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')
      break
    fi
  done
fi
[ -f "$PY_INC/Python.h" ] || die "no Python $PYV headers (Python.h): install python$PYV-dev, or set FASTDIFF_PY312_INCLUDE"
grep -q "PY_MINOR_VERSION *${PYV#*.}\$" "$PY_INC/patchlevel.h" || die "$PY_INC holds no Python $PYV headers"
echo "python headers: $PY_INC; nvcc $nvcc_release ($NVCC); $(g++ --version | head -n1)"

# ---------------------------------------------------------------- compile
B="$WORK/build-$ARCH"
rm -rf "$B"; mkdir -p "$B"
mapfile -t CXXFLAGS < <(python3 -c 'import sys; sys.path.insert(0, "csrc"); import build_flags as f; print("\n".join(f.cxx_flags() + f.OPENMP_FLAGS))')
mapfile -t NVCCFLAGS < <(FASTDIFF_CUDA_ARCHS=$ARCH python3 -c 'import sys; sys.path.insert(0, "csrc"); import build_flags as f; print("\n".join(f.nvcc_flags()))')
# torch's COMMON_NVCC_FLAGS (__CUDA_NO_HALF_OPERATORS__ and friends) as this torch release has them
mapfile -t TORCH_NVCC < <(python3 - "$T/utils/cpp_extension.py" <<'PYEOF'
import ast, sys
tree = ast.parse(open(sys.argv[1]).read())
node = next(n for n in tree.body if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "COMMON_NVCC_FLAGS")
print("\n".join(ast.literal_eval(node.value)))
PYEOF
)
# what setup.py (define_macros) and BuildExtension add to every source
COMMON=(-I"$T/include" -I"$T/include/torch/csrc/api/include" -I"$CUDA_HOME/include" -I"$PY_INC"
        -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=_C -DFASTDIFF_WITH_CUDA=1 -DFASTDIFF_CUDA_ARCHS=$ARCH)
mapfile -t CPP < <(ls csrc/bindings.cpp csrc/*/*.cpp)
mapfile -t CU < <(ls csrc/*/*.cu)
pids=()
for src in "${CPP[@]}"; do
  g++ -c -fPIC -std=c++17 "${COMMON[@]}" "${CXXFLAGS[@]}" "$src" -o "$B/$(basename "$src").o" &
  pids+=($!)
done
for src in "${CU[@]}"; do
  "$NVCC" -c "${COMMON[@]}" "${TORCH_NVCC[@]}" --compiler-options -fPIC "${NVCCFLAGS[@]}" "$src" -o "$B/$(basename "$src").o" &
  pids+=($!)
done
failed=0
for p in "${pids[@]}"; do wait "$p" || failed=$((failed + 1)); done
(( failed == 0 )) || die "$failed of ${#pids[@]} sources failed to compile against torch $WANT (errors above)"
echo "compiled ${#CPP[@]} C++ and ${#CU[@]} CUDA sources for $ARCH"

# ---------------------------------------------------------------- link, resolve
SO="$B/_C.cpython-${PYV/./}-x86_64-linux-gnu.so"
g++ -shared -fopenmp "$B"/*.o -L"$T/lib" -lc10 -ltorch -ltorch_cpu -ltorch_python -lc10_cuda -ltorch_cuda \
  -L"$CUDA_HOME/lib64" -lcudart -o "$SO"
undefined() { nm -D --undefined-only "$1" | awk '$1 == "U" {sub(/@.*/, "", $2); print $2}' | sort -u; }
defined() { nm -D --defined-only "$@" 2>/dev/null | awk 'NF == 3 {sub(/@.*/, "", $3); print $3}' | sort -u; }
undefined "$SO" >"$B/undefined.txt"
defined "$T"/lib/*.so >"$B/torch.txt"
defined "$CUDA_HOME/lib64/libcudart.so" >"$B/cudart.txt"
PY_LIB=$(ls "$PY_LIBDIR"/libpython"$PYV".so* 2>/dev/null | head -n1 || true)
if [ -n "$PY_LIB" ]; then defined "$PY_LIB" >"$B/python.txt"
else grep -E '^_?Py' "$B/undefined.txt" >"$B/python.txt" || true; echo "note: no libpython$PYV.so: Py* symbols taken as Python's"; fi
runtime=()
for lib in libstdc++.so libgcc_s.so.1 libc.so.6 libm.so.6 libgomp.so; do runtime+=("$(g++ -print-file-name=$lib)"); done
runtime+=("$(ldd /bin/sh | awk '/ld-linux/ {print $1}')")  # the dynamic loader (__tls_get_addr)
defined "${runtime[@]}" >"$B/runtime.txt"
count() { comm -12 "$B/undefined.txt" "$B/$1.txt" | wc -l; }
unresolved=$(sort -u "$B"/torch.txt "$B"/cudart.txt "$B"/python.txt "$B"/runtime.txt | comm -23 "$B/undefined.txt" -)
if [ -n "$unresolved" ]; then
  echo "$unresolved" | head -n 40 | c++filt >&2
  die "$(echo "$unresolved" | wc -l) symbols of fastdiff._C are in none of torch $WANT's libraries, cudart, libpython$PYV or the C/C++ runtime"
fi
echo "torch $WANT build check: ok: fastdiff._C ($((${#CPP[@]} + ${#CU[@]})) sources, $ARCH) compiled against its headers" \
  "(nvcc $nvcc_release, Python $PYV) and linked; all $(wc -l <"$B/undefined.txt") undefined symbols resolve" \
  "(torch $(count torch), Python $(count python), cudart $(count cudart), C/C++ runtime $(count runtime)); $(( $(date +%s) - START )) s"
