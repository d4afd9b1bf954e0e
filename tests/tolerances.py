"""One tolerance table for every comparison against a float64 (or fp32-upcast) reference.

Relative error = ||out - ref|| / ||ref|| over the whole tensor (NaN never passes).
Each row says why it is what it is.
"""
import torch

REL_TOL = {
    # fp32 storage and fp32 arithmetic: a handful of roundings of 6e-8 each, summed over
    # a few terms; 1e-5 leaves room for fma/ordering differences between backends.
    torch.float32: 1e-5,
    # fp16 storage of the model output (10-bit mantissa, unit roundoff 4.9e-4): one
    # rounding of the input dominates.
    torch.float16: 2e-3,
    # bf16 storage (7-bit mantissa, unit roundoff 3.9e-3): one rounding of the input.
    torch.bfloat16: 1.6e-2,
    # float64 vs float64 (a different but exact-arithmetic path): only reassociation.
    torch.float64: 1e-12,
}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out = out.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    if not torch.isfinite(out).all():
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-300))


def assert_close(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, factor: float = 1.0, what: str = "") -> None:
    """Assert rel_err(out, ref) <= factor * REL_TOL[dtype]."""
    err = rel_err(out, ref)
    tol = factor * REL_TOL[dtype]
    assert err <= tol, f"{what} relative error {err:.3e} > {tol:.1e} ({dtype})"


def assert_close_each(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype, what: str = "",
                      factor: float = 1.0) -> None:
    """assert_close, and every element within factor * REL_TOL[dtype] of max(|ref|, rms(ref)): one
    wrong element among thousands moves the norm too little to fail assert_close on its own."""
    assert_close(out, ref, dtype, factor=factor, what=what)
    out = out.detach().to(torch.float64).cpu()
    ref = ref.detach().to(torch.float64).cpu()
    bound = factor * REL_TOL[dtype] * torch.maximum(ref.abs(), ref.pow(2).mean().sqrt())
    bad = ~((out - ref).abs() <= bound)  # NaN fails
    if bad.any():
        i = tuple(int(v) for v in bad.nonzero()[0])
        raise AssertionError(f"{what} {int(bad.sum())} of {bad.numel()} elements off ({dtype}), first at {i}: "
                             f"{float(out[i])!r} vs {float(ref[i])!r}")


def assert_as_close_as(out: torch.Tensor, theirs: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype,
                       what: str = "") -> None:
    """For whole models in half precision: every layer rounds, so the original model's own run
    (`theirs`) is off the float64 `ref` by many table rows already; `out` may be off by at most
    that plus one table tolerance."""
    assert out.dtype == theirs.dtype == dtype, (out.dtype, theirs.dtype, dtype)
    err, their_err = rel_err(out, ref), rel_err(theirs, ref)
    assert err <= their_err + REL_TOL[dtype], \
        f"{what} relative error {err:.3e} > the original's {their_err:.3e} + {REL_TOL[dtype]:.1e} ({dtype})"
