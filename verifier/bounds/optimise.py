"""Optimised relaxations (alpha-CROWN style) for the final back-substitution (method.md §7, eq. A1).

`optimised_upper_bound` takes propagated `Bounds` (intermediate intervals stay fixed) and makes
free parameters of the lines whose every value in a range is sound on those intervals:
- the lower slope `alpha in [a, 1]` of every unstable ReLU / LeakyReLU / PReLU / Abs unit
  (`sigma(h) >= alpha h` for `h` of either sign when `a <= alpha <= 1`);
- the upper weights `a in [0, 1]^T` of every MaxPool window (`pool.upper_offset`, eq. P1) and its
  lower weights, a convex combination of the taps (kept on the simplex as a softmax).
One set per objective (as in alpha-CROWN). Adam on the sum of the bounds improves them; every
iterate is a sound bound, so the minimum over the iterates is returned and a deadline may stop
the search at any step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from verifier.bounds import relaxations
from verifier.bounds.network import Activation, BoundNetwork
from verifier.bounds.pool import PoolRelaxation, upper_offset, window_bounds
from verifier.bounds.propagate import Bounds, InputSet, upper_bound
from verifier.deadline import NEVER, Deadline, Stopped, Terminated

_RELU_FAMILY = frozenset({"relu", "leaky_relu", "prelu", "abs"})


@dataclass(frozen=True)
class SlopeSearch:
    """Settings of the projected-gradient search (alpha-CROWN uses a few dozen Adam steps)."""

    steps: int = 20
    learning_rate: float = 0.2
    pool: bool = True  # also optimise the MaxPool weights


@dataclass
class _Free:
    """One node's parameters: a tensor the optimiser moves and how it becomes a relaxation."""

    values: torch.Tensor
    build: object  # Callable[[torch.Tensor], Relaxation | PoolRelaxation]
    project: object  # Callable[[torch.Tensor], None], in place


def optimised_upper_bound(network: BoundNetwork, state: Bounds, region: InputSet, target: str,
                          coefficients: torch.Tensor, search: SlopeSearch = SlopeSearch(),
                          deadline: Deadline = NEVER) -> torch.Tensor:
    """Sound upper bounds (N, K) of `<coefficients_k, v_target>`, at most `upper_bound`'s (eq. A1).

    The first iterate is the default relaxation; a deadline past it ends the search with the best so far.
    """
    best = upper_bound(network, state, region, target, coefficients, deadline)
    objectives = coefficients.shape[1]
    free = _free_parameters(network, state, objectives, search.pool)
    if not free or search.steps <= 0:
        return best
    optimiser = torch.optim.Adam([item.values for item in free.values()], lr=search.learning_rate)
    try:
        for step in range(search.steps):
            relaxed = dict(state.relaxed)
            relaxed.update({name: item.build(item.values) for name, item in free.items()})
            with torch.enable_grad():
                value = upper_bound(network, Bounds(state.intervals, relaxed), region, target, coefficients, deadline)
                best = torch.minimum(best, value.detach())
                if step == search.steps - 1:
                    break
                optimiser.zero_grad()
                torch.where(torch.isfinite(value), value, 0.0).sum().backward()
            optimiser.step()
            with torch.no_grad():
                for item in free.values():
                    item.project(item.values)
    except Stopped as err:
        if isinstance(err, Terminated):
            raise
    return best


def _free_parameters(network: BoundNetwork, state: Bounds, objectives: int, pool: bool) -> dict[str, _Free]:
    free: dict[str, _Free] = {}
    for node in network.nodes:
        relax, rule = state.relaxed.get(node.name), node.rule
        if not isinstance(rule, Activation) or relax is None:
            continue
        if isinstance(relax, PoolRelaxation):
            if pool:
                free[node.name] = _pool_parameters(node, relax, state.intervals[node.inputs[0]], objectives)
        elif rule.kind in _RELU_FAMILY:
            item = _relu_parameters(rule, relax, state.intervals[node.inputs[0]], objectives)
            if item is not None:
                free[node.name] = item
    return free


def _relu_parameters(rule: Activation, relax: relaxations.Relaxation, interval, objectives: int) -> _Free | None:
    """Lower slopes `alpha in [a, 1]` of the unstable units (convex case `a <= 1` only)."""
    low, high = interval
    # sigma(-1) = -a for the ReLU family: the slope of the negative piece, per unit (PReLU).
    a = -relaxations.activation(rule.kind, -torch.ones_like(low[:1]), rule.params, rule.slope)
    unstable = (low < 0) & (high > 0) & (a <= 1)
    if not bool(unstable.any()):
        return None
    floor = a.expand_as(low).unsqueeze(1).expand(-1, objectives, *low.shape[1:])
    mask = unstable.unsqueeze(1).expand_as(floor)
    start = relax.lower_slope.unsqueeze(1).expand_as(floor)
    values = start.clone().requires_grad_(True)

    def build(alpha: torch.Tensor) -> relaxations.Relaxation:
        return replace(relax, lower_slope=torch.where(mask, alpha, start),
                       lower_offset=torch.where(mask, 0.0, relax.lower_offset.unsqueeze(1)))

    def project(alpha: torch.Tensor) -> None:
        alpha.copy_(torch.maximum(torch.minimum(alpha, torch.ones_like(alpha)), floor))

    return _Free(values, build, project)


def _pool_parameters(node, relax: PoolRelaxation, interval, objectives: int) -> _Free:
    """Per window: upper weights in [0, 1] (offset from eq. P1) and lower logits (softmax weights)."""
    windows = window_bounds(node.rule.params, node.onnx_node, *interval)
    finite = ((torch.isfinite(windows.lows) & torch.isfinite(windows.highs)) | ~windows.valid).all(-1, keepdim=True)

    def per_objective(weight: torch.Tensor) -> torch.Tensor:
        return weight.unsqueeze(1).expand(-1, objectives, *weight.shape[1:]).clone()

    upper = per_objective(relax.upper_weight)
    # Logits of the default one-hot lower weights: 0 at the winner, -4 elsewhere, -inf on padding.
    logits = per_objective(torch.where(relax.lower_weight > 0, 0.0, -4.0).masked_fill(~windows.valid, -math.inf))
    values = torch.stack([upper, logits]).requires_grad_(True)
    finite = finite.unsqueeze(1)

    def build(pair: torch.Tensor) -> PoolRelaxation:
        weight = torch.where(finite, pair[0], 0.0)
        lower = torch.softmax(pair[1], -1)
        return PoolRelaxation(relax.taps, lower, weight, upper_offset(weight, windows), relax.input_shape)

    def project(pair: torch.Tensor) -> None:
        pair[0].clamp_(0.0, 1.0)

    return _Free(values, build, project)
