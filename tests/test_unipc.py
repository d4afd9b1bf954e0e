"""UniPC: agreement with diffusers' UniPCMultistepScheduler, its known special cases, and the
shape of its coefficient table. (Table vs textbook parity on every backend is in
tests/test_sample_fused.py; the convergence orders in tests/test_reference_solvers.py.)"""
import numpy as np
import pytest
import torch

import fastdiff
from fastdiff.solvers import build_table
from fastdiff.testing import GaussianMixture

from conftest import require

F64 = torch.float64


@pytest.fixture(scope="module")
def mixture():
    return GaussianMixture.random(shape=(2, 3, 5), seed=0)


def _noise(seed=0):
    return torch.randn(3, 2, 3, 5, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _diffusers_loop(sampler, model, noise, *, order, variant, corrector, prediction):
    """diffusers' own UniPC loop, on fastdiff's grid: its timesteps and sigmas (sigma/alpha) are
    replaced by the plan's, in float64, so both run the same algorithm on the same points."""
    from diffusers import UniPCMultistepScheduler

    n = sampler.steps
    sch = UniPCMultistepScheduler(solver_order=order, solver_type=variant, predict_x0=True,
                                  prediction_type="v_prediction" if prediction == "v" else "epsilon",
                                  lower_order_final=True, disable_corrector=[] if corrector else list(range(n)))
    sch.set_timesteps(n)
    sch.timesteps = torch.from_numpy(sampler.grid.model_time.copy())
    sch.sigmas = torch.from_numpy(sampler.grid.karras_sigma.copy())
    x = noise.clone()
    for t in sch.timesteps:
        m = model(x, t.float().expand(x.shape[0]))  # the float32 model time fastdiff's loop passes
        x = sch.step(m, t, x).prev_sample
    return x


@pytest.mark.parametrize("spacing", ["trailing", "karras"])
@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("corrector", [True, False])
@pytest.mark.parametrize("variant", ["bh1", "bh2"])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_unipc_agrees_with_the_diffusers_scheduler(mixture, order, variant, corrector, prediction, spacing):
    """Settings where both define the same algorithm: 8 steps (diffusers documents its
    lower_order_final for < 15 steps; both cap the order at N - i), every step corrected or
    none (disable_corrector), data prediction. bh1 runs to sigma_min: diffusers' jump to
    sigma = 0 multiplies B(h) = -inf by a zero sum there and returns NaN (fastdiff's first-order
    last step has no B(h) term). Both sides in float64: agreement to reassociation level."""
    require("diffusers", "diffusers")
    final = "min" if variant == "bh1" else "zero"
    s = fastdiff.Sampler(solver="unipc", order=order, variant=variant, corrector=corrector, steps=8, spacing=spacing,
                         prediction=prediction, final=final, backend="reference")
    model = mixture.model(fastdiff.get_schedule("linear"), prediction, dtype=F64)
    noise = _noise()
    ours = s.sample(model, noise, dtype=F64)
    theirs = _diffusers_loop(s, model, noise, order=order, variant=variant, corrector=corrector,
                             prediction=prediction)
    assert float((ours - theirs).norm() / theirs.norm()) < 1e-10


@pytest.mark.parametrize("spacing", ["trailing", "karras"])
@pytest.mark.parametrize("same", [("dpmpp_1m", dict(order=1)), ("dpmpp_2m", dict(order=2, variant="bh2"))],
                         ids=["UniP-1=dpmpp_1m", "UniP-2-bh2=dpmpp_2m"])
def test_the_predictor_alone_reduces_to_dpm_solver_pp(mixture, spacing, same):
    """UniP-1 is DDIM/DPM-Solver++(1); UniP-2 with B(h) = e^h - 1 and rho = 1/2 is exactly
    DPM-Solver++(2M) -- for the tables and for the textbook loops."""
    other, kw = same
    plan = dict(steps=9, spacing=spacing, backend="reference")
    a = fastdiff.Sampler(solver="unipc", corrector=False, **kw, **plan)
    b = fastdiff.Sampler(solver=other, **plan)
    np.testing.assert_allclose(a.table.coef, b.table.coef, rtol=1e-13, atol=1e-13)
    model = mixture.model(fastdiff.get_schedule("linear"), "epsilon", dtype=F64)
    x, y = a.sample(model, _noise(1), dtype=F64), b.sample(model, _noise(1), dtype=F64)
    assert float((x - y).norm() / y.norm()) < 1e-12


@pytest.mark.parametrize("corrector", [True, False])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_the_table_reads_as_many_earlier_predictions_as_the_corrector_needs(order, corrector):
    """UniC-p after UniP-p reads D_i .. D_{i-p}: the ring holds `order` earlier D's with the
    corrector (order - 1 without), and order 3 uses b3 / slot D_{i-3} once warmed up."""
    grid = fastdiff.Sampler(steps=10, spacing="trailing").grid
    t = build_table("unipc", grid, "epsilon", order=order, corrector=corrector)
    history = order if corrector else order - 1
    assert t.history == history
    reads = (t.slots[:, 1:] >= 0).sum(1)
    used = (t.coef[:, 4:7] != 0).sum(1)
    assert (reads == used).all(), "a weight without a slot, or a slot without a weight"
    assert reads.max() == history
    if order == 3 and corrector:
        assert (t.coef[4:8, 6] != 0).all()  # warmed up, before lower_order_final lowers the order
    for i in range(t.rows):
        for k in range(1, 4):
            if t.slots[i, k] >= 0:
                assert t.slots[i, k] == t.slots[i - k, 0], f"step {i} reads D_{i - k} from the wrong slot"


def test_the_variant_matters_only_through_the_1x1_systems():
    """bh1 / bh2 change B(h), which the exactly solved systems cancel; only where the published
    algorithm fixes rho = 1/2 (UniP-2, UniC-1) do the rows differ. UniPC-3 on 10 steps with
    lower_order_final: orders 1, 2, 3, ..., 3, 2, 1, so UniP-2 at steps 1 and 8, UniC-1 at step 1,
    and with the corrector also row 2, whose correction undoes step 1's UniP-2 (row 9 jumps to
    sigma = 0 and needs no corrected state)."""
    grid = fastdiff.Sampler(steps=10, spacing="trailing").grid
    for corrector in (True, False):
        bh1, bh2 = (build_table("unipc", grid, "epsilon", order=3, variant=v, corrector=corrector).coef
                    for v in ("bh1", "bh2"))
        differ = [i for i in range(10) if not np.allclose(bh1[i], bh2[i], rtol=1e-12, atol=1e-14)]
        assert differ == ([1, 2, 8] if corrector else [1, 8]), corrector
    with_c, without = (build_table("unipc", grid, "epsilon", order=3, corrector=c).coef for c in (True, False))
    assert [i for i in range(10) if not np.allclose(with_c[i], without[i])] == list(range(1, 9))  # not row 0 nor 9
