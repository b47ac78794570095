"""Optimised relaxations (alpha-CROWN style) for the final back-substitution (method.md §7, eq. A1).

`optimised_upper_bound` takes propagated `Bounds` (intermediate intervals stay fixed) and makes
free parameters of the lines whose every value in a range is sound on those intervals:
- the lower slope `alpha in [a, 1]` of every unstable ReLU / LeakyReLU / PReLU / Abs unit
  (`sigma(h) >= alpha h` for `h` of either sign when `a <= alpha <= 1`);
- the upper weights `a in [0, 1]^T` of every MaxPool window (`pool.upper_offset`, eq. P1) and its
  lower weights, a convex combination of the taps (kept on the simplex as a softmax).
One set per objective (as in alpha-CROWN). Adam on the sum of the bounds improves them; every
iterate is a sound bound, so the minimum over the iterates is returned and a deadline may stop
the search at any step. By default the intermediate intervals stay those of `propagate`;
`SlopeSearch(intermediate=True)` also re-bounds, at every step, the unstable inputs of each ReLU-type
node after the first by back-substitution through the earlier nodes' lines, with one parameter set
per intermediate row while they fit `INTERMEDIATE_BUDGET` (else one shared set per node), each
re-bounded interval intersected with the fixed one.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

from verifier.bounds import relaxations
from verifier.bounds.network import Activation, BoundNetwork, BoundNode
from verifier.bounds.pool import PoolRelaxation, upper_offset, window_bounds
from verifier.bounds.propagate import Bounds, InputSet, _linear_interval, upper_bound
from verifier.deadline import NEVER, Deadline, Stopped, Terminated

_RELU_FAMILY = frozenset({"relu", "leaky_relu", "prelu", "abs"})


@dataclass(frozen=True)
class SlopeSearch:
    """Settings of the projected-gradient search (alpha-CROWN uses a few dozen Adam steps)."""

    steps: int = 20
    learning_rate: float = 0.2
    pool: bool = True  # also optimise the MaxPool weights
    intermediate: bool = False  # also re-bound the inputs of later ReLU-type nodes at every step


Pair = tuple[torch.Tensor, torch.Tensor]


@dataclass
class _Free:
    """One node's parameters (objective axis K for the final objectives, 1 for the intermediate ones),
    how they become a relaxation on a given input interval, and their projection onto the sound set."""

    node: BoundNode
    final: torch.Tensor
    shared: torch.Tensor
    build: Callable[[torch.Tensor, Pair], relaxations.Relaxation | PoolRelaxation]
    project: Callable[[torch.Tensor], None]


def optimised_upper_bound(network: BoundNetwork, state: Bounds, region: InputSet, target: str,
                          coefficients: torch.Tensor, search: SlopeSearch = SlopeSearch(),
                          deadline: Deadline = NEVER) -> torch.Tensor:
    """Sound upper bounds (N, K) of `<coefficients_k, v_target>`, at most `upper_bound`'s (eq. A1).

    The first iterate is the default relaxation; a deadline past it ends the search with the best so far.
    """
    best = upper_bound(network, state, region, target, coefficients, deadline)
    free = _free_parameters(network, state, coefficients.shape[1], search.pool)
    if not free or search.steps <= 0:
        return best
    plan = _intermediate_plan(network, state, free) if search.intermediate else None
    tensors = [item.final for item in free.values()]
    if search.intermediate:
        tensors += [item.shared for item in free.values()] if plan is None else \
            [values for rows in plan.values() for values in rows.inner.values()]
    optimiser = torch.optim.Adam(tensors, lr=search.learning_rate)
    try:
        for step in range(search.steps):
            with torch.enable_grad():
                intervals = _rebound(network, state, region, free, plan, deadline) if search.intermediate \
                    else state.intervals
                relaxed = dict(state.relaxed)
                relaxed.update({name: item.build(item.final, intervals[item.node.inputs[0]])
                                for name, item in free.items()})
                value = upper_bound(network, Bounds(intervals, relaxed), region, target, coefficients, deadline)
                best = torch.minimum(best, value.detach())
                if step == search.steps - 1:
                    break
                optimiser.zero_grad()
                torch.where(torch.isfinite(value), value, 0.0).sum().backward()
            optimiser.step()
            with torch.no_grad():
                for item in free.values():
                    item.project(item.final)
                    item.project(item.shared)
                for rows in (plan or {}).values():
                    for name, values in rows.inner.items():
                        free[name].project(values)
    except Stopped as err:
        if isinstance(err, Terminated):
            raise
    return best


# Per-objective intermediate parameters (elements, over all re-bounded nodes) beyond which the
# intermediate objectives share one set per node instead.
INTERMEDIATE_BUDGET = 2**24


@dataclass
class _UnitRows:
    """The re-bounded units of one node's input: per sample (N, m), as rows `+-e_unit` (N, 2m, *shape),
    and the earlier free nodes' parameters with one set per row."""

    index: torch.Tensor
    rows: torch.Tensor
    inner: dict[str, torch.Tensor]


def _intermediate_plan(network: BoundNetwork, state: Bounds, free: dict[str, _Free]) -> dict[str, _UnitRows] | None:
    """Rows and per-row parameters for the unstable inputs of every ReLU-type node after the first free
    one (None when they would exceed `INTERMEDIATE_BUDGET`)."""
    plan: dict[str, _UnitRows] = {}
    earlier: list[str] = []
    total = 0
    for node in network.nodes:
        if node.name not in free:
            continue
        if earlier and node.rule.kind in _RELU_FAMILY:
            low, high = state.intervals[node.inputs[0]]
            count = low.shape[0]
            unstable = ((low < 0) & (high > 0)).reshape(count, -1)
            width = int(unstable.sum(1).max())
            if width:
                # Unstable units first in each sample's row (a sample with fewer also bounds a few stable ones).
                index = torch.argsort((~unstable).to(torch.int8), dim=1, stable=True)[:, :width]
                rows = torch.zeros(count, 2 * width, unstable.shape[1], dtype=low.dtype, device=low.device)
                rows[:, :width].scatter_(2, index.unsqueeze(-1), 1.0)
                rows[:, width:].scatter_(2, index.unsqueeze(-1), -1.0)
                inner = {name: _with_objectives(free[name].shared[:, 0].detach(), 2 * width) for name in earlier}
                total += rows.numel() + sum(values.numel() for values in inner.values())
                plan[node.name] = _UnitRows(index, rows.reshape(count, 2 * width, *low.shape[1:]), inner)
        earlier.append(node.name)
    return plan if total <= INTERMEDIATE_BUDGET else None


def _rebound(network: BoundNetwork, state: Bounds, region: InputSet, free: dict[str, _Free],
             plan: dict[str, _UnitRows] | None, deadline: Deadline) -> dict[str, Pair]:
    """Intervals with the unstable inputs of every ReLU-type node after the first free one re-bounded
    through the earlier nodes' lines (one set per row of `plan`; without a plan the shared sets),
    each intersected with its fixed (sound) interval."""
    intervals, relaxed = dict(state.intervals), dict(state.relaxed)
    seen = False
    for node in network.nodes:
        item = free.get(node.name)
        if item is None:
            continue
        name = node.inputs[0]
        if seen and node.rule.kind in _RELU_FAMILY and (plan is None or node.name in plan):
            low, high = state.intervals[name]
            if plan is None:
                new_low, new_high = _linear_interval(network, Bounds(intervals, relaxed), region, name,
                                                     (low < 0) & (high > 0), deadline)
            else:
                rows = plan[node.name]
                lines = dict(state.relaxed)
                lines.update({earlier: free[earlier].build(values, intervals[free[earlier].node.inputs[0]])
                              for earlier, values in rows.inner.items()})
                values = upper_bound(network, Bounds(intervals, lines), region, name, rows.rows, deadline)
                width, count = rows.index.shape[1], low.shape[0]
                new_high = high.reshape(count, -1).scatter(1, rows.index, values[:, :width]).reshape(high.shape)
                new_low = low.reshape(count, -1).scatter(1, rows.index, -values[:, width:]).reshape(low.shape)
            intervals[name] = torch.maximum(low, new_low), torch.minimum(high, new_high)
            out_low, out_high = relaxations.interval(node.rule.kind, *intervals[name], node.rule.params, node.rule.slope)
            fixed_low, fixed_high = state.intervals[node.name]
            intervals[node.name] = torch.maximum(fixed_low, out_low), torch.minimum(fixed_high, out_high)
        relaxed[node.name] = item.build(item.shared, intervals[name])
        seen = True
    return intervals


def _free_parameters(network: BoundNetwork, state: Bounds, objectives: int, pool: bool) -> dict[str, _Free]:
    free: dict[str, _Free] = {}
    for node in network.nodes:
        relax, rule = state.relaxed.get(node.name), node.rule
        if not isinstance(rule, Activation) or relax is None:
            continue
        if isinstance(relax, PoolRelaxation):
            if pool:
                free[node.name] = _pool_parameters(node, relax, objectives)
        elif rule.kind in _RELU_FAMILY:
            item = _relu_parameters(node, relax, state.intervals[node.inputs[0]], objectives)
            if item is not None:
                free[node.name] = item
    return free


def _with_objectives(tensor: torch.Tensor, objectives: int) -> torch.Tensor:
    """A leaf copy (N, objectives, ...) of a per-unit tensor (N, ...), for the optimiser."""
    return tensor.unsqueeze(1).expand(-1, objectives, *tensor.shape[1:]).clone().requires_grad_(True)


def _relu_parameters(node: BoundNode, relax: relaxations.Relaxation, interval: Pair, objectives: int) -> _Free | None:
    """Lower slopes `alpha in [a, 1]` of the unstable units (convex case `a <= 1` only)."""
    rule = node.rule
    low, high = interval
    # sigma(-1) = -a for the ReLU family: the slope of the negative piece, per unit (PReLU).
    a = -relaxations.activation(rule.kind, -torch.ones_like(low[:1]), rule.params, rule.slope)
    if not bool(((low < 0) & (high > 0) & (a <= 1)).any()):
        return None
    floor = a.unsqueeze(1)

    def build(alpha: torch.Tensor, interval: Pair) -> relaxations.Relaxation:
        low, high = interval
        default = relaxations.linear_relaxation(rule.kind, low, high, rule.params, rule.slope)
        free = ((low < 0) & (high > 0) & (a <= 1)).unsqueeze(1)
        return replace(default, lower_slope=torch.where(free, alpha, default.lower_slope.unsqueeze(1)),
                       lower_offset=torch.where(free, 0.0, default.lower_offset.unsqueeze(1)))

    def project(alpha: torch.Tensor) -> None:
        alpha.copy_(torch.maximum(torch.minimum(alpha, torch.ones_like(alpha)), floor))

    return _Free(node, _with_objectives(relax.lower_slope, objectives), _with_objectives(relax.lower_slope, 1),
                 build, project)


def _pool_parameters(node: BoundNode, relax: PoolRelaxation, objectives: int) -> _Free:
    """Per window: upper weights in [0, 1] (offset from eq. P1) and lower logits (softmax weights)."""
    valid = relax.taps >= 0
    # Logits of the default one-hot lower weights: 0 at the winner, -4 elsewhere, -inf on padding.
    logits = torch.where(relax.lower_weight > 0, 0.0, -4.0).masked_fill(~valid, -math.inf)
    start = torch.stack([relax.upper_weight, logits], 1)  # (N, 2, C, W, T): an objective axis goes at 1

    def build(pair: torch.Tensor, interval: Pair) -> PoolRelaxation:
        windows = window_bounds(node.rule.params, node.onnx_node, *interval)
        finite = ((torch.isfinite(windows.lows) & torch.isfinite(windows.highs)) | ~windows.valid).all(-1, keepdim=True)
        weight = torch.where(finite.unsqueeze(1), pair[:, :, 0], 0.0)
        lower = torch.softmax(pair[:, :, 1], -1)
        return PoolRelaxation(windows.taps, lower, weight, upper_offset(weight, windows), interval[0].shape)

    def project(pair: torch.Tensor) -> None:
        pair[:, :, 0].clamp_(0.0, 1.0)

    return _Free(node, _with_objectives(start, objectives), _with_objectives(start, 1), build, project)
