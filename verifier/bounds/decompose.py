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
from fractions import Fraction

import numpy as np
import torch
from onnx import helper

from verifier.bounds import bilinear, ops
from verifier.bounds.elementary import function
from verifier.bounds.variance import MeanSquare
from verifier.convert.normalize import VERIFIER_DOMAIN

_DOMAINS = ("", "ai.onnx", VERIFIER_DOMAIN)
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


def _producer(graph, tensor: str, *ops_: str):
    """The node of one of `ops_` that writes `tensor`, else None (standard ops, or ours for the same
    op: the normalised model's Reshape, verifier.convert.normalize)."""
    node = graph.nodes.get(graph.producer.get(tensor, ""))
    return node if node is not None and node.op_type in ops_ and node.domain in _DOMAINS else None


def _reduced_axes(c, node, keepdims_only: bool) -> tuple[int, ...] | None:
    """The axes (negative, sorted) a ReduceMean/ReduceSum reduces, when they are the last ones and not
    the batch axis (and, with `keepdims_only`, it keeps them); else None."""
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    axes = attributes.get("axes")
    if axes is None and len(node.input) > 1 and node.input[1]:
        axes = c.builder.graph.constant(node.input[1])
    if axes is None or (keepdims_only and not attributes.get("keepdims", 1)):
        return None  # (noop_with_empty_axes only matters for empty axes, refused below: 0 reduced)
    rank = len(c.builder._shape(node.input[0]))
    if rank == 0:
        return None
    chosen = tuple(sorted({int(a) % rank - rank for a in np.atleast_1d(axes)}))
    return chosen if 0 < len(chosen) < rank and chosen == tuple(range(-len(chosen), 0)) else None


def written_layer_norm(c) -> tuple[int, float] | None:
    """`(dims, eps)` when this `Div(a, b)` is a LayerNorm written out (torch's legacy export below
    opset 17, tf2onnx): `a = x - ReduceMean(x)` and `b = Sqrt(ReduceMean(a²) + eps)`, both means over
    the same last `dims` axes (keepdims), `eps > 0` a constant; else None."""
    graph, centred = c.builder.graph, c.node.input[0]
    root = _producer(graph, c.node.input[1], "Sqrt")
    eps, variance = _shifted(graph, root.input[0]) if root else (None, None)
    variance = variance and _producer(graph, variance, "ReduceMean")
    subtract = _producer(graph, centred, "Sub")
    if not (variance and subtract) or not _is_square_of(graph, variance.input[0], centred):
        return None
    average = _producer(graph, subtract.input[1], "ReduceMean")
    if average is None or average.input[0] != subtract.input[0]:
        return None
    axes = _reduced_axes(c, variance, True)
    if axes is None or axes != _reduced_axes(c, average, True):
        return None
    return len(axes), eps


def _shifted(graph, tensor: str) -> tuple[float | None, str | None]:
    """`(eps, v)` when `tensor = v + eps` with `eps > 0` a scalar constant; else (None, None)."""
    shifted = _producer(graph, tensor, "Add")
    if shifted is None:
        return None, None
    constants = [graph.constant(t) is not None for t in shifted.input]
    if sum(constants) != 1:
        return None, None
    eps = graph.scalar(shifted.input[constants.index(True)])
    return (eps, shifted.input[constants.index(False)]) if eps is not None and eps > 0 else (None, None)


def _square_base(graph, tensor: str) -> str | None:
    """`b` when `tensor = b²`, as `Pow(b, 2)` or `Mul(b, b)`; else None."""
    square = _producer(graph, tensor, "Pow", "Mul")
    if square is None:
        return None
    if square.op_type == "Pow":
        return square.input[0] if graph.scalar(square.input[1]) == 2.0 else None
    return square.input[0] if square.input[0] == square.input[1] else None


def _is_square_of(graph, tensor: str, base: str) -> bool:
    """Whether `tensor = base²`."""
    return _square_base(graph, tensor) == base


_BROADCASTS = ("Reshape", "Expand", "Unsqueeze", "Identity")


def _unbroadcast(graph, tensor: str) -> str:
    """`tensor` before the reshapes and expansions that write it."""
    node = _producer(graph, tensor, *_BROADCASTS)
    while node is not None:
        tensor = node.input[0]
        node = _producer(graph, tensor, *_BROADCASTS)
    return tensor


def _mean_of(c, tensor: str) -> tuple[str, tuple[int, ...]] | None:
    """`(x, axes)` when `tensor` is the mean of x over its last axes: `ReduceMean(x)`, or `ReduceSum(x)`
    times `1/n` or divided by `n`, n the reduced entries' count, exactly (a rounded `1/n`, e.g. float32's
    1/3, leaves `x - m` off centre by `ε·mean(x)`, unbounded on R^d); else None."""
    graph = c.builder.graph
    node = _producer(graph, tensor, "ReduceMean")
    if node is not None:
        axes = _reduced_axes(c, node, False)
        return None if axes is None else (node.input[0], axes)
    scaled = _producer(graph, tensor, "Mul", "Div")
    if scaled is None or (scaled.op_type == "Div" and graph.constant(scaled.input[1]) is None):
        return None
    constants = [graph.scalar(t) for t in scaled.input]
    if sum(v is not None for v in constants) != 1:
        return None
    factor = next(v for v in constants if v is not None)
    total = _producer(graph, scaled.input[constants.index(None)], "ReduceSum")
    axes = total and _reduced_axes(c, total, False)
    if axes is None:
        return None
    dims = c.builder._shape(total.input[0])[axes[0]:]  # axes are negative: the reduced trailing dims
    if not all(d.HasField("dim_value") for d in dims):
        return None
    count = math.prod(d.dim_value for d in dims)
    exact = Fraction(factor) * count == 1 if scaled.op_type == "Mul" else factor == count
    return (total.input[0], axes) if exact else None


def flax_layer_norm(c) -> tuple[int, str, int, float, str | None] | None:
    """`(centred, x, dims, eps, scale)` when this `Mul` is a LayerNorm as jax2tf writes flax's:
    `(x - m) · rsqrt(var + eps) [· scale]`, with `m` the mean of x over its last `dims` axes, `var`
    either `mean(x²) - m²` (flax's fast variance, possibly floored at a constant `≤ 0` by Max, exact on
    the reals) or `mean((x - m)²)`, `rsqrt` as `Reciprocal(Sqrt)` or `Pow(·, -0.5)`, reshapes and
    expansions anywhere between; `centred` is the variable position of `x - m`, `scale`
    the constant factor's tensor. Else None."""
    graph = c.builder.graph
    for position in (0, 1):
        subtract = _producer(graph, c.node.input[position], "Sub")
        mean = subtract and _unbroadcast(graph, subtract.input[1])
        averaged = mean and _mean_of(c, mean)
        if averaged is None or averaged[0] != subtract.input[0]:
            continue
        x, axes = averaged
        factor, scale = c.node.input[1 - position], None
        scaled = _producer(graph, factor, "Mul")
        if scaled is not None:
            constants = [graph.constant(t) is not None for t in scaled.input]
            if sum(constants) == 1:
                scale, factor = scaled.input[constants.index(True)], scaled.input[constants.index(False)]
        root = _producer(graph, factor, "Reciprocal")
        root = root and _producer(graph, root.input[0], "Sqrt")
        power = _producer(graph, factor, "Pow")
        if power is not None and graph.scalar(power.input[1]) == -0.5:
            shifted = power.input[0]
        elif root is not None:
            shifted = root.input[0]
        else:
            continue
        eps, variance = _shifted(graph, _unbroadcast(graph, shifted))
        if variance is not None and _variance_of(c, _unbroadcast(graph, variance), x, mean, axes):
            return position, x, len(axes), eps, scale
    return None


def flax_layer_norm_parts(c) -> list[Part] | None:
    """The LayerNorm parts (eq. 3.8d) of a `flax_layer_norm` Mul, from its centred input on, when the
    model's own values on a random probe agree with them (the reshapes between the means and their
    readers are not checked otherwise); else None."""
    try:
        found = flax_layer_norm(c)
    except KeyError:  # a tensor of the pattern has no known shape
        return None
    if found is None:
        return None
    position, x, dims, eps, scale = found
    factor = None if scale is None else c.builder.constant(scale)
    if not _probe_agrees(c, x, dims, eps, factor):
        return None
    parts = normalised(dims, eps, position, "" if factor is None else "normalised")
    if factor is not None:
        parts.append(Part("", "Affine", ("normalised",), ops.scale(factor)))
    return parts


def _probe_agrees(c, x: str, dims: int, eps: float, factor: torch.Tensor | None) -> bool:
    """Whether the Mul's value on the builder's probe is x's LayerNorm over its last `dims` axes."""
    source, reached = c.builder.probe_value(x), c.builder.probe_value(c.node.output[0])
    if source is None or reached is None:
        return False
    axes = tuple(range(-dims, 0))
    centred = source.double() - source.double().mean(axes, keepdim=True)
    variance = centred.square().mean(axes, keepdim=True)
    if not bool((variance > 100 * eps).all()):  # x nearly constant on the probe: both sides ~0, no evidence
        return False
    expected = centred / torch.sqrt(variance + eps)
    if factor is not None:
        expected = expected * factor.double().cpu()
    return expected.shape == reached.shape and torch.allclose(reached.double(), expected, rtol=1e-3, atol=1e-4)


def _variance_of(c, tensor: str, x: str, mean: str, axes: tuple[int, ...]) -> bool:
    """Whether `tensor` is the variance of x over `axes` about `mean`: `mean(x²) - mean²` (possibly
    `Max(a, ·)` with a constant `a ≤ 0`) or `mean((x - mean)²)`."""
    graph = c.builder.graph
    floored = _producer(graph, tensor, "Max")
    if floored is not None and len(floored.input) == 2:
        floors = [graph.scalar(t) for t in floored.input]
        if sum(v is not None for v in floors) != 1 or not next(v for v in floors if v is not None) <= 0:  # NaN too
            return False
        tensor = _unbroadcast(graph, floored.input[floors.index(None)])
    difference = _producer(graph, tensor, "Sub")
    if difference is not None:
        moment, base = _mean_of(c, difference.input[0]), _square_base(graph, difference.input[1])
        return (moment is not None and moment[1] == axes and _is_square_of(graph, moment[0], x)
                and base is not None and _unbroadcast(graph, base) == mean)
    spread = _mean_of(c, tensor)
    if spread is None or spread[1] != axes:
        return False
    base = _square_base(graph, spread[0])
    deviation = base and _producer(graph, base, "Sub")
    return bool(deviation and deviation.input[0] == x and _unbroadcast(graph, deviation.input[1]) == mean)


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
