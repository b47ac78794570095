"""Report layer: schema, derived verdicts, plots, HTML, Markdown, atomic writer (no model runs)."""

from __future__ import annotations

import copy
import json
import re

import numpy as np
import pytest

from verifier.report import (
    SECTION_IDS, ReportSchemaError, finalize_report, render_html, render_markdown, validate_report, write_report,
)
from verifier.report import writer as writer_module
from verifier.report.plots import accuracy_plot, risk_plot, slopes_plot

SHA = "63f7ef7eb91406964d298432afd1ec07113aabb14fe2355fe4c0be36fcf30f0e"
HOSTILE = "<script>alert(1)</script>"


def _attack(risk, accuracy, cost, seconds=0.5, flags=()):
    return {"risk": risk, "robust_accuracy": accuracy, "transport_cost": cost,
            "replayed_in_onnxruntime": True, "seconds": seconds, "flags": list(flags)}


def _result(delta, certificate, global_bound, first, certified, pgd, wda, exact):
    return {"delta": delta, "clean_risk": 0.0812, "clean_accuracy": 0.98, "certificate": certificate,
            "global_bound": global_bound, "first_order_estimate": first, "certified_accuracy": certified,
            "exact": exact, "fallbacks": [], "attacks": {"pgd": pgd, "wda": wda}}


def raw_report() -> dict:
    """An audit of the digits ReLU MLP as the orchestrator hands it over (before finalize_report)."""
    return {
        "schema_version": "1.0", "complete": True, "stopped_at": None,
        "generated_at": "2026-11-30T12:00:00+00:00",
        "producer": {"name": "verifier", "version": "0.1.0"},
        "versions": {"verifier": "0.1.0", "python": "3.11.9", "torch": "2.13.0+cpu", "onnx": "1.23.2",
                     "onnxruntime": "1.32.0"},
        "device": "cpu", "seed": 0,
        "model": {
            "path": "models/digits_mlp_relu.onnx", "sha256": SHA, "size_bytes": 31698, "ir_version": 10,
            "opset": 18, "opsets": {"": 18}, "producer": {"name": "pytorch", "version": "2.13.0+cpu"},
            "inputs": [{"name": "input", "shape": ["batch", 64], "dtype": "float32"}],
            "outputs": [{"name": "logits", "shape": ["batch", 10], "dtype": "float32"}],
            "node_count": 5, "op_histogram": {"Gemm": 3, "Relu": 2}, "family": "piecewise-linear",
            "activation_counts": {"relu": 2},
            "activation_sites": [
                {"index": 0, "kind": "relu", "nodes": [HOSTILE], "input": "linear", "output": "relu", "params": {}},
                {"index": 1, "kind": "relu", "nodes": ["node_relu_1"], "input": "linear_1", "output": "relu_1",
                 "params": {}}],
            "logits": "logits"},
        "data": {"path": "models/digits_test.npz", "sha256": None, "samples": 50},
        "conversion": {
            "passed": True, "samples": 50, "max_abs_diff": 4.7e-07, "max_rel_diff": 2.1e-06,
            "top1_agreement": 1.0, "providers": ["CPUExecutionProvider"], "torch_device": "cpu",
            "atol": 1e-05, "rtol": 1e-05, "accuracy": {"onnxruntime": 0.98, "torch": 0.98},
            "outputs": [{"name": "logits", "max_abs_diff": 4.7e-07, "max_rel_diff": 2.1e-06,
                         "within_tolerance": True}]},
        "settings": {"p": 2.0, "norm": "2", "loss": "ce", "box": [0.0, 1.0], "deltas": [0.05, 0.1, 0.2],
                     "attacks": ["pgd", "wda"], "samples": 50, "time_limit": 600.0,
                     "thresholds": {"max_risk": 0.5, "min_certified_accuracy": 0.5, "min_robust_accuracy": None}},
        "timings": {"inspect": 0.04, "validate": 0.31, "certify": 3.2, "attacks": 5.9, "report": 0.6,
                    "total": 10.05},
        "local_slopes": {"norm": "2", "per_sample": [0.0, 0.12, 0.4, 0.9, 1.7, 2.3, 0.05, 0.6, 1.1, 0.33],
                         "global": 118.4},
        "results": [
            _result(0.05, 0.1456, 5.9012, 0.1391, 0.94, _attack(0.1402, 0.96, 0.05), _attack(0.1377, 0.94, 0.05), True),
            _result(0.1, 0.2481, 11.7212, 0.1970, 0.88, _attack(0.2103, 0.92, 0.1), _attack(0.2210, 0.9, 0.0999),
                    False),
            _result(0.2, 0.6633, 23.5612, 0.3128, 0.71, _attack(0.3702, 0.84, 0.2), _attack(0.4105, 0.78, 0.2), False),
        ],
        "warnings": [],
    }


@pytest.fixture
def report() -> dict:
    return finalize_report(raw_report())


def _finalized(**changes) -> dict:
    raw = raw_report()
    for path, item in changes.items():
        target = raw
        *parents, last = path.split("__")
        for key in parents:
            target = target[int(key)] if isinstance(target, list) else target[key]
        target[last] = item
    return finalize_report(raw)


def _rejected(report: dict) -> str:
    with pytest.raises(ReportSchemaError) as caught:
        validate_report(report)
    message = str(caught.value)
    assert "\n" not in message and caught.value.exit_code == 4
    return message


# --- schema and derived numbers -------------------------------------------------------------

def test_schema_is_valid_draft_2020_12():
    import jsonschema

    from verifier.report import REPORT_SCHEMA, SCHEMA_VERSION
    jsonschema.Draft202012Validator.check_schema(REPORT_SCHEMA)
    assert SCHEMA_VERSION == "1.0" and REPORT_SCHEMA["properties"]["schema_version"] == {"const": "1.0"}


def test_fixture_validates_and_derived_numbers(report):
    validate_report(report)
    low, mid, high = report["results"]
    assert (low["best_attack"], low["best_attack_risk"], low["best_attack_accuracy"]) == ("pgd", 0.1402, 0.94)
    assert (mid["best_attack"], mid["best_attack_risk"], mid["best_attack_accuracy"]) == ("wda", 0.2210, 0.9)
    assert low["tightness"] == pytest.approx((0.1456 - 0.0812) / (0.1402 - 0.0812))
    assert high["tightness"] == pytest.approx((0.6633 - 0.0812) / (0.4105 - 0.0812))
    assert [r["verdict"]["max_risk"] for r in report["results"]] == ["pass", "pass", "fail"]
    assert [r["verdict"]["min_certified_accuracy"] for r in report["results"]] == ["pass"] * 3
    assert all(r["verdict"]["min_robust_accuracy"] is None for r in report["results"])
    assert report["exact_up_to_delta"] == 0.05 and report["warnings"] == []
    verdict = report["verdict"]
    assert (verdict["passed"], verdict["exit_code"]) == (False, 1)
    assert verdict["failures"] == ["delta=0.2: risk not certified below 0.5 (certificate 0.6633, best attack 0.4105)"]
    assert verdict["summary"].startswith("FAIL: 1 check(s) failed")


def test_verdicts_pass_none_and_violations():
    passing = _finalized(settings__thresholds={"max_risk": 0.7, "min_certified_accuracy": 0.7,
                                               "min_robust_accuracy": 0.75})
    verdict = passing["verdict"]
    assert (verdict["passed"], verdict["exit_code"], verdict["failures"]) == (True, 0, [])
    assert passing["verdict"]["summary"] == "PASS: all 9 threshold check(s) hold at every delta."
    unset = _finalized(settings__thresholds={"max_risk": None, "min_certified_accuracy": None,
                                             "min_robust_accuracy": None})
    assert (unset["verdict"]["passed"], unset["verdict"]["exit_code"]) == (None, 0)
    assert "[0.4105, 0.6633]" in unset["verdict"]["summary"]
    violated = _finalized(settings__thresholds={"max_risk": 0.4, "min_certified_accuracy": None,
                                                "min_robust_accuracy": 0.8})
    assert violated["verdict"]["failures"] == [
        "delta=0.2: risk above 0.4: attack wda reaches 0.4105 (certificate 0.6633)",
        "delta=0.2: attacked accuracy 78.0% below 80.0% (attack wda)"]
    # robust accuracy lies in [certified, attacked]: a certified accuracy above the threshold passes it
    assert violated["results"][1]["verdict"]["min_robust_accuracy"] == "pass"


def test_conversion_failure_fails_without_thresholds():
    raw = raw_report()
    raw["settings"]["thresholds"] = {"max_risk": None, "min_certified_accuracy": None, "min_robust_accuracy": None}
    raw["conversion"].update(passed=False, max_abs_diff="Infinity")
    report = finalize_report(raw)
    assert report["verdict"]["failures"] == [
        "conversion check failed: torch and onnxruntime differ by up to ∞ (atol 1e-05, rtol 1e-05)"]
    assert (report["verdict"]["passed"], report["verdict"]["exit_code"]) == (False, 1)
    validate_report(report)


def test_partial_report_exit_code_and_banner():
    raw = raw_report()
    raw.update(complete=False, stopped_at="attacks")
    raw["results"] = raw["results"][:2]
    del raw["results"][1]["attacks"]["wda"]
    raw["settings"]["thresholds"]["max_risk"] = None
    report = finalize_report(raw)
    validate_report(report)
    assert (report["verdict"]["passed"], report["verdict"]["exit_code"]) == (None, 3)
    assert report["verdict"]["summary"].startswith("Partial report (time limit hit during attacks): no threshold")
    page = render_html(report)
    assert 'id="partial"' in page and "Partial report: time limit hit (during attacks" in page
    assert ">PARTIAL<" in page
    assert "**Partial report: time limit hit** (during attacks); 2 of 3 budgets" in render_markdown(report)
    assert 'id="partial"' not in render_html(finalize_report(raw_report()))


def test_soundness_warnings(report):
    raw = raw_report()
    raw["results"][0]["attacks"]["pgd"]["risk"] = 0.2        # above the certificate 0.1456
    raw["results"][1]["attacks"]["wda"]["transport_cost"] = 0.2  # budget 0.1
    warnings = finalize_report(raw)["warnings"]
    assert warnings == [
        "delta=0.05: attack pgd reaches 0.2 above the certificate 0.1456: a soundness bug, please report it",
        "delta=0.1: attack wda spends 0.2 over the budget (W_2 distance)"]


def test_finalize_converts_numpy_and_infinite_bounds():
    raw = raw_report()
    raw["results"][0]["clean_risk"] = np.float32(0.0812)
    raw["results"][0]["certificate"] = float("inf")
    raw["seed"] = np.int64(3)
    raw["settings"]["box"] = (0.0, 1.0)
    report = finalize_report(raw)
    validate_report(report)
    assert report["results"][0]["certificate"] == "Infinity" and report["results"][0]["tightness"] is None
    assert type(report["seed"]) is int and report["settings"]["box"] == [0.0, 1.0]
    assert report["results"][0]["verdict"]["max_risk"] == "fail"
    assert report["verdict"]["failures"][0] == ("delta=0.05: risk not certified below 0.5 "
                                                "(certificate ∞, best attack 0.1402)")
    text = json.dumps(report, allow_nan=False)
    assert "Infinity" in text and "NaN" not in text


@pytest.mark.parametrize("mutate, where, problem", [
    (lambda r: r["results"][0].pop("certificate"), "results[0]", "'certificate' is a required property"),
    (lambda r: r.pop("verdict"), "the top level", "'verdict' is a required property"),
    (lambda r: r["results"][2].update(clean_accuracy="high"), "results[2].clean_accuracy",
     "'high' is not of type 'number'"),
    (lambda r: r["results"][1].update(global_bound=float("nan")), "results[1].global_bound", "nan is not strict JSON"),
    (lambda r: r["local_slopes"]["per_sample"].append(float("-inf")), "local_slopes.per_sample[10]",
     "-inf is not strict JSON"),
    (lambda r: r["results"][0].update(certificate="NaN"), "results[0].certificate",
     "'NaN' is not a number, \"Infinity\" (a vacuous bound) or null"),
    (lambda r: r["results"][0]["attacks"]["pgd"].update(seconds=np.float32(1.5)), "results[0].attacks.pgd.seconds",
     "numpy.float32 1.5 is not a JSON value"),
    (lambda r: r["settings"].update(colour="red"), "settings", "('colour' was unexpected)"),
    (lambda r: r["results"][0]["verdict"].update(max_risk="ok"), "results[0].verdict.max_risk", "'ok' is not"),
    (lambda r: r["model"].update(sha256="abc"), "model.sha256", "'abc' does not match"),
    (lambda r: r.update(schema_version="2.0"), "schema_version", "'1.0' was expected"),
    (lambda r: r["results"][1].update(delta=0.15), "results", "deltas [0.05, 0.15, 0.2] must be distinct, ascending"),
    (lambda r: r["results"].pop(), "results", "a complete report has every delta of settings"),
    (lambda r: r["results"][0]["attacks"].pop("wda"), "results[0].attacks", "a complete report has every attack"),
    (lambda r: r["results"][0]["attacks"].update(fgsm=r["results"][0]["attacks"]["pgd"]), "results[0].attacks",
     "['fgsm'] not in settings.attacks"),
    (lambda r: r.update(generated_at="2026-13-40T99:00"), "generated_at", "is not an ISO 8601 time"),
    (lambda r: r.update(complete=False), "stopped_at", "a partial report (complete: false) names the stage"),
])
def test_invalid_reports_are_rejected_with_one_line(report, mutate, where, problem):
    broken = copy.deepcopy(report)
    mutate(broken)
    message = _rejected(broken)
    assert message.startswith(f"invalid report at {where}: ") and problem in message, message


def test_malformed_raw_values_reach_validation_with_a_clear_message():
    raw = raw_report()
    raw["results"][0]["attacks"]["pgd"]["risk"] = "high"
    report = finalize_report(raw)  # derivation skips what it cannot read ...
    assert report["results"][0]["best_attack"] == "wda"
    assert _rejected(report) == ("invalid report at results[0].attacks.pgd.risk: "  # ... validation names it
                                 "'high' is not of type 'number'")
    raw = raw_report()
    del raw["settings"]
    with pytest.raises(ReportSchemaError, match=r"cannot derive the verdict \(KeyError: 'settings'\)"):
        finalize_report(raw)


def test_non_dict_rejected():
    assert _rejected([]) == "invalid report at the top level: the report is a list, not a dict"


# --- HTML ------------------------------------------------------------------------------------

def test_html_sections_inline_svg_no_external_resources(report):
    page = render_html(report)
    for section in SECTION_IDS:
        assert f'<section id="{section}">' in page
    assert page.index('id="verdict"') < page.index('id="model-summary"')
    assert page.count("<svg") == 3 and page.count("</svg>") == 3
    assert not re.search(r"https?://", page) and "src=" not in page and "<link" not in page
    assert '<span class="badge fail">FAIL</span>' in page
    assert "delta=0.2: risk not certified below 0.5 (certificate 0.6633, best attack 0.4105)" in page
    ids = re.findall(r'\bid="([^"]+)"', page)
    assert len(ids) == len(set(ids))
    assert set(re.findall(r'(?:href="#|url\(#)([^")]+)', page)) <= set(ids)
    for text in ("Gemm", "piecewise-linear", "CPUExecutionProvider", "4.7e-07", "0.6633", "23.56", "1.768",
                 "2.13.0+cpu", SHA):
        assert text in page


def test_html_escapes_hostile_strings():
    raw = raw_report()
    raw["model"]["path"] = 'evil"><img src=x onerror=alert(1)>.onnx'
    raw["model"]["op_histogram"] = {"<script>alert(2)</script>": 1}
    raw["results"][0]["fallbacks"] = ["bounds unsupported at node '<b>x</b>'"]
    page = render_html(finalize_report(raw))
    assert "<script" not in page and "<img" not in page and "<b>x" not in page
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in page  # the activation site's node name
    assert "&lt;script&gt;alert(2)&lt;/script&gt;" in page
    assert "evil&#34;&gt;&lt;img src=x onerror=alert(1)&gt;.onnx" in page
    assert "bounds unsupported at node &#39;&lt;b&gt;x&lt;/b&gt;&#39;" in page


def test_html_without_thresholds_and_without_slopes():
    raw = raw_report()
    raw["settings"]["thresholds"] = {"max_risk": None, "min_certified_accuracy": None, "min_robust_accuracy": None}
    raw["local_slopes"] = None
    raw["conversion"] = None
    page = render_html(finalize_report(raw))
    assert '<span class="badge none">NO THRESHOLDS</span>' in page
    assert page.count("<svg") == 2 and "Local slopes were not computed." in page
    assert "Not run (time limit hit before it)." in page


# --- Markdown --------------------------------------------------------------------------------

def test_markdown_verdict_and_table(report):
    text = render_markdown(report)
    assert text.startswith("## ❌ verifier audit: FAIL\n")
    assert "- delta=0.2: risk not certified below 0.5 (certificate 0.6633, best attack 0.4105)" in text
    assert ("| 0.05 | 0.0812 | 0.1402 (pgd) | 0.1456 | 5.901 | 1.092 | 98.0% | 94.0% | 94.0% | yes | pass | pass |"
            in text)
    assert "| 0.2 | 0.0812 | 0.4105 (wda) | 0.6633 | 23.56 | 1.768 | 98.0% | 71.0% | 78.0% | no | fail | pass |" in text
    assert "Model `models/digits_mlp_relu.onnx` (sha256 `63f7ef7eb914`, piecewise-linear, 5 nodes)" in text
    assert "conversion check passed (max abs diff 4.7e-07, top-1 agreement 100.0%)" in text
    assert "exit code 1" in text


def test_markdown_escapes_hostile_strings():
    raw = raw_report()
    raw["model"]["path"] = "a`b<script>.onnx"
    raw["model"]["family"] = "x|y<script>*z*"
    raw["warnings"] = ["node <img src=x> | broke"]
    text = render_markdown(finalize_report(raw))
    assert "`a'b<script>.onnx`" in text  # a code span shows its content literally
    assert "x\\|y&lt;script&gt;\\*z\\*" in text
    assert "- ⚠️ node &lt;img src=x&gt; \\| broke" in text
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(rows) == 5 and len({line.replace("\\|", "").count("|") for line in rows}) == 1


# --- plots -----------------------------------------------------------------------------------

def test_plots_handle_null_certificates_and_empty_results():
    raw = raw_report()
    raw["settings"]["loss"] = "dlr"
    for result in raw["results"]:
        result.update(certificate=None, global_bound=None, first_order_estimate=None, certified_accuracy=None)
    report = finalize_report(raw)
    validate_report(report)
    svg = risk_plot(report)
    assert svg.startswith("<svg") and "no certificate for this loss" in svg and "best attack (lower bound)" in svg
    assert "certified (lower bound)" in accuracy_plot(report)
    raw["results"], raw["complete"], raw["stopped_at"] = [], False, "certify"
    empty = finalize_report(raw)
    validate_report(empty)
    assert risk_plot(empty) is None and accuracy_plot(empty) is None
    assert render_html(empty).count("<svg") == 1


def test_risk_plot_scaling_when_global_bound_dwarfs():
    report = finalize_report(raw_report())
    assert "(log scale)" in risk_plot(report)
    raw = raw_report()
    raw["settings"]["loss"] = "margin"
    for result in raw["results"]:  # margins are negative: no log scale, the axis is clipped instead
        result.update(clean_risk=-3.0, certificate=result["certificate"] - 3, first_order_estimate=None)
        for attack in result["attacks"].values():
            attack["risk"] -= 3
    assert "global bound off scale (up to 23.6)" in risk_plot(finalize_report(raw))


def test_slopes_plot():
    report = finalize_report(raw_report())
    svg = slopes_plot(report)
    assert "global constant 118" in svg and "1 zero slope(s) not shown" in svg and "median 0.5" in svg
    raw = raw_report()
    raw["local_slopes"]["global"] = "Infinity"
    assert "(global constant infinite)" in slopes_plot(finalize_report(raw))
    raw["local_slopes"] = None
    assert slopes_plot(finalize_report(raw)) is None


# --- writer ----------------------------------------------------------------------------------

def test_write_report_files(tmp_path, report):
    paths = write_report(report, tmp_path / "out" / "nested")
    assert paths.to_dict() == {"json": str(tmp_path / "out/nested/report.json"),
                               "html": str(tmp_path / "out/nested/report.html"),
                               "markdown": str(tmp_path / "out/nested/report.md")}
    assert json.loads(paths.json.read_text("utf-8")) == report
    assert paths.html.read_text("utf-8").startswith("<!DOCTYPE html>")
    assert paths.markdown.read_text("utf-8") == render_markdown(report)
    assert sorted(p.name for p in paths.json.parent.iterdir()) == ["report.html", "report.json", "report.md"]


def test_write_report_refuses_invalid_report_before_writing(tmp_path, report):
    broken = copy.deepcopy(report)
    broken["results"][0]["clean_risk"] = float("nan")
    with pytest.raises(ReportSchemaError, match=r"results\[0\]\.clean_risk"):
        write_report(broken, tmp_path)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("failure", [RuntimeError("disk full"), KeyboardInterrupt()])
def test_write_report_atomic_on_failure(tmp_path, report, monkeypatch, failure):
    write_report(report, tmp_path)  # an earlier, complete report in the same folder
    stale_markdown = (tmp_path / "report.md").read_text("utf-8")

    def broken_render(_report):
        raise failure

    monkeypatch.setattr(writer_module, "render_html", broken_render)
    with pytest.raises(type(failure)):
        write_report(report, tmp_path)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["report.html", "report.md"]  # no report.json, no temporary file
    assert (tmp_path / "report.md").read_text("utf-8") == stale_markdown


def test_write_report_failure_inside_a_file_leaves_no_temporary(tmp_path, report, monkeypatch):
    real_replace = writer_module.os.replace
    calls = []

    def failing_replace(source, target):
        calls.append(target)
        if str(target).endswith("report.md"):
            raise OSError("rename failed")
        real_replace(source, target)

    monkeypatch.setattr(writer_module.os, "replace", failing_replace)
    with pytest.raises(OSError, match="rename failed"):
        write_report(report, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.html"]
    assert [str(t).rsplit("/", 1)[-1] for t in calls] == ["report.html", "report.md"]
