"""Anytime results made monotone in delta: what was feasible at a smaller budget stays a candidate.

A distribution Q with W_p(Q, P_N) <= delta is feasible at every larger delta, so the best risk
(the lowest robust accuracy) an attack reports at delta' >= delta is never below (above) the one it
reports at delta. Under a time budget a later delta may get fewer steps than an earlier one (or
none: the samples themselves), so `monotone_in_delta` carries each method's best measured
distribution of the smaller deltas forward, the risk's and the accuracy's separately, after
re-checking its float64 transport cost against the larger budget. The measured numbers of a
carried distribution are its own (the same atoms replay to the same logits), so nothing is
re-evaluated. Shared by every method: `verifier.attacks.attack` applies it to each method's results.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

from verifier.attacks.base import NO_STEP
from verifier.attacks.result import AttackResult

BUDGET_RTOL = 1e-6  # the tolerance of `measure`'s over-budget check
CARRIED = "carried from delta {delta:g} (a smaller budget's distribution scored higher)"


def _fits(result: AttackResult, delta: float) -> bool:
    """Whether `result`'s couplings (risk and accuracy, float64 cost) fit budget `delta`."""
    return "over-budget" not in result.flags and result.transport_cost <= delta * (1 + BUDGET_RTOL)


def _accuracy_part(result: AttackResult) -> tuple:
    """(atoms, weights, source) of the distribution the accuracy of `result` was measured on."""
    if result.accuracy_atoms is None:
        return result.atoms, result.weights, result.source
    return (result.accuracy_atoms,
            result.weights if result.accuracy_weights is None else result.accuracy_weights,
            result.source if result.accuracy_source is None else result.accuracy_source)


def monotone_in_delta(results: Sequence[AttackResult]) -> list[AttackResult]:
    """One method's results (any order of deltas), each at least as strong as those of every smaller
    delta: the risk and its distribution from the highest-risk result of the deltas <= this one, the
    robust accuracy and its distribution from the lowest-accuracy one, when its cost fits this delta."""
    out = list(results)
    order = sorted(range(len(out)), key=lambda k: out[k].delta)
    top_risk: AttackResult | None = None
    low_accuracy: AttackResult | None = None
    for k in order:
        result = out[k]
        risk_from = top_risk if top_risk is not None and top_risk.risk > result.risk and \
            _fits(top_risk, result.delta) else result
        accuracy_from = low_accuracy if low_accuracy is not None and \
            low_accuracy.robust_accuracy < result.robust_accuracy and _fits(low_accuracy, result.delta) else result
        if risk_from is not result or accuracy_from is not result:
            out[k] = _combined(result, risk_from, accuracy_from)
        if _fits(result, result.delta):
            top_risk = result if top_risk is None or result.risk > top_risk.risk else top_risk
            low_accuracy = (result if low_accuracy is None or result.robust_accuracy < low_accuracy.robust_accuracy
                            else low_accuracy)
    return out


def _combined(result: AttackResult, risk_from: AttackResult, accuracy_from: AttackResult) -> AttackResult:
    """`result` with its risk taken from `risk_from` and its accuracy from `accuracy_from`."""
    atoms, weights, source = _accuracy_part(accuracy_from)
    same = accuracy_from is risk_from
    carried = sorted({r.delta for r in (risk_from, accuracy_from) if r is not result})
    # numbers carried from a delta that took steps are an attack's result here too
    attacked = any(r is not result and NO_STEP not in r.flags for r in (risk_from, accuracy_from))
    return replace(
        result, risk=risk_from.risk, robust_accuracy=accuracy_from.robust_accuracy,
        transport_cost=max(risk_from.transport_cost, accuracy_from.transport_cost),
        flags=tuple(f for f in result.flags if not (attacked and f == NO_STEP))
        + tuple(CARRIED.format(delta=d) for d in carried),
        atoms=risk_from.atoms, weights=risk_from.weights, source=risk_from.source,
        accuracy_atoms=None if same and risk_from.accuracy_atoms is None else atoms,
        accuracy_weights=None if same else weights, accuracy_source=None if same else source)
