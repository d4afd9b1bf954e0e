"""Baselines: device copy and a plain elementwise add.

`copy` (``dst.copy_(src)``, 2 x N x 4 bytes) is the reference every memory-bound kernel is
reported against (its "% copy" column is the fraction of this run's measured copy bandwidth);
`add` (``c = a + b``, 3 x N x 4 bytes) is what a well-behaved elementwise PyTorch op reaches,
i.e. what one unfused step of an eager solver loop gets at best.

Providers:
  eager   torch: ``dst.copy_(src)`` / ``torch.add(a, b, out=c)`` (preallocated output)
  alloc   torch, allocating the output each call (``src.clone()`` / ``a + b``)
  triton  a one-line Triton kernel (GPU only): what a plain Triton kernel reaches
  graph   the eager op captured in a CUDA graph, replayed (GPU only): launch cost removed
"""
from __future__ import annotations

import pytest
import torch

from fastdiff.bench.harness import Rotating, bench_sizes, graph_per_arg_set, run_benchmark

SIZES = bench_sizes(full=[1 << 20, 1 << 22, 1 << 24, 1 << 26, 1 << 28], quick=[1 << 16, 1 << 20])
PROVIDERS = ["eager", "alloc"] + (["triton", "graph"] if torch.cuda.is_available() else [])
ELEM = 4  # float32

try:
    import triton
    import triton.language as tl

    @triton.jit
    def _copy_kernel(src_ptr, dst_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        tl.store(dst_ptr + offs, tl.load(src_ptr + offs, mask=mask), mask=mask)

    @triton.jit
    def _add_kernel(a_ptr, b_ptr, c_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        a = tl.load(a_ptr + offs, mask=mask)
        b = tl.load(b_ptr + offs, mask=mask)
        tl.store(c_ptr + offs, a + b, mask=mask)

    HAVE_TRITON = True
except Exception:  # no triton: the triton provider is skipped
    HAVE_TRITON = False

BLOCK = 4096


def _triton_copy(src, dst):
    _copy_kernel[(triton.cdiv(src.numel(), BLOCK),)](src, dst, src.numel(), BLOCK=BLOCK, num_warps=8)


def _triton_add(a, b, c):
    _add_kernel[(triton.cdiv(a.numel(), BLOCK),)](a, b, c, a.numel(), BLOCK=BLOCK, num_warps=8)


def _make_fn(provider, eager, alloc, triton_fn, arg_sets):
    if provider == "triton" and not HAVE_TRITON:
        pytest.skip("triton is not importable")
    if provider == "graph":
        rot = Rotating(graph_per_arg_set(eager, arg_sets))
        return rot.bind(lambda g: g.replay())
    rot = Rotating(arg_sets)
    return rot.bind({"eager": eager, "alloc": alloc, "triton": triton_fn}[provider])


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("size", SIZES)
def test_copy(benchmark, hw, device, size, provider):
    nbytes = 2 * size * ELEM
    gen = torch.Generator(device=device).manual_seed(0)
    n_sets = Rotating.count(nbytes, device)
    arg_sets = [
        (torch.randn(size, device=device, generator=gen), torch.empty(size, device=device))
        for _ in range(n_sets)
    ]
    fn = _make_fn(
        provider,
        eager=lambda src, dst: dst.copy_(src),
        alloc=lambda src, dst: src.clone(),
        triton_fn=_triton_copy,
        arg_sets=arg_sets,
    )
    run_benchmark(benchmark, fn, hw=hw, op="copy", provider=provider, size=size, bytes_moved=nbytes)
    if provider != "alloc":  # every element written, and right
        src, dst = arg_sets[0]
        assert torch.equal(src, dst)


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("size", SIZES)
def test_add(benchmark, hw, device, size, provider):
    nbytes = 3 * size * ELEM
    gen = torch.Generator(device=device).manual_seed(0)
    n_sets = Rotating.count(nbytes, device)
    arg_sets = [
        (
            torch.randn(size, device=device, generator=gen),
            torch.randn(size, device=device, generator=gen),
            torch.full((size,), float("nan"), device=device),
        )
        for _ in range(n_sets)
    ]
    fn = _make_fn(
        provider,
        eager=lambda a, b, c: torch.add(a, b, out=c),
        alloc=lambda a, b, c: a + b,
        triton_fn=_triton_add,
        arg_sets=arg_sets,
    )
    run_benchmark(benchmark, fn, hw=hw, op="add", provider=provider, size=size, bytes_moved=nbytes)
    if provider != "alloc":
        a, b, c = arg_sets[0]
        torch.testing.assert_close(c, a + b)
