"""`render_html`: one self-contained HTML page from a report dict (jinja2, inline CSS and SVG).

The page loads nothing (a Content-Security-Policy forbids it, scripts included); every string
from the report is HTML-escaped by autoescaping (node names in a model can be hostile); only
the SVG produced by `plots.py` is inserted as markup. Sections carry the stable ids of
`SECTION_IDS` so tools and tests can find them.
"""

from __future__ import annotations

from importlib import resources

import jinja2
from markupsafe import Markup

from verifier.report.numbers import fmt, fmt_box, fmt_delta, fmt_exact_mode, fmt_pct, fmt_seconds, fmt_sources
from verifier.report.plots import accuracy_plot, risk_plot, slopes_plot
from verifier.report.schema import THRESHOLDS
from verifier.report.summary import split_warnings, threshold_lines, vacuous_note, weakest_attack

SECTION_IDS = ("verdict", "numbers", "model-summary", "conversion", "risk-plot", "accuracy-plot", "slopes-plot",
               "settings")
PARTIAL_ID = "partial"
_TEMPLATE = "report.html.j2"


def _shape(shape) -> str:
    if shape is None:
        return "—"
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def _environment() -> jinja2.Environment:
    env = jinja2.Environment(autoescape=True, undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    env.filters.update(num=fmt, pct=fmt_pct, secs=fmt_seconds, sources=fmt_sources, exact_mode=fmt_exact_mode, shape=_shape, delta=fmt_delta, box=fmt_box,
                       weakest=weakest_attack)
    return env


def verdict_label(report: dict) -> str:
    """PASS, FAIL, PARTIAL (time limit, nothing failed yet) or NO THRESHOLDS."""
    passed = report["verdict"]["passed"]
    if passed is not None:
        return "PASS" if passed else "FAIL"
    return "NO THRESHOLDS" if report["complete"] else "PARTIAL"


def render_html(report: dict) -> str:
    """The HTML page of a finalized, valid report."""
    template_text = resources.files("verifier.report").joinpath("templates", _TEMPLATE).read_text("utf-8")
    template = _environment().from_string(template_text)
    plots = {name: (None if svg is None else Markup(svg)) for name, svg in (
        ("risk", risk_plot(report)), ("accuracy", accuracy_plot(report)), ("slopes", slopes_plot(report)))}
    label = verdict_label(report)
    css = {"PASS": "pass", "FAIL": "fail", "PARTIAL": "partial"}.get(label, "none")
    limits = report["settings"]["thresholds"]
    used = [name for name in THRESHOLDS if limits.get(name) is not None]
    problems, notes = split_warnings(report["warnings"])
    return template.render(r=report, c=report["conversion"], plots=plots, label=label, css=css,
                           thresholds=THRESHOLDS, used=used, headers=column_headers(limits),
                           tlines=threshold_lines(report), vacuous=vacuous_note(report),
                           problems=problems, notes=notes)


def column_headers(limits: dict) -> dict[str, str]:
    """Table headers of the per-delta threshold columns: `max risk ≤ 0.5`, `certified acc. ≥ 50.0%`, ..."""
    heads = {"max_risk": ("max risk ≤", fmt), "min_certified_accuracy": ("certified acc. ≥", fmt_pct),
             "min_robust_accuracy": ("robust acc. ≥", fmt_pct)}
    return {name: f"{head} {show(limits[name])}" for name, (head, show) in heads.items()
            if limits.get(name) is not None}
