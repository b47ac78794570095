"""The Jacobian route (method §3.4): sound bounds on the local slope of the margins.

Gradients are propagated backwards as intervals: through an affine node the centre goes through
the adjoint of the linear part and the radius through the adjoint of `|L|`; through an
activation the gradient interval is multiplied by the activation's derivative range on its
input interval (GELU'/SiLU' are non-monotone: `relaxations.derivative_range` knows their
extremes, and so do the elementary kinds Softmax and LayerNorm are decomposed into); through MaxPool
the gradient may go to any window entry that can still win; through a product of two variables
`x * y` (or `x @ y`) the gradient reaches x times the interval of y and y times that of x. The result
`Lambda_j(s) >= sup over B(x, s) ∩ box of ||grad (z_j - z_y)||_*` bounds the margin's (and the
cross-entropy's) local Lipschitz constant. Nodes without a derivative rule (an undecomposed
Softmax, other interval-only ops) make the route inapplicable: +inf.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from verifier.bounds import bilinear, ops, relaxations
from verifier.bounds.adjoints import transpose
from verifier.bounds.network import Activation, BoundNetwork
from verifier.bounds.propagate import Bounds, MarginProblem, PerClassResult, margin_problem, propagate, rows_at_once
from verifier.cells import window_index
from verifier.convert import ConvertedModel
from verifier.deadline import NEVER, Deadline
from verifier.device import resolve_device
from verifier.geometry import dual_norm, parse_norm

Pair = tuple[torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class SlopeBounds(PerClassResult):
    """`per_class[i, j] >= sup ||grad (z_j - z_y)||_*` over the set (0 at j = y; inf if no rule)."""

    per_class: torch.Tensor  # (N, C)
    unsupported: tuple[str, ...]  # nodes that made the route inapplicable

    @property
    def loss_slope(self) -> torch.Tensor:
        """Bound on the local Lipschitz constant of the margin and of the cross-entropy (N,).

        CE's gradient in z is `p - e_y = sum_{j != y} p_j (e_j - e_y)`, a convex combination,
        so its dual norm after the Jacobian is at most the largest per-class bound.
        """
        return self.worst_other(self.per_class)


def slope_bounds(model: ConvertedModel | BoundNetwork, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray,
                 radius: torch.Tensor | float, norm: str | float = "inf", box: tuple[float, float] | None = None,
                 device: str = "auto", dtype: torch.dtype = torch.float64,
                 deadline: Deadline = NEVER) -> SlopeBounds:
    """Interval-Jacobian bounds on the margins' slopes over `B_r(x_i, s_i) ∩ box`."""
    problem = margin_problem(model, x, y, radius, parse_norm(norm), box, resolve_device(device), dtype)
    return slopes_from(problem, propagate(problem.network, problem.region, deadline=deadline), deadline)


def slopes_from(problem: MarginProblem, state: Bounds, deadline: Deadline = NEVER) -> SlopeBounds:
    """Slope bounds from an already propagated state (shared with `margins_from`; `deadline`: per node).

    The objective rows (one per class) are independent: they go backwards as many at a time as keep
    (samples x rows x the widest tensor of the pass) within `propagate.ROW_ELEMENTS`, at least one."""
    rows = problem.rows
    step = rows_at_once(problem.network, state.intervals, len(rows))
    parts, unsupported = [], ()
    for start in range(0, rows.shape[1], step):
        gradient, unsupported = _backward_intervals(problem.network, state.intervals, rows[:, start:start + step],
                                                    deadline)
        if gradient is None:
            break
        low, high = gradient
        parts.append(dual_norm(torch.maximum(low.abs(), high.abs()).flatten(2), problem.region.norm))
    if gradient is None:
        per_class = torch.full(problem.true_class.shape, math.inf, dtype=problem.rows.dtype,
                               device=problem.labels.device)
    else:
        per_class = torch.cat(parts, 1)
    return SlopeBounds(norm=problem.region.norm, radius=problem.region.radius, labels=problem.labels,
                       per_class=per_class.masked_fill(problem.true_class, 0.0), unsupported=unsupported)


def _backward_intervals(network: BoundNetwork, intervals: dict[str, Pair], rows: torch.Tensor, deadline: Deadline):
    pending: dict[str, Pair] = {network.output: (rows, rows)}
    for node in reversed(network.nodes):
        grad = pending.pop(node.name, None)
        if grad is None:
            continue
        deadline.check("slope bounds")
        rule = node.rule
        if isinstance(rule, ops.Affine):
            shapes = [intervals[i][0].shape[1:] for i in node.inputs]
            contributions = _affine_backward(rule, grad, shapes)
        elif isinstance(rule, Activation) and rule.kind == "max_pool":
            contributions = [_pool_backward(node, intervals[node.inputs[0]], grad)]
        elif isinstance(rule, bilinear.Product):
            contributions = _product_backward(rule, [intervals[i] for i in node.inputs], grad)
        elif isinstance(rule, Activation) and rule.kind != "softmax":
            low, high = intervals[node.inputs[0]]
            d_low, d_high = relaxations.derivative_range(rule.kind, low, high, rule.params, rule.slope)
            contributions = [_product(grad, (d_low.unsqueeze(1), d_high.unsqueeze(1)))]
        else:
            return None, (node.onnx_node,)
        for name, (low, high) in zip(node.inputs, contributions):
            if name in pending:
                low, high = pending[name][0] + low, pending[name][1] + high
            pending[name] = (low, high)
    return pending.get(network.input), ()


def _product(a: Pair, b: Pair) -> Pair:
    """Interval product; an exact 0 times an infinite end is 0 (every actual value is finite)."""
    pairs = [(a[0], b[0]), (a[0], b[1]), (a[1], b[0]), (a[1], b[1])]
    corners = torch.stack([torch.where((u == 0) | (v == 0), 0.0, u * v) for u, v in pairs])
    return corners.min(0).values, corners.max(0).values


def _product_backward(rule: bilinear.Product, inputs: list[Pair], grad: Pair) -> list[Pair]:
    """d(x * y) = dx * y + x * dy (and d(x @ y) = dx @ y + x @ dy), with y, x ranging over their intervals."""
    (x_lo, x_hi), (y_lo, y_hi) = ((lo.unsqueeze(1), hi.unsqueeze(1)) for lo, hi in inputs)
    count, objectives = grad[0].shape[:2]
    if rule.matmul:
        interval_matmul = ops.matrix_product().rule
        to_x = interval_matmul([grad, (y_lo.transpose(-1, -2), y_hi.transpose(-1, -2))])
        to_y = interval_matmul([(x_lo.transpose(-1, -2), x_hi.transpose(-1, -2)), grad])
    else:
        to_x, to_y = _product(grad, (y_lo, y_hi)), _product(grad, (x_lo, x_hi))
    return [tuple(torch.nan_to_num(v, nan=fill).sum_to_size(count, objectives, *shape[2:])
                  for v, fill in zip(pair, (-math.inf, math.inf)))
            for pair, shape in ((to_x, x_lo.shape), (to_y, y_lo.shape))]


def _affine_backward(rule: ops.Affine, grad: Pair, shapes: list[torch.Size]) -> list[Pair]:
    low, high = grad
    count, objectives = low.shape[:2]
    centre = torch.nan_to_num((low + high) / 2, nan=0.0).reshape(count * objectives, *low.shape[2:])  # inf - inf
    radius = ((high - low) / 2).reshape(count * objectives, *low.shape[2:])
    # The transposes of the rows, not a vjp at a batch of rows (whose forward pass, a convolution's
    # unfolded input among it, is wasted work and memory): the rule's written adjoint where it has one.
    zeros = [torch.zeros(1, *shape, dtype=low.dtype, device=low.device) for shape in shapes]
    linear = rule.adjoint(centre, shapes) if rule.adjoint is not None else None  # None: not written for these shapes
    if linear is None:
        linear = transpose(rule.linear, zeros, centre)
    results = []
    for c, r in zip(linear, transpose(rule.magnitude, zeros, radius)):
        c, r = c.reshape(count, objectives, *c.shape[1:]), r.reshape(count, objectives, *r.shape[1:])
        results.append((torch.nan_to_num(c - r, nan=-math.inf), torch.nan_to_num(c + r, nan=math.inf)))
    return results


def _pool_backward(node, bounds: Pair, grad: Pair) -> Pair:
    """MaxPool's Clarke Jacobian: each window passes its gradient to one entry that can still win."""
    low, high = bounds
    count, channels, height, width = low.shape
    objectives = grad[0].shape[1]
    index = window_index(node.rule.params, node.onnx_node, height, width, low.device)
    valid, safe = index >= 0, index.clamp_min(0)
    lows = low.reshape(count, channels, -1)[:, :, safe].masked_fill(~valid, -math.inf)
    highs = high.reshape(count, channels, -1)[:, :, safe].masked_fill(~valid, -math.inf)
    threshold = lows.max(-1, keepdim=True).values
    candidate = valid & (highs >= threshold)  # (N, C, W, T)
    decided = candidate.sum(-1, keepdim=True) == 1
    g_low = grad[0].reshape(count, objectives, channels, -1, 1)
    g_high = grad[1].reshape(count, objectives, channels, -1, 1)
    take = candidate.unsqueeze(1)
    sure = (take & decided.unsqueeze(1))
    part_low = torch.where(sure, g_low, torch.where(take, g_low.clamp_max(0), torch.zeros_like(g_low)))
    part_high = torch.where(sure, g_high, torch.where(take, g_high.clamp_min(0), torch.zeros_like(g_high)))
    target = safe.expand(count, objectives, channels, -1, -1).reshape(count, objectives, channels, -1)
    out_low = torch.zeros(count, objectives, channels, height * width, dtype=low.dtype, device=low.device)
    out_high = torch.zeros_like(out_low)
    out_low.scatter_add_(-1, target, part_low.reshape(count, objectives, channels, -1))
    out_high.scatter_add_(-1, target, part_high.reshape(count, objectives, channels, -1))
    shape = (count, objectives, channels, height, width)
    return out_low.reshape(shape), out_high.reshape(shape)
