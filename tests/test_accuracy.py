"""The accuracy table (fastdiff.accuracy) and its command: budgets in model calls, errors
against the exact ODE solution that behave as the solvers' orders say."""
import pytest

from fastdiff.__main__ import main
from fastdiff.accuracy import Entry, accuracy_table, format_table, plan_for


def test_errors_follow_the_solvers_orders():
    e = {(x.solver, x.spacing, x.calls): x for x in
         accuracy_table(("ddim", "dpmpp_2m"), ("logsnr", "two_stage"), (5, 10), batch=4, ode_step=4e-2)}
    assert all(x.steps == x.calls for x in e.values())  # one call per step
    for solver in ("ddim", "dpmpp_2m"):
        assert e[solver, "logsnr", 10].rms < e[solver, "logsnr", 5].rms
    # second order: halving the step gains much more than first order does
    gain = {s: e[s, "logsnr", 5].rms / e[s, "logsnr", 10].rms for s in ("ddim", "dpmpp_2m")}
    assert gain["dpmpp_2m"] > 1.5 * gain["ddim"], gain
    assert e["dpmpp_2m", "logsnr", 10].rms < 0.5 * e["ddim", "logsnr", 10].rms
    assert 0 < e["dpmpp_2m", "two_stage", 10].rms < 1.0


def test_tuned_entries_run_the_tuned_grid_of_the_logsnr_plan():
    e = {x.spacing: x for x in accuracy_table(("dpmpp_2m",), ("logsnr", "tuned"), (4,), batch=4, ode_step=4e-2,
                                              calibration=4, tune_calls=120)}
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
    assert "dpmpp_2m   karras" in text and "best at  4 calls: dpmpp_2m + karras" in text
    assert '"calls": 4' in out.read_text()
