"""Build of fastdiff: the Python package plus the optional compiled extension `fastdiff._C`.

    pip install --no-build-isolation -e ".[test,triton]"     (builds against the installed torch)

`fastdiff._C` always holds the CPU kernels (C++, OpenMP) and, when both a CUDA toolkit and a
CUDA build of torch are present, the CUDA kernels. Compile flags and the CUDA arch list live in
ONE place, csrc/build_flags.py, which CMakeLists.txt reads too. Sources are discovered, not
listed: csrc/bindings.cpp + every csrc/<op>/*.cpp (+ csrc/<op>/*.cu with CUDA), so a new op
only adds its folder.

Environment:
  FASTDIFF_BUILD_EXT=0     build no extension (pure Python; the package falls back to the
                           Triton/reference backends at run time). Without it, a build with no
                           importable torch (pip's build isolation) is an error.
  FASTDIFF_WITH_CUDA=0|1   0: CPU kernels only; 1: require the CUDA kernels (error if no CUDA
                           toolkit or a CPU-only torch); unset: CUDA when both are present
  FASTDIFF_CUDA_ARCHS      CUDA targets, default "sm_80;sm_90a;compute_90" (see build_flags.py)
  FASTDIFF_BUILD_DEBUG=1   -O0 -g
  MAX_JOBS                 parallel compile jobs (torch's BuildExtension / ninja)
"""
import glob
import importlib.util
import os
import sys

from setuptools import find_namespace_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _load_build_flags():
    path = os.path.join(ROOT, "csrc", "build_flags.py")
    spec = importlib.util.spec_from_file_location("_fastdiff_build_flags", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _env(name):
    return os.environ.get(name, "").strip().lower()


def _rel(paths):
    # setuptools wants sources relative to setup.py
    return [os.path.relpath(p, ROOT) for p in paths]


def _extension():
    """([Extension], cmdclass) for fastdiff._C, or ([], {}) when not built."""
    if _env("FASTDIFF_BUILD_EXT") in ("0", "false", "no", "off"):
        print("fastdiff: FASTDIFF_BUILD_EXT=0, building no compiled extension", file=sys.stderr)
        return [], {}
    try:
        import torch
        from torch.utils import cpp_extension
    except ImportError:
        # An isolated build, or no torch yet: building against another torch than the one
        # fastdiff will run with gives an extension that does not load, so stop here.
        raise SystemExit(
            "fastdiff: torch is not importable at build time. fastdiff._C is built against the "
            "installed torch: install torch first (pip install torch==2.13.0), then fastdiff with "
            "`pip install --no-build-isolation ...`; or set FASTDIFF_BUILD_EXT=0 to install the "
            "pure-Python package without the compiled kernels.")

    flags = _load_build_flags()
    cxx = flags.cxx_flags()
    link = []
    if sys.platform != "darwin":  # Apple clang has no -fopenmp; the loops stay vectorised
        cxx += flags.OPENMP_FLAGS
        link += flags.OPENMP_FLAGS

    sources = _rel([os.path.join(ROOT, "csrc", "bindings.cpp")]
                   + sorted(glob.glob(os.path.join(ROOT, "csrc", "*", "*.cpp"))))
    cu_sources = _rel(sorted(glob.glob(os.path.join(ROOT, "csrc", "*", "*.cu"))))

    want = _env("FASTDIFF_WITH_CUDA")
    torch_cuda = torch.version.cuda is not None
    toolkit = cpp_extension.CUDA_HOME is not None
    if want in ("1", "true", "yes", "on") and not (torch_cuda and toolkit):
        raise RuntimeError(
            "FASTDIFF_WITH_CUDA=1 but "
            + ("torch is a CPU-only build" if not torch_cuda else "no CUDA toolkit was found (set CUDA_HOME)"))
    with_cuda = torch_cuda and toolkit and want not in ("0", "false", "no", "off")

    if with_cuda:
        archs = flags.arch_names()
        ext = cpp_extension.CUDAExtension(
            "fastdiff._C",
            sources + cu_sources,
            define_macros=[("FASTDIFF_WITH_CUDA", "1"), ("FASTDIFF_CUDA_ARCHS", ",".join(archs))],
            extra_compile_args={"cxx": cxx, "nvcc": flags.nvcc_flags()},
            extra_link_args=link,
        )
        print(f"fastdiff: building fastdiff._C with CPU and CUDA kernels for {', '.join(archs)}",
              file=sys.stderr)
    else:
        why = ("FASTDIFF_WITH_CUDA=0" if want in ("0", "false", "no", "off")
               else "torch is a CPU-only build" if not torch_cuda else "no CUDA toolkit found")
        ext = cpp_extension.CppExtension(
            "fastdiff._C", sources, extra_compile_args={"cxx": cxx}, extra_link_args=link)
        print(f"fastdiff: building fastdiff._C with CPU kernels only ({why})", file=sys.stderr)
    return [ext], {"build_ext": cpp_extension.BuildExtension}


ext_modules, cmdclass = _extension()

setup(
    # kernels/ (Triton) ships as the subpackage fastdiff.kernels.
    packages=find_namespace_packages(include=["fastdiff", "fastdiff.*"], exclude=["*.__pycache__"])
    + ["fastdiff.kernels"],
    package_dir={"fastdiff.kernels": "kernels"},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
