"""`--model` specs for tests/test_generate.py (imported by the `python -m fastdiff generate`
subprocesses, which get tests/ on PYTHONPATH)."""
import os
import signal

from fastdiff.demo.workload import digits


def digits_dying_at(device="cpu", **options):
    """The digits workload, but the process kills itself (SIGKILL: no cleanup, like a preempted
    job) when asked for image $FASTDIFF_TEST_DIE_AT."""
    w = digits(device=device, **options)
    die_at, cond = os.environ.get("FASTDIFF_TEST_DIE_AT"), w.cond

    def dying_cond(indices):
        if die_at is not None and int(die_at) in indices.tolist():
            os.kill(os.getpid(), signal.SIGKILL)
        return cond(indices)

    w.cond = dying_cond
    return w


def not_a_workload(device="cpu", **options):
    return "a string"


class Counting:
    """A tiny elementwise denoiser that counts its calls (CALLS, summed over instances): the CLI
    catalogue asserts that a bad argument or file is refused before any model call."""

    calls = 0

    def __call__(self, x, t, **cond):
        Counting.calls += 1
        return 0.5 * x


def counting(device="cpu", solver=None, steps=None, guidance_scale=None):
    import fastdiff
    from fastdiff.generation import Workload

    return Workload(model=Counting(), sampler=fastdiff.Sampler(solver=solver or "ddim", steps=steps or 1),
                    shape=(1, 4, 4), guidance_scale=1.0 if guidance_scale is None else guidance_scale)
