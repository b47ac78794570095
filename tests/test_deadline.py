"""`Deadline`: polled inside bound propagation, the slope pass, cells, Jacobians and every attack loop
(not only between stages), so a stop lands within one chunk of work; the audit's partial report stays
valid when an attack is stopped half-way."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import pytest
import torch
from conftest import shipped_data, shipped_model

from verifier import audit as audit_module
from verifier.attacks import METHODS, attack
from verifier.audit import AuditSettings, audit
from verifier.bounds.margins import margin_bounds
from verifier.bounds.network import BoundNetwork
from verifier.bounds.propagate import margin_problem, propagate
from verifier.bounds.slopes import slopes_from
from verifier.cells import cell_analysis
from verifier.certify.certificate import certify
from verifier.convert import convert_model
from verifier.deadline import NEVER, Deadline, Stopped
from verifier.jacobian import loss_gradients
from verifier.onnx_io import load_model
from verifier.report import validate_report

pytestmark = pytest.mark.usefixtures("one_thread")


class Polls:
    """A `stop_when` that counts its calls and says stop from call `stop_at` on (never: None)."""

    def __init__(self, stop_at: int | None = None) -> None:
        self.count, self.stop_at = 0, stop_at

    def __call__(self) -> bool:
        self.count += 1
        return self.stop_at is not None and self.count >= self.stop_at


@pytest.fixture(scope="module")
def mlp():
    loaded = load_model(shipped_model("mlp_relu"))
    data = np.load(shipped_data("mlp_relu"))
    return loaded, convert_model(loaded), data["x"][:80], data["y"][:80]


def test_deadline_on_a_fake_clock():
    now = [100.0]
    deadline = Deadline.after(5.0, clock=lambda: now[0])
    assert deadline.at == 105.0 and not deadline.expired()
    deadline.check("nothing")  # does not raise before the deadline
    now[0] = 105.0
    assert deadline.expired()
    with pytest.raises(Stopped, match="during bound propagation"):
        deadline.check("bound propagation")
    assert Deadline.after(None) is NEVER and Deadline.polling(None) is NEVER and not NEVER.expired()
    polls = Polls(stop_at=2)
    flag = Deadline.polling(polls)
    assert (flag.expired(), flag.expired(), polls.count) == (False, True, 2)


def test_propagation_polls_per_node_and_stops_at_the_poll_that_says_so(mlp):
    _, converted, x, y = mlp
    network = BoundNetwork.from_model(converted)
    problem = margin_problem(network, x, y, 0.02, "inf", (0.0, 1.0), torch.device("cpu"), torch.float64)
    counted = Polls()
    propagate(network, problem.region, deadline=Deadline.polling(counted))
    # one poll per node of the forward pass plus one per node visited by each back-substitution
    assert counted.count > len(network.nodes)
    for stop_at in (1, counted.count // 2, counted.count):
        polls = Polls(stop_at)
        with pytest.raises(Stopped):
            propagate(network, problem.region, deadline=Deadline.polling(polls))
        assert polls.count == stop_at  # nothing polled after the stop: no further work was done


def test_slope_pass_and_margin_bounds_poll_inside(mlp):
    _, converted, x, y = mlp
    network = BoundNetwork.from_model(converted)
    problem = margin_problem(network, x, y, 0.02, "inf", (0.0, 1.0), torch.device("cpu"), torch.float64)
    state = propagate(network, problem.region)
    polls = Polls(stop_at=2)
    with pytest.raises(Stopped, match="slope bounds"):
        slopes_from(problem, state, Deadline.polling(polls))
    assert polls.count == 2
    with pytest.raises(Stopped):
        margin_bounds(network, x, y, 0.02, "inf", box=(0.0, 1.0), device="cpu", deadline=Deadline(at=-math.inf))
    free = margin_bounds(network, x, y, 0.02, "inf", box=(0.0, 1.0), device="cpu", deadline=Deadline.polling(Polls()))
    plain = margin_bounds(network, x, y, 0.02, "inf", box=(0.0, 1.0), device="cpu")
    assert torch.equal(free.upper, plain.upper)  # polling changes nothing when it never stops


def test_cells_and_gradients_poll_per_sample_chunk(mlp):
    _, converted, x, y = mlp  # 80 samples: two cell chunks of 64
    counted = Polls()
    cell_analysis(converted, x, y, "inf", box=(0.0, 1.0), device="cpu", deadline=Deadline.polling(counted))
    assert counted.count == 2 * (1 + 2)  # per chunk: before it and before each of its two ReLU sites
    polls = Polls(stop_at=2)
    with pytest.raises(Stopped, match="cell analysis"):
        cell_analysis(converted, x, y, "inf", box=(0.0, 1.0), device="cpu", deadline=Deadline.polling(polls))
    chunked = Polls()
    from verifier.jacobian import autograd_bytes, prepared_module

    kept = autograd_bytes(prepared_module(converted, "cpu", torch.float64), torch.as_tensor(x[:1]).double())
    assert kept > 0
    loss_gradients(converted, x, y, "ce", device="cpu", dtype=torch.float64,
                   memory_bytes=(64 * 8 * 8 + kept) * 10, deadline=Deadline.polling(chunked))
    assert chunked.count == 8  # 10 samples per chunk


def test_certify_stops_inside_its_first_bound_computation(mlp):
    _, converted, x, y = mlp
    polls = Polls(stop_at=5)
    with pytest.raises(Stopped):
        certify(converted, x[:8], y[:8], [1 / 255], box=(0.0, 1.0), grid_points=4,
                deadline=Deadline.polling(polls))
    # The fifth poll ends the bound refinement where it is; certify's own check right after stops.
    assert polls.count == 6


class Ticks:
    """A clock that advances one second per reading."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


def test_certify_under_a_short_limit_returns_a_sound_coarser_certificate(mlp):
    """Anytime: the refinements stop at their share of the limit and say so; the certificate is
    never below the full one's realised risk and never above the global bound."""
    _, converted, x, y = mlp
    x, y = x[:8], y[:8]
    full = certify(converted, x, y, [1 / 255, 4 / 255], box=(0.0, 1.0), grid_points=6)
    ticks = Ticks()
    # The full run reads the clock ~480 times, ~320 of them in the bound evidence; with 300 the
    # refinements stop at reading ~240 (80 %), inside the evidence, and the rest needs ~15 more.
    budget = Deadline(at=300.0, clock=ticks)
    cut = certify(converted, x, y, [1 / 255, 4 / 255], box=(0.0, 1.0), grid_points=6, deadline=budget)
    assert any(note.startswith("time limit: tightened bounds at") for note in cut.fallbacks)
    for coarse, fine in zip(cut.results, full.results):
        assert fine.certificate <= coarse.certificate + 1e-12
        assert fine.realised_risk <= coarse.certificate
        assert coarse.certificate <= coarse.global_bound
        assert coarse.certified_accuracy <= fine.certified_accuracy + 1e-12
        assert coarse.certified_accuracy <= coarse.realised_accuracy


def test_collect_evidence_cut_short_keeps_the_cheap_bounds(mlp):
    from verifier.certify.growth import collect_evidence

    _, converted, x, y = mlp
    network = BoundNetwork.from_model(converted)
    x, y = torch.as_tensor(x[:6]).double(), torch.as_tensor(y[:6])
    logits = network.evaluate(x)
    radii = torch.linspace(0.0, 0.05, 6, dtype=torch.float64)
    full = collect_evidence(network, x, y, logits, "inf", radii, (0.0, 1.0))
    # Chunks of samples (here of 2) give the same bounds as one pass.
    chunked = collect_evidence(network, x, y, logits, "inf", radii, (0.0, 1.0),
                               memory_limit_bytes=2 * 2 * network.units(x) * 8 * 10)
    assert torch.allclose(chunked.linear, full.linear, rtol=1e-12, atol=1e-12)
    assert torch.allclose(chunked.slopes, full.slopes, rtol=1e-12, atol=1e-12)
    assert torch.allclose(chunked.whole_box, full.whole_box, rtol=1e-12, atol=1e-12)
    counted = Polls()
    collect_evidence(network, x, y, logits, "inf", radii, (0.0, 1.0), deadline=Deadline.polling(counted))

    def stopped_at(poll: int):
        return collect_evidence(network, x, y, logits, "inf", radii, (0.0, 1.0),
                                deadline=Deadline.polling(Polls(stop_at=poll)))

    # The first poll after the cheap pass (bisection: whether it finished is monotone in the poll).
    low, high = 1, counted.count
    while low < high:
        middle = (low + high) // 2
        low, high = (low, middle) if torch.isfinite(stopped_at(middle).linear[:, 1:].max()) else (middle + 1, high)
    cut = stopped_at(low + 2)  # inside the first tightened radius
    assert cut.notes == ("time limit: tightened bounds at 0 of 30 (sample, radius) points, interval-based "
                         "bounds elsewhere",)
    assert not cut.tightened[:, 1:].any() and full.tightened.all()
    assert torch.all(full.linear <= cut.linear + 1e-12)  # the cheap bounds are looser, never tighter
    assert torch.isfinite(cut.linear.masked_fill(torch.isinf(full.linear), 0.0)).all()
    assert cut.whole_box is not None and torch.all(full.whole_box <= cut.whole_box + 1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_every_attack_polls_every_step(mlp, method):
    _, converted, x, y = mlp
    counts = {}
    for steps in (4, 8):
        polls = Polls()
        attack(converted, None, x[:12], y[:12], [method], [2 / 255], p=2.0, norm="inf", box=(0.0, 1.0),
               steps=steps, device="cpu", deadline=Deadline.polling(polls))
        counts[steps] = polls.count
    assert counts[8] - counts[4] >= 4  # at least one poll per extra step: polled inside the loop
    middle = counts[4] // 2
    polls = Polls(stop_at=middle)
    with pytest.raises(Stopped):
        attack(converted, None, x[:12], y[:12], [method], [2 / 255], p=2.0, norm="inf", box=(0.0, 1.0),
               steps=4, device="cpu", deadline=Deadline.polling(polls))
    assert polls.count == middle


def test_an_expired_deadline_stops_certify_and_attack_at_once(mlp):
    _, converted, x, y = mlp
    expired = Deadline(at=0.0)  # time.monotonic() is far past 0
    with pytest.raises(Stopped):
        certify(converted, x, y, [1 / 255], box=(0.0, 1.0), deadline=expired)
    with pytest.raises(Stopped):
        attack(converted, None, x, y, ["wdapp"], [1 / 255], box=(0.0, 1.0), device="cpu", deadline=expired)


def _expiring_after(polls: int):
    """Wrap a function taking `deadline=`: its deadline's clock reaches the deadline at poll `polls`."""
    def wrap(real):
        def wrapped(*args, deadline, **kwargs):
            calls = [0]

            def clock() -> float:
                calls[0] += 1
                return deadline.at if calls[0] >= polls else deadline.at - 1.0
            wrapped.calls = calls
            return real(*args, deadline=dataclasses.replace(deadline, clock=clock), **kwargs)
        return wrapped
    return wrap


def test_audit_stopped_inside_an_attack_writes_a_valid_partial_report(tmp_path, monkeypatch):
    real_attack = audit_module.attack
    stopping = _expiring_after(polls=6)(real_attack)

    def by_method(*args, **kwargs):
        return (stopping if args[4] == ["pgd"] else real_attack)(*args, **kwargs)

    monkeypatch.setattr(audit_module, "attack", by_method)
    settings = AuditSettings(deltas=(1 / 255, 4 / 255), attacks=("wdapp", "pgd"), box=(0.0, 1.0), samples=16,
                             grid_points=8, steps=5, time_limit=3600.0)
    outcome = audit(shipped_model("mlp_relu"), shipped_data("mlp_relu"), settings, tmp_path)
    # the clock reaches the limit at its sixth reading, inside pgd's steps (the passes time themselves on the
    # same clock, so a few more readings follow): its loops stop there and the replay's check raises
    assert stopping.calls[0] >= 6
    assert outcome.exit_code == 3
    report = json.loads((tmp_path / "report.json").read_text())
    validate_report(report)
    assert report["complete"] is False and report["stopped_at"] == "attacks"
    assert len(report["results"]) == 2  # certify finished: every delta has its certificate
    for row in report["results"]:
        assert set(row["attacks"]) == {"wdapp"} and row["certificate"] is not None
    assert report["verdict"]["exit_code"] == 3 and report["timings"]["attacks"] > 0
    assert "partial" in (tmp_path / "report.html").read_text()


def test_audit_stopped_inside_certify_writes_a_valid_partial_report(tmp_path, monkeypatch):
    stopping = _expiring_after(polls=4)(audit_module.certify)
    monkeypatch.setattr(audit_module, "certify", stopping)
    settings = AuditSettings(deltas=(1 / 255,), attacks=("pgd",), box=(0.0, 1.0), samples=16, grid_points=8,
                             steps=5, time_limit=3600.0)
    outcome = audit(shipped_model("mlp_relu"), shipped_data("mlp_relu"), settings, tmp_path)
    # reading 4 reaches the limit inside the bound refinement; certify's own check (reading 5) stops
    assert stopping.calls[0] == 5 and outcome.exit_code == 3
    report = json.loads((tmp_path / "report.json").read_text())
    validate_report(report)
    assert report["stopped_at"] == "certify" and report["results"] == [] and report["timings"]["attacks"] is None


@pytest.mark.parametrize("command", ["certify", "attack"])
def test_certify_and_attack_time_limit_exit_3_with_one_line(command, capsys):
    from verifier import cli

    base = [command, str(shipped_model("mlp_relu")), "--data", str(shipped_data("mlp_relu")), "--samples", "8",
            "--box", "0,1"]
    assert cli.main([*base, "--time-limit", "1e-9", "--json"]) == 3  # spent before the work starts
    captured = capsys.readouterr()
    assert json.loads(captured.out)["error_type"] == "Stopped"
    assert captured.err.count("\n") == 1 and captured.err.startswith(f"verifier: time limit hit: {command} stopped")
    assert cli.main([*base, "--time-limit", "0"]) == 2
    assert "time limit must be > 0" in capsys.readouterr().err
    assert cli.main([*base, "--time-limit", "3600", "--json"]) == 0
    assert "results" in json.loads(capsys.readouterr().out)


def test_certify_without_time_for_the_logits_jacobians_keeps_its_certificate(mlp, monkeypatch):
    """The logits Jacobian (C backward passes per sample) and the loss gradients are refinements: cut,
    the certificate (from the growth curves) is unchanged, the realising distribution has no
    linearised moves, there is no first-order estimate, and the fallbacks say so."""
    import verifier.certify.tables as tables

    loaded = load_model(shipped_model("mlp_gelu"))  # smooth: no cell analysis provides the Jacobian
    converted = convert_model(loaded)
    data = np.load(shipped_data("mlp_gelu"))
    x, y = data["x"][:12], data["y"][:12]
    full = certify(converted, x, y, [2 / 255], box=(0.0, 1.0), grid_points=8)

    def out_of_time(*args, **kwargs):
        raise Stopped("stopped by the time limit during the logits Jacobians")

    monkeypatch.setattr(tables, "logits_jacobian", out_of_time)
    monkeypatch.setattr(tables, "loss_gradients", out_of_time)
    cut = certify(converted, x, y, [2 / 255], box=(0.0, 1.0), grid_points=8)
    assert cut.results[0].certificate == full.results[0].certificate
    assert cut.local_slopes is None and cut.results[0].first_order_estimate is None
    assert any("loss gradients skipped" in line for line in cut.results[0].fallbacks)
    assert cut.results[0].realised_risk <= cut.results[0].certificate
    assert cut.results[0].realised_risk == pytest.approx(cut.results[0].clean_risk)  # nothing moved
    assert any("logits Jacobians skipped" in line for line in cut.results[0].fallbacks)


def test_a_rewrapped_signal_is_found_and_the_audit_clock_re_raises_it():
    from verifier.audit import _Clock
    from verifier.deadline import Terminated, terminated_cause

    signal = Terminated("stopped by SIGTERM")

    def library_work():
        try:
            raise signal
        except Exception as err:  # what inspect.getfullargspec does with any exception
            raise TypeError("unsupported callable") from err

    with pytest.raises(TypeError) as wrapped:
        library_work()
    assert terminated_cause(wrapped.value) is signal
    assert terminated_cause(TypeError("a real bug")) is None
    clock = _Clock(None)
    with pytest.raises(Terminated) as raised:
        clock.run("certify", library_work)
    assert raised.value is signal and clock.timings["certify"] is not None
    with pytest.raises(ZeroDivisionError):  # a real error stays itself
        clock.run("attacks", lambda: 1 / 0)
