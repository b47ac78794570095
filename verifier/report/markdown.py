"""`render_markdown`: the verdict and the numbers table as GitHub-flavoured Markdown (a PR comment).

Strings from the model are escaped (HTML special characters as entities, Markdown punctuation
with a backslash) so a hostile node or file name cannot inject markup or break the table.
"""

from __future__ import annotations

import re

from verifier.report.html import verdict_label
from verifier.report.numbers import MISSING, fmt, fmt_pct
from verifier.report.schema import THRESHOLDS

_ICON = {"PASS": "✅", "FAIL": "❌", "PARTIAL": "⏱️", "NO THRESHOLDS": "ℹ️"}
_MARKDOWN_PUNCTUATION = re.compile(r"([\\`*_\[\]|~])")


def escape(text: str) -> str:
    """Any text (a file or node name) safe inside Markdown prose and table cells, on one line."""
    text = _MARKDOWN_PUNCTUATION.sub(r"\\\1", " ".join(str(text).split()))
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def _html(text: str) -> str:
    """One line with HTML's special characters as entities (for verifier's own sentences)."""
    text = " ".join(str(text).split())
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("|", "\\|")


def code(text: str) -> str:
    """`text` as an inline code span (shown literally; backticks inside replaced)."""
    return "`" + " ".join(str(text).split()).replace("`", "'") + "`"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _numbers(report: dict) -> list[str]:
    head = ["delta", "clean risk", "best attack", "certificate", "global bound", "tightness",
            "clean acc.", "certified acc.", "attacked acc.", "exact"]
    used = [name for name in THRESHOLDS if report["settings"]["thresholds"][name] is not None]
    lines = [_row(head + used), _row(["---:"] * (len(head) - 1) + [":---:"] + [":---:"] * len(used))]
    for x in report["results"]:
        attack = fmt(x["best_attack_risk"]) + (f" ({escape(x['best_attack'])})" if x["best_attack"] else "")
        lines.append(_row([
            fmt(x["delta"]), fmt(x["clean_risk"]), attack, fmt(x["certificate"]), fmt(x["global_bound"]),
            fmt(x["tightness"]), fmt_pct(x["clean_accuracy"]), fmt_pct(x["certified_accuracy"]),
            fmt_pct(x["best_attack_accuracy"]), fmt(x["exact"]) if x["exact"] is not None else MISSING,
            *(x["verdict"][name] or MISSING for name in used)]))
    return lines


def render_markdown(report: dict) -> str:
    """The Markdown summary of a finalized, valid report."""
    label = verdict_label(report)
    model, settings = report["model"], report["settings"]
    lines = [f"## {_ICON[label]} verifier audit: {label}", ""]
    if not report["complete"]:
        lines += [f"> **Partial report: time limit hit** (during {report['stopped_at']}); "
                  f"{len(report['results'])} of {len(settings['deltas'])} budgets analysed.", ""]
    lines += [_html(report["verdict"]["summary"]), ""]
    lines += [f"- {_html(line)}" for line in report["verdict"]["failures"]]
    lines += [f"- ⚠️ {escape(line)}" for line in report["warnings"]]
    if report["verdict"]["failures"] or report["warnings"]:
        lines.append("")
    conversion = report["conversion"]
    check = ("not run" if conversion is None else
             f"{'passed' if conversion['passed'] else '**failed**'} (max abs diff {fmt(conversion['max_abs_diff'])}, "
             f"top-1 agreement {fmt_pct(conversion['top1_agreement'])})")
    lines += [
        f"Model {code(model['path'])} (sha256 `{model['sha256'][:12]}`, {escape(model['family'])}, "
        f"{model.get('node_count', MISSING)} nodes); conversion check {check}.",
        f"Loss {settings['loss']}, Wasserstein p = {fmt(settings['p'])}, {settings['norm']} norm, "
        f"{report['data']['samples']} samples; exit code {report['verdict']['exit_code']}.", "",
    ]
    if report["results"]:
        lines += _numbers(report) + [""]
    lines.append("_certificate = proven upper bound on the worst-case risk; attacks = lower bounds; "
                 "tightness = (certificate − clean) / (best attack − clean)._")
    return "\n".join(lines) + "\n"
