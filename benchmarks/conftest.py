"""pytest configuration for the benchmark suites (`benchmarks/bench_*.py`).

Fixtures:
  device  "cuda" when a GPU is available, else "cpu" (FASTDIFF_BENCH_DEVICE overrides).
  hw      the device's measured ceilings, measured ONCE per session:
          {device, device_name, copy_gbps, gemm_tflops, torch, triton, cuda, ...}
          (see `fastdiff.bench.harness.measure_hw`).

The same dict goes into the pytest-benchmark JSON as ``machine_info["fastdiff"]`` (hook
`pytest_benchmark_update_machine_info`), where `python -m fastdiff.bench report` reads it.

Providers (a test's `provider` parameter) are chosen at collection by FASTDIFF_BENCH_PROVIDERS
(only these) and FASTDIFF_BENCH_SKIP_PROVIDERS (not these), see `fastdiff.bench.harness`.

Benchmark files are named ``bench_*.py`` and their functions ``test_*``; this conftest makes
``pytest benchmarks`` collect them (pytest's default pattern is ``test_*.py``). Run, e.g.::

    pytest benchmarks --benchmark-json=results.json
    FASTDIFF_BENCH_QUICK=1 pytest benchmarks/bench_copy.py --benchmark-json=quick.json
    python -m fastdiff.bench report results.json -o report.md
"""
from __future__ import annotations

import pytest

from fastdiff.bench import harness


def pytest_collect_file(file_path, parent):
    # Collect bench_*.py under this directory when pytest walks it; files named explicitly on
    # the command line are collected by pytest itself (skip them here to avoid duplicates).
    if (
        file_path.suffix == ".py"
        and file_path.name.startswith("bench_")
        and not parent.session.isinitpath(file_path)
    ):
        return pytest.Module.from_parent(parent, path=file_path)
    return None


def pytest_collection_modifyitems(items):
    # Providers ruled out by FASTDIFF_BENCH_PROVIDERS / FASTDIFF_BENCH_SKIP_PROVIDERS are skipped
    # here, before the test body builds them (a torch.compile provider compiles there).
    for item in items:
        provider = getattr(item, "callspec", None) and item.callspec.params.get("provider")
        reason = harness.provider_skip_reason(provider) if provider else None
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


def pytest_report_header(config):
    device = harness.default_device()
    quick = harness.is_quick()
    return f"fastdiff bench: device={device} quick={quick} (FASTDIFF_BENCH_QUICK=1 forces quick sizes)"


@pytest.fixture(scope="session")
def device() -> str:
    return harness.default_device()


@pytest.fixture(scope="session")
def hw(device) -> dict:
    return harness.measure_hw(device)


def pytest_benchmark_update_machine_info(config, machine_info):
    info = harness.cached_hw()
    if info is None:  # no benchmark asked for `hw`; measure now so the report has its ceilings
        info = harness.measure_hw(harness.default_device())
    machine_info["fastdiff"] = dict(info)
