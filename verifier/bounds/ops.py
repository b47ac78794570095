"""One rule per ONNX op family for bound propagation (bounds-design.md §2–§3).

Every node of the logits path becomes one of:
- `Affine`: `v = L(u_1, …) + offset` with `L` linear. Weighted ops (Gemm, MatMul/Mul/Div by a
  constant, Conv, BatchNormalization, Add/Sub/Neg) are written here from ONNX semantics so that
  the same code with `|weights|` gives `|L|`; structural ops (Reshape, Transpose, Slice, Concat,
  Pad, pooling averages, reductions by sums …) reuse the converted module, whose linear part is
  entrywise non-negative, so `|L| = L`.
- `Interval`: ops with no linear rule of their own give sound intervals. The products of two
  variables (`bilinear.Product`, an `Interval` with McCormick planes) and the pieces of Softmax /
  LayerNorm (`decompose.py`) reuse the rules here for their intervals; what stays interval-only
  (Erf outside GELU, a Softmax over > 512 entries, monotone unary functions) is concretised
  during back-substitution.
An op with no rule raises "unsupported for bounds: OP at NODE".
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from verifier.bounds.windows import same_pads

Linear = Callable[..., torch.Tensor]
# The transpose of a linear map applied to rows (B, *out), given the inputs' per-row shapes (None:
# not written for these shapes, take the vjp).
Adjoint = Callable[[torch.Tensor, Sequence[torch.Size]], tuple[torch.Tensor, ...] | None]
# The transpose applied to signed unit rows sign_b e_(index_b), from the flat output-unit index and
# the sign of each row (B,).
UnitAdjoint = Callable[[torch.Tensor, torch.Tensor, Sequence[torch.Size]], tuple[torch.Tensor, ...]]

STRUCTURAL_OPS = frozenset(
    """Reshape Flatten Transpose Squeeze Unsqueeze Identity Dropout Slice Gather Concat Split Pad
    AveragePool GlobalAveragePool ReduceMean ReduceSum Expand Tile Sum Mean""".split()
)
# A Conv's table of placed unit transposes (`unit_adjoint`) is kept when it has at most this many values.
UNIT_TABLE_ELEMENTS = 2**22
MONOTONE_UNARY = {"Erf": torch.erf, "Sigmoid": torch.sigmoid, "Tanh": torch.tanh, "Relu": torch.relu}


@dataclass(frozen=True)
class Affine:
    """`v = linear(u_1, …) + offset`; `magnitude(r_1, …) = |linear|(r_1, …)` for radii r >= 0.

    `adjoint` (optional): the transpose of `linear` written out (a weighted op's own kernel); without
    it back-substitution takes the vjp of `linear`. `unit_adjoint`: the transpose of unit rows `e_i`
    read off the weights; `unit_signs`: `linear` is `Σ s_i u_i` of same-shape inputs, so a unit row
    reaches input i as `s_i e_i` (`verifier.bounds.adjoints`). `workspace`: values per output value
    that the transpose's kernel holds besides its rows (a CPU convolution's unfolded matrix), for
    sizing passes (`BoundNetwork.widest_backward`).
    """

    linear: Linear
    magnitude: Linear
    offset: torch.Tensor | float = 0.0
    adjoint: Adjoint | None = field(default=None, repr=False, kw_only=True)
    unit_adjoint: UnitAdjoint | None = field(default=None, repr=False, kw_only=True)
    unit_signs: tuple[float, ...] | None = field(default=None, kw_only=True)
    workspace: float = field(default=0.0, kw_only=True)

    def __call__(self, *inputs: torch.Tensor) -> torch.Tensor:
        return self.linear(*inputs) + self.offset

    def interval(self, bounds: Sequence[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact interval image in centre-radius form: `c' = A(c)`, `r' = |L|(r)`."""
        centres = [(lo + hi) / 2 for lo, hi in bounds]
        radii = [(hi - lo) / 2 for lo, hi in bounds]
        centre, radius = self(*centres), self.magnitude(*radii)
        return centre - radius, centre + radius


@dataclass(frozen=True)
class Interval:
    """A node bounded by intervals only: `rule(bounds of variable inputs) -> (lower, upper)`."""

    rule: Callable[[Sequence[tuple[torch.Tensor, torch.Tensor]]], tuple[torch.Tensor, torch.Tensor]]
    forward: Callable[..., torch.Tensor] = field(repr=False, default=None)


@dataclass(frozen=True)
class Activation:
    """An activation site (or an elementary kind) as a bound node: kind, parameters, PReLU slope if any."""

    kind: str
    params: dict
    slope: torch.Tensor | None = None
    forward: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)


def _attr(attributes: dict, name: str, default):
    value = attributes.get(name, default)
    return value.decode() if isinstance(value, bytes) else value


def gemm(attributes: dict, weight: torch.Tensor, bias: torch.Tensor | None) -> Affine:
    """Gemm with a variable A (transA = 0) and constant B, C."""
    alpha, beta = float(_attr(attributes, "alpha", 1.0)), float(_attr(attributes, "beta", 1.0))
    matrix = alpha * (weight.T if _attr(attributes, "transB", 0) else weight)
    offset = 0.0 if bias is None else beta * bias
    return Affine(lambda u: u @ matrix, lambda r: r @ matrix.abs(), offset,
                  adjoint=lambda rows, shapes: (rows @ matrix.T,),
                  unit_adjoint=lambda index, sign, shapes: (matrix.T.index_select(0, index) * sign.unsqueeze(1),))


def matmul(constant: torch.Tensor, variable_first: bool) -> Affine:
    """MatMul with one constant operand."""
    if variable_first:
        return Affine(lambda u: torch.matmul(u, constant), lambda r: torch.matmul(r, constant.abs()))
    return Affine(lambda u: torch.matmul(constant, u), lambda r: torch.matmul(constant.abs(), r))


def scale(factor: torch.Tensor | float, offset: torch.Tensor | float = 0.0) -> Affine:
    """Elementwise `u * factor + offset` (Mul/Div by a constant, Neg, BatchNormalization)."""
    factor = torch.as_tensor(factor)
    return Affine(lambda u: u * factor, lambda r: r * factor.abs(), offset)


def shift(offset: torch.Tensor | float, sign: float = 1.0) -> Affine:
    """`sign * u + offset` (Add/Sub with a constant); a constant wider than `u` broadcasts `u` to
    its shape (the linear part then copies u, so its adjoint sums the copies back)."""
    def widened(u: torch.Tensor) -> torch.Tensor:
        return u.expand(torch.broadcast_shapes(u.shape, offset.shape)) if torch.is_tensor(offset) else u

    return Affine(lambda u: sign * widened(u), widened, offset)


def add_variables(signs: Sequence[float]) -> Affine:
    """Sum of variable inputs with signs (Add, Sub of two branches)."""
    def adjoint(rows: torch.Tensor, shapes: Sequence[torch.Size]) -> tuple[torch.Tensor, ...] | None:
        if any(len(shape) != rows.dim() - 1 for shape in shapes):
            return None  # broadcasting across ranks: the vjp sums the copies
        # a sign of 1 passes the rows themselves (back-substitution never writes into its coefficients)
        return tuple(rows.sum_to_size(len(rows), *shape) * s if s != 1 else rows.sum_to_size(len(rows), *shape)
                     for s, shape in zip(signs, shapes))

    return Affine(lambda *us: sum(s * u for s, u in zip(signs, us)), lambda *rs: sum(rs), adjoint=adjoint,
                  unit_signs=tuple(float(s) for s in signs))


def select(condition: torch.Tensor) -> Affine:
    """`Where(condition, a, b)` with a constant condition and two variable branches: each value is one
    of its inputs' (exact)."""
    keep = condition != 0
    return Affine(lambda a, b: torch.where(keep, a, b), lambda ra, rb: torch.where(keep, ra, rb))


def select_constant(condition: torch.Tensor, constant: torch.Tensor, variable_when: bool) -> Affine:
    """`Where` with a constant condition, one variable branch (taken where the condition is
    `variable_when`) and a finite constant other one: `keep·u + (1 - keep)·constant`, exact."""
    keep = (condition != 0) if variable_when else (condition == 0)
    if not bool(torch.isfinite(constant).all()):
        raise ValueError("a constant branch with an infinite value (e.g. a -inf attention mask) has no "
                         "linear bound here")
    return Affine(lambda u: torch.where(keep, u, 0.0), lambda r: torch.where(keep, r, 0.0),
                  torch.where(keep, 0.0, constant))


def batch_norm(attributes: dict, gamma, beta, mean, var) -> Affine:
    """Inference BatchNormalization over axis 1."""
    eps = float(_attr(attributes, "epsilon", 1e-5))
    factor = gamma / torch.sqrt(var + eps)
    shape = (1, -1) + (1,) * 8

    def per_channel(t: torch.Tensor, dims: int) -> torch.Tensor:
        return t.reshape(shape[: dims])

    return Affine(
        lambda u: u * per_channel(factor, u.dim()),
        lambda r: r * per_channel(factor.abs(), r.dim()),
        _LazyChannelOffset(beta - factor * mean),
    )


class _LazyChannelOffset:
    """A per-channel offset that broadcasts against axis 1 of whatever it is added to."""

    def __init__(self, values: torch.Tensor) -> None:
        self.values = values

    def __radd__(self, other: torch.Tensor) -> torch.Tensor:
        return other + self.values.reshape((1, -1) + (1,) * (other.dim() - 2))

    def reshaped(self, like: torch.Tensor) -> torch.Tensor:
        """The offset as a tensor broadcastable to `like`."""
        return self.values.reshape((1, -1) + (1,) * (like.dim() - 2))


def conv(attributes: dict, weight: torch.Tensor, bias: torch.Tensor | None) -> Affine:
    """Conv (1-3 spatial dims) with ONNX pads / auto_pad / strides / dilations / groups."""
    dims = weight.dim() - 2
    strides = list(_attr(attributes, "strides", [1] * dims))
    dilations = list(_attr(attributes, "dilations", [1] * dims))
    groups = int(_attr(attributes, "group", 1))
    auto_pad = _attr(attributes, "auto_pad", "NOTSET")
    pads = list(_attr(attributes, "pads", [0] * (2 * dims)))
    function = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]

    def sides_for(spatial: Sequence[int]) -> tuple[list[int], list[int]]:
        if auto_pad in ("NOTSET", "VALID"):
            return (pads[:dims], pads[dims:]) if auto_pad == "NOTSET" else ([0] * dims, [0] * dims)
        sides = [same_pads(spatial[axis], weight.shape[2 + axis], strides[axis], dilations[axis],
                           lower=auto_pad != "SAME_UPPER") for axis in range(dims)]
        return [b for b, _ in sides], [e for _, e in sides]

    def apply(u: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
        begin, end = sides_for(u.shape[2:])
        if begin == end:  # symmetric: the kernel pads (no padded copy of u)
            return function(u, kernel, stride=strides, padding=begin, dilation=dilations, groups=groups)
        flat: list[int] = []
        for axis in reversed(range(dims)):
            flat += [begin[axis], end[axis]]
        return function(F.pad(u, flat), kernel, stride=strides, dilation=dilations, groups=groups)

    def adjoint(rows: torch.Tensor, shapes: Sequence[torch.Size]) -> tuple[torch.Tensor]:
        # The input gradient of the convolution (its transpose), the kernel's own backward.
        spatial = list(shapes[0][1:])
        begin, end = sides_for(spatial)
        symmetric = begin == end
        padded = spatial if symmetric else [s + b + e for s, b, e in zip(spatial, begin, end)]
        placeholder = rows.new_empty(1).expand(len(rows), shapes[0][0], *padded)
        grad = torch.ops.aten.convolution_backward(
            rows, placeholder, weight.to(rows.dtype), None, strides, begin if symmetric else [0] * dims, dilations,
            False, [0] * dims, groups, (True, False, False))[0]
        if not symmetric:  # the adjoint of zero padding drops the padded border
            for axis in range(dims):
                grad = grad.narrow(2 + axis, begin[axis], spatial[axis])
        return (grad,)

    tables: dict[tuple, torch.Tensor | None] = {}

    def unit_adjoint(index: torch.Tensor, sign: torch.Tensor, shapes: Sequence[torch.Size]) -> tuple[torch.Tensor]:
        # Signs +-1 on a small layer: rows of the table of every unit's placed transpose (the same values).
        key = (tuple(shapes[0]), index.device)
        if key not in tables:
            tables[key] = unit_table(shapes, index.device)
        table = tables[key]
        if table is None or not bool(((sign == 1) | (sign == -1)).all()):
            return place_units(index, sign, shapes)
        units = len(table) // 2
        return (table.index_select(0, index + units * (sign < 0)).reshape(len(index), *shapes[0]),)

    def unit_table(shapes: Sequence[torch.Size], device: torch.device) -> torch.Tensor | None:
        # (2 * units, inputs): the transposes of +e_i (first half) and -e_i; None above UNIT_TABLE_ELEMENTS.
        begin, end = sides_for(list(shapes[0][1:]))
        padded = [s + b + e for s, b, e in zip(shapes[0][1:], begin, end)]
        out = [(p - d * (k - 1) - 1) // st + 1 for p, k, st, d in zip(padded, weight.shape[2:], strides, dilations)]
        units = weight.shape[0] * math.prod(out)
        if 2 * units * math.prod(shapes[0]) > UNIT_TABLE_ELEMENTS:
            return None
        index = torch.arange(units, device=device).repeat(2)
        sign = torch.ones(2 * units, dtype=weight.dtype, device=device)
        sign[units:] = -1.0
        return place_units(index, sign, shapes)[0].reshape(2 * units, -1).contiguous()

    def place_units(index: torch.Tensor, sign: torch.Tensor, shapes: Sequence[torch.Size]) -> tuple[torch.Tensor]:
        # The transpose of s e_(c, o) is the kernel s W[c] placed at output o's window in the padded input
        # (the taps of one window are distinct inputs: no sums), cropped to the input.
        channels, spatial = shapes[0][0], list(shapes[0][1:])
        begin, end = sides_for(spatial)
        padded = [s + b + e for s, b, e in zip(spatial, begin, end)]
        kernel = list(weight.shape[2:])
        out = [(p - d * (k - 1) - 1) // st + 1 for p, k, st, d in zip(padded, kernel, strides, dilations)]
        unravelled = torch.unravel_index(index, (weight.shape[0], *out))
        unit_channel, places = unravelled[0], unravelled[1:]
        per_group = channels // groups
        group = unit_channel // (weight.shape[0] // groups)
        rows = torch.arange(len(index), device=index.device).reshape(-1, *[1] * (dims + 1))
        read = group.unsqueeze(1) * per_group + torch.arange(per_group, device=index.device)
        where = [rows, read.reshape(len(index), per_group, *[1] * dims)]
        for axis in range(dims):
            taps = places[axis].unsqueeze(1) * strides[axis] + torch.arange(kernel[axis], device=index.device) * dilations[axis]
            shape = [len(index)] + [1] * (dims + 1)
            shape[2 + axis] = kernel[axis]
            where.append(taps.reshape(shape))
        placed = weight.new_zeros(len(index), channels, *padded)
        placed[tuple(where)] = weight[unit_channel] * sign.reshape(-1, *[1] * (dims + 1))
        for axis in range(dims):
            placed = placed.narrow(2 + axis, begin[axis], spatial[axis])
        return (placed,)

    offset = 0.0 if bias is None else _LazyChannelOffset(bias)
    # CPU kernels without oneDNN (float64 among them) unfold the input: per output position, the
    # C_in/groups x taps entries of each group (counted for every group: an upper estimate).
    unfolded = groups * weight.shape[1] * math.prod(weight.shape[2:]) / weight.shape[0]
    return Affine(lambda u: apply(u, weight), lambda r: apply(r, weight.abs()), offset, adjoint=adjoint,
                  unit_adjoint=unit_adjoint, workspace=unfolded)


def structural(call: Callable[..., torch.Tensor], reshape: bool = False) -> Affine:
    """A data-movement / averaging op whose linear part is entrywise non-negative.

    `call` may add a constant (Pad with a non-zero value): the radius map subtracts `call(0)`.
    `reshape`: the op keeps the elements' order (Reshape, Flatten), so its adjoint reshapes back.
    """
    def magnitude(*radii: torch.Tensor) -> torch.Tensor:
        return call(*radii) - call(*[torch.zeros_like(r) for r in radii])

    def adjoint(rows: torch.Tensor, shapes: Sequence[torch.Size]) -> tuple[torch.Tensor]:
        return (rows.reshape(len(rows), *shapes[0]),)

    return Affine(call, magnitude, adjoint=adjoint if reshape else None)


# ---- interval-only rules -------------------------------------------------------------------

def monotone(function: Callable[[torch.Tensor], torch.Tensor]) -> Interval:
    """Non-decreasing unary function: map the ends."""
    return Interval(lambda b: (function(b[0][0]), function(b[0][1])), function)


def product() -> Interval:
    """Elementwise product of two variable tensors (all four corner products)."""
    def rule(bounds):
        (a_lo, a_hi), (b_lo, b_hi) = bounds
        corners = torch.stack([a_lo * b_lo, a_lo * b_hi, a_hi * b_lo, a_hi * b_hi])
        return corners.min(0).values, corners.max(0).values
    return Interval(rule, torch.mul)


def matrix_product() -> Interval:
    """MatMul of two variable tensors in centre-radius form (sound, not exact)."""
    def rule(bounds):
        (a_lo, a_hi), (b_lo, b_hi) = bounds
        a_c, a_r, b_c, b_r = (a_lo + a_hi) / 2, (a_hi - a_lo) / 2, (b_lo + b_hi) / 2, (b_hi - b_lo) / 2
        centre = torch.matmul(a_c, b_c)
        radius = torch.matmul(a_c.abs(), b_r) + torch.matmul(a_r, b_c.abs()) + torch.matmul(a_r, b_r)
        return centre - radius, centre + radius
    return Interval(rule, torch.matmul)


def softmax(axis: int, coerce_2d: bool = False) -> Interval:
    """`softmax_k ∈ [1/(1+Σ_{m≠k} exp(u_m - l_k)), 1/(1+Σ_{m≠k} exp(l_m - u_k))]`, in log space.

    `coerce_2d` (Softmax before opset 13): normalise over all axes from `axis` on.
    """
    def flat(function):
        def apply(*tensors: torch.Tensor):
            if not coerce_2d:
                return function(*tensors, axis)
            shape = tensors[0].shape
            start = axis % len(shape)
            flattened = [t.reshape(*shape[:start], -1) for t in tensors]
            result = function(*flattened, -1)
            return tuple(r.reshape(shape) for r in result) if isinstance(result, tuple) else result.reshape(shape)
        return apply

    def side(own: torch.Tensor, others: torch.Tensor, dim: int) -> torch.Tensor:
        own, others = own.movedim(dim, -1), others.movedim(dim, -1)
        gaps = others.unsqueeze(-2) - own.unsqueeze(-1)  # [..., k, m] = others_m - own_k
        eye = torch.eye(own.shape[-1], dtype=torch.bool, device=own.device)
        gaps = gaps.masked_fill(eye, -math.inf)
        return torch.sigmoid(-torch.logsumexp(gaps, dim=-1)).movedim(-1, dim)

    def bounds(lo: torch.Tensor, hi: torch.Tensor, dim: int):
        return side(lo, hi, dim), side(hi, lo, dim)

    def rule(intervals):
        (lo, hi), = intervals
        return flat(bounds)(lo, hi)
    return Interval(rule, flat(lambda u, dim: torch.softmax(u, dim)))


def layer_norm(attributes: dict, scale_: torch.Tensor | None, bias: torch.Tensor | None, dims: int) -> Interval:
    """LayerNormalization over the last `dims` axes: exact centring, variance interval, division."""
    eps = float(_attr(attributes, "epsilon", 1e-5))

    def rule(bounds):
        (lo, hi), = bounds
        axes = tuple(range(-dims, 0))
        c_lo, c_hi = _centred_bounds(lo, hi, axes, math.prod(lo.shape[-dims:]))
        y_lo, y_hi = normalised_bounds(c_lo, c_hi, dims, eps)
        if scale_ is not None:
            y_lo, y_hi = torch.minimum(y_lo * scale_, y_hi * scale_), torch.maximum(y_lo * scale_, y_hi * scale_)
        if bias is not None:
            y_lo, y_hi = y_lo + bias, y_hi + bias
        return y_lo, y_hi

    def forward(u: torch.Tensor) -> torch.Tensor:
        shape = u.shape[-dims:]
        return F.layer_norm(u, shape, scale_, bias, eps)

    return Interval(rule, forward)


def normalised_bounds(c_lo: torch.Tensor, c_hi: torch.Tensor, dims: int, eps: float):
    """Bounds of `c_k / sqrt(mean(c²) + eps)` over the last `dims` axes from bounds on the centred c.

    The quotient of the variance interval's ends, capped by `|y_k| <= sqrt(n - 1)` (a centred
    vector's entry is at most sqrt(n - 1) times its root mean square).
    """
    axes = tuple(range(-dims, 0))
    count = math.prod(c_lo.shape[-dims:])
    square_hi = torch.maximum(c_lo**2, c_hi**2)
    square_lo = torch.where((c_lo <= 0) & (c_hi >= 0), torch.zeros_like(c_lo), torch.minimum(c_lo**2, c_hi**2))
    var_lo, var_hi = square_lo.mean(axes, keepdim=True), square_hi.mean(axes, keepdim=True)
    denominators = torch.sqrt(torch.stack([var_lo, var_hi]) + eps)
    quotients = torch.stack([c_lo / denominators[0], c_lo / denominators[1],
                             c_hi / denominators[0], c_hi / denominators[1]])
    cap = math.sqrt(max(count - 1, 1))
    return quotients.min(0).values.clamp(-cap, cap), quotients.max(0).values.clamp(-cap, cap)


def _centred_bounds(lo: torch.Tensor, hi: torch.Tensor, axes: tuple[int, ...], count: int):
    """Bounds of `x_k - mean(x)` = `(1 - 1/n) x_k - (1/n) Σ_{m≠k} x_m`: exact per coordinate."""
    total_lo, total_hi = lo.sum(axes, keepdim=True), hi.sum(axes, keepdim=True)
    own = 1.0 - 1.0 / count
    return own * lo - (total_hi - hi) / count, own * hi - (total_lo - lo) / count


def max_pool(forward: Callable[[torch.Tensor], torch.Tensor]) -> Interval:
    """MaxPool is monotone in every input: pool the ends."""
    return Interval(lambda b: (forward(b[0][0]), forward(b[0][1])), forward)
