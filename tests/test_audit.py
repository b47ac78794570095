"""`verifier audit` end to end on a shipped model: schema-valid report, HTML sections, exit codes,
time limit, and the same numbers as `certify` / `attack` run alone."""

from __future__ import annotations

import dataclasses
import json

import pytest
from conftest import shipped_data, shipped_model

from verifier import audit as audit_module
from verifier import cli
from verifier.attacks import attack
from verifier.audit import AuditSettings, Thresholds, audit
from verifier.certify.certificate import certify
from verifier.convert import convert_model
from verifier.data import load_samples
from verifier.onnx_io import load_model
from verifier.report import SECTION_IDS, validate_report

DELTAS = (1 / 255, 4 / 255)
SETTINGS = AuditSettings(deltas=DELTAS, p=2.0, norm="inf", loss="ce", attacks=("wdapp", "pgd"), box=(0.0, 1.0),
                         samples=16, grid_points=8, steps=5)


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def passing(tmp_path_factory):
    out = tmp_path_factory.mktemp("audit")
    settings = AuditSettings(**{**SETTINGS.__dict__, "thresholds": Thresholds(max_risk=100.0),
                                "optimise_slopes": "final"})
    return audit(shipped_model("mlp_relu"), shipped_data("mlp_relu"), settings, out), out


def test_report_is_schema_valid_and_complete(passing):
    outcome, out = passing
    assert outcome.exit_code == 0
    on_disk = json.loads((out / "report.json").read_text())
    validate_report(on_disk)
    assert on_disk["complete"] is True and on_disk["verdict"]["passed"] is True
    assert [r["delta"] for r in on_disk["results"]] == pytest.approx(list(DELTAS))
    assert on_disk["warnings"] == []  # clean <= attack <= certificate held everywhere
    assert on_disk["settings"]["optimise_slopes"] == "final"
    for row in on_disk["results"]:
        assert set(row["attacks"]) == {"wdapp", "pgd"}
        assert row["clean_risk"] <= row["best_attack_risk"] <= row["certificate"] <= row["global_bound"]
        assert row["certified_accuracy"] <= row["best_attack_accuracy"] <= row["clean_accuracy"]


def test_html_has_every_section_and_inline_plots(passing):
    _, out = passing
    html = (out / "report.html").read_text()
    for section in SECTION_IDS:
        assert f'id="{section}"' in html
    assert html.count("<svg") >= 3 and "http://" not in html and "https://" not in html
    markdown = (out / "report.md").read_text()
    assert "PASS" in markdown and "| delta |" in markdown


def test_numbers_equal_certify_and_attack_alone(passing):
    outcome, _ = passing
    loaded = load_model(shipped_model("mlp_relu"))
    converted = convert_model(loaded)
    samples = load_samples(shipped_data("mlp_relu"), loaded.info.data_input, SETTINGS.samples)
    alone = certify(converted, samples.x, samples.y, list(DELTAS), p=2.0, norm="inf", loss="ce", box=(0.0, 1.0),
                    grid_points=8, optimise_slopes="final")  # as the audit ran it
    plain = certify(converted, samples.x, samples.y, list(DELTAS), p=2.0, norm="inf", loss="ce", box=(0.0, 1.0),
                    grid_points=8)
    attacked = attack(converted, loaded, samples.x, samples.y, ["pgd"], list(DELTAS), p=2.0, norm="inf", loss="ce",
                      box=(0.0, 1.0), steps=5, seed=0, device="cpu")
    for row, certified, pgd in zip(outcome.report["results"], alone.results, attacked.results):
        assert row["certificate"] == certified.certificate
        assert certified.certificate < plain.results[list(DELTAS).index(row["delta"])].certificate - 1e-4  # 0.2772 vs 0.2784
        assert row["certified_accuracy"] == certified.certified_accuracy
        assert row["attacks"]["pgd"]["risk"] == pgd.risk
    assert outcome.report["local_slopes"]["per_sample"] == alone.local_slopes.tolist()


def test_failing_threshold_exits_1(tmp_path, capsys):
    code = cli.main([
        "audit", str(shipped_model("mlp_relu")), "--data", str(shipped_data("mlp_relu")), "--samples", "8",
        "--delta", "4/255", "--attacks", "pgd", "--box", "0,1", "--max-risk", "0.0", "--out", str(tmp_path)])
    captured = capsys.readouterr()
    out = captured.out
    assert code == 1
    # stderr is no terminal here: the stage lines still reach it (a CI log), in order, one per stage
    stages = [line.split(" ...")[0] for line in captured.err.splitlines()]
    assert stages == [f"verifier audit: {s}" for s in ("inspect", "validate", "certify", "attack pgd", "report")]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["verdict"]["passed"] is False and report["results"][0]["verdict"]["max_risk"] == "fail"
    assert "FAIL" in out and "report.html" in out


def test_time_limit_gives_a_partial_report_and_exit_3(tmp_path, monkeypatch):
    ticks = iter(range(0, 10_000, 5))  # every clock reading advances 5 s: the 1 s limit hits after inspect
    monkeypatch.setattr(audit_module.time, "monotonic", lambda: float(next(ticks)))
    settings = AuditSettings(**{**SETTINGS.__dict__, "time_limit": 1.0})
    outcome = audit(shipped_model("mlp_relu"), shipped_data("mlp_relu"), settings, tmp_path)
    assert outcome.exit_code == 3
    report = json.loads((tmp_path / "report.json").read_text())
    validate_report(report)
    assert report["complete"] is False and report["stopped_at"] == "validate" and report["results"] == []
    assert "partial" in (tmp_path / "report.html").read_text()


def test_conversion_mismatch_stops_the_audit_with_exit_1(tmp_path, monkeypatch):
    real = audit_module.validate_against_onnxruntime

    def broken(*args, **kwargs):  # the first output differs beyond the tolerance
        report = real(*args, **kwargs)
        first = dataclasses.replace(report.outputs[0], max_abs_diff=0.5, within_tolerance=False)
        return dataclasses.replace(report, outputs=(first, *report.outputs[1:]))

    monkeypatch.setattr(audit_module, "validate_against_onnxruntime", broken)
    outcome = audit(shipped_model("mlp_relu"), shipped_data("mlp_relu"), SETTINGS, tmp_path)
    assert outcome.exit_code == 1 and outcome.report["results"] == []
    assert "conversion check failed" in outcome.report["verdict"]["failures"][0]


@pytest.mark.parametrize("given, spelled", [(True, "final"), (False, None), ("off", None), ("intermediate", "intermediate")])
def test_slope_search_settings_are_spelled_as_the_report_schema_says(given, spelled):
    from verifier.audit import _check

    assert _check(AuditSettings(**{**SETTINGS.__dict__, "optimise_slopes": given})).optimise_slopes == spelled


@pytest.mark.parametrize("argv,message", [
    (["--data", "missing.npz"], "not found"),
    ([], "--data FILE.npz with inputs x and labels y is required"),
    (["--data", str(shipped_data("mlp_relu")), "--min-certified-accuracy", "1.5"], "must lie in [0, 1]"),
    (["--data", str(shipped_data("mlp_relu")), "--time-limit", "0"], "time limit must be > 0"),
    (["--data", str(shipped_data("mlp_relu")), "--attacks", "fgsm"], "unknown attack method"),
])
def test_bad_input_exits_2_without_a_report(tmp_path, capsys, argv, message):
    code = cli.main(["audit", str(shipped_model("mlp_relu")), *argv, "--out", str(tmp_path / "r"), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "r" / "report.json").exists()


def test_p_one_drops_wpgd_from_the_defaults_with_a_warning(tmp_path):
    settings = AuditSettings(**{**SETTINGS.__dict__, "p": 1.0, "attacks": audit_module.DEFAULT_ATTACKS,
                                "deltas": (2 / 255,), "samples": 6})
    outcome = audit(shipped_model("mlp_relu"), shipped_data("mlp_relu"), settings, tmp_path)
    assert outcome.exit_code == 0
    assert outcome.report["settings"]["attacks"] == ["wdapp", "wda", "pgd", "wda-curve"]  # CE, p < inf: + curve
    assert any("wpgd" in warning for warning in outcome.report["warnings"])


def test_out_pointing_at_a_file_exits_2_before_any_work(tmp_path, capsys):
    target = tmp_path / "file.txt"
    target.write_text("not a folder")
    code = cli.main(["audit", str(shipped_model("mlp_relu")), "--data", str(shipped_data("mlp_relu")),
                     "--out", str(target), "--quiet"])
    assert code == 2 and "is not a folder" in capsys.readouterr().err


def test_time_limit_inside_certify_stops_there(tmp_path, monkeypatch):
    def stopped(*args, **kwargs):
        raise audit_module.Stopped("time")

    monkeypatch.setattr(audit_module, "certify", stopped)
    outcome = audit(shipped_model("mlp_relu"), shipped_data("mlp_relu"), SETTINGS, tmp_path)
    assert outcome.exit_code == 3
    assert outcome.report["stopped_at"] == "certify" and outcome.report["results"] == []
    assert outcome.report["timings"]["attacks"] is None


def test_max_risk_nan_and_unwritable_out_exit_2_before_work(tmp_path, capsys):
    base = ["audit", str(shipped_model("mlp_relu")), "--data", str(shipped_data("mlp_relu")), "--quiet"]
    assert cli.main([*base, "--max-risk", "nan", "--out", str(tmp_path / "r")]) == 2
    assert "max-risk must be a finite number" in capsys.readouterr().err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert cli.main([*base, "--out", str(blocker / "sub")]) == 2
    assert "cannot create the report folder" in capsys.readouterr().err
