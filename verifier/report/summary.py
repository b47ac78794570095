"""What the top of a report says besides the verdict, computed once for HTML and Markdown.

`threshold_lines`: each set threshold with its value, the worst value observed over the deltas
and the margin to it. `vacuous_note`: a plain warning when the certificate carries no
information (docs/report.md states the rule). `split_warnings`: soundness problems (a bug to
report) apart from neutral notes. `weakest_attack`: the attack behind the lowest accuracy.
Nothing here is stored in report.json; it is all derived from it at render time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from verifier.deadline import NO_STEP
from verifier.report.numbers import fmt, fmt_delta, fmt_pct, value
from verifier.report.schema import THRESHOLDS

LABELS = {"max_risk": "max risk", "min_certified_accuracy": "min certified accuracy",
          "min_robust_accuracy": "min robust accuracy"}
NOTE_PREFIXES = ("attack skipped:", "audit stopped after the conversion check:", "threat model:")
VACUOUS_FACTOR = 10.0


@dataclass(frozen=True)
class ThresholdLine:
    """One set threshold, e.g. "min certified accuracy 50.0%" / "lowest 55.5% at delta 8/255 (...)" / "pass"."""

    name: str
    label: str   # the threshold and its value
    detail: str  # the worst value observed over the deltas, where, and the margin
    status: str  # "pass", "fail", "pass so far" (partial report) or "not checked" (no delta analysed)

    @property
    def text(self) -> str:
        """The whole line: `label: detail — status`."""
        return f"{self.label}: {self.detail} — {self.status}"


def _finite(item) -> float | None:
    number = value(item)
    return number if number is not None and math.isfinite(number) else None


def attacks_that_stepped(attacks: dict) -> dict:
    """The attacks of one delta that took a step (a result flagged `NO_STEP` holds the samples' own
    numbers: no attack result, so never the best attack nor the attacked accuracy)."""
    return {m: a for m, a in attacks.items() if NO_STEP not in a.get("flags", ())}


def weakest_attack(result: dict) -> str | None:
    """The attack with the lowest accuracy at this delta (`best_attack_accuracy`), None without one."""
    accuracies = {m: _finite(a.get("robust_accuracy")) for m, a in attacks_that_stepped(result["attacks"]).items()}
    accuracies = {m: a for m, a in accuracies.items() if a is not None}
    return min(sorted(accuracies), key=accuracies.__getitem__) if accuracies else None


def _status(report: dict, name: str) -> str:
    checks = [r["verdict"][name] for r in report["results"]]
    if "fail" in checks:
        return "fail"
    if not checks:
        return "not checked"
    return "pass" if report["complete"] else "pass so far"


def _max_risk(report: dict, limit: float) -> str:
    results = report["results"]
    if all(r["certificate"] is None for r in results):
        return "no certificate for this loss"
    worst = max(reversed(results),  # ties: the largest delta
                key=lambda r: math.inf if value(r["certificate"]) is None else value(r["certificate"]))
    attacks = [r["best_attack_risk"] for r in results if r["best_attack_risk"] is not None]
    attack = f"; highest attack risk {fmt(max(attacks))}" if attacks else ""
    bound = _finite(worst["certificate"])
    if bound is None:
        what = "no certificate" if worst["certificate"] is None else "certificate ∞"
        return f"{what} at delta {fmt_delta(worst['delta'])}{attack}"
    return (f"highest certificate {fmt(bound)} at delta {fmt_delta(worst['delta'])}, "
            f"margin {_signed(f'{limit - bound:+.3g}')}{attack}")


def _accuracy(report: dict, name: str, limit: float) -> str:
    results = report["results"]
    key = "certified_accuracy" if name == "min_certified_accuracy" else "best_attack_accuracy"
    seen = [r for r in results if _finite(r.get(key)) is not None]
    if not seen:
        return f"no {'certified' if key == 'certified_accuracy' else 'attacked'} accuracy"
    worst = min(reversed(seen), key=lambda r: _finite(r[key]))  # ties: the largest delta
    lowest = _finite(worst[key])
    if key == "certified_accuracy":
        return f"lowest {fmt_pct(lowest)} at delta {fmt_delta(worst['delta'])}, {_points(lowest - limit)}"
    # robust accuracy lies in [certified, attacked]: the attacked accuracy is the number to compare
    return (f"lowest attacked accuracy {fmt_pct(lowest)} at delta {fmt_delta(worst['delta'])} "
            f"(attack {weakest_attack(worst)}, certified {fmt_pct(worst.get('certified_accuracy'))}), "
            f"{_points(lowest - limit)}")


def _signed(text: str) -> str:
    """`+0.35` / `−0.35` (a real minus sign)."""
    return text.replace("-", "−")


def _points(margin: float) -> str:
    return f"margin {_signed(f'{100 * margin:+.1f}')} pts"


def threshold_lines(report: dict) -> list[ThresholdLine]:
    """One line per set threshold, in `THRESHOLDS` order (empty when none is set)."""
    lines = []
    for name in THRESHOLDS:
        limit = report["settings"]["thresholds"].get(name)
        if limit is None:
            continue
        label = f"{LABELS[name]} {fmt(limit) if name == 'max_risk' else fmt_pct(limit)}"
        if not report["results"]:
            detail = "no delta analysed"
        else:
            detail = _max_risk(report, limit) if name == "max_risk" else _accuracy(report, name, limit)
        lines.append(ThresholdLine(name, label, detail, _status(report, name)))
    return lines


def _vacuous_at(result: dict) -> bool:
    """Rule (a) at one delta: certificate infinite, or certified accuracy 0 and certificate > 10× best attack."""
    if value(result["delta"]) in (None, 0.0) or result["certificate"] is None:
        return False
    bound = value(result["certificate"])
    if bound is not None and math.isinf(bound):
        return True
    attack, certified = result["best_attack_risk"], _finite(result.get("certified_accuracy"))
    return (certified is not None and certified <= 1e-12 and bound is not None and attack is not None and attack > 0
            and bound > VACUOUS_FACTOR * attack)


def _constant(results: list[dict]) -> float | None:
    """Rule (b): the same finite certificate at >= 2 positive deltas, above every attack: it ignores the budget."""
    positive = [r for r in results if (value(r["delta"]) or 0.0) > 0]
    bounds = [_finite(r["certificate"]) for r in positive]
    if len(positive) < 2 or any(b is None for b in bounds):
        return None
    first = bounds[0]
    if any(abs(b - first) > 1e-9 * max(1.0, abs(first)) for b in bounds):
        return None
    below = all(r["best_attack_risk"] is not None and r["best_attack_risk"] < first - 1e-9 * max(1.0, abs(first))
                for r in positive)
    return first if below else None


def vacuous_note(report: dict) -> str | None:
    """A sentence when the certificate is vacuous at some delta (rules in docs/report.md), else None."""
    results = report["results"]
    positive = [r for r in results if (value(r["delta"]) or 0.0) > 0]
    constant = _constant(results)
    at = positive if constant is not None else [r for r in positive if _vacuous_at(r)]
    if not at:
        return None
    reasons = []
    if constant is not None:
        reasons.append(f"it is {fmt(constant)} whatever the budget")
    if any(value(r["certificate"]) == math.inf for r in at):
        reasons.append("it is infinite")
    if any(_vacuous_at(r) and value(r["certificate"]) != math.inf for r in at):
        reasons.append(f"certified accuracy 0% with a certificate over {fmt(VACUOUS_FACTOR)}× the best attack")
    where = ("at every budget" if len(at) == len(positive)
             else "at delta " + ", ".join(fmt_delta(r["delta"]) for r in at))
    return (f"The certificate is vacuous {where} ({'; '.join(reasons)}): its bounds are too loose for this "
            "architecture (see the fallbacks and docs/method.md). Rely on the attacks' lower bounds; "
            "the true worst case may be far below the certificate.")


def split_warnings(warnings: list[str]) -> tuple[list[str], list[str]]:
    """(problems, notes): notes are the lines starting with a `NOTE_PREFIXES` entry; the rest are bugs to report."""
    notes = [w for w in warnings if w.startswith(NOTE_PREFIXES)]
    return [w for w in warnings if not w.startswith(NOTE_PREFIXES)], notes
