"""Anytime attacks: under a time budget every attack loop stops at its next step and the attack
returns the best points found so far (within the perturbation budget, flagged time-limited); the
hard deadline still raises `Stopped`; the audit shares its time out between the attacks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import shipped_data, shipped_model
from test_deadline import Polls, Ticks  # a stop_when counting its calls (never stopping by default); a ticking clock

from verifier import audit as audit_module
from verifier.attacks import METHODS, attack
from verifier.attacks.base import TIME_LIMITED
from verifier.attacks.result import transport_cost
from verifier.audit import AuditSettings, audit
from verifier.convert import convert_model
from verifier.deadline import NEVER, Deadline
from verifier.onnx_io import load_model
from verifier.report import validate_report

pytestmark = pytest.mark.usefixtures("one_thread")
DELTAS = [1 / 255, 4 / 255]


@pytest.fixture(scope="module")
def mlp():
    loaded = load_model(shipped_model("mlp_relu"))
    data = np.load(shipped_data("mlp_relu"))
    return loaded, convert_model(loaded), data["x"][:24], data["y"][:24]


def _run(mlp, method: str, budget: Deadline | None):
    loaded, converted, x, y = mlp
    polls = Polls()
    report = attack(converted, loaded, x, y, [method], DELTAS, p=2.0, norm="inf", box=(0.0, 1.0), steps=10,
                    device="cpu", deadline=Deadline.polling(polls), budget=budget)
    return report, polls.count


@pytest.mark.parametrize("method", METHODS)
def test_a_spent_budget_stops_every_attack_early_with_a_valid_lower_bound(mlp, method):
    full, full_passes = _run(mlp, method, None)
    cut, cut_passes = _run(mlp, method, Deadline(at=3.0, clock=Ticks()))  # spent after a few readings
    assert cut_passes < full_passes  # the loops stopped: fewer forward/gradient passes
    for before, after in zip(full.results, cut.results):
        assert TIME_LIMITED in after.flags and TIME_LIMITED not in before.flags
        assert after.transport_cost <= after.delta * (1 + 1e-9)  # still inside the perturbation budget
        assert after.risk >= after.clean_risk - 1e-12  # the best point kept includes the samples themselves
        assert after.robust_accuracy <= after.clean_accuracy + 1e-12


def test_a_budget_that_is_not_reached_changes_nothing(mlp):
    plain, _ = _run(mlp, "pgd", None)
    far, _ = _run(mlp, "pgd", Deadline.after(1e6))
    assert [r.risk for r in plain.results] == [r.risk for r in far.results]
    assert [r.flags for r in plain.results] == [r.flags for r in far.results]
    assert all(TIME_LIMITED not in r.flags for r in far.results)


def test_each_method_gets_an_equal_share_of_the_budget_left(mlp, monkeypatch):
    import verifier.attacks as attacks_module

    seen = []
    real = attacks_module.ATTACKS["pgd"]

    class Recording(real):
        def __init__(self, *args, budget, **kwargs):
            seen.append(budget.at)
            super().__init__(*args, budget=budget, **kwargs)

    monkeypatch.setitem(attacks_module.ATTACKS, "pgd", Recording)
    monkeypatch.setitem(attacks_module.ATTACKS, "wda", Recording)
    clock = iter([0.0, 0.0, 100.0] + [100.0] * 10_000)  # the second method starts at t = 100
    budget = Deadline(at=1000.0, clock=lambda: next(clock))
    loaded, converted, x, y = mlp
    attack(converted, None, x[:4], y[:4], ["pgd", "wda"], [1 / 255], box=(0.0, 1.0), steps=2, device="cpu",
           budget=budget)
    # first: half of ATTACK_SHARE of the 1000 s left; second: ATTACK_SHARE of the 900 s left at t = 100
    # (less the replays' reserve, timed on the clean samples in real seconds: milliseconds here)
    share = attacks_module.ATTACK_SHARE
    assert seen == pytest.approx([share / 2 * 1000.0, 100.0 + share * 900.0], abs=0.5)
    assert seen[0] < share / 2 * 1000.0


def test_audit_attack_cut_by_its_share_still_completes_and_says_so(tmp_path, monkeypatch):
    real = audit_module.attack
    budgets = []

    def spent_for_pgd(*args, budget, **kwargs):
        budgets.append(budget)
        return real(*args, budget=Deadline(at=0.0) if args[4] == ["pgd"] else budget, **kwargs)

    monkeypatch.setattr(audit_module, "attack", spent_for_pgd)
    settings = AuditSettings(deltas=(1 / 255, 4 / 255), attacks=("wdapp", "pgd"), box=(0.0, 1.0), samples=16,
                             grid_points=8, steps=5, time_limit=3600.0)
    outcome = audit(shipped_model("mlp_relu"), shipped_data("mlp_relu"), settings, tmp_path)
    assert [b.at != NEVER.at for b in budgets] == [True, True]
    assert budgets[0].at < budgets[1].at  # the first attack's share ends before the second's
    report = json.loads((tmp_path / "report.json").read_text())
    validate_report(report)
    assert report["complete"] is True and outcome.exit_code in (0, 1)
    assert any(w.startswith("attack pgd stopped early by the time limit at delta") for w in report["warnings"])
    for row in report["results"]:
        assert TIME_LIMITED in row["attacks"]["pgd"]["flags"]
        assert TIME_LIMITED not in row["attacks"]["wdapp"]["flags"]
        assert row["attacks"]["pgd"]["risk"] <= row["certificate"] + 1e-9


def test_passes_of_no_rows_give_empty_results(mlp):
    """A loop whose rows all dropped out (e.g. no verified flip left to pull back) asks for nothing."""
    from verifier.attacks import _target
    from verifier.device import resolve_device

    _, converted, x, y = mlp
    target = _target(converted, x[:3], y[:3], 2.0, "inf", "ce", (0.0, 1.0), resolve_device("cpu"), NEVER)
    empty = target.x[:0]
    assert target.logits(empty).shape == (0, 10)
    values, grads, logits = target.gradient(empty, target.loss_objective(target.y[:0]))
    assert values.shape == (0,) and grads.shape == (0, x[0].size) and logits.shape == (0, 10)


def test_a_loop_stops_before_a_step_that_would_end_past_its_share(mlp):
    """Steps of 10 s and a share ending at t = 25: the poll at t = 20 stops (the next step would end
    at 30), not the one at t = 30 after the share is already spent."""
    from verifier.attacks.base import Attack
    from verifier.attacks import _target
    from verifier.device import resolve_device

    _, converted, x, y = mlp
    target = _target(converted, x[:2], y[:2], 2.0, "inf", "ce", (0.0, 1.0), resolve_device("cpu"), NEVER)
    readings = iter([0.0, 10.0, 20.0])  # begin's share, then one reading per poll
    runner = Attack(target, budget=Deadline(at=25.0, clock=lambda: next(readings)))
    runner.begin(1)
    assert runner.until.at == 25.0
    assert runner.out_of_time() is False  # t = 10, no step measured yet
    assert runner.out_of_time() is True and runner.cut  # t = 20: the next step would end at 30


def test_a_loop_does_not_start_a_pass_longer_than_its_share(mlp):
    """The target times its passes: with a gradient pass taking 1 s a row, a step of 10 rows (one
    padded pass) does not start with 30 s of share left, and a step of no rows does."""
    from verifier.attacks import _target
    from verifier.attacks.base import Attack
    from verifier.device import resolve_device

    _, converted, x, y = mlp
    target = _target(converted, x[:2], y[:2], 2.0, "inf", "ce", (0.0, 1.0), resolve_device("cpu"), NEVER)
    assert target.timing["forward"] > 0  # the pass that read the number of classes was timed
    target.timing["gradient"] = 1.0
    assert target.step_seconds(10) == target.rows_per_pass  # one padded pass
    runner = Attack(target, budget=Deadline.after(30.0))
    runner.begin(1)
    assert target.rows_per_pass > 30 and runner.out_of_time(rows=10) is True
    runner.begin(1)
    assert runner.out_of_time(rows=0) is False


@pytest.mark.parametrize("method", ["pgd", "wda", "wdapp", "wpgd"])
def test_a_delta_starved_of_steps_reports_no_less_than_a_smaller_delta(mlp, method, monkeypatch):
    """The larger delta's share is spent before it starts (no step: its own result would be the clean
    samples); the smaller delta's distribution, feasible there too, is carried forward."""
    from verifier.attacks.base import Attack
    from verifier.attacks.monotone import CARRIED

    clock = Ticks()
    real_begin = Attack.begin

    def begin(self, parts_left):
        if parts_left == 1:  # the last delta: its share ends before its first step
            clock.now = 1e9
        real_begin(self, parts_left)

    monkeypatch.setattr(Attack, "begin", begin)
    loaded, converted, x, y = mlp
    small, large = DELTAS
    report = attack(converted, loaded, x, y, [method], [small, large], p=2.0, norm="inf", box=(0.0, 1.0),
                    steps=10, device="cpu", budget=Deadline(at=1e6, clock=clock))
    at_small, at_large = report.results
    assert at_small.risk > at_small.clean_risk + 1e-3  # the smaller delta got its steps
    assert TIME_LIMITED in at_large.flags and CARRIED.format(delta=small) in at_large.flags
    assert at_large.risk == at_small.risk and at_large.robust_accuracy <= at_small.robust_accuracy
    assert at_large.transport_cost <= large * (1 + 1e-9)
    assert transport_cost(at_large.atoms, at_large.weights, at_large.source, torch.as_tensor(x), 2.0,
                          "inf") <= small * (1 + 1e-6)  # the carried atoms are the smaller delta's


def test_carrying_forward_never_takes_an_over_budget_distribution(mlp):
    from dataclasses import replace as changed

    from verifier.attacks.monotone import monotone_in_delta

    loaded, converted, x, y = mlp
    report = attack(converted, loaded, x, y, ["pgd"], DELTAS, p=2.0, norm="inf", box=(0.0, 1.0), steps=5,
                    device="cpu")
    low, high = report.results
    weak = changed(high, risk=low.risk - 1.0, robust_accuracy=1.0)
    strong = changed(low, flags=low.flags + ("over-budget",))
    assert monotone_in_delta([strong, weak])[1] is weak  # an over-budget result is never carried
    carried = monotone_in_delta([low, weak])[1]
    assert carried.risk == low.risk and carried.robust_accuracy == low.robust_accuracy
    assert carried.atoms is low.atoms and carried.delta == high.delta


class _Slowing(torch.nn.Module):
    """A module whose every forward pass advances a fake clock: 1 s, then 3 s from t = 10 on (a
    machine that suddenly gets loaded)."""

    def __init__(self, inner: torch.nn.Module, clock) -> None:
        super().__init__()
        self.inner, self.clock = inner, clock

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock.now += 1.0 if self.clock.now < 10.0 else 3.0
        return self.inner(x)


@pytest.mark.parametrize("method", ["pgd", "wda"])
def test_a_pass_that_suddenly_takes_3x_longer_still_ends_in_a_time_limited_result(mlp, method, monkeypatch):
    """The share is far away, the hard deadline near (t = 30): the loops stop while the next step, even
    3x slower than the slowest pass seen, and the replays after it still fit before it; without that
    guard the loops run into the hard deadline and the attack raises `Stopped`."""
    import verifier.attacks as attacks_module

    clock = Ticks()
    clock.now = 0.0
    real = attacks_module.prepared_module
    monkeypatch.setattr(attacks_module, "prepared_module", lambda *a, **k: _Slowing(real(*a, **k), clock))
    readings = lambda: clock.now  # noqa: E731 - the clock only the passes advance
    loaded, converted, x, y = mlp
    report = attack(converted, None, x[:8], y[:8], [method], [4 / 255], p=2.0, norm="inf", box=(0.0, 1.0),
                    steps=500, device="cpu", deadline=Deadline(at=30.0, clock=readings),
                    budget=Deadline(at=1000.0, clock=readings))
    (result,) = report.results
    assert TIME_LIMITED in result.flags and clock.now <= 30.0
    assert result.steps > 0 or result.risk >= result.clean_risk  # it stopped with its best points, not an error
    assert result.transport_cost <= result.delta * (1 + 1e-9)


def test_a_step_is_predicted_from_the_slowest_recent_one_not_the_last(mlp):
    """Polls at t = 10, 40 (a step of 30 s), 45 (one of 5 s): with the share ending at t = 70, the
    30 s step still counts, so the poll at 45 stops (the last step alone would have allowed 65)."""
    from verifier.attacks import _target
    from verifier.attacks.base import Attack
    from verifier.device import resolve_device

    _, converted, x, y = mlp
    target = _target(converted, x[:2], y[:2], 2.0, "inf", "ce", (0.0, 1.0), resolve_device("cpu"), NEVER)
    readings = iter([0.0, 10.0, 40.0, 45.0])  # begin's share, then one reading per poll
    runner = Attack(target, budget=Deadline(at=70.0, clock=lambda: next(readings)))
    runner.begin(1)
    assert runner.out_of_time() is False and runner.out_of_time() is False  # t = 10; t = 40 (+30 = 70, not past)
    assert runner.out_of_time() is True  # t = 45: the slowest recent step (30 s) would end past 70


class _Stepping(torch.nn.Module):
    """A module whose every forward pass advances a fake clock by `seconds` (a large model's pass),
    a gradient pass by `gradient_seconds` (default the same)."""

    def __init__(self, inner: torch.nn.Module, clock, seconds: float, gradient_seconds: float | None = None) -> None:
        super().__init__()
        self.inner, self.clock, self.seconds = inner, clock, seconds
        self.gradient_seconds = seconds if gradient_seconds is None else gradient_seconds

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.clock.now += self.gradient_seconds if torch.is_grad_enabled() and x.requires_grad else self.seconds
        return self.inner(x)


def _attack_on_a_fake_clock(mlp, monkeypatch, method: str, delta: float, hard: float, *seconds: float):
    """One attack of the first 8 samples whose passes advance a fake clock (`_Stepping(*seconds)`),
    the share ending at t = 15 and the hard limit at `hard`; its one result and the clock."""
    import verifier.attacks as attacks_module

    clock = Ticks()
    real = attacks_module.prepared_module
    monkeypatch.setattr(attacks_module, "prepared_module", lambda *a, **k: _Stepping(real(*a, **k), clock, *seconds))
    readings = lambda: clock.now  # noqa: E731 - the clock only the passes advance
    _, converted, x, y = mlp
    report = attack(converted, None, x[:8], y[:8], [method], [delta], p=2.0, norm="inf", box=(0.0, 1.0),
                    steps=50, device="cpu", deadline=Deadline(at=hard, clock=readings),
                    budget=Deadline(at=15.0, clock=readings))
    (result,) = report.results
    return result, clock


@pytest.mark.parametrize("hard, stepped", [(200.0, True), (50.0, False)])
def test_a_first_step_longer_than_the_share_is_taken_when_it_fits_the_hard_limit(mlp, monkeypatch, hard, stepped):
    """Every pass takes 10 s (the clean logits end at t = 10), a gradient step is predicted at 30 s
    and the share ends near t = 10: before, no step fitted the share and the attack returned the
    samples themselves. Now the first step is taken when it (30), the pass that evaluates its point
    (10) and the replay (10), 1.25 x 50 s from t = 10, end before the hard limit (t = 200): a real
    step, time-limited; with the hard limit at t = 50 it is not, and the result says that no step was
    taken."""
    from verifier.deadline import NO_STEP

    result, clock = _attack_on_a_fake_clock(mlp, monkeypatch, "pgd", 4 / 255, hard, 10.0)
    assert TIME_LIMITED in result.flags and clock.now <= hard
    assert result.transport_cost <= result.delta * (1 + 1e-9)
    if stepped:
        assert NO_STEP not in result.flags and result.risk > result.clean_risk + 1e-6
    else:
        assert NO_STEP in result.flags and result.risk == result.clean_risk


@pytest.mark.parametrize("hard, stepped", [(140.0, False), (1000.0, True)])
def test_a_gradient_pass_that_moved_nothing_is_no_step(mlp, monkeypatch, hard, stepped):
    """W-PGD's first gradient pass is at the samples themselves: when it runs long and no step may
    follow (hard limit t = 140), the result is the samples' own numbers and must say that no step was
    taken (before, only "time-limited": shown as an attack result); with time for it, a real step."""
    from verifier.deadline import NO_STEP

    result, _ = _attack_on_a_fake_clock(mlp, monkeypatch, "wpgd", 8 / 255, hard, 10.0, 60.0)  # a gradient pass 60 s
    assert TIME_LIMITED in result.flags
    if stepped:
        assert NO_STEP not in result.flags and result.steps >= 1 and result.risk > result.clean_risk + 1e-6
    else:
        assert NO_STEP in result.flags and result.steps == 0 and result.risk == result.clean_risk


def test_the_first_step_counts_the_hard_limit_not_the_share(mlp):
    """One gradient step of the target's rows predicted at 20 s, a share ending at t = 10, one
    delta's replay 5 s: at t = 1 the first step is granted when t = 100 is the hard limit (1 + 1.25
    (20 + the evaluating pass + 5) fits), refused when it is t = 25; a second step keeps to the share."""
    from verifier.attacks import _target
    from verifier.attacks.base import Attack
    from verifier.device import resolve_device

    _, converted, x, y = mlp
    now = [0.0]
    readings = lambda: now[0]  # noqa: E731
    answers = []
    for hard in (100.0, 25.0):
        target = _target(converted, x[:2], y[:2], 2.0, "inf", "ce", (0.0, 1.0), resolve_device("cpu"),
                         Deadline(at=hard, clock=readings))
        target.timing.update(gradient=20.0 / target.rows_per_pass, forward=1.0 / target.rows_per_pass)
        runner = Attack(target, budget=Deadline(at=10.0, clock=readings), reserve=5.0)
        now[0] = 0.0
        runner.begin(1)
        now[0] = 1.0
        answers.append(runner.out_of_time(rows=2))
        if hard == 100.0:
            now[0] = 3.0  # (a step of the fake clock's own: 2 s)
            assert runner.out_of_time(rows=2) is True  # the second step: past its share's t = 10 by the estimate
    assert answers == [False, True]
