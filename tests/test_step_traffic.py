"""What one step of the fused loop launches and moves outside the model call, counted by
fastdiff.bench.traffic's TorchDispatchMode (every op that is neither a view nor an allocation is
a launch; bytes read and written). Issue 21's budget: at most 3 launches per step outside the
model, bytes within 1.2x of the minimum (read the state once for the model input, write the
CFG-doubled input once in the model's dtype, and the solver step's own reads and writes)."""
import pytest
import torch

import fastdiff
from fastdiff.bench.traffic import OpTraffic

STEPS = 6
SHAPE = (2, 4, 8, 8)


class _PerModelCall(OpTraffic):
    """The launches outside the model, split at each model call: intervals[k] after the k-th."""

    def __init__(self):
        super().__init__()
        self.intervals = [self.ops]

    def model(self, inner):
        def call(x, t, **kw):
            with self.pause():
                out = inner(x, t, **kw)
            self.ops = []
            self.intervals.append(self.ops)
            return out
        return call


def _model(x, t, context):
    return (x * 0.9 + context.mean() + t.mean() * 1e-3).to(x.dtype)


@pytest.mark.parametrize("model_dtype", [None, torch.float16, torch.bfloat16], ids=str)
def test_a_cfg_step_launches_at_most_3_ops_and_moves_close_to_the_minimum(model_dtype):
    sampler = fastdiff.Sampler("dpmpp_2m", steps=STEPS, backend="cpu")
    noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))
    cond, uncond = torch.randn(SHAPE[0], 3, 5), torch.zeros(SHAPE[0], 3, 5)
    mode = _PerModelCall()
    with mode:
        out = sampler.sample(mode.model(_model), noise, guidance_scale=7.5, cond={"context": cond},
                             uncond={"context": uncond}, model_dtype=model_dtype)
    assert torch.isfinite(out).all()
    assert len(mode.intervals) == STEPS + 1
    step = mode.intervals[3]  # steady state: step 2's update, then step 3's model input
    n = noise.numel()
    model_bytes = (model_dtype or torch.float32).itemsize
    # model input: read x, write 2 copies; 2M update: read x, m_u, m_c, D_{i-1}; write x, D_i
    minimum = (4 * n + 2 * n * model_bytes) + (4 * n + 2 * n * model_bytes + 4 * n) + (4 * n + 4 * n)
    launches, moved = len(step), sum(b for _, b in step)
    assert launches <= 3, f"{launches} launches outside the model per step: {[name for name, _ in step]}"
    assert moved <= 1.2 * minimum, f"{moved} bytes per step outside the model, minimum {minimum}: {step}"
    assert moved >= minimum, f"fewer bytes than the step must move ({moved} < {minimum}): the count is wrong"


def test_the_counter_sees_the_old_way_as_over_budget():
    """The counter can fail: an fp32 cat of the doubled batch, then a cast (the loop before issue
    21), moves more than the budget allows and takes more launches."""
    x = torch.randn(SHAPE)
    mode = _PerModelCall()
    with mode:
        torch.cat([x, x]).to(torch.float16)
    n = x.numel()
    (_, cat_bytes), (_, cast_bytes) = mode.intervals[0]
    assert (cat_bytes, cast_bytes) == (2 * 4 * n + 2 * 4 * n, 2 * 4 * n + 2 * 2 * n)
    assert cat_bytes + cast_bytes > 1.2 * (4 * n + 2 * 2 * n)
