"""The accuracy table (fastdiff.accuracy) and its command: budgets in model calls, errors
against the exact ODE solution that behave as the solvers' orders say; on the digits model,
errors against a reference that is converged far below them."""
import dataclasses

import pytest

from fastdiff.__main__ import main
from fastdiff.sampler import Sampler
from fastdiff.accuracy import (DIGITS_OPTIONS, DIGITS_REFERENCE, Entry, accuracy_table, digits_case, format_table,
                               mixture_case, plan_for)


def test_errors_follow_the_solvers_orders():
    e = {(x.solver, x.spacing, x.calls): x for x in
         accuracy_table(mixture_case(batch=4, ode_step=4e-2), ("ddim", "dpmpp_2m"), ("logsnr", "two_stage"), (5, 10))}
    assert all(x.steps == x.calls for x in e.values())  # one call per step
    for solver in ("ddim", "dpmpp_2m"):
        assert e[solver, "logsnr", 10].rms < e[solver, "logsnr", 5].rms
    # second order: halving the step gains much more than first order does
    gain = {s: e[s, "logsnr", 5].rms / e[s, "logsnr", 10].rms for s in ("ddim", "dpmpp_2m")}
    assert gain["dpmpp_2m"] > 1.5 * gain["ddim"], gain
    assert e["dpmpp_2m", "logsnr", 10].rms < 0.5 * e["ddim", "logsnr", 10].rms
    assert 0 < e["dpmpp_2m", "two_stage", 10].rms < 1.0


def test_tuned_entries_run_the_tuned_grid_of_the_logsnr_plan():
    case = mixture_case(batch=4, ode_step=4e-2, calibration=4)
    e = {x.spacing: x for x in accuracy_table(case, ("dpmpp_2m",), ("logsnr", "tuned"), (4,), tune_calls=120)}
    assert e["tuned"].steps == e["tuned"].calls == 4
    assert 0 < e["tuned"].rms < 1.0 and 0 < e["logsnr"].rms < 1.0


def test_plan_budget_is_in_model_calls():
    s = plan_for("dpmpp_3m", "two_stage", 6, "linear")
    assert s.steps == 6 and s.backend == "reference" and s.grid.steps == 6
    assert plan_for("ddim", "two_stage", 1, "linear") is None  # two stages need two steps
    heun = plan_for("heun", "karras", 9, "linear")  # 2N - 1 calls for N steps
    assert heun.steps == 5 and heun.model_calls == 9 and plan_for("heun", "karras", 8, "linear") is None
    u3 = plan_for("unipc3", "karras", 6, "linear")
    assert u3.solver == "unipc" and u3.options["order"] == 3


def test_format_table_marks_missing_budgets_and_names_the_best():
    entries = [Entry("a", "karras", 4, 4, 0.5), Entry("b", "karras", 4, 2, 0.25), Entry("a", "karras", 8, 8, 0.1)]
    text = format_table(entries, (4, 8))
    row_b = next(line for line in text.splitlines() if line.startswith("b "))
    assert row_b.split()[2:] == ["2.50e-01", "-"]
    assert "best at  4 calls: b + karras (2.50e-01)" in text and "best at  8 calls: a + karras (1.00e-01)" in text


@pytest.mark.parametrize("argv,match", [
    (["--calls", "4,x"], "--calls 4,x: expected integers"),
    (["--calls", "0"], "--calls 0: expected integers"),
    (["--solvers", "ddpm"], "--solvers: 'ddpm' is not a deterministic solver label"),
    (["--spacings", "leading"], "--spacings: 'leading'"),
    (["--ode-step", "0"], "--ode-step 0.0: expected a step in"),
    (["--calibration", "0"], "--calibration 0: expected an integer >= 1"),
    (["--model", "cifar"], "--model cifar: expected one of mixture, digits"),
    (["--fd"], "--fd: only for --model digits"),
    (["--reference-steps", "100"], "--reference-steps: only for --model digits"),
    (["--model", "digits", "--ode-step", "0.01"], "--ode-step: only for --model mixture"),
    (["--model", "digits", "--schedule", "cosine"], "--schedule cosine: the digits model was trained on the linear"),
    (["--schedule", "sqrt"], "--schedule sqrt: expected one of linear, scaled_linear, cosine"),
    (["--model", "digits", "--reference-steps", "0"], "--reference-steps 0: expected an integer >= 1"),
])
def test_command_bad_input_is_one_line(argv, match, capsys):
    assert main(["accuracy", *argv]) == 2
    err = capsys.readouterr().err
    assert match in err and len(err.strip().splitlines()) == 1


def test_command_prints_the_table(capsys, tmp_path):
    out = tmp_path / "acc.json"
    assert main(["accuracy", "--calls", "4", "--solvers", "dpmpp_2m", "--spacings", "karras", "--batch", "2",
                 "--ode-step", "0.05", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert text.startswith("RMS error against the exact ODE solution (analytic Gaussian mixture, scaled_linear, "
                           "batch 2, float64 reference solvers)")
    assert "dpmpp_2m   karras" in text and "best at  4 calls: dpmpp_2m + karras" in text
    assert '"calls": 4' in out.read_text()


def test_digits_table_counts_model_calls_against_a_converged_reference():
    case = digits_case(batch=2, calibration=2)
    calls = []

    def counted(x, t, **cond):  # the table's own runs only: the reference runs call case.model
        calls.append(x.shape[0])
        return case.model(x, t, **cond)

    runs = dataclasses.replace(case, model=counted)
    e = {(x.solver, x.spacing, x.calls): x for x in accuracy_table(runs, ("dpmpp_2m", "heun"), ("logsnr",), (5, 20))}
    assert len(calls) == 5 + 20 + 5  # heun: 3 steps for 5 calls, none for 20 (2N - 1 is odd)
    assert e["heun", "logsnr", 5].steps == 3 and e["dpmpp_2m", "logsnr", 20].steps == 20
    assert ("heun", "logsnr", 20) not in e
    calls.clear()
    tuned = accuracy_table(runs, ("unipc",), ("tuned",), (5,), tune_calls=120)[0]
    assert tuned.steps == 5 and 100 + 2 * 5 + 5 <= len(calls) <= 120 + 5  # the search's budget, then the run
    assert set(calls) == {2}
    assert e["dpmpp_2m", "logsnr", 20].rms < 0.5 * e["dpmpp_2m", "logsnr", 5].rms
    # converged: doubling the reference's steps moves it far less than the best entry's error
    start = Sampler(steps=5, spacing="logsnr", **DIGITS_OPTIONS).grid
    start = (float(start.alpha[0]), float(start.sigma[0]))
    finer = digits_case(batch=2, reference=(DIGITS_REFERENCE[0], 2 * DIGITS_REFERENCE[1])).answer(*start)
    moved = float((finer - case.answer(*start)).pow(2).mean().sqrt())
    assert 0 < moved < 0.1 * min(x.rms for x in [*e.values(), tuned]), (moved, e, tuned)


def test_digits_command_names_its_reference_and_metric(capsys):
    assert main(["accuracy", "--model", "digits", "--calls", "4", "--solvers", "dpmpp_2m", "--spacings", "logsnr",
                 "--batch", "4", "--reference-steps", "20", "--fd"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("RMS distance to unipc with 20 logsnr steps from the same noise and FD / KID vs the "
                           "held-out digits (digits model, linear, batch 4")
    assert "best at  4 calls: dpmpp_2m + logsnr" in text
    assert "dpmpp_2m + logsnr at 4 calls: FD " in text and "(4 samples vs 359 reference images)" in text
