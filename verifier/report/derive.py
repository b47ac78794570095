"""`finalize_report`: the numbers a report derives from its raw ones, computed in one place.

From the measured numbers (certificates, attacks, thresholds, conversion check) it fills the
best attack per delta, the tightness, each threshold's pass/fail, `exact_up_to_delta`,
soundness warnings and the overall verdict with the audit's exit code (docs/report.md).
"""

from __future__ import annotations

import math

import numpy as np

from verifier.graph import json_safe
from verifier.report.numbers import fmt, fmt_pct, value
from verifier.report.schema import THRESHOLDS, ReportSchemaError
from verifier.report.summary import attacks_that_stepped, weakest_attack

EXIT_PASSED, EXIT_FAILED, EXIT_PARTIAL = 0, 1, 3
_SOUND_TOL = 1e-6
_GAIN_TOL = 1e-12


def _plain(item):
    """Python scalars in place of numpy ones, tuples as lists (JSON-ready)."""
    if isinstance(item, dict):
        return {str(k): _plain(v) for k, v in item.items()}
    if isinstance(item, (list, tuple, np.ndarray)):
        return [_plain(v) for v in item]
    if isinstance(item, np.generic):
        return item.item()
    return item


def _num(item) -> float | None:
    """A finite report number, else None (malformed values are left for `validate_report` to name)."""
    number = value(item)
    return number if number is not None and math.isfinite(number) else None


def _best(attacks: dict) -> tuple[str | None, float | None, float | None]:
    """(method with the highest risk, that risk, lowest attacked accuracy) over the methods that took a step."""
    attacks = attacks_that_stepped(attacks)
    risks = {m: _num(a.get("risk")) for m, a in attacks.items() if _num(a.get("risk")) is not None}
    accuracies = [_num(a.get("robust_accuracy")) for a in attacks.values()]
    accuracies = [a for a in accuracies if a is not None]
    method = max(sorted(risks), key=risks.__getitem__) if risks else None
    return method, (None if method is None else risks[method]), (min(accuracies) if accuracies else None)


def _tightness(certificate, clean, attack: float | None) -> float | None:
    """(certificate − clean) / (best attack − clean); None when either is missing or the attack gains nothing."""
    bound, clean = _num(certificate), _num(clean)
    if bound is None or attack is None or clean is None:
        return None
    gain = attack - clean
    return None if gain <= _GAIN_TOL * max(1.0, abs(clean)) else (bound - clean) / gain


def _checks(result: dict, thresholds: dict) -> tuple[dict, list[str]]:
    """Per-threshold "pass"/"fail"/None at one delta, with a one-line reason per failure."""
    at = f"delta={fmt(result['delta'])}"
    verdict: dict = dict.fromkeys(THRESHOLDS)
    reasons: list[str] = []
    limit = thresholds.get("max_risk")
    if limit is not None:
        bound, attack = _num(result["certificate"]), result["best_attack_risk"]
        if attack is not None and attack > limit:
            reasons.append(f"{at}: risk above {fmt(limit)}: attack {result['best_attack']} reaches {fmt(attack)} "
                           f"(certificate {fmt(result['certificate'])})")
        elif bound is None or bound > limit:
            why = "no certificate" if result["certificate"] is None else f"certificate {fmt(result['certificate'])}"
            reasons.append(f"{at}: risk not certified below {fmt(limit)} ({why}, best attack {fmt(attack)})")
        verdict["max_risk"] = "fail" if reasons else "pass"
    certified, attacked = _num(result.get("certified_accuracy")), result["best_attack_accuracy"]
    limit = thresholds.get("min_certified_accuracy")
    if limit is not None:
        ok = certified is not None and certified >= limit
        verdict["min_certified_accuracy"] = "pass" if ok else "fail"
        if not ok:
            reasons.append(f"{at}: certified accuracy {fmt_pct(certified)} below {fmt_pct(limit)}")
    limit = thresholds.get("min_robust_accuracy")
    if limit is not None:  # the true robust accuracy lies in [certified, attacked]
        ok = any(a is not None and a >= limit for a in (attacked, certified))
        verdict["min_robust_accuracy"] = "pass" if ok else "fail"
        if not ok:
            reasons.append(f"{at}: attacked accuracy {fmt_pct(attacked)} below {fmt_pct(limit)}"
                           + (f" (attack {weakest_attack(result)})" if attacked is not None else
                              " (no attack took a step within the time limit)" if result["attacks"] else
                              " (no attack ran)"))
    return verdict, reasons


def _soundness(result: dict, p) -> list[str]:
    """Warnings where the numbers contradict `clean <= attack <= certificate` or the budget."""
    at, out = f"delta={fmt(result['delta'])}", []
    bound, attack = _num(result["certificate"]), result["best_attack_risk"]
    if bound is not None and attack is not None and attack > bound + _SOUND_TOL * max(1.0, abs(bound)):
        out.append(f"{at}: attack {result['best_attack']} reaches {fmt(attack, 8)} above the certificate "
                   f"{fmt(bound, 8)}: a soundness bug, please report it")
    certified, attacked = _num(result.get("certified_accuracy")), result["best_attack_accuracy"]
    if certified is not None and attacked is not None and certified > attacked + _SOUND_TOL:
        out.append(f"{at}: certified accuracy {fmt_pct(certified)} above the attacked accuracy "
                   f"{fmt_pct(attacked)}: a soundness bug, please report it")
    for method, attack_result in sorted(result["attacks"].items()):
        cost, delta = _num(attack_result.get("transport_cost")), _num(result.get("delta"))
        if cost is not None and delta is not None and cost > delta * (1 + _SOUND_TOL) + 1e-12:
            out.append(f"{at}: attack {method} spends {fmt(attack_result['transport_cost'], 8)} "
                       f"over the budget (W_{fmt(p)} distance)")
    return out


def _exact_up_to(results: list[dict]) -> float | None:
    """The largest delta such that every result up to it is exact (None when the first is not)."""
    reached = None
    for result in sorted(results, key=lambda r: _num(r.get("delta")) or 0.0):
        if result.get("exact") is not True:
            break
        reached = result["delta"]
    return reached


def _summary(report: dict, failures: list[str], checks: int, thresholds_set: bool) -> str:
    results = report["results"]
    partial = "" if report["complete"] else f"Partial report (time limit hit; {report['stopped_at']} not completed): "
    if failures:
        return f"{partial}FAIL: {len(failures)} check(s) failed; first: {failures[0]}."
    if thresholds_set and report["complete"]:
        return f"PASS: all {checks} threshold check(s) hold at every delta."
    if not results:
        return f"{partial}no budget was analysed."
    last = results[-1]
    numbers = (f"at delta={fmt(last['delta'])} the risk lies in [{fmt(last['best_attack_risk'])}, "
               f"{fmt(last['certificate'])}] (best attack, certificate), clean {fmt(last['clean_risk'])}.")
    if last["attacks"] and last["best_attack_risk"] is None:  # every attack flagged NO_STEP there
        numbers = (f"at delta={fmt(last['delta'])} no attack took a step within the time limit (not attacked: "
                   f"no attacked risk or accuracy); certificate {fmt(last['certificate'])}, clean "
                   f"{fmt(last['clean_risk'])}.")
    lead = "no threshold failed so far; " if thresholds_set else "No thresholds set; "
    return (partial + lead + numbers) if partial else lead + numbers


def finalize_report(report: dict) -> dict:
    """A copy of `report` with every derived field filled (results, exactness, warnings, verdict).

    The input has the raw fields of docs/report.md; numpy scalars and non-finite floats are
    converted (`json_safe`). Call it once before `write_report`.
    """
    try:
        return _finalized(json_safe(_plain(report)))
    except (KeyError, TypeError, AttributeError, IndexError) as err:
        raise ReportSchemaError("", f"cannot derive the verdict ({type(err).__name__}: {err}); "
                                    "see docs/report.md for the fields it needs") from err


def _finalized(out: dict) -> dict:
    """`finalize_report` on a JSON-safe copy (filled in place)."""
    thresholds = out["settings"]["thresholds"]
    warnings = list(out.get("warnings", []))
    failures: list[str] = []
    conversion = out.get("conversion")
    if conversion is not None and conversion.get("passed") is False:
        failures.append(f"conversion check failed: torch and onnxruntime differ by up to "
                        f"{fmt(conversion.get('max_abs_diff'))} (atol {fmt(conversion.get('atol'))}, "
                        f"rtol {fmt(conversion.get('rtol'))})")
    checks = 0
    for result in out["results"]:
        result["best_attack"], result["best_attack_risk"], result["best_attack_accuracy"] = _best(result["attacks"])
        result["tightness"] = _tightness(result["certificate"], result["clean_risk"], result["best_attack_risk"])
        result["verdict"], reasons = _checks(result, thresholds)
        checks += sum(v is not None for v in result["verdict"].values())
        failures += reasons
        warnings += _soundness(result, out["settings"]["p"])
    out["exact_up_to_delta"] = _exact_up_to(out["results"])
    out["warnings"] = warnings
    thresholds_set = any(thresholds.get(name) is not None for name in THRESHOLDS)
    if failures:
        passed, code = False, EXIT_FAILED
    else:
        passed = True if (thresholds_set and out["complete"]) else None
        code = EXIT_PASSED if out["complete"] else EXIT_PARTIAL
    out["verdict"] = {"passed": passed, "exit_code": code, "failures": failures,
                      "summary": _summary(out, failures, checks, thresholds_set)}
    return out
