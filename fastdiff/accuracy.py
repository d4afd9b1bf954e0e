"""How far each solver x grid lands from the exact answer, at equal model calls.

A `ModelCase` says what is sampled and what is the answer: `mixture_case` (the default of the
command) or `digits_case` (the bundled digits model, against a converged many-step run).
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
    python -m fastdiff accuracy --model digits --calls 4,6,8,10 [--fd]
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

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
    quality: Optional[Dict] = None  # FD, KID, ... of the samples (`fastdiff.evaluation.evaluate`), when measured


def spacing_for(name: str, steps: int):
    """A spacing name, or "two_stage": a third of the steps (rounded, at least two: one coarse
    step is first order over the whole high-noise range) down to sigma/alpha = 4 in logSNR, the
    rest in Karras spacing."""
    if name == "two_stage":
        return TwoStage(max(2, round(steps / 3)), TWO_STAGE_SPLIT, "logsnr", "karras")
    return name


@dataclass
class ModelCase:
    """What the table samples and measures against: `model` with the Sampler `options` it needs
    (schedule, prediction, model_time), the held-out `noise` (+ `cond`), and `answer(alpha, sigma)`,
    the reference result for `noise` started at a grid's first point. "tuned" entries tune on
    `calibration` (+ `calibration_cond`); `quality(x)`, when given, scores an entry's samples."""

    title: str  # the table's header: model, reference, metric
    model: Callable
    options: Dict
    noise: torch.Tensor
    answer: Callable[[float, float], torch.Tensor]
    calibration: torch.Tensor
    cond: Optional[Dict] = None
    calibration_cond: Optional[Dict] = None
    quality: Optional[Callable[[torch.Tensor], Dict]] = None
    model_dtype: Optional[torch.dtype] = None  # the model's own dtype when it is not float64

    def sample(self, plan: Sampler) -> torch.Tensor:
        """`plan` run on `noise` with a float64 solver state."""
        return plan.sample(self.model, self.noise, cond=self.cond, model_dtype=self.model_dtype, dtype=torch.float64)


def _noise(seed: int, n: int, shape) -> torch.Tensor:
    return torch.randn(n, *shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def mixture_case(schedule: str = "scaled_linear", batch: int = 32, seed: int = 0, ode_step: float = 1e-2,
                 calibration: int = 64) -> ModelCase:
    """The analytic Gaussian mixture, against the exact ODE solution. `ode_step`: the RK4 step in
    logSNR of the exact solution (1e-2 agrees with 5e-3 to ~1e-8 relative, far below any solver
    error here)."""
    mixture = GaussianMixture.random(shape=(4, 4, 4), components=4, seed=seed, std_range=(0.1, 0.5))
    noise = _noise(seed + 1, batch, (4, 4, 4))
    return ModelCase(
        title=f"RMS error against the exact ODE solution (analytic Gaussian mixture, {schedule}, batch {batch}, "
              f"float64 reference solvers), by model calls:",
        model=mixture.model(get_schedule(schedule), "epsilon", dtype=torch.float64), options=dict(schedule=schedule),
        noise=noise, answer=lambda alpha, sigma: mixture.ode_solution(noise, alpha, sigma, 1.0, 0.0, step=ode_step),
        calibration=_noise(seed + 2, calibration, (4, 4, 4)))


DIGITS_OPTIONS = dict(schedule="linear", prediction="epsilon", model_time="timestep")  # how the model was trained
DIGITS_REFERENCE = ("unipc", 400)  # converged: see tests/test_accuracy.py and benchmarks/NOTES.md


def digits_case(batch: int = 64, seed: int = 0, calibration: int = 64, reference=DIGITS_REFERENCE,
                fd: bool = False, bootstrap: int = 100) -> ModelCase:
    """The bundled digits model (class-conditional, labels balanced, no guidance; float32 model,
    float64 solver state), against `reference` = (solver label, steps) on the logsnr grid from
    the same noise and labels. `fd`: also FD and KID (95 % bootstrap intervals, `bootstrap`
    replicates) in the metric classifier's feature space against the held-out real digits."""
    from fastdiff.demo import load_digits_model
    from fastdiff.demo.evaluate import balanced_labels

    model = load_digits_model()
    shape = tuple(model.config.sample_shape)
    noise = _noise(seed + 1, batch, shape)
    cond = {"class_labels": balanced_labels(batch)}
    ref_solver, ref_steps = reference

    def answer(alpha, sigma):  # `case`, below, by the time it is called
        return case.sample(Sampler(steps=ref_steps, spacing="logsnr", sigma_max=sigma / alpha, backend="reference",
                                   **DIGITS_OPTIONS, **ODE_SOLVERS[ref_solver]))

    quality = None
    if fd:
        from fastdiff.demo.png import to_uint8
        from fastdiff.evaluation import Samples, evaluate, load_reference

        real = load_reference("digits")
        quality = lambda x: evaluate(Samples(to_uint8(x), cond["class_labels"]), real, bootstrap=bootstrap, seed=seed)
    metric = " and FD / KID vs the held-out digits" if fd else ""
    case = ModelCase(
        title=f"RMS distance to {ref_solver} with {ref_steps} logsnr steps from the same noise{metric} (digits model, "
              f"linear, batch {batch}, balanced labels, no guidance, float64 reference solvers), by model calls:",
        model=model, options=DIGITS_OPTIONS, noise=noise, answer=answer, cond=cond,
        calibration=_noise(seed + 2, calibration, shape),
        calibration_cond={"class_labels": balanced_labels(calibration)}, quality=quality, model_dtype=torch.float32)
    return case


def plan_for(solver: str, spacing: str, calls: int, schedule: str, **options) -> Optional[Sampler]:
    """The reference plan of the `ODE_SOLVERS` label `solver` whose model calls equal `calls`,
    or None. `options`: further Sampler options (prediction, model_time)."""
    for steps in range(1, calls + 1):
        try:
            s = Sampler(steps=steps, schedule=schedule, spacing=spacing_for(spacing, steps), backend="reference",
                        **options, **ODE_SOLVERS[solver])
        except ValueError:  # e.g. too few steps for a two-stage grid
            continue
        made = s.model_calls
        if made == calls:
            return s
        if made > calls:
            return None
    return None


def accuracy_table(case: ModelCase, solvers: Sequence[str] = tuple(ODE_SOLVERS), spacings: Sequence[str] = SPACINGS,
                   calls: Sequence[int] = CALLS, progress=None, tune_calls: int = 2000) -> List[Entry]:
    """RMS distance to `case.answer` for every solver x spacing x model-call budget (and
    `case.quality` of the samples, when the case has one). Spacing "tuned": `tune_calls` model
    calls for each `tune_grid` search on `case.calibration`."""
    answers: Dict[Tuple[float, float], torch.Tensor] = {}  # by the grid's first (alpha, sigma)
    todo = [(so, sp, n) for so in solvers for sp in spacings for n in calls]
    out = []
    for k, (solver, spacing, n) in enumerate(todo):
        plan = plan_for(solver, "logsnr" if spacing == TUNED else spacing, n, **case.options)
        if plan is not None and spacing == TUNED:
            levels = tune_grid(case.model, plan, plan.steps, case.calibration, cond=case.calibration_cond,
                               model_dtype=case.model_dtype, max_model_calls=tune_calls, progress=False,
                               dtype=torch.float64)
            plan = Sampler(sigmas=levels, backend="reference", **case.options, **ODE_SOLVERS[solver])
        if plan is not None:
            start = (float(plan.grid.alpha[0]), float(plan.grid.sigma[0]))
            if start not in answers:
                answers[start] = case.answer(*start)
            x = case.sample(plan)
            rms = float((x - answers[start]).pow(2).mean().sqrt())
            out.append(Entry(solver, spacing, n, plan.steps, rms, case.quality(x) if case.quality else None))
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


def format_quality(entries: Sequence[Entry]) -> str:
    """One line per entry with a quality measurement: FD [95 % CI], KID x1e3 [CI], acc."""
    from fastdiff.evaluation import format_result

    return "\n".join(format_result(f"{e.solver} + {e.spacing} at {e.calls} calls", e.quality)
                     for e in entries if e.quality is not None)
