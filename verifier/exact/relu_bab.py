"""`relu_split_margins`: ReLU-splitting branch and bound on one sample's margins (method §8), for
piecewise-linear nets of any input size (the MILP's alternative where it is too big).

A leaf is the input set with some unstable units' pre-activations fixed to a sign: on the branch
`h_u >= 0` the unit's interval is intersected with `[0, inf)`, on `h_u <= 0` with `(-inf, 0]`, and
the leaf is re-bounded by the bounds package's own interval + CROWN pass (`propagate(prior=...)`
with the parent's intervals, which hold on the child too). Every point of the set lies in one of
the two children, and a leaf's bounds hold for every point of the set that satisfies its signs,
so the maximum over the leaves bounds every margin at any stop; a leaf whose intervals become
empty holds no point and is dropped. On encodable nets a leaf's bound also carries its split
constraints (`beta_crown.split_bound`, β-CROWN): interval splits alone leave the final
maximisation over the whole ball. The unit split is the one whose chord intercept costs the leaf's
worst bound most (`lam+ * intercept`, BaBSR's score). Leaves are taken best-first (highest bound), `batch` at a time.
It stops when the highest bound is within `tolerance` of the best known margin (`floor`, e.g. an
attack's, or the centre's), at `max_leaves`, at `seconds`, or when no leaf has an unstable unit.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace

import torch

from verifier.bounds.network import Activation, BoundNetwork
from verifier.bounds.propagate import Bounds, InputSet, propagate, upper_bound
from verifier.deadline import NEVER, Deadline
from verifier.exact.beta_crown import DenseNetwork, dense_forward, split_bound
from verifier.exact.encode import NotEncodable, UnitNode, encode_network
from verifier.exact.milp import MilpLimits, project_displacement, solve_margins

SPLIT_KINDS = ("relu", "leaky_relu", "prelu")
LP_SLACK = 1e-7
LONG_STEPS = 100  # beta steps on fully fixed leaves the LP did not answer (their bound falls without limit if empty)


@dataclass(frozen=True)
class ReluSplitSolution:
    """Upper bounds on every margin over the set (max over leaves), the lower end used, the effort."""

    upper: torch.Tensor  # (C,): sound upper bounds of z_j - z_y (-inf at y)
    floor: float  # the best known margin (a lower bound on the worst margin)
    point: torch.Tensor  # (d,): where a forward pass gave `floor` (the centre when it came from the caller)
    leaves: int  # leaves bounded (the root included)
    complete: bool  # max_j upper - floor <= tolerance


def relu_split_margins(network: BoundNetwork, region: InputSet, label: int, floor: float = -math.inf,
                       tolerance: float = 1e-3, max_leaves: int = 512, batch: int = 32, seconds: float | None = None,
                       deadline: Deadline = NEVER, dense: DenseNetwork | None = None) -> ReluSplitSolution:
    """Worst margins of the one sample of `region` (N = 1) by ReLU splitting (see the module doc).

    `dense`: the network's `DenseNetwork` (encodable nets; built here when None and possible): leaves
    are bounded with their split constraints (β-CROWN); without one, by the plain pass on their
    intervals (the least of the leaf's and its parent's bounds).
    """
    began = time.perf_counter()
    if dense is None:
        try:
            dense = DenseNetwork.of(encode_network(network, tuple(region.center.shape[1:])))
        except NotEncodable:
            dense = None
    units = [(node.name, node.inputs[0]) for node in network.nodes
             if isinstance(node.rule, Activation) and node.rule.kind in SPLIT_KINDS]
    with torch.no_grad():
        logits = network.evaluate(region.center)[0]
    classes = logits.shape[0]
    eye = torch.eye(classes, dtype=logits.dtype)
    rows = (eye - eye[label]).unsqueeze(0)
    floor = max(floor, float((logits - logits[label]).index_fill(0, torch.tensor([label]), -math.inf).max()))
    state = propagate(network, region, deadline=deadline)
    signs = {pre: torch.zeros(1, state.intervals[pre][0][0].numel(), dtype=torch.int8) for _, pre in units}
    upper = upper_bound(network, state, region, network.output, rows.clone(), deadline)
    leaves, (found, point) = _bound(network, dense, region, rows, units, state.intervals, signs, upper, label)
    if found <= floor:
        point = region.center.flatten(1)[0]
    floor = max(floor, found)
    settled = torch.full((classes,), -math.inf, dtype=logits.dtype)  # leaves that cannot matter any more
    count = 1

    def close(value: torch.Tensor) -> torch.Tensor:
        return value - floor <= tolerance * max(1.0, abs(floor))

    while True:
        worst = leaves.upper.max(1).values
        final = ~_splittable(leaves, units) & ~close(worst)
        if final.any() and dense is not None and region.norm in ("inf", "1"):  # affine there: an LP is exact
            upper, found, candidate = _solve_fixed(dense, region, label, leaves.take(final), floor)
            leaves = replace(leaves, upper=leaves.upper.masked_scatter(final[:, None], upper))
            if found > floor:
                floor, point = found, candidate
            worst = leaves.upper.max(1).values
        done = close(worst) | ~_splittable(leaves, units)
        if done.any():
            settled = torch.maximum(settled, leaves.upper[done].max(0).values)
            leaves = leaves.take(~done)
        if leaves.size == 0 or count >= max_leaves or (seconds is not None and time.perf_counter() - began > seconds):
            break
        deadline.check("ReLU splitting")
        order = torch.argsort(leaves.upper.max(1).values, descending=True)
        chosen = order[: max(1, min(batch, (max_leaves - count) // 2))]
        children, (found, candidate) = _branch(network, dense, region, rows, units, leaves.take(chosen), label,
                                               deadline)
        if found > floor:
            floor, point = found, candidate
        keep = torch.ones(leaves.size, dtype=torch.bool)
        keep[chosen] = False
        leaves = leaves.take(keep).join(children)
        count += 2 * len(chosen)
    per_class = settled if leaves.size == 0 else torch.maximum(settled, leaves.upper.max(0).values)
    per_class[label] = -math.inf
    return ReluSplitSolution(per_class, floor, point, count, bool(close(per_class.max())))


@dataclass(frozen=True)
class _Leaves:
    """B leaves: the intervals of every node on each, their split signs, margin bounds and unit scores."""

    intervals: dict[str, tuple[torch.Tensor, torch.Tensor]]  # (B, *shape) each
    signs: dict[str, torch.Tensor]  # (B, width) int8 per pre-activation: +1 / -1 split active / inactive
    upper: torch.Tensor  # (B, C), -inf at the label
    scores: torch.Tensor  # (B, all units): the branching score, -1 where a unit cannot be split

    @property
    def size(self) -> int:
        return len(self.upper)

    def take(self, index: torch.Tensor) -> _Leaves:
        return _Leaves({k: (low[index], high[index]) for k, (low, high) in self.intervals.items()},
                       {k: v[index] for k, v in self.signs.items()}, self.upper[index], self.scores[index])

    def join(self, other: _Leaves) -> _Leaves:
        return _Leaves({k: (torch.cat([low, other.intervals[k][0]]), torch.cat([high, other.intervals[k][1]]))
                        for k, (low, high) in self.intervals.items()},
                       {k: torch.cat([v, other.signs[k]]) for k, v in self.signs.items()},
                       torch.cat([self.upper, other.upper]), torch.cat([self.scores, other.scores]))


def _unstable(intervals: dict[str, tuple[torch.Tensor, torch.Tensor]], units: list[tuple[str, str]]):
    """Per split node, the units (B, width) whose pre-activation interval straddles 0."""
    masks = []
    for _, pre in units:
        low, high = intervals[pre]
        masks.append(((low < 0) & (high > 0)).flatten(1))
    return masks


def _splittable(leaves: _Leaves, units: list[tuple[str, str]]) -> torch.Tensor:
    return (leaves.scores >= 0).any(1) if leaves.scores.shape[1] else torch.zeros(leaves.size, dtype=torch.bool)


def _bound(network: BoundNetwork, dense: DenseNetwork | None, region: InputSet, rows: torch.Tensor,
           units: list[tuple[str, str]], intervals, signs, plain: torch.Tensor, label: int):
    """Leaves with their bounds (the least of `plain`, sound on each, and the split-constrained
    bound) and the best (margin, point) among their candidate points."""
    count = len(plain)
    masks = _unstable(intervals, units)
    if dense is not None:
        split, parts, points = split_bound(dense, _repeat(region, count), intervals, signs,
                                           rows.expand(count, -1, -1))
        upper = torch.minimum(plain, split)
        raw = [parts[name] for name, _ in units]
        with torch.no_grad():
            logits = network.evaluate(points.reshape(count, *region.center.shape[1:]))
        found = (logits - logits[:, label:label + 1]).index_fill(1, torch.tensor([label]), -math.inf).max(1).values
        best = int(found.argmax())
        floor = (float(found[best]), points[best])
    else:  # no split constraints: the intercept of each unstable unit's chord scores it
        upper = plain
        raw = [_intercept(*intervals[pre]) for _, pre in units]
        floor = (-math.inf, region.center.flatten(1)[0])
    scores = [torch.where(mask, score.flatten(1) + 1e-9 * _intercept(*intervals[pre]).flatten(1),
                          torch.full_like(score.flatten(1), -1.0)) for (_, pre), mask, score in zip(units, masks, raw)]
    upper = upper.clone()
    upper[:, label] = -math.inf
    all_scores = torch.cat(scores, 1) if scores else torch.zeros(count, 0, dtype=plain.dtype)
    return _Leaves(intervals, signs, upper, all_scores), floor


def _solve_fixed(dense: DenseNetwork, region: InputSet, label: int, leaves: _Leaves, floor: float):
    """Exact margin bounds (B, C) of leaves without unstable units (one LP each: `exact.milp` with no
    binaries, whose variable bounds are the leaf's intervals and so its signs), and the best point."""
    uppers, unsolved, best, point = [], [], -math.inf, None
    centre = region.center.flatten(1)[0]
    pre = {node.input for node in dense.encoded.nodes if isinstance(node, UnitNode)}
    for row in range(leaves.size):
        intervals = {name: _loosened(low[row].flatten(), high[row].flatten(), name in pre)
                     for name, (low, high) in leaves.intervals.items()}
        solution = solve_margins(dense.encoded, centre.numpy(), label, region.lower[0].numpy(),
                                 region.upper[0].numpy(), float(region.radius[0]), region.norm, intervals,
                                 leaves.upper[row].numpy(), MilpLimits(time_limit=None))
        uppers.append(torch.from_numpy(solution.upper))
        if solution.point is not None and solution.best > max(best, floor):
            best, point = solution.best, torch.from_numpy(solution.point)
        unsolved.append(not solution.solved[torch.arange(len(solution.upper)) != label].any())
    upper = torch.stack(uppers)
    failed = torch.tensor(unsolved, dtype=torch.bool)
    if failed.any():  # no LP answer (e.g. an empty leaf): longer beta steps, sound at every step
        count = int(failed.sum())
        rows = torch.eye(len(upper[0]), dtype=upper.dtype) - torch.eye(len(upper[0]), dtype=upper.dtype)[label]
        longer, _, _ = split_bound(dense, _repeat(region, count), leaves.take(failed).intervals,
                                   leaves.take(failed).signs, rows.expand(count, -1, -1), steps=LONG_STEPS,
                                   learning_rate=1.0)
        longer[:, label] = -math.inf
        upper[failed] = torch.minimum(upper[failed], longer)
    if point is not None:  # the solver's point, put exactly in the set and evaluated
        move = project_displacement(point - centre, region.lower[0], region.upper[0], float(region.radius[0]),
                                    region.norm)
        point = centre + move
        with torch.no_grad():
            logits = dense_forward(dense, point)
        best = float((logits - logits[label]).index_fill(0, torch.tensor([label]), -math.inf).max())
    return upper, best, point


def _loosened(low: torch.Tensor, high: torch.Tensor, pre_activation: bool):
    """The interval widened by `LP_SLACK` (relative + absolute) as numpy arrays: measured, HiGHS called
    a feasible program with many 1e-12-wide variable bounds infeasible; a wider box is still sound.
    A pre-activation keeps its sign (the unit stays stable, no binary)."""
    pad = LP_SLACK * (1.0 + torch.maximum(low.abs(), high.abs()))
    wide_low, wide_high = low - pad, high + pad
    if pre_activation:
        wide_low = torch.where(low >= 0, wide_low.clamp_min(0.0), wide_low)
        wide_high = torch.where(high <= 0, wide_high.clamp_max(0.0), wide_high)
    return wide_low.numpy(), wide_high.numpy()


def _intercept(low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """`-l h / (h - l)` on unstable units (the ReLU chord's intercept), 0 elsewhere."""
    unstable = (low < 0) & (high > 0)
    return torch.where(unstable, -low * high / torch.where(unstable, high - low, torch.ones_like(low)),
                       torch.zeros_like(low))


def _branch(network: BoundNetwork, dense: DenseNetwork | None, region: InputSet, rows: torch.Tensor,
            units: list[tuple[str, str]], parents: _Leaves, label: int, deadline: Deadline):
    """Both children of every parent on its best-scored unit, re-bounded in one batched pass."""
    batch = parents.size
    pick = parents.scores.argmax(1)
    widths = [parents.signs[pre].shape[1] for _, pre in units]
    starts = torch.cumsum(torch.tensor([0] + widths), 0)
    prior = {k: (torch.cat([low, low]), torch.cat([high, high])) for k, (low, high) in parents.intervals.items()}
    signs = {k: torch.cat([v, v]) for k, v in parents.signs.items()}
    samples = torch.arange(batch)
    for position, (_, pre) in enumerate(units):
        mine = (pick >= starts[position]) & (pick < starts[position + 1])
        if not mine.any():
            continue
        unit = pick[mine] - starts[position]
        low, high = (bound.flatten(1).clone() for bound in prior[pre])
        high[samples[mine], unit] = 0.0  # first child: h_u <= 0
        low[samples[mine] + batch, unit] = 0.0  # second child: h_u >= 0
        prior[pre] = (low.reshape(prior[pre][0].shape), high.reshape(prior[pre][1].shape))
        signs[pre] = signs[pre].clone()
        signs[pre][samples[mine], unit] = -1
        signs[pre][samples[mine] + batch, unit] = 1
    doubled = _repeat(region, 2 * batch)
    state = propagate(network, doubled, deadline=deadline, prior=Bounds(prior, {}))
    plain = upper_bound(network, state, doubled, network.output, rows.expand(2 * batch, -1, -1).clone(), deadline)
    plain = torch.minimum(plain, torch.cat([parents.upper, parents.upper]))  # a child is a subset of its parent
    empty = torch.zeros(2 * batch, dtype=torch.bool)
    for low, high in state.intervals.values():
        empty |= (low > high).flatten(1).any(1)
    children, floor = _bound(network, dense, region, rows, units, state.intervals, signs, plain, label)
    # No point of the set has an empty leaf's signs: it bounds nothing.
    return replace(children, upper=children.upper.masked_fill(empty[:, None], -math.inf)), floor


def _repeat(region: InputSet, count: int) -> InputSet:
    """The one-sample set `region` repeated `count` times (a batch of leaves)."""
    return InputSet(center=region.center.repeat(count, *[1] * (region.center.dim() - 1)),
                    radius=region.radius.repeat(count), norm=region.norm,
                    lower=region.lower.repeat(count, 1), upper=region.upper.repeat(count, 1))
