"""Mutation tests of the CUDA kernels: each planted bug below, applied alone to its csrc/*.cu
source, must make tests/test_cuda_kernels_on_cpu.py fail (a wrong result, a sanitizer report,
a deadlock, a wrong launch).

Slow -- a build of the mutated source and a run of the emulation suite (stopping at the first
failure) per mutant -- so not part of `pytest`; tests/test_mutants.py only checks that every
mutant still applies. Run it when a kernel or its tests change:

    python tests/mutants.py            # every mutant; exit status 1 if any survives
    python tests/mutants.py NAME ...   # some

`FASTDIFF_CUDA_MUTANT=NAME` makes tests/cuda_on_cpu.py build that mutant instead of the sources.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
SS = "csrc/solver_step/solver_step.cu"
GN = "csrc/group_norm_silu/group_norm_silu.cu"
ENV = "FASTDIFF_CUDA_MUTANT"

# name -> (source, text, replacement); the text occurs exactly once in the source
MUTANTS = {
    # every alignment check of the vectorised paths
    **{f"ss-align-{name}": (SS, f"aligned16(a.{name})", "true")
       for name in ("x", "model", "uncond", "hist_read[0]", "hist_read[1]", "hist_read[2]", "noise", "out",
                    "hist_write")},
    **{f"gn-align-{name}": (GN, f"aligned(a.{name}, vec * esize)", "true") for name in ("x", "out", "residual")},
    # (pick_vec's divisibility conditions imply one another -- the row length divides every
    # stride -- so removing one alone changes nothing: not listed)
    # every __syncthreads
    "gn-sync-block-merge-1": (GN, "    sh[3 * warp + 2] = m2;\n  }\n  __syncthreads();",
                              "    sh[3 * warp + 2] = m2;\n  }"),
    "gn-sync-block-merge-2": (GN, "      sh[3 * kWarps + 2] = m2;\n    }\n  }\n  __syncthreads();",
                              "      sh[3 * kWarps + 2] = m2;\n    }\n  }"),
    "gn-sync-load-offsets": (GN, "s_off[c] = 0.0f;\n  }\n  __syncthreads();", "s_off[c] = 0.0f;\n  }"),
    "gn-sync-load-affine": (GN, "s_shift[c] = bc + (s_off[c] - mean) * sc;\n  }\n  __syncthreads();",
                            "s_shift[c] = bc + (s_off[c] - mean) * sc;\n  }"),
    # every path limit off by one
    "gn-cache-limit": (GN, "P.size <= int64_t(kThreads) * kCacheVecs * VEC",
                       "P.size <= int64_t(kThreads) * kCacheVecs * VEC + VEC"),
    "gn-split-min-chunk": (GN, "const int64_t by_size = g.size / kMinChunk;",
                           "const int64_t by_size = g.size / kMinChunk + 1;"),
    # (make_plan's `splits > vecs` cap is restored by recomputing the splits from the chunk: its
    # off-by-one changes nothing, not listed)
    "ss-grid-cap": (SS, "if (blocks > max_blocks) blocks = max_blocks;",
                    "if (blocks > max_blocks + 1) blocks = max_blocks + 1;"),
    "ss-vector-loop": (SS, "for (int64_t v = tid; v < nvec; v += stride)",
                       "for (int64_t v = tid; v <= nvec; v += stride)"),
    # the 64-bit index path (groups of >= 2^31 elements; Args.wide_index takes it in the tests)
    "gn-wide-index-column": (GN, "    r = e / P.cols;\n    k = e - r * P.cols;",
                             "    r = e / P.cols;\n    k = e - r * P.rows;"),
    # the unclamped and the clamped data prediction swapped (the weight r, the history write)
    "ss-unclamped-weight": (SS, "P.r * dj + P.b0 * dc", "P.r * dc + P.b0 * dc"),
    "ss-history-unclamped": (SS, "d[j] = dc;", "d[j] = dj;"),
    # dropped tails
    "ss-tail": (SS, "if (i < P.numel) step<TM, TS, 1>(P, w, i);", "(void)i;"),
    "gn-last-chunk": (GN, "p.splits = p.chunk > 0 ? (g.size + p.chunk - 1) / p.chunk : 1;",
                      "p.splits = p.chunk > 0 ? g.size / p.chunk : 1;"),
    "gn-cached-tail": (GN, "      if (e < P.size) {\n        load_centered",
                       "      if (e + VEC < P.size) {\n        load_centered"),
    # racy accumulation: every warp leader adds its partials into the block total, unordered
    "gn-racy-block-merge": (GN, """  if (warp == 0) {
    n = lane < kWarps ? sh[3 * lane] : 0.0f;""",
                            """  if (threadIdx.x == 0) sh[3 * kWarps] = sh[3 * kWarps + 1] = sh[3 * kWarps + 2] = 0.0f;
  __syncthreads();
  if (lane == 0) {
    float tn = sh[3 * kWarps], tmean = sh[3 * kWarps + 1], tm2 = sh[3 * kWarps + 2];
    merge(tn, tmean, tm2, n, mean, m2);
    sh[3 * kWarps] = tn;
    sh[3 * kWarps + 1] = tmean;
    sh[3 * kWarps + 2] = tm2;
  }
  if (false) {
    n = lane < kWarps ? sh[3 * lane] : 0.0f;"""),
}


def mutated(name: str) -> dict:
    """{absolute source path: mutated text} of mutant `name`."""
    rel, old, new = MUTANTS[name]
    path = os.path.join(os.path.dirname(HERE), rel)
    text = open(path).read()
    if text.count(old) != 1:
        raise ValueError(f"mutant {name}: its text occurs {text.count(old)} times in {rel}, expected once")
    return {path: text.replace(old, new)}


def run(name: str) -> bool:
    """True when the suite fails on mutant `name` (caught)."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                        os.path.join(HERE, "test_cuda_kernels_on_cpu.py")], cwd=os.path.dirname(HERE),
                       env=dict(os.environ, **{ENV: name}), capture_output=True, text=True)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith(("FAILED", "ERROR"))] or r.stdout.splitlines()[-1:]
    print(f"{name}: {'caught' if r.returncode else 'SURVIVED'}  {lines[0] if lines else ''}", flush=True)
    return r.returncode != 0


def main(names) -> int:
    names = names or list(MUTANTS)
    start = time.time()
    caught = sum(run(n) for n in names)
    print(f"caught {caught} of {len(names)} in {time.time() - start:.0f} s")
    return 0 if caught == len(names) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
