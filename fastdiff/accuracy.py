"""How far each solver x grid lands from the exact answer, at equal model calls.

The analytic Gaussian-mixture model (`fastdiff.testing.GaussianMixture`) has a closed-form
ideal denoiser, so sampling it solves the exact probability-flow ODE, which
`GaussianMixture.ode_solution` integrates to ~1e-10. For every deterministic solver, spacing
and model-call budget, `accuracy_table` runs the textbook reference solver in float64 from the
same noise and reports the RMS distance to the exact clean-limit solution started at the
grid's own first point. Budgets count model calls (NFE): a solver with two calls per step gets
the step count whose calls equal the budget, or no entry when none does. The pseudo-spacing
"tuned" is the logsnr plan's grid tuned by `fastdiff.tune_grid` on a separate calibration batch
(`calibration` samples; the table's noise stays held out).

    python -m fastdiff accuracy --schedule scaled_linear --calls 4,6,8,10,15,20
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from fastdiff.grid import TwoStage
from fastdiff.sampler import Sampler
from fastdiff.schedules import get_schedule
from fastdiff.testing import GaussianMixture
from fastdiff.tuning import tune_grid

CALLS = (4, 6, 8, 10, 15, 20)
SPACINGS = ("trailing", "karras", "logsnr", "linspace", "two_stage")
# the deterministic solvers (an ODE error means nothing for SDE/ancestral samplers), by label
ODE_SOLVERS = {
    "ddim": dict(solver="ddim"), "euler": dict(solver="euler"), "dpmpp_2m": dict(solver="dpmpp_2m"),
    "dpmpp_3m": dict(solver="dpmpp_3m"), "heun": dict(solver="heun"),
    "unipc": dict(solver="unipc"),  # bh2, order 2 (the defaults)
    "unipc_bh1": dict(solver="unipc", variant="bh1"), "unipc3": dict(solver="unipc", order=3),
}
TUNED = "tuned"  # a spacing label for tune_grid's grids (not in SPACINGS: it costs a search per entry)
TWO_STAGE_SPLIT = 4.0  # sigma/alpha of the split (best of 0.25-4 over 4-20 calls, benchmarks/NOTES.md)


@dataclass(frozen=True)
class Entry:
    solver: str
    spacing: str
    calls: int
    steps: int
    rms: float


def spacing_for(name: str, steps: int):
    """A spacing name, or "two_stage": a third of the steps (rounded, at least two: one coarse
    step is first order over the whole high-noise range) down to sigma/alpha = 4 in logSNR, the
    rest in Karras spacing."""
    if name == "two_stage":
        return TwoStage(max(2, round(steps / 3)), TWO_STAGE_SPLIT, "logsnr", "karras")
    return name


def plan_for(solver: str, spacing: str, calls: int, schedule: str) -> Optional[Sampler]:
    """The reference plan of the `ODE_SOLVERS` label `solver` whose model calls equal `calls`,
    or None."""
    for steps in range(1, calls + 1):
        try:
            s = Sampler(steps=steps, schedule=schedule, spacing=spacing_for(spacing, steps), backend="reference",
                        **ODE_SOLVERS[solver])
        except ValueError:  # e.g. too few steps for a two-stage grid
            continue
        made = s.model_calls
        if made == calls:
            return s
        if made > calls:
            return None
    return None


def accuracy_table(solvers: Sequence[str] = tuple(ODE_SOLVERS), spacings: Sequence[str] = SPACINGS,
                   calls: Sequence[int] = CALLS, schedule: str = "scaled_linear", batch: int = 32,
                   seed: int = 0, ode_step: float = 1e-2, progress=None, calibration: int = 64,
                   tune_calls: int = 2000) -> List[Entry]:
    """RMS error against the exact ODE solution for every solver x spacing x model-call budget.
    `ode_step`: the RK4 step in logSNR of the exact solution (1e-2 agrees with 5e-3 to ~1e-8
    relative, far below any solver error here). Spacing "tuned": `calibration` noise samples and
    `tune_calls` model calls for each `tune_grid` search."""
    mixture = GaussianMixture.random(shape=(4, 4, 4), components=4, seed=seed, std_range=(0.1, 0.5))
    sched = get_schedule(schedule)
    model = mixture.model(sched, "epsilon", dtype=torch.float64)
    noise, calib = (torch.randn(n, 4, 4, 4, generator=torch.Generator().manual_seed(seed + k), dtype=torch.float64)
                    for k, n in ((1, batch), (2, calibration)))
    exact: Dict[Tuple[float, float], torch.Tensor] = {}  # by the grid's first (alpha, sigma)
    todo = [(so, sp, n) for so in solvers for sp in spacings for n in calls]
    out = []
    for k, (solver, spacing, n) in enumerate(todo):
        plan = plan_for(solver, "logsnr" if spacing == TUNED else spacing, n, schedule)
        if plan is not None and spacing == TUNED:
            levels = tune_grid(model, plan, plan.steps, calib, max_model_calls=tune_calls, progress=False,
                               dtype=torch.float64)
            plan = Sampler(schedule=schedule, sigmas=levels, backend="reference", **ODE_SOLVERS[solver])
        if plan is not None:
            start = (float(plan.grid.alpha[0]), float(plan.grid.sigma[0]))
            if start not in exact:
                exact[start] = mixture.ode_solution(noise, *start, 1.0, 0.0, step=ode_step)
            x = plan.sample(model, noise, dtype=torch.float64)
            rms = float((x - exact[start]).pow(2).mean().sqrt())
            out.append(Entry(solver, spacing, n, plan.steps, rms))
        if progress is not None:
            progress(k + 1, len(todo))
    return out


def format_table(entries: Sequence[Entry], calls: Sequence[int] = CALLS) -> str:
    """One row per solver x spacing, one column per budget (RMS error; "-": no plan with that
    many calls); then the best combination at each budget."""
    rows: Dict[Tuple[str, str], Dict[int, float]] = {}
    for e in entries:
        rows.setdefault((e.solver, e.spacing), {})[e.calls] = e.rms
    head = f"{'solver':<10} {'spacing':<10}" + "".join(f"{n:>10}" for n in calls)  # solver: its label
    lines = [head, "-" * len(head)]
    for (solver, spacing), errs in rows.items():
        cells = "".join(f"{errs[n]:>10.2e}" if n in errs else f"{'-':>10}" for n in calls)
        lines.append(f"{solver:<10} {spacing:<10}{cells}")
    lines.append("")
    for n in calls:
        at = [e for e in entries if e.calls == n and math.isfinite(e.rms)]
        if at:
            best = min(at, key=lambda e: e.rms)
            lines.append(f"best at {n:>2} calls: {best.solver} + {best.spacing} ({best.rms:.2e})")
    return "\n".join(lines)
