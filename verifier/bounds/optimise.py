"""Optimised relaxations (alpha-CROWN style) for the final back-substitution (method.md §7, eq. A1).

`optimised_upper_bound` takes propagated `Bounds` (intermediate intervals stay fixed) and makes
free parameters of the lines whose every value in a range is sound on those intervals:
- the lower slope `alpha in [a, 1]` of every unstable ReLU / LeakyReLU / PReLU / Abs unit
  (`sigma(h) >= alpha h` for `h` of either sign when `a <= alpha <= 1`);
- the upper weights `a in [0, 1]^T` of every MaxPool window (`pool.upper_offset`, eq. P1) and its
  lower weights, a convex combination of the taps (kept on the simplex as a softmax);
- the mixing weights in [0, 1] of McCormick's two lower and two upper planes of every product of two
  variables (method eq. 3.8g) and the tangent point in [l, u] of every convex / concave elementary
  function (eq. 3.8h).
One set per objective (as in alpha-CROWN). Adam on the sum of the bounds improves them; every
iterate is a sound bound, so the minimum over the iterates is returned and a deadline may stop
the search at any step. By default the intermediate intervals stay those of `propagate`;
`SlopeSearch(intermediate=True)` also re-bounds, at every step, the unstable inputs of each ReLU-type
node after the first and (`smooth`) every affine input of a later product or smooth function, by
back-substitution through the earlier nodes' lines, with one parameter set per intermediate row
while they fit `INTERMEDIATE_BUDGET` (a few samples at a time; else one shared set per node), each
re-bounded interval intersected with the fixed one; the re-bounded widths join the objective.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, fields, replace

import torch

from verifier.bounds import bilinear, elementary, relaxations
from verifier.bounds.network import Activation, BoundNetwork, BoundNode
from verifier.bounds.pool import PoolRelaxation, upper_offset, window_bounds
from verifier.bounds.propagate import Bounds, InputSet, _linear_interval, _with_variance_floor, upper_bound
from verifier.bounds.variance import MeanSquare
from verifier.deadline import NEVER, Deadline, Stopped, Terminated

_RELU_FAMILY = frozenset({"relu", "leaky_relu", "prelu", "abs"})


@dataclass(frozen=True)
class SlopeSearch:
    """Settings of the projected-gradient search (alpha-CROWN uses a few dozen Adam steps)."""

    steps: int = 20
    learning_rate: float = 0.2
    pool: bool = True  # also optimise the MaxPool weights
    products: bool = True  # also the McCormick planes' mixing weights of products of two variables
    tangents: bool = True  # also the tangent points of the convex / concave elementary functions
    intermediate: bool = False  # also re-bound the inputs of later ReLU-type nodes at every step
    smooth: bool = True  # with `intermediate`, also the affine inputs of later products and smooth functions


Pair = tuple[torch.Tensor, torch.Tensor]


@dataclass
class _Free:
    """One node's parameters (objective axis K for the final objectives, 1 for the intermediate ones),
    how they become a relaxation on a given input interval, and their projection onto the sound set."""

    node: BoundNode
    final: torch.Tensor
    shared: torch.Tensor
    build: Callable[[torch.Tensor, dict[str, Pair]], relaxations.Relaxation | PoolRelaxation | bilinear.Planes]
    project: Callable[[torch.Tensor], None]


def optimised_upper_bound(network: BoundNetwork, state: Bounds, region: InputSet, target: str,
                          coefficients: torch.Tensor, search: SlopeSearch = SlopeSearch(),
                          deadline: Deadline = NEVER) -> torch.Tensor:
    """Sound upper bounds (N, K) of `<coefficients_k, v_target>`, at most `upper_bound`'s (eq. A1).

    The first iterate is the default relaxation; a deadline past it ends the search with the best so far.
    """
    count = coefficients.shape[0]
    chunk = _samples_at_once(network, state, region, search) if search.intermediate and count > 1 else count
    best = upper_bound(network, state, region, target, coefficients, deadline)
    if chunk < count:  # samples are independent: a few at a time keep the per-row parameters in budget
        for part in torch.arange(count, device=coefficients.device).split(chunk):
            try:
                best[part] = torch.minimum(best[part], optimised_upper_bound(
                    network, _take_state(state, part), _take_region(region, part), target, coefficients[part],
                    search, deadline))
            except Stopped as err:  # the parts not searched keep the default bound
                if isinstance(err, Terminated):
                    raise
                break
        return best
    free = _free_parameters(network, state, coefficients.shape[1], search)
    if not free or search.steps <= 0:
        return best
    targets = _targets(network, state, free, search) if search.intermediate else {}
    plan = _intermediate_plan(network, state, free, targets) if search.intermediate else None
    tensors = [item.final for item in free.values()]
    if search.intermediate:
        tensors += [item.shared for item in free.values()] if plan is None else \
            [values for rows in plan.values() for values in rows.inner.values()]
    optimiser = torch.optim.Adam(tensors, lr=search.learning_rate)
    try:
        for step in range(search.steps):
            with torch.enable_grad():
                intervals, rebuilt, spread = _rebound(network, state, region, free, targets, plan, deadline) \
                    if search.intermediate else (state.intervals, {}, 0.0)
                relaxed = dict(state.relaxed)
                relaxed.update(rebuilt)
                relaxed.update({name: item.build(item.final, intervals) for name, item in free.items()})
                value = upper_bound(network, Bounds(intervals, relaxed), region, target, coefficients, deadline)
                best = torch.minimum(best, value.detach())
                if step == search.steps - 1:
                    break
                optimiser.zero_grad()
                # The re-bounded intervals' widths join the objective: a final bound capped at an
                # interval (a vacuous one) passes no gradient to the lines that would tighten it.
                (torch.where(torch.isfinite(value), value, 0.0).sum() + spread).backward()
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
# intermediate objectives share one set per node instead (with several samples, fewer samples are
# searched at once first).
INTERMEDIATE_BUDGET = 2**24


def _samples_at_once(network: BoundNetwork, state: Bounds, region: InputSet, search: SlopeSearch) -> int:
    """How many samples one intermediate search takes so that its plan fits `INTERMEDIATE_BUDGET`
    (measured on the first sample; at least one)."""
    first = torch.arange(1, device=region.center.device)
    one = _take_state(state, first)
    free = _free_parameters(network, one, 1, search)
    targets = _targets(network, one, free, search)
    size = _plan_size(network, one, free, targets)
    return max(1, INTERMEDIATE_BUDGET // max(1, size))


def _take_state(state: Bounds, index: torch.Tensor) -> Bounds:
    """The bounds of the samples `index` (every per-sample tensor sliced on its first axis)."""
    def take(relax):
        if isinstance(relax, PoolRelaxation):
            pick = {name: getattr(relax, name)[index] for name in ("lower_weight", "upper_weight", "upper_offset")}
            pick.update({name: getattr(relax, name)[index] for name in ("upper_tap", "lower_tap")
                         if isinstance(getattr(relax, name, None), torch.Tensor)})
            return replace(relax, input_shape=torch.Size((len(index), *relax.input_shape[1:])), **pick)
        return replace(relax, **{field.name: getattr(relax, field.name)[index] for field in fields(relax)
                                 if isinstance(getattr(relax, field.name), torch.Tensor)})
    return Bounds({name: (low[index], high[index]) for name, (low, high) in state.intervals.items()},
                  {name: take(relax) for name, relax in state.relaxed.items()})


def _take_region(region: InputSet, index: torch.Tensor) -> InputSet:
    return InputSet(region.center[index], region.radius[index], region.norm, region.lower[index], region.upper[index])


@dataclass
class _UnitRows:
    """The re-bounded units of one node: per sample (N, m), as rows `+-e_unit` (N, 2m, *shape), and the
    earlier free nodes' parameters with one set per row."""

    index: torch.Tensor
    rows: torch.Tensor
    inner: dict[str, torch.Tensor]


def _targets(network: BoundNetwork, state: Bounds, free: dict[str, _Free], search: SlopeSearch) -> dict[str, torch.Tensor]:
    """The nodes re-bounded at every step and, per sample, the mask of their units that are: the unstable
    inputs of every ReLU-type node after the first free one and, with `search.smooth`, every unit of each
    affine input of a later product, elementary function or smooth activation (a LayerNorm's centred
    input and variance, the attention's queries, keys and values, Softmax's differences and sums)."""
    targets: dict[str, torch.Tensor] = {}
    nonlinear = {node.name for node in network.nodes if node.name in free or _smooth_fixed(node, free, state)}
    earlier = False
    for node in network.nodes:
        if earlier and node.name in free and getattr(node.rule, "kind", None) in _RELU_FAMILY:
            low, high = state.intervals[node.inputs[0]]
            targets[node.inputs[0]] = (low < 0) & (high > 0)
        elif earlier and search.smooth and node.name in nonlinear:
            for name in node.inputs:
                if name not in nonlinear and name != network.input:
                    targets[name] = torch.ones_like(state.intervals[name][0], dtype=torch.bool)
        earlier = earlier or node.name in free
    return targets


def _intermediate_plan(network: BoundNetwork, state: Bounds, free: dict[str, _Free],
                       targets: dict[str, torch.Tensor]) -> dict[str, _UnitRows] | None:
    """Rows and per-row parameters (of the free nodes before it) for every target with a unit to
    re-bound (None when they would exceed `INTERMEDIATE_BUDGET`)."""
    plan: dict[str, _UnitRows] = {}
    earlier: list[str] = []
    total = 0
    for node in network.nodes:
        mask = targets.get(node.name)
        if mask is not None and earlier:
            low = state.intervals[node.name][0]
            count = low.shape[0]
            wanted = mask.reshape(count, -1)
            width = int(wanted.sum(1).max())
            if width:
                # Wanted units first in each sample's row (a sample with fewer also bounds a few others).
                index = torch.argsort((~wanted).to(torch.int8), dim=1, stable=True)[:, :width]
                rows = torch.zeros(count, 2 * width, wanted.shape[1], dtype=low.dtype, device=low.device)
                rows[:, :width].scatter_(2, index.unsqueeze(-1), 1.0)
                rows[:, width:].scatter_(2, index.unsqueeze(-1), -1.0)
                inner = {name: _with_objectives(free[name].shared[:, 0].detach(), 2 * width) for name in earlier}
                total += rows.numel() + sum(values.numel() for values in inner.values())
                plan[node.name] = _UnitRows(index, rows.reshape(count, 2 * width, *low.shape[1:]), inner)
        if node.name in free:
            earlier.append(node.name)
    return plan if total <= INTERMEDIATE_BUDGET else None


def _plan_size(network: BoundNetwork, state: Bounds, free: dict[str, _Free], targets: dict[str, torch.Tensor]) -> int:
    """Elements `_intermediate_plan` would hold (rows and per-row parameters), without building it."""
    total, earlier = 0, 0
    for node in network.nodes:
        mask = targets.get(node.name)
        if mask is not None and earlier:
            width = int(mask.reshape(mask.shape[0], -1).sum(1).max())
            total += 2 * width * (mask[0].numel() + earlier) * mask.shape[0]
        if node.name in free:
            earlier += free[node.name].shared[0].numel()
    return total


def _rebound(network: BoundNetwork, state: Bounds, region: InputSet, free: dict[str, _Free],
             targets: dict[str, torch.Tensor], plan: dict[str, _UnitRows] | None,
             deadline: Deadline) -> tuple[dict[str, Pair], dict[str, relaxations.Relaxation], torch.Tensor]:
    """Intervals with every target re-bounded through the earlier nodes' lines (one set per row of `plan`;
    without a plan the shared sets), and the outputs of the free nodes reading a re-bounded interval
    recomputed from it, each intersected with its fixed (sound) interval."""
    intervals, relaxed = dict(state.intervals), dict(state.relaxed)
    spread = torch.zeros((), dtype=state.intervals[network.input][0].dtype)
    rebuilt = {node.name: None for node in network.nodes if _smooth_fixed(node, free, state)}
    changed: set[str] = set()
    seen = False
    for node in network.nodes:
        name = node.name
        if name in targets and seen and (plan is None or name in plan):
            low, high = state.intervals[name]
            if plan is None:
                new_low, new_high = _linear_interval(network, Bounds(intervals, relaxed), region, name,
                                                     targets[name], deadline)
                gap = torch.minimum(high, new_high) - torch.maximum(low, new_low)
                spread = spread + torch.where(torch.isfinite(gap), gap, 0.0).sum()
            else:
                rows = plan[name]
                lines = dict(relaxed)
                lines.update({earlier: free[earlier].build(values, intervals) for earlier, values in rows.inner.items()})
                values = upper_bound(network, Bounds(intervals, lines), region, name, rows.rows, deadline)
                spread = spread + torch.where(torch.isfinite(values), values, 0.0).sum()
                width, count = rows.index.shape[1], low.shape[0]
                new_high = high.reshape(count, -1).scatter(1, rows.index, values[:, :width]).reshape(high.shape)
                new_low = low.reshape(count, -1).scatter(1, rows.index, -values[:, width:]).reshape(low.shape)
            intervals[name] = torch.maximum(low, new_low), torch.minimum(high, new_high)
            if isinstance(node.rule, MeanSquare):  # its Cauchy–Schwarz floor through the tighter lines (eq. 3.8f)
                intervals[name] = _with_variance_floor(network, Bounds(intervals, relaxed), region, name, deadline)
            changed.add(name)
        item = free.get(name)
        if item is None:
            if name in rebuilt and changed.intersection(node.inputs):  # a fixed-form line on a tighter input
                low, high = intervals[node.inputs[0]]
                rule = node.rule
                rebuilt[name] = relaxed[name] = relaxations.linear_relaxation(rule.kind, low, high, rule.params,
                                                                              rule.slope)
                out_low, out_high = _output_interval(node, [intervals[node.inputs[0]]])
                fixed_low, fixed_high = state.intervals[name]
                intervals[name] = torch.maximum(fixed_low, out_low), torch.minimum(fixed_high, out_high)
                changed.add(name)
            continue
        if changed.intersection(node.inputs) and not isinstance(relaxed.get(name), PoolRelaxation):
            out_low, out_high = _output_interval(node, [intervals[i] for i in node.inputs])
            fixed_low, fixed_high = state.intervals[name]
            intervals[name] = torch.maximum(fixed_low, out_low), torch.minimum(fixed_high, out_high)
            changed.add(name)
        relaxed[name] = item.build(item.shared, intervals)
        seen = True
    return intervals, {name: lines for name, lines in rebuilt.items() if lines is not None}, spread


def _smooth_fixed(node: BoundNode, free: dict[str, _Free], state: Bounds) -> bool:
    """A relaxed activation without free parameters (GELU, SiLU, ...): its default lines are rebuilt
    when its input is re-bounded."""
    return (node.name not in free and isinstance(node.rule, Activation)
            and isinstance(state.relaxed.get(node.name), relaxations.Relaxation) and node.rule.kind not in elementary.KINDS)


def _output_interval(node: BoundNode, inputs: list[Pair]) -> Pair:
    """A free node's output interval from its input intervals (an activation's or a product's rule)."""
    if isinstance(node.rule, bilinear.Product):
        return node.rule.rule(inputs)
    return relaxations.interval(node.rule.kind, *inputs[0], node.rule.params, node.rule.slope)


def _free_parameters(network: BoundNetwork, state: Bounds, objectives: int, search: SlopeSearch) -> dict[str, _Free]:
    free: dict[str, _Free] = {}
    pool = search.pool
    for node in network.nodes:
        relax, rule = state.relaxed.get(node.name), node.rule
        if isinstance(rule, bilinear.Product) and search.products:
            free[node.name] = _product_parameters(node, state, objectives)
            continue
        if not isinstance(rule, Activation) or relax is None:
            continue
        if rule.kind in elementary.KINDS:
            if search.tangents:
                free[node.name] = _tangent_parameters(node, state, objectives)
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

    def build(alpha: torch.Tensor, intervals: dict[str, Pair]) -> relaxations.Relaxation:
        low, high = intervals[node.inputs[0]]
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

    def build(pair: torch.Tensor, intervals: dict[str, Pair]) -> PoolRelaxation:
        interval = intervals[node.inputs[0]]
        windows = window_bounds(node.rule.params, node.onnx_node, *interval)
        finite = ((torch.isfinite(windows.lows) & torch.isfinite(windows.highs)) | ~windows.valid).all(-1, keepdim=True)
        weight = torch.where(finite.unsqueeze(1), pair[:, :, 0], 0.0)
        lower = torch.softmax(pair[:, :, 1], -1)
        return PoolRelaxation(windows.taps, lower, weight, upper_offset(weight, windows), interval[0].shape)

    def project(pair: torch.Tensor) -> None:
        pair[:, :, 0].clamp_(0.0, 1.0)

    return _Free(node, _with_objectives(start, objectives), _with_objectives(start, 1), build, project)


def _product_parameters(node: BoundNode, state: Bounds, objectives: int) -> _Free:
    """Per product unit and objective: the weights in [0, 1] of the first McCormick plane of each side
    (method eq. 3.8g), starting at the corner rule's choice."""
    rule = node.rule
    start = bilinear.default_weights(rule, *(state.intervals[name] for name in node.inputs), 1)[:, 0]

    def build(weights: torch.Tensor, intervals: dict[str, Pair]) -> bilinear.Planes:
        return bilinear.relax(rule, *(intervals[name] for name in node.inputs), intervals[node.name], weights)

    def project(weights: torch.Tensor) -> None:
        weights.clamp_(0.0, 1.0)

    return _Free(node, _with_objectives(start, objectives), _with_objectives(start, 1), build, project)


def _tangent_parameters(node: BoundNode, state: Bounds, objectives: int) -> _Free:
    """Per unit and objective: where in its input interval (0..1) the tangent line of a convex or
    concave elementary function touches (method eq. 3.8h), starting at the default point."""
    rule = node.rule
    start = elementary.default_position(rule.kind, *state.intervals[node.inputs[0]], rule.params)

    def build(position: torch.Tensor, intervals: dict[str, Pair]) -> relaxations.Relaxation:
        low, high = intervals[node.inputs[0]]
        return relaxations.linear_relaxation(rule.kind, low.unsqueeze(1), high.unsqueeze(1), rule.params,
                                             position=position)

    def project(position: torch.Tensor) -> None:
        position.clamp_(0.0, 1.0)

    return _Free(node, _with_objectives(start.to(state.intervals[node.inputs[0]][0].dtype), objectives),
                 _with_objectives(start, 1), build, project)
