"""Softmax, LayerNormalization and Div by a variable as chains of primitive bound nodes (method §3.8).

`verifier.bounds.network` turns each `Part` list into consecutive `BoundNode`s, so that linear
bounds pass through these ops instead of stopping at an interval:

- Softmax (method eq. 3.8c): `softmax_i = 1 / Σ_j exp(x_j - x_i)`: the pairwise differences
  (affine), exp, the sum over j (affine), the reciprocal (on [1, ∞)).
- LayerNormalization (eq. 3.8d): `c = x - mean(x)` (affine), `c²`, `v = mean(c²) + eps` (affine, a
  `variance.MeanSquare`, whose lower end propagation raises by eq. 3.8f),
  `rsqrt(v)`, the product `c · rsqrt(v)` (bilinear, its interval also intersected with the direct
  LayerNorm interval rule on `c`), then `· scale + bias` (affine). A LayerNorm written out as
  `Div(x - mean(x), Sqrt(mean((x - mean(x))²) + eps))` gets the same parts from its centred input
  (`written_layer_norm`).
- `x / y` = `x · reciprocal(y)`; `a / y` (constant a) = `a · reciprocal(y)`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from onnx import helper

from verifier.bounds import bilinear, ops
from verifier.bounds.elementary import function
from verifier.bounds.variance import MeanSquare

PAIRWISE_LIMIT = 512  # a Softmax over more entries keeps its interval rule (n² differences per row)


@dataclass(frozen=True)
class Part:
    """One primitive node of a decomposed op. `inputs`: an int is the op's variable input of that
    position, a str the suffix of an earlier part; the last part (suffix "") is the op's output."""

    suffix: str
    op: str
    inputs: tuple[int | str, ...]
    rule: object  # a network Rule (ops.Affine, ops.Interval, Activation)


def unary(kind: str, params: dict) -> ops.Activation:
    """An elementary convex/concave function (verifier.bounds.elementary) as a relaxed node."""
    return ops.Activation(kind, dict(params), None, lambda u: function(kind, u, params))


def softmax(axis: int, coerce_2d: bool, shape: list[int | None],
            keep: torch.Tensor | None = None) -> list[Part] | None:
    """Parts of a Softmax over `axis` of a per-sample input of `shape` (None: keep the interval rule).

    `keep` (bool, `(1, *shape)`): the entries a constant -inf mask leaves (method eq. 3.8c'): a kept
    row's softmax runs over its kept entries only, a masked entry's output is 0 (exp(-inf) = 0); the
    masked inputs' own values are never read."""
    rank = len(shape) + 1  # with the batch axis
    start = axis % rank
    if start == 0:
        return None
    if coerce_2d:
        tail = shape[start - 1:]
        if any(d is None for d in tail):
            return None
        size = math.prod(tail)

        def to_last(u: torch.Tensor) -> torch.Tensor:
            return u.reshape(*u.shape[:start], -1)

        def from_last(v: torch.Tensor) -> torch.Tensor:
            return v.reshape(*v.shape[:-1], *tail)
    else:
        size = shape[start - 1]

        def to_last(u: torch.Tensor) -> torch.Tensor:
            return u.movedim(start, -1)

        def from_last(v: torch.Tensor) -> torch.Tensor:
            return v.movedim(-1, start)
    if size is None or size > PAIRWISE_LIMIT:
        return None

    def differences(u: torch.Tensor) -> torch.Tensor:
        last = to_last(u)
        return last.unsqueeze(-2) - last.unsqueeze(-1)  # [..., i, j] = u_j - u_i

    def spread(r: torch.Tensor) -> torch.Tensor:  # |L| r: r_i + r_j off the diagonal, 0 on it
        last = to_last(r)
        off = 1.0 - torch.eye(last.shape[-1], dtype=last.dtype, device=last.device)
        return (last.unsqueeze(-2) + last.unsqueeze(-1)) * off

    moved = start != rank - 1  # the normalised axes are not already the last one
    if keep is None:
        parts = [
            Part("differences", "Sub", (0,), ops.Affine(differences, spread)),
            Part("exp", "exp", ("differences",), unary("exp", {})),
            Part("sum", "ReduceSum", ("exp",), ops.structural(lambda e: e.sum(-1))),
            Part("reciprocal" if moved else "", "reciprocal", ("sum",), unary("reciprocal", {})),
        ]
    else:
        kept = to_last(keep)  # (1, ..., n): row i of a softmax, entries j
        pairs = kept.unsqueeze(-1) & kept.unsqueeze(-2)  # [..., i, j]: both kept; else the difference is 0
        columns = kept.unsqueeze(-2)  # [..., 1, j]: entry j of every row's sum

        def kept_differences(u: torch.Tensor) -> torch.Tensor:
            return torch.where(pairs, differences(u), 0.0)

        def kept_spread(r: torch.Tensor) -> torch.Tensor:
            return torch.where(pairs, spread(r), 0.0)

        def kept_sum(e: torch.Tensor) -> torch.Tensor:  # the dropped pairs' exp(0) = 1 left out
            return torch.where(columns, e, 0.0).sum(-1)

        def kept_rows(v: torch.Tensor) -> torch.Tensor:
            return torch.where(kept, v, 0.0)

        parts = [
            Part("differences", "Sub", (0,), ops.Affine(kept_differences, kept_spread)),
            Part("exp", "exp", ("differences",), unary("exp", {})),
            Part("sum", "ReduceSum", ("exp",), ops.structural(kept_sum)),
            Part("reciprocal", "reciprocal", ("sum",), unary("reciprocal", {})),
            Part("kept" if moved else "", "Mul", ("reciprocal",), ops.structural(kept_rows)),
        ]
    if moved:
        parts.append(Part("", "Transpose", (parts[-1].suffix,), ops.structural(from_last)))
    return parts


def layer_norm(dims: int, eps: float, scale: torch.Tensor | None, bias: torch.Tensor | None) -> list[Part]:
    """Parts of a LayerNormalization over the last `dims` axes."""
    axes = tuple(range(-dims, 0))

    def centre(u: torch.Tensor) -> torch.Tensor:
        return u - u.mean(axes, keepdim=True)

    def centre_magnitude(r: torch.Tensor) -> torch.Tensor:  # |I - 11ᵀ/n| r
        count = math.prod(r.shape[-dims:])
        return r * (1.0 - 2.0 / count) + r.sum(axes, keepdim=True) / count

    last = "" if scale is None and bias is None else "normalised"
    parts = [Part("centred", "Sub", (0,), ops.Affine(centre, centre_magnitude)), *normalised(dims, eps, "centred", last)]
    if last:
        factor = 1.0 if scale is None else scale
        parts.append(Part("", "Affine", ("normalised",), ops.scale(factor, 0.0 if bias is None else bias)))
    return parts


def normalised(dims: int, eps: float, centred: int | str = 0, last: str = "") -> list[Part]:
    """Parts of `c / sqrt(mean(c²) + eps)` over the last `dims` axes of an already centred `c` (the
    part or input position `centred`): LayerNorm's square, variance, rsqrt and product (eq. 3.8d, 3.8i)."""
    axes = tuple(range(-dims, 0))

    def mean(q: torch.Tensor) -> torch.Tensor:
        return q.mean(axes, keepdim=True)

    def hull(bounds):
        (c_lo, c_hi), _ = bounds
        return ops.normalised_bounds(c_lo, c_hi, dims, eps)

    return [
        Part("square", "square", (centred,), unary("square", {})),
        Part("variance", "ReduceMean", ("square",), MeanSquare(mean, mean, eps, dims)),
        Part("rsqrt", "rsqrt", ("variance",), unary("rsqrt", {})),
        Part(last, "Mul", (centred, "rsqrt"), bilinear.product(False, hull, sphere_dims=dims)),
    ]


def reciprocal_times(numerator: int | torch.Tensor, denominator: int) -> list[Part]:
    """Parts of `x / y` (numerator: the variable position of x) or `a / y` (numerator: constant a)."""
    parts = [Part("reciprocal", "reciprocal", (denominator,), unary("reciprocal", {}))]
    if isinstance(numerator, int):
        parts.append(Part("", "Mul", (numerator, "reciprocal"), bilinear.product(False)))
    else:
        parts.append(Part("", "Mul", ("reciprocal",), ops.scale(numerator)))
    return parts


# ---- rules of the network builder for ops with variable operands beyond the affine ones; `c` is
# its node context (variables, constants, shapes).

def same_rank(c, least: int) -> bool:
    """Both variable inputs have known ranks, equal and at least `least` + 1 (the batch axis)."""
    try:
        ranks = {len(c.builder._shape(t)) for t in c.variables}
    except KeyError:
        return False
    return len(ranks) == 1 and ranks.pop() >= least + 1


def _div(c):
    if c.variable_at(0):
        return ops.scale(1.0 / c.const(1))
    if c.variable_at(1):
        return reciprocal_times(c.const(0), 0)
    if len(c.variables) == 2 and same_rank(c, 1):
        written = written_layer_norm(c)
        return reciprocal_times(0, 1) if written is None else normalised(*written)
    return None


def written_layer_norm(c) -> tuple[int, float] | None:
    """`(dims, eps)` when this `Div(a, b)` is a LayerNorm written out (torch's legacy export below
    opset 17, tf2onnx): `a = x - ReduceMean(x)` and `b = Sqrt(ReduceMean(a²) + eps)`, both means over
    the same last `dims` axes (keepdims), `eps > 0` a constant; else None."""
    graph, centred = c.builder.graph, c.node.input[0]

    def producer(tensor: str, *ops_: str):
        node = graph.nodes.get(graph.producer.get(tensor, ""))
        return node if node is not None and node.op_type in ops_ and node.domain in ("", "ai.onnx") else None

    def mean_axes(node) -> tuple[int, ...] | None:
        attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        axes = attributes.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = graph.constant(node.input[1])
        if axes is None or not attributes.get("keepdims", 1) or attributes.get("noop_with_empty_axes", 0):
            return None
        rank = len(c.builder._shape(node.input[0]))
        chosen = tuple(sorted({int(a) % rank - rank for a in np.atleast_1d(axes)}))
        return chosen if len(chosen) < rank else None  # never over the batch axis

    root = producer(c.node.input[1], "Sqrt")
    shifted = root and producer(root.input[0], "Add")
    if not shifted:
        return None
    constants = [graph.constant(t) is not None for t in shifted.input]
    if sum(constants) != 1:
        return None
    eps = graph.scalar(shifted.input[constants.index(True)])
    variance = producer(shifted.input[constants.index(False)], "ReduceMean")
    square = variance and producer(variance.input[0], "Pow", "Mul")
    subtract = producer(centred, "Sub")
    if not (square and subtract) or eps is None or not eps > 0:
        return None
    if square.op_type == "Pow":
        squared = square.input[0] == centred and graph.scalar(square.input[1]) == 2.0
    else:
        squared = list(square.input) == [centred, centred]
    average = producer(subtract.input[1], "ReduceMean")
    if not squared or average is None or average.input[0] != subtract.input[0]:
        return None
    axes = mean_axes(variance)
    if axes is None or axes != mean_axes(average) or axes != tuple(range(-len(axes), 0)):
        return None
    return len(axes), eps


_ELEMENTARY_OPS = {"Exp": "exp", "Log": "log", "Sqrt": "sqrt", "Reciprocal": "reciprocal"}
_NAMED_POWERS = {2.0: "square", 0.5: "sqrt", -0.5: "rsqrt", -1.0: "reciprocal"}


def _elementary(c):
    return unary(_ELEMENTARY_OPS[c.node.op_type], {}) if c.single else None


def _pow(c):
    exponent = c.const(1)
    if not c.variable_at(0) or exponent is None or exponent.numel() != 1:
        return None
    value = float(exponent)
    if value in _NAMED_POWERS:
        return unary(_NAMED_POWERS[value], {})
    if value == 1.0:
        return ops.scale(1.0)
    return unary("power", {"exponent": value}) if math.isfinite(value) and value != 0.0 else None


RULES = {"Div": _div, "Pow": _pow, **{op: _elementary for op in _ELEMENTARY_OPS}}
