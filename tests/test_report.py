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
from verifier.report.numbers import fmt_box, fmt_delta
from verifier.report.plots import accuracy_figure, accuracy_plot, risk_figure, risk_plot, slopes_plot
from verifier.report.summary import split_warnings, threshold_lines, vacuous_note

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


def _per_255_raw() -> dict:
    """The fixture on the budgets 1/255, 2/255, 8/255 (image-style L_inf budgets)."""
    raw = raw_report()
    deltas = [1 / 255, 2 / 255, 8 / 255]
    raw["settings"]["deltas"] = deltas
    for result, delta in zip(raw["results"], deltas):
        result["delta"] = delta
        for attack in result["attacks"].values():
            attack["transport_cost"] = delta
    return raw


def _vacuous_raw() -> dict:
    """A transformer-like audit: the certificate is one constant far above every attack, certified accuracy 0."""
    raw = raw_report()
    for result in raw["results"]:
        result.update(certificate=35.31, global_bound="Infinity", certified_accuracy=0.0, exact=False)
    return raw


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
    assert report["verdict"]["summary"].startswith("Partial report (time limit hit; attacks not completed): no threshold")
    page = render_html(report)
    assert 'id="partial"' in page and "Partial report: time limit hit (attacks not completed" in page
    assert ">PARTIAL<" in page
    assert "**Partial report: time limit hit** (attacks not completed); 2 of 3 budgets" in render_markdown(report)
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
    assert page.index('id="verdict"') < page.index('id="numbers"') < page.index('id="model-summary"')
    assert page.index('id="numbers"') < page.index('id="risk-plot"') < page.index('id="settings"')
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
    # best risk from pgd, lowest accuracy from wda: both attacks are named
    assert ("| 0.05 | 0.0812 | 0.1402 (pgd) | 0.1456 | 5.901 | 1.092 | 98.0% | 94.0% | 94.0% (wda) | yes "
            "| — | pass | pass |") in text
    assert ("| 0.2 | 0.0812 | 0.4105 (wda) | 0.6633 | 23.56 | 1.768 | 98.0% | 71.0% | 78.0% (wda) | no | — | fail | pass |"
            in text)
    assert "| gap ratio |" in text and "| max risk ≤ 0.5 | certified acc. ≥ 50.0% |" in text
    assert "1 = the certificate is met by an attack; larger = looser" in text
    assert "exact: the certificate equals the true worst case" in text
    assert "box [0, 1]" in text
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
    assert "x\\|y\\<script\\>\\*z\\*" in text  # backslash escapes, shown literally, never a tag
    assert "- ⚠️ node \\<img src=x\\> \\| broke" in text
    assert "&lt;" not in text and "&gt;" not in text and "&amp;" not in text
    assert "<script" not in text.replace("\\<script", "").replace("`a'b<script>.onnx`", "")
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


def _visible_ticks(axis, low, high) -> int:
    return sum(low <= t <= high for t in axis.get_ticklocs())


def test_risk_plot_linear_focus_global_bound_off_scale_and_threshold():
    report = finalize_report(raw_report())
    figure = risk_figure(report)
    axes = figure.axes[0]
    bottom, top = axes.get_ylim()
    assert axes.get_yscale() == "linear" and bottom == 0 and 0.6633 < top < 1.0  # ~1.3x the largest certificate
    assert _visible_ticks(axes.yaxis, bottom, top) >= 4
    svg = risk_plot(report)
    assert "global Lipschitz bound — 5.9–24, off scale" in svg and "max-risk threshold 0.5" in svg
    raw = raw_report()
    raw["settings"]["loss"] = "margin"
    for result in raw["results"]:  # negative margins: the axis still follows the data
        result.update(clean_risk=-3.0, certificate=result["certificate"] - 3, first_order_estimate=None)
        for attack in result["attacks"].values():
            attack["risk"] -= 3
    raw["settings"]["thresholds"]["max_risk"] = 100.0
    svg = risk_plot(finalize_report(raw))
    assert "global Lipschitz bound — 5.9–24, off scale" in svg and "max-risk threshold 100 — off scale" in svg
    raw = raw_report()  # a global bound that fits is drawn without a note
    for result in raw["results"]:
        result["global_bound"] = result["certificate"] * 1.1
    assert "global Lipschitz bound</text>" in risk_plot(finalize_report(raw)).replace("\n", "")


def test_plots_mark_thresholds_and_fractions_of_255():
    raw = _per_255_raw()
    raw["settings"]["thresholds"]["min_robust_accuracy"] = 0.75
    report = finalize_report(raw)
    risk, accuracy = risk_plot(report), accuracy_plot(report)
    for svg in (risk, accuracy):
        assert ">1/255<" in svg and ">8/255<" in svg
    assert "threshold: min certified accuracy 50.0%" in accuracy and "threshold: min robust accuracy 75.0%" in accuracy
    labels = [t.get_text() for t in accuracy_figure(report).axes[0].get_xticklabels()]
    assert labels == ["1/255", "2/255", "8/255"]
    assert "/255" not in risk_plot(finalize_report(raw_report()))  # plain decimals keep the default ticks


def test_risk_plot_vacuous_certificate_is_off_scale():
    report = finalize_report(_vacuous_raw())
    figure = risk_figure(report)
    assert figure.axes[0].get_ylim()[1] < 1.0  # focused on the attacks, not on the certificate 35.31
    assert "certificate (upper bound) — vacuous; 35.3, off scale" in risk_plot(report)


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


# --- top of the report: thresholds, vacuous certificates, warnings vs notes ------------------

def test_threshold_lines_state_worst_value_and_margin(report):
    lines = threshold_lines(report)
    assert [(t.name, t.status) for t in lines] == [("max_risk", "fail"), ("min_certified_accuracy", "pass")]
    assert lines[0].text == ("max risk 0.5: highest certificate 0.6633 at delta 0.2, margin −0.163; "
                             "highest attack risk 0.4105 — fail")
    assert lines[1].text == "min certified accuracy 50.0%: lowest 71.0% at delta 0.2, margin +21.0 pts — pass"
    robust = threshold_lines(_finalized(settings__thresholds={"max_risk": None, "min_certified_accuracy": None,
                                                              "min_robust_accuracy": 0.8}))
    assert [t.text for t in robust] == [
        "min robust accuracy 80.0%: lowest attacked accuracy 78.0% at delta 0.2 (attack wda, certified 71.0%), "
        "margin −2.0 pts — fail"]
    page, text = render_html(report), render_markdown(report)
    verdict = page[page.index('<section id="verdict">'):page.index('<section id="numbers">')]
    assert "<td>max risk 0.5</td>" in verdict and "highest certificate 0.6633 at delta 0.2, margin −0.163" in verdict
    assert "<td>min certified accuracy 50.0%</td>" in verdict and 'class="cell-pass">pass<' in verdict
    assert ("- max risk 0.5: highest certificate 0.6633 at delta 0.2, margin −0.163; highest attack risk 0.4105 "
            "— ❌") in text
    assert text.index("**Thresholds**") < text.index("| delta |")
    unset = finalize_report({**raw_report(), "settings": {**raw_report()["settings"], "thresholds": dict.fromkeys(
        ("max_risk", "min_certified_accuracy", "min_robust_accuracy"))}})
    assert threshold_lines(unset) == [] and "No thresholds set" in render_html(unset)
    assert "No thresholds set" in render_markdown(unset)


def test_budgets_shown_as_fractions_of_255():
    assert fmt_delta(8 / 255) == "8/255 (0.0314)" and fmt_delta(np.float32(8 / 255)) == "8/255 (0.0314)"
    assert fmt_delta(0.2) == "0.2" and fmt_delta(0.05) == "0.05" and fmt_delta(0) == "0"  # 0.2 = 51/255 stays
    report = finalize_report(_per_255_raw())
    page, text = render_html(report), render_markdown(report)
    assert '<td class="num">8/255 (0.0314)</td>' in page and "1/255 (0.00392), 2/255 (0.00784), 8/255 (0.0314)" in page
    assert "| 8/255 (0.0314) | 0.0812 |" in text and "at delta 8/255 (0.0314)" in text


def test_html_has_no_python_leaks_and_explains_columns(report):
    page = render_html(report)
    assert "None" not in page and "cell-None" not in page
    assert "<tr><th>box</th><td>[0, 1]</td></tr>" in page and "(0.0, 1.0)" not in page
    assert fmt_box(None) == "none (unbounded)"
    assert "gap ratio" in page and "1 = the certificate is met by an attack; larger = looser" in page
    assert "JSON key <code>tightness</code>" in page
    assert "exact</strong>: the certificate equals the true worst case" in page
    assert '94.0% <span class="muted">(wda)</span>' in page  # the attack behind the lowest accuracy
    assert "<th>max risk ≤ 0.5</th><th>certified acc. ≥ 50.0%</th>" in page
    table = page[page.index('<section id="numbers">'):page.index("<h3>Attacks</h3>")]
    assert "robust acc. ≥" not in table and table.count("<td>—</td>") == 0  # unset threshold: no column


def test_vacuous_certificate_note():
    assert vacuous_note(finalize_report(raw_report())) is None
    report = finalize_report(_vacuous_raw())
    note = vacuous_note(report)
    assert note.startswith("The certificate is vacuous at every budget (it is 35.31 whatever the budget; "
                           "certified accuracy 0% with a certificate over 10× the best attack)")
    assert "Rely on the attacks' lower bounds" in note
    assert 'id="vacuous-note"' in render_html(report)
    assert "> ⚠️ **Vacuous certificate.** The certificate is vacuous at every budget" in render_markdown(report)
    raw = raw_report()  # rule (a) at one delta only
    raw["results"][2].update(certificate=5.0, certified_accuracy=0.0)
    assert vacuous_note(finalize_report(raw)).startswith(
        "The certificate is vacuous at delta 0.2 (certified accuracy 0% with a certificate over 10× the best attack)")
    raw = raw_report()  # an infinite certificate is vacuous too
    raw["results"][0]["certificate"] = "Infinity"
    assert "vacuous at delta 0.05 (it is infinite)" in vacuous_note(finalize_report(raw))


def test_warnings_split_into_problems_and_notes():
    raw = raw_report()
    raw["warnings"] = ["attack skipped: wpgd is not defined for p = 1 (needs q < inf)"]
    raw["results"][0]["attacks"]["pgd"]["risk"] = 0.2  # above the certificate: a real soundness warning
    report = finalize_report(raw)
    problems, notes = split_warnings(report["warnings"])
    assert notes == ["attack skipped: wpgd is not defined for p = 1 (needs q < inf)"]
    assert len(problems) == 1 and "soundness bug" in problems[0]
    page = render_html(report)
    warn = page[page.index('<div class="warn">'):]
    note = page[page.index('<div class="note">'):]
    assert "soundness bug" in warn[:warn.index("</div>")] and "attack skipped" not in warn[:warn.index("</div>")]
    assert "attack skipped: wpgd is not defined for p = 1 (needs q &lt; inf)" in note[:note.index("</div>")]
    text = render_markdown(report)
    assert "- ℹ️ attack skipped: wpgd is not defined for p = 1 (needs q \\< inf)" in text and "&lt;" not in text
    assert "**Warnings** (these numbers contradict each other; please report them)" in text
    only_notes = finalize_report({**raw_report(), "warnings": notes})
    assert '<div class="warn">' not in render_html(only_notes) and "**Warnings**" not in render_markdown(only_notes)


def test_an_attack_that_took_no_step_is_not_the_best_attack_nor_the_attacked_accuracy():
    """A result flagged NO_STEP holds the samples' own numbers: left out of best attack and attacked
    accuracy (which a robust-accuracy gate would otherwise pass on the clean accuracy)."""
    from verifier.deadline import NO_STEP

    raw = raw_report()
    raw["settings"]["thresholds"] = {"max_risk": None, "min_certified_accuracy": None, "min_robust_accuracy": 0.93}
    for result in raw["results"]:
        result["attacks"]["wda"].update(risk=0.0812, robust_accuracy=0.98, flags=[NO_STEP])
    raw["results"][2]["attacks"]["pgd"].update(risk=0.0812, robust_accuracy=0.98, flags=[NO_STEP])
    report = finalize_report(raw)
    validate_report(report)
    low, _, high = report["results"]
    assert (low["best_attack"], low["best_attack_risk"], low["best_attack_accuracy"]) == ("pgd", 0.1402, 0.96)
    assert (high["best_attack"], high["best_attack_risk"], high["best_attack_accuracy"]) == (None, None, None)
    assert high["tightness"] is None and high["verdict"]["min_robust_accuracy"] == "fail"
    assert "delta=0.2: attacked accuracy — below 93.0% (no attack took a step within the time limit)" \
        in report["verdict"]["failures"]
    unset = _finalized(settings__thresholds={"max_risk": None, "min_certified_accuracy": None,
                                             "min_robust_accuracy": None},
                       results__2__attacks={"pgd": _attack(0.0812, 0.98, 0.0, flags=[NO_STEP])})
    assert unset["verdict"]["summary"] == (
        "No thresholds set; at delta=0.2 no attack took a step within the time limit (not attacked: no attacked "
        "risk or accuracy); certificate 0.6633, clean 0.0812.")
    assert "| 0.2 | 0.0812 | — |" in render_markdown(unset)
