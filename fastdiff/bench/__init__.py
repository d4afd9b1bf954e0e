"""fastdiff.bench: the benchmark harness, the report tool and the Nsight Compute summary.

* `fastdiff.bench.harness` -- what `benchmarks/*.py` import: `run_benchmark`, `bench_sizes`,
  `Rotating`, `measure_hw` (it imports torch); built from `env` (environment variables), `hw`
  (the measured ceilings) and `rotation` (input rotation).
* `fastdiff.bench.report` -- pytest-benchmark JSON -> markdown (+ PNG plots with matplotlib);
  standard library only; built from `markdown`, `runs`, `tables` and `plots`.
* `fastdiff.bench.ncu` -- Nsight Compute CSV -> a short per-kernel summary; standard library only.

Command line: ``python -m fastdiff.bench report RESULTS.json [...] [-o report.md] [--plots DIR]``
and ``python -m fastdiff.bench ncu-summary NCU.csv [...] [-o summary.txt]``.

Nothing here is imported by ``import fastdiff``; this package imports no submodule eagerly, so
the report tool runs without touching torch.
"""

__all__ = ["harness", "report", "ncu"]
