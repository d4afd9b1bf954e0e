"""`fastdiff::solver_step` against the eager scheduler step it replaces.

One DPM-Solver++(2M) step with classifier-free guidance (eps prediction), the way a diffusers
pipeline + DPMSolverMultistepScheduler run it, side by side with the fused op:

  eager        the step written plainly, diffusers-like: CFG on the chunked doubled batch, the
               schedule scalars computed per step as 0-dim CPU tensors (sigma -> alpha/sigma,
               log-SNR), convert to x0, the 2M update -- about 15 tensor ops
  compile      torch.compile of that same function (inductor)
  cuda         fused op, CUDA kernel                    (GPU)
  cuda_graph   fused op, CUDA kernel replayed from a CUDA graph (GPU)
  triton       fused op, Triton kernel                  (GPU)
  cpu          fused op, C++/OpenMP kernel              (CPU)

Latents: x and the history in fp32, the model output in `dtype` (fp32 or fp16). Bytes moved
(the fewest any implementation must move): read x, both CFG halves, D_{i-1}; write x', D_i.
Each provider is checked once against the eager step before it is timed.

    pytest benchmarks/bench_solver_step.py --benchmark-json=out.json           # GPU: full sizes
    FASTDIFF_BENCH_QUICK=1 pytest benchmarks/bench_solver_step.py              # small sizes
"""
from __future__ import annotations

import math

import pytest
import torch

from fastdiff import _ext
from fastdiff.bench.harness import Rotating, bench_sizes, graph_per_arg_set, rel_err, run_benchmark
from fastdiff.ops.solver_step import solver_step

GPU = torch.cuda.is_available()
SIZES = bench_sizes(
    full=[(1, 4, 64, 64), (4, 4, 64, 64), (16, 4, 64, 64), (1, 4, 128, 128), (4, 4, 128, 128),
          (16, 4, 128, 128), (64, 3, 256, 256)],
    quick=[(1, 4, 64, 64), (4, 4, 128, 128)],
)
DTYPES = ["fp32", "fp16"] if GPU else ["fp32"]
PROVIDERS = ["eager", "compile"] + (["cuda", "cuda_graph", "triton"] if GPU else ["cpu"])
GUIDANCE = 7.5

# A step in the middle of a 20-step Karras-like run: sigmas of s1 (previous), s0 (current), t.
SIGMAS = torch.tensor([2.10, 1.62, 1.23], dtype=torch.float32)  # CPU, as diffusers keeps them


def _sigma_to_alpha_sigma_t(sigma):
    alpha_t = 1 / ((sigma**2 + 1) ** 0.5)
    sigma_t = sigma * alpha_t
    return alpha_t, sigma_t


def eager_dpmpp_2m_cfg_step(x, noise_pred, prev_x0, sigmas):
    """One DPM-Solver++(2M) step with CFG, as a diffusers pipeline + scheduler runs it.
    Returns (x_next, x0) -- x0 is kept by the scheduler for the next step."""
    # pipeline: classifier-free guidance on the doubled batch
    noise_pred_uncond, noise_pred_text = noise_pred.chunk(2)
    eps = noise_pred_uncond + GUIDANCE * (noise_pred_text - noise_pred_uncond)
    # scheduler.convert_model_output (algorithm_type="dpmsolver++", prediction_type="epsilon")
    alpha_s0, sigma_s0 = _sigma_to_alpha_sigma_t(sigmas[1])
    x0 = (x - sigma_s0 * eps) / alpha_s0
    # scheduler.multistep_dpm_solver_second_order_update (solver_type="midpoint")
    sigma_t, sigma_s1 = sigmas[2], sigmas[0]
    alpha_t, sigma_t = _sigma_to_alpha_sigma_t(sigma_t)
    alpha_s1, sigma_s1 = _sigma_to_alpha_sigma_t(sigma_s1)
    lambda_t = torch.log(alpha_t) - torch.log(sigma_t)
    lambda_s0 = torch.log(alpha_s0) - torch.log(sigma_s0)
    lambda_s1 = torch.log(alpha_s1) - torch.log(sigma_s1)
    h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
    r0 = h_0 / h
    d0, d1 = x0, (1.0 / r0) * (x0 - prev_x0)
    x_t = (
        (sigma_t / sigma_s0) * x
        - (alpha_t * (torch.exp(-h) - 1.0)) * d0
        - 0.5 * (alpha_t * (torch.exp(-h) - 1.0)) * d1
    )
    return x_t, x0


def fused_coefficients(sigmas):
    """The same step as one row of the solver_step table: host float64, computed once per plan."""
    s1, s0, t = (float(v) for v in sigmas)

    def a_s(sig):
        alpha = 1.0 / math.sqrt(sig * sig + 1.0)
        return alpha, sig * alpha

    alpha_s0, sigma_s0 = a_s(s0)
    alpha_t, sigma_t = a_s(t)
    alpha_s1, sigma_s1 = a_s(s1)
    lam = lambda a, s: math.log(a) - math.log(s)  # noqa: E731
    h = lam(alpha_t, sigma_t) - lam(alpha_s0, sigma_s0)
    r0 = (lam(alpha_s0, sigma_s0) - lam(alpha_s1, sigma_s1)) / h
    k = -alpha_t * math.expm1(-h)  # = -alpha_t (e^{-h} - 1) > 0
    p, q = 1.0 / alpha_s0, -sigma_s0 / alpha_s0  # D = x0 = (x - sigma eps) / alpha
    a = sigma_t / sigma_s0
    b0, b1 = k * (1.0 + 0.5 / r0), -k * 0.5 / r0
    return [p, q, a, b0, b1, 0.0, 0.0, 0.0, 0.0]


COEF = fused_coefficients(SIGMAS)
SLOTS = [0, 0, -1, -1]  # read D_{i-1} from slot 0, then write D_i there


def _make_set(size, mdtype, device, seed):
    g = torch.Generator(device="cpu").manual_seed(seed)
    b = size[0]
    x = torch.randn(size, generator=g).to(device)
    noise_pred = torch.randn((2 * b,) + tuple(size[1:]), generator=g).to(device=device, dtype=mdtype)
    prev_x0 = torch.randn(size, generator=g).to(device)
    history = prev_x0.clone().unsqueeze(0)
    out = torch.empty_like(x)
    return x, noise_pred, prev_x0, history, out


@pytest.mark.parametrize("provider", PROVIDERS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("size", SIZES)
def test_solver_step(benchmark, hw, device, size, dtype, provider):
    mdtype = {"fp32": torch.float32, "fp16": torch.float16}[dtype]
    if provider in ("cuda", "cuda_graph") and not _ext.has_kernel("solver_step", "CUDA"):
        pytest.skip("fastdiff._C was built without CUDA kernels")
    if provider == "cpu" and not _ext.has_kernel("solver_step", "CPU"):
        pytest.skip("fastdiff._C is not built")
    if provider == "triton":
        pytest.importorskip("triton")
    numel = math.prod(size)
    msize = torch.tensor([], dtype=mdtype).element_size()
    bytes_moved = numel * (4 + 2 * msize + 4 + 4 + 4)  # x, m_u, m_c, D_{i-1} in; x', D_i out
    # per set: the buffers above plus the eager path's prev_x0
    rot_sets = Rotating.count(numel * (4 * 5 + 2 * msize), device)
    sets = [_make_set(size, mdtype, device, seed) for seed in range(rot_sets)]
    sigmas = SIGMAS  # stays on the CPU, as in diffusers

    # the eager step is the yardstick every provider is checked against
    x, m, prev, hist, out = sets[0]
    expect, expect_x0 = eager_dpmpp_2m_cfg_step(x, m, prev, sigmas)
    tol = 1e-4 if mdtype == torch.float32 else 5e-3  # eager does CFG in the model dtype

    if provider in ("eager", "compile"):
        step = eager_dpmpp_2m_cfg_step
        if provider == "compile":
            step = torch.compile(eager_dpmpp_2m_cfg_step, dynamic=False)
        got, got_x0 = step(x, m, prev, sigmas)
        assert rel_err(got, expect) < tol and rel_err(got_x0, expect_x0) < tol
        rot = Rotating([s[:3] for s in sets])
        fn = rot.bind(lambda x, m, prev: step(x, m, prev, sigmas))
    else:
        backend = "cuda" if provider == "cuda_graph" else provider

        def fused(x, m, prev, hist, out):
            return solver_step(x, m, None, hist, coef=COEF, slots=SLOTS, guidance=GUIDANCE, out=out,
                               backend=backend)

        fused(*sets[0])
        assert rel_err(sets[0][4], expect) < tol and rel_err(sets[0][3][0], expect_x0) < tol
        for s in sets:  # history slot back to D_{i-1} (the check above overwrote it)
            s[3][0].copy_(s[2])
        if provider == "cuda_graph":
            fn = Rotating(graph_per_arg_set(fused, sets)).bind(lambda g: g.replay())
        else:
            fn = Rotating(sets).bind(fused)

    for _ in range(len(sets)):  # touch every set once (first-touch page faults, lazy init) before timing
        fn()
    run_benchmark(benchmark, fn, hw=hw, op="solver_step", provider=provider, size=size, bytes_moved=bytes_moved,
                  variant=dtype)
