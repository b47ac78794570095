"""`render_markdown`: the verdict, the thresholds and the numbers table as GitHub-flavoured Markdown (a PR comment).

Every text that is not verifier's own fixed wording (file and node names, warnings, failure
lines) goes through `escape`: Markdown-significant characters get a backslash, which GitHub
shows literally, so a hostile name can neither inject HTML (`\\<script\\>` is text, not a tag)
nor break a table. No HTML entities are written: Markdown would show `&lt;` as-is in code
and makes it noise elsewhere.
"""

from __future__ import annotations

import re

from verifier.report.html import column_headers, verdict_label
from verifier.report.numbers import MISSING, fmt, fmt_box, fmt_delta, fmt_exact_mode, fmt_pct, fmt_sources
from verifier.report.schema import THRESHOLDS
from verifier.report.summary import split_warnings, threshold_lines, vacuous_note, weakest_attack

_ICON = {"PASS": "✅", "FAIL": "❌", "PARTIAL": "⏱️", "NO THRESHOLDS": "ℹ️"}
_STATUS = {"pass": "✅ pass", "fail": "❌ **fail**", "pass so far": "⏱️ pass so far",
           "not checked": "not checked"}
_MARKDOWN_PUNCTUATION = re.compile(r"([\\`*_\[\]|~<>&])")


def escape(text: str) -> str:
    """Any text (a file or node name, a warning) safe inside Markdown prose and table cells, on one line."""
    return _MARKDOWN_PUNCTUATION.sub(r"\\\1", " ".join(str(text).split()))


def code(text: str) -> str:
    """`text` as an inline code span (shown literally; backticks inside replaced)."""
    return "`" + " ".join(str(text).split()).replace("`", "'") + "`"


def _row(cells: list[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _numbers(report: dict) -> list[str]:
    head = ["delta", "clean risk", "best attack (attack)", "certificate", "global bound", "gap ratio",
            "clean acc.", "certified acc.", "attacked acc. (attack)", "exact", "decisive curve points"]
    limits = report["settings"]["thresholds"]
    used = [name for name in THRESHOLDS if limits[name] is not None]
    headers = column_headers(limits)
    lines = [_row(head + [headers[name] for name in used]),
             _row(["---:"] * (len(head) - 2) + [":---:", ":---"] + [":---:"] * len(used))]
    for x in report["results"]:
        attack = fmt(x["best_attack_risk"]) + (f" ({escape(x['best_attack'])})" if x["best_attack"] else "")
        weakest = weakest_attack(x)
        attacked = fmt_pct(x["best_attack_accuracy"]) + (f" ({escape(weakest)})" if weakest else "")
        lines.append(_row([
            fmt_delta(x["delta"]), fmt(x["clean_risk"]), attack, fmt(x["certificate"]), fmt(x["global_bound"]),
            fmt(x["tightness"]), fmt_pct(x["clean_accuracy"]), fmt_pct(x["certified_accuracy"]),
            attacked, fmt(x["exact"]) if x["exact"] is not None else MISSING,
            escape(fmt_sources(x.get("curve_sources"))),
            *(x["verdict"][name] or MISSING for name in used)]))
    return lines


_LEGEND = [
    "_certificate: a proven upper bound on the worst-case risk; best attack: a lower bound (the attack in "
    "brackets reached it). attacked acc.: the lowest accuracy an attack forced, an upper bound on the robust "
    "accuracy (the attack in brackets; it can differ from the one with the highest risk); certified acc.: a "
    "lower bound._",
    "_gap ratio = (certificate − clean) / (best attack − clean): 1 = the certificate is met by an attack; "
    "larger = looser. exact: the certificate equals the true worst case (an explicit distribution reaches it); "
    "\"no\" means the truth lies between the best attack and the certificate. decisive curve points: where the "
    "per-sample bounds that decide the certificate came from (share of the samples): MILP (exact) is the exact "
    "worst margin, solved as a mixed-integer program (`--exact`)._",
]


def _top(report: dict) -> list[str]:
    """Thresholds with their margins, the vacuous-certificate note, failures, warnings and notes."""
    lines = []
    thresholds = threshold_lines(report)
    if thresholds:
        lines += ["**Thresholds** (worst value over the deltas):", ""]
        lines += [f"- {escape(t.label)}: {escape(t.detail)} — {_STATUS[t.status]}" for t in thresholds]
    else:
        lines.append("No thresholds set (`--max-risk`, `--min-certified-accuracy`, `--min-robust-accuracy`).")
    lines.append("")
    note = vacuous_note(report)
    if note:
        lines += [f"> ⚠️ **Vacuous certificate.** {escape(note)}", ""]
    if report["verdict"]["failures"]:
        lines += ["Reasons:", ""] + [f"- {escape(line)}" for line in report["verdict"]["failures"]] + [""]
    problems, notes = split_warnings(report["warnings"])
    if problems:
        lines += ["**Warnings** (these numbers contradict each other; please report them):", ""]
        lines += [f"- ⚠️ {escape(line)}" for line in problems] + [""]
    if notes:
        lines += ["Notes:", ""] + [f"- ℹ️ {escape(line)}" for line in notes] + [""]
    return lines


def render_markdown(report: dict) -> str:
    """The Markdown summary of a finalized, valid report."""
    label = verdict_label(report)
    model, settings = report["model"], report["settings"]
    lines = [f"## {_ICON[label]} verifier audit: {label}", ""]
    if not report["complete"]:
        lines += [f"> **Partial report: time limit hit** ({report['stopped_at']} not completed); "
                  f"{len(report['results'])} of {len(settings['deltas'])} budgets analysed.", ""]
    lines += [escape(report["verdict"]["summary"]), ""]
    lines += _top(report)
    conversion = report["conversion"]
    check = ("not run" if conversion is None else
             f"{'passed' if conversion['passed'] else '**failed**'} (max abs diff {fmt(conversion['max_abs_diff'])}, "
             f"top-1 agreement {fmt_pct(conversion['top1_agreement'])})")
    lines += [
        f"Model {code(model['path'])} (sha256 `{model['sha256'][:12]}`, {escape(model['family'])}, "
        f"{model.get('node_count', MISSING)} nodes); conversion check {check}.",
        f"Loss {escape(settings['loss'])}, Wasserstein p = {fmt(settings['p'])}, {escape(settings['norm'])} norm, "
        f"box {fmt_box(settings['box'])}, {report['data']['samples']} samples; "
        f"exit code {report['verdict']['exit_code']}.", "",
    ]
    exact_mode = fmt_exact_mode(report.get("exact_mode"))
    if exact_mode:
        lines += [escape(exact_mode), ""]
    if report["results"]:
        lines += _numbers(report) + [""] + _LEGEND
    return "\n".join(lines) + "\n"
