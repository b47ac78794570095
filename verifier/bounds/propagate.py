"""Interval and linear (CROWN-style) bound propagation over a `BoundNetwork` (bounds-design §2–§4).

`InputSet` is `B_r(x0, s) ∩ box` per sample. `propagate` runs the interval pass forward; at the
input of every nonlinear node it first tightens the interval by back-substituting the node's
units as objectives (`tighten=True`), so each activation is relaxed on the tightest interval
known. `upper_bound` back-substitutes any objective `C · v` to the input and maximises it
exactly over the set (`verifier.geometry.max_linear`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from verifier.bounds import bilinear, elementary, ops, relaxations, variance
from verifier.bounds.adjoints import UnitRows, affine_adjoint, inner, relaxation_adjoint, units_passed
from verifier.bounds.network import Activation, BoundNetwork, BoundNode
from verifier.bounds.pool import PoolRelaxation, pool_adjoint, pool_relaxation, taps_read
from verifier.cells import displacement_box
from verifier.deadline import NEVER, Deadline
from verifier.geometry import max_linear

_RELAXED = frozenset({"relu", "leaky_relu", "prelu", "abs", "clip", "gelu", "silu", "sigmoid", "tanh",
                      "softplus", "hard_swish"}) | elementary.KINDS
UNIT_CHUNK = 512
# Back-substitution holds (samples x objectives x the widest tensor of the pass, as counted by
# `BoundNetwork.widest_backward`) coefficients at once: a unit chunk is sized to keep that under
# this many elements (64 MB in float64), which also bounds the work between two deadline checks.
ELEMENT_BUDGET = 2**23
# Objective rows (margins, slopes: independent) go backwards as many at a time as keep samples x
# rows x the widest tensor of the pass under this many values per copy (128 MB in float64).
ROW_ELEMENTS = 2**24


def rows_at_once(network: BoundNetwork, intervals: dict, samples: int) -> int:
    """How many objective rows one backward pass over `network` takes at once (at least one)."""
    sizes = {name: low[0].numel() for name, (low, _) in intervals.items()}
    widest = network.widest_backward(sizes) if sizes else 1
    return max(1, ROW_ELEMENTS // max(1, samples * widest))


@dataclass(frozen=True)
class InputSet:
    """`{x0 + d : lower <= d <= upper, ||d||_norm <= radius}` per sample (d flattened)."""

    center: torch.Tensor  # (N, *input shape)
    radius: torch.Tensor  # (N,)
    norm: str
    lower: torch.Tensor  # (N, d): box - x0, -inf without a box
    upper: torch.Tensor  # (N, d)

    def interval(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The interval hull of the set (the same for every norm)."""
        flat = self.center.flatten(1)
        reach = self.radius.unsqueeze(1)
        low = flat + torch.maximum(self.lower, -reach)
        high = flat + torch.minimum(self.upper, reach)
        return low.reshape(self.center.shape), high.reshape(self.center.shape)

    def maximise(self, coefficients: torch.Tensor) -> torch.Tensor:
        """Exact `max over the set of <coefficients_k, x>` for coefficients (N, K, *input shape)."""
        flat = coefficients.flatten(2)
        at_center = torch.einsum("nkd,nd->nk", flat, self.center.flatten(1))
        gain = max_linear(flat, self.lower[:, None], self.upper[:, None], self.radius[:, None], self.norm)
        return at_center + gain


@dataclass(frozen=True)
class Bounds:
    """Interval bounds of every node and the relaxations used at every activation."""

    intervals: dict[str, tuple[torch.Tensor, torch.Tensor]]
    relaxed: dict[str, relaxations.Relaxation | PoolRelaxation | bilinear.Planes]


def propagate(network: BoundNetwork, region: InputSet, tighten: bool = True, deadline: Deadline = NEVER,
              prior: Bounds | None = None, margins_only: bool = False) -> Bounds:
    """Interval bounds of every node, tightened by back-substitution at nonlinear inputs.

    `prior`: bounds already propagated over a superset of `region` for the same samples (a larger
    radius, the whole box); they hold here too, so every interval starts from their intersection and
    units they already settle are not back-substituted again. `deadline` is checked before every node
    and inside every back-substitution (`Stopped`). `margins_only`: the state feeds nothing but the
    default margin and slope bounds (no MILP, branch and bound or slope search reads its intervals),
    so units only those would read keep their interval bounds (`pool.taps_read`).
    """
    intervals = {network.input: region.interval()}
    relaxed: dict[str, relaxations.Relaxation] = {}
    state = Bounds(intervals, relaxed)
    # Outputs of nonlinear nodes are already bounded from tightened inputs: only affine outputs
    # feeding a nonlinear node are worth a back-substitution.
    tightened = {network.input} | {n.name for n in network.nodes if not isinstance(n.rule, ops.Affine)}
    consumers = _nonlinear_consumers(network)
    for node in network.nodes:
        deadline.check("bound propagation")
        if not isinstance(node.rule, ops.Affine) and tighten:
            for name in node.inputs:
                if name not in tightened:
                    needed = _units_worth_tightening(network, region, name, consumers, intervals[name],
                                                     margins_only)
                    upper_first = margins_only and _dead_settles(network, name)
                    intervals[name] = _intersect(intervals[name], _linear_interval(
                        network, state, region, name, needed, deadline, upper_first=upper_first))
                    intervals[name] = _with_variance_floor(network, state, region, name, deadline)
                    tightened.add(name)
        interval = _interval(node, [intervals[i] for i in node.inputs])
        intervals[node.name] = interval if node.op in _DATA_MOVEMENT else widen(*interval)
        if prior is not None and node.name in prior.intervals:
            intervals[node.name] = _intersect(intervals[node.name], prior.intervals[node.name])
        if isinstance(node.rule, Activation) and node.rule.kind in _RELAXED:
            low, high = intervals[node.inputs[0]]
            relaxed[node.name] = relaxations.linear_relaxation(node.rule.kind, low, high, node.rule.params,
                                                               node.rule.slope)
        elif isinstance(node.rule, Activation) and node.rule.kind == "max_pool":
            relaxed[node.name] = pool_relaxation(node.rule.params, node.onnx_node, *intervals[node.inputs[0]])
        elif isinstance(node.rule, bilinear.Product):
            relaxed[node.name] = bilinear.relax(node.rule, *(intervals[i] for i in node.inputs), intervals[node.name])
    return state


def _with_variance_floor(network: BoundNetwork, state: Bounds, region: InputSet, name: str, deadline: Deadline):
    """A LayerNorm variance's interval raised to its Cauchy–Schwarz floor (method eq. 3.8f); others as they are."""
    low, high = state.intervals[name]
    node = next(n for n in network.nodes if n.name == name)
    if not isinstance(node.rule, variance.MeanSquare):
        return low, high
    centred = next(n for n in network.nodes if n.name == node.inputs[0]).inputs[0]
    with torch.no_grad():
        clean = network.values(region.center)[centred]
    floor = variance.variance_floor(node.rule, centred, clean, lambda target, rows: upper_bound(
        network, state, region, target, rows, deadline), ELEMENT_BUDGET)
    floor = floor.to(low.dtype)
    if low.dtype != torch.float64:  # rounding to nearest may have gone up
        floor = torch.nextafter(floor, torch.full_like(floor, -math.inf))
    return torch.fmax(low, floor), high


def _intersect(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]):
    # fmax/fmin ignore a NaN side (an undefined bound, e.g. inf - inf on an unbounded set).
    return torch.fmax(a[0], b[0]), torch.fmin(a[1], b[1])


_ROUNDING = 1e-12  # relative outward pad: float64 sums of a few thousand terms stay inside it


# Ops whose outputs are copies of input values (or constants): no rounding to widen for, so held
# integers packed behind the perturbed input (verifier.perturb) reach a Cast as exact points.
_DATA_MOVEMENT = frozenset("""Reshape Flatten Transpose Squeeze Unsqueeze Identity Dropout Slice Gather Concat
    Split Pad Expand Tile""".split())


def widen(low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Round an interval outward so floating-point error never cuts off the true value.

    An undefined end (NaN, e.g. `inf - inf` on an unbounded set) becomes the trivial bound.
    """
    low = torch.nan_to_num(low, nan=-math.inf, posinf=math.inf, neginf=-math.inf)
    high = torch.nan_to_num(high, nan=math.inf, posinf=math.inf, neginf=-math.inf)
    return low - _ROUNDING * (1.0 + low.abs()), high + _ROUNDING * (1.0 + high.abs())


def _interval(node: BoundNode, inputs: list[tuple[torch.Tensor, torch.Tensor]]):
    rule = node.rule
    if isinstance(rule, ops.Affine):
        return rule.interval(inputs)
    if isinstance(rule, ops.Interval):
        return rule.rule(inputs)
    low, high = inputs[0]
    if rule.kind in ("max_pool", "softmax"):
        if rule.kind == "softmax":
            return ops.softmax(int(rule.params.get("axis", -1)), bool(rule.params.get("coerce_2d", False))).rule(inputs)
        return rule.forward(low), rule.forward(high)
    return relaxations.interval(rule.kind, low, high, rule.params, rule.slope)


def _nonlinear_consumers(network: BoundNetwork) -> dict[str, list[BoundNode]]:
    """The non-affine nodes reading each node's output."""
    consumers: dict[str, list[BoundNode]] = {n.name: [] for n in network.nodes}
    for node in network.nodes:
        if not isinstance(node.rule, ops.Affine):
            for name in node.inputs:
                consumers.setdefault(name, []).append(node)
    return consumers


def _units_worth_tightening(network: BoundNetwork, region: InputSet, name: str,
                            consumers: dict[str, list[BoundNode]], interval: tuple[torch.Tensor, torch.Tensor],
                            margins_only: bool = False) -> torch.Tensor | None:
    """Mask (N, *shape) of the units whose back-substituted interval can change a relaxation (None: all).

    A unit whose interval already lies in one linear piece of every activation reading it (a stable
    ReLU) is relaxed exactly whatever its interval. When that activation's output interval is also
    read by a non-affine node (a MaxPool's relaxation depends on it), only a dead ReLU unit (output 0
    on any sub-interval) is settled; for `margins_only`, also the taps a lone MaxPool reader does not
    read (`pool.taps_read`). A single affine map of the input on a box (the l_inf ball, or
    the whole box) has an exact interval already: nothing to tighten.
    """
    node = next(n for n in network.nodes if n.name == name)
    if isinstance(node.rule, ops.Affine) and node.inputs == (network.input,) and (
            region.norm == "inf" or bool(torch.isinf(region.radius).all())):
        return torch.zeros_like(interval[0], dtype=torch.bool)
    needed = None
    for consumer in consumers[name]:
        rule = consumer.rule
        if not (isinstance(rule, Activation) and rule.kind in _RELAXED):
            return None
        if consumers.get(consumer.name):  # its output interval matters too
            if rule.kind != "relu":
                return None
            unsettled = interval[1] > 0
            pool = _lone_pool_reader(network, consumer.name, consumers) if margins_only else None
            if pool is not None:
                read = taps_read(pool.rule.params, pool.onnx_node, interval[0].clamp_min(0), interval[1].clamp_min(0),
                                 not _only_affine_after(network, pool.name))
                unsettled = unsettled & read
        else:
            unsettled = ~relaxations.settled(rule.kind, *interval, rule.params)
        needed = unsettled if needed is None else needed | unsettled
    return needed


def _dead_settles(network: BoundNetwork, name: str) -> bool:
    """Every reader of node `name` is a ReLU (and it is not the output): a unit whose upper bound is at
    most 0 then needs no lower bound. Its ReLU's lines are 0 and its output interval [0, 0] whatever
    the lower bound, and nothing else reads the node's interval (with `margins_only`)."""
    readers = [n for n in network.nodes if name in n.inputs]
    return name != network.output and bool(readers) and all(
        isinstance(n.rule, Activation) and n.rule.kind == "relu" for n in readers)


def _lone_pool_reader(network: BoundNetwork, name: str, consumers: dict[str, list[BoundNode]]) -> BoundNode | None:
    """The MaxPool that is the only reader of node `name`'s output (None when there is another reader)."""
    readers = [n for n in network.nodes if name in n.inputs]
    if len(readers) != 1 or readers != consumers.get(name):
        return None
    reader = readers[0]
    return reader if isinstance(reader.rule, Activation) and reader.rule.kind == "max_pool" else None


def _only_affine_after(network: BoundNetwork, name: str) -> bool:
    """Every node downstream of `name` is affine: its interval feeds only interval arithmetic of affine
    nodes, which no relaxation and no back-substitution reads."""
    downstream, found = {name}, False
    for node in network.nodes:
        if downstream.intersection(node.inputs):
            downstream.add(node.name)
            found = found or not isinstance(node.rule, ops.Affine)
    return not found


def _linear_interval(network: BoundNetwork, state: Bounds, region: InputSet, name: str,
                     needed: torch.Tensor | None, deadline: Deadline, upper_first: bool = False):
    """Bounds of the `needed` units of node `name` (all when None) by back-substitution, chunked.

    Units are chosen per sample (padded to the sample with the most); the others keep the interval.
    `upper_first`: every reader of the node is a ReLU whose lower bound nothing else reads (see
    `_dead_settles`), so the upper bounds go first and the lower bound is computed only for units
    still above 0 (a unit at or below 0 is dead: its ReLU is the zero line and outputs [0, 0]
    whatever its lower bound).
    """
    low, high = state.intervals[name]
    count, units = low.shape[0], low[0].numel()
    flat_needed = torch.ones(count, units, dtype=torch.bool, device=low.device) if needed is None \
        else needed.reshape(count, units)
    new_low, new_high = low.reshape(count, units).clone(), high.reshape(count, units).clone()
    bound = _chunked_bounds(network, state, region, name, deadline)
    if not upper_first:
        bound(flat_needed, ((new_high, 1.0), (new_low, -1.0)))
    else:
        bound(flat_needed, ((new_high, 1.0),))
        bound(flat_needed & (torch.fmin(new_high, high.reshape(count, units)) > 0), ((new_low, -1.0),))
    return new_low.reshape(low.shape), new_high.reshape(high.shape)


def _chunked_bounds(network: BoundNetwork, state: Bounds, region: InputSet, name: str, deadline: Deadline):
    """`bound(mask, sides)`: back-substitute the masked units of node `name` in chunks; each side
    `(target (N, units), sign)` gets the units' upper bound (sign 1) or lower bound (sign -1)."""
    low = state.intervals[name][0]
    count, units = low.shape[0], low[0].numel()
    widest = network.widest_backward({node: bounds[0][0].numel() for node, bounds in state.intervals.items()})
    rows_per_pass = 2 * max(1, min(UNIT_CHUNK, ELEMENT_BUDGET // (2 * count * widest)))

    def bound(mask: torch.Tensor, sides: tuple[tuple[torch.Tensor, float], ...]) -> None:
        width = int(mask.sum(1).max()) if units else 0
        # Masked units first in each sample's row; a sample with fewer repeats some (still sound) bounds.
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)[:, :width]
        chunk = rows_per_pass // len(sides)
        for start in range(0, width, chunk):
            index = order[:, start:start + chunk]  # (N, m)
            m = index.shape[1]
            rows = torch.zeros(count, len(sides) * m, units, dtype=low.dtype, device=low.device)
            for side, (_, sign) in enumerate(sides):  # +e_i for the upper bound, -e_i for the lower bound
                rows[:, side * m:(side + 1) * m].scatter_(2, index.unsqueeze(-1), sign)
            signs = torch.tensor([sign for _, sign in sides], dtype=low.dtype, device=low.device).repeat_interleave(m)
            values = upper_bound(network, state, region, name, rows.reshape(count, len(sides) * m, *low.shape[1:]),
                                 deadline, UnitRows(index.repeat(1, len(sides)), signs))
            for side, (target, sign) in enumerate(sides):
                target.scatter_(1, index, sign * values[:, side * m:(side + 1) * m])

    return bound


def upper_bound(network: BoundNetwork, state: Bounds, region: InputSet, target: str,
                coefficients: torch.Tensor, deadline: Deadline = NEVER, units: UnitRows | None = None) -> torch.Tensor:
    """Sound upper bounds (N, K) of `<coefficients_k, v_target>` over the input set (`deadline`: per node).

    `units`: the coefficients are those signed unit rows (`adjoints.UnitRows`), which lets the first
    affine nodes place their transposes instead of computing them.
    """
    count, objectives = coefficients.shape[:2]
    pending: dict[str, torch.Tensor] = {target: coefficients}
    unit_rows = {} if units is None else {target: units}  # pending entries that are still those unit rows
    bias = torch.zeros(count, objectives, dtype=coefficients.dtype, device=coefficients.device)
    position = next(i for i, n in enumerate(network.nodes) if n.name == target) if target != network.input else -1
    cut = torch.full_like(bias, math.inf)  # the best bound stopping at a product or elementary node (§3.8)
    spheres = None  # LayerNorm products by name: their group dims (eq. 3.8i)
    for node in reversed(network.nodes[: position + 1]):
        lam = pending.pop(node.name, None)
        if lam is None:
            continue
        as_units = unit_rows.pop(node.name, None)
        passed = [None] * len(node.inputs)
        deadline.check("back-substitution")
        rule = node.rule
        if isinstance(rule, bilinear.Product) or getattr(rule, "kind", None) in elementary.KINDS:
            if spheres is None:
                spheres = {n.name: n.rule.sphere_dims for n in network.nodes
                           if isinstance(n.rule, bilinear.Product) and n.rule.sphere_dims}
            cut = torch.fmin(cut, _concretised(state, {node.name: lam, **pending}, bias, spheres))
        if isinstance(rule, ops.Affine):
            shapes = [state.intervals[i][0].shape[1:] for i in node.inputs]
            contributions, offset = affine_adjoint(rule, lam, shapes, as_units)
            passed = units_passed(rule, as_units, shapes, lam.shape[2:])
            bias = bias + offset
        elif isinstance(rule, Activation) and isinstance(state.relaxed.get(node.name), PoolRelaxation):
            contribution, offset = pool_adjoint(state.relaxed[node.name], lam)
            contributions = [contribution]
            bias = bias + offset
        elif isinstance(rule, bilinear.Product):
            contributions, offset = bilinear.adjoint(rule, state.relaxed[node.name], lam)
            bias = bias + offset
        elif isinstance(rule, Activation) and node.name in state.relaxed:
            contribution, offset = relaxation_adjoint(state.relaxed[node.name], lam)
            contributions = [contribution]
            bias = bias + offset
        else:
            low, high = state.intervals[node.name]
            bias = bias + inner(lam.clamp_min(0), high.unsqueeze(1)) + inner(lam.clamp_max(0), low.unsqueeze(1))
            contributions = []
        for name, contribution, rows in zip(node.inputs, contributions, passed):
            if name in pending:
                pending[name] = pending[name] + contribution
                unit_rows.pop(name, None)
            else:
                pending[name] = contribution
                if rows is not None:
                    unit_rows[name] = rows
    lam = pending.pop(network.input, None)
    value = bias if lam is None else bias + region.maximise(lam)
    value = torch.nan_to_num(value, nan=math.inf, posinf=math.inf, neginf=-math.inf)  # undefined: no bound
    value = torch.fmin(value, cut)
    return value + _ROUNDING * (1.0 + value.abs())


def _concretised(state: Bounds, pending: dict[str, torch.Tensor], bias: torch.Tensor,
                 spheres: dict[str, int]) -> torch.Tensor:
    """`bias + Σ <lam, v>` with every pending node's v bounded by its interval, a LayerNorm product's
    groups by the smaller of their intervals and the sphere (eq. 3.8i): a sound upper bound wherever
    back-substitution stops (it keeps a loose relaxation from costing more than an interval)."""
    total = bias
    for name, lam in pending.items():
        low, high = state.intervals[name]
        if name in spheres:
            everywhere = torch.ones_like(lam, dtype=torch.bool)
            total = total + bilinear.sphere_bound(lam, everywhere, high.unsqueeze(1), low.unsqueeze(1), spheres[name])
            continue
        total = total + inner(lam.clamp_min(0), high.unsqueeze(1)) + inner(lam.clamp_max(0), low.unsqueeze(1))
    return torch.nan_to_num(total, nan=math.inf)


@dataclass(frozen=True)
class PerClassResult:
    """Common part of per-class results: threat norm, radius per sample, labels."""

    norm: str
    radius: torch.Tensor  # (N,)
    labels: torch.Tensor  # (N,)

    def worst_other(self, values: torch.Tensor) -> torch.Tensor:
        """`max_{j != y} values[i, j]` (N,)."""
        mask = torch.nn.functional.one_hot(self.labels, values.shape[1]).bool()
        return values.masked_fill(mask, -math.inf).max(1).values


@dataclass(frozen=True)
class MarginProblem:
    """Everything a margin query needs: the network, the input set, labels and rows `e_j - e_y`."""

    network: BoundNetwork
    region: InputSet
    labels: torch.Tensor  # (N,)
    rows: torch.Tensor  # (N, C, C)

    @property
    def true_class(self) -> torch.Tensor:
        """Mask of the true class (N, C)."""
        return torch.nn.functional.one_hot(self.labels, self.rows.shape[1]).bool()


def margin_problem(model, x, y, radius, norm: str, box: tuple[float, float] | None, device: torch.device,
                   dtype: torch.dtype) -> MarginProblem:
    """Set up a margin query: build (or reuse) the network, the set `B_r(x_i, s_i) ∩ box`, the rows."""
    network = model if isinstance(model, BoundNetwork) else BoundNetwork.from_model(model, dtype, device)
    center = torch.as_tensor(x).to(device=device, dtype=dtype)
    labels = torch.as_tensor(y, dtype=torch.long, device=device)
    radii = torch.broadcast_to(torch.as_tensor(radius, dtype=dtype, device=device), (len(center),))
    lower, upper = displacement_box(center, box)
    region = InputSet(center=center, radius=radii, norm=norm, lower=lower, upper=upper)
    classes = network.classes or network.evaluate(center[:1]).shape[-1]
    eye = torch.eye(classes, dtype=dtype, device=device)
    return MarginProblem(network, region, labels, eye.unsqueeze(0) - eye[labels].unsqueeze(1))
