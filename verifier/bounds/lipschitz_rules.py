"""The global-Lipschitz rules of `global_lipschitz`: one per op family, on a shared view of the op.

A rule sees an `OpView` (the node, the threat norm r, constants, shapes and the bounds `L` of its
inputs) and returns (the op's own gain, `L` of its outputs); `RULES` maps ONNX op types to rules.
Matrix norms are exact in float64: max row abs-sum (inf), max column abs-sum (1), the SVD's top
singular value times `1 + 1e-6` (2; never power iteration, a lower estimate). An op without a
global constant gives `+inf`.

Derivations (A an op's linear part, norms induced): per-row/per-token layers are block diagonal
with equal blocks (the block's norm). Copying each entry k times (broadcast, Tile, repeated Gather
indices) has norm 1 / k / sqrt k (inf / 1 / 2); separate parts (Concat, elementwise Max/Min)
combine by max / sum / root-sum-square. Conv = sum over taps of (channel mixing by W[:, :, tap])
o (an injective shifted selection, norm <= 1), so r=2 <= sum_tap ||W[:, :, tap]||_2 (max over
groups, which are independent blocks); r=inf / r=1 are the unrolled matrix's exact row / column
abs-sums without padding and only shrink with padding or stride. MaxPool: |max_w x - max_w x'|
<= max_{i in w} |dx_i|, so with m the most windows an input lies in, sum_w max_w |dx| <= m ||dx||_1
and sum_w max_w dx^2 <= m ||dx||_2^2: gains 1 / m / sqrt m, attained by a spike in the input.
AveragePool is linear and a Kronecker product over axes: row sums <= 1, column sum of input i =
sum_{w containing i} 1/divisor_w, and ||A||_2 <= sqrt(||A||_1 ||A||_inf) (Schur test); the window
counting is in `windows.py`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import onnx

from verifier.bounds.windows import pool_sums
from verifier.graph import OperatorGraph

SPECTRAL_SAFETY = 1.0 + 1e-6
INF = math.inf
_FLOAT_TYPES = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                          onnx.TensorProto.BFLOAT16})

Dim = int | str | None


@dataclass
class OpView:
    """What a rule sees: the node, the threat norm, constants, shapes and input bounds."""

    node: onnx.NodeProto
    norm: str
    graph: OperatorGraph
    lips: dict[str, float]
    shapes: dict[str, tuple[Dim, ...]]

    def attr(self, name: str, default=None):
        """Attribute value (bytes decoded), or `default`."""
        for a in self.node.attribute:
            if a.name == name:
                value = onnx.helper.get_attribute_value(a)
                return value.decode() if isinstance(value, bytes) else value
        return default

    def has(self, i: int) -> bool:
        """Whether input i is given."""
        return i < len(self.node.input) and bool(self.node.input[i])

    def is_var(self, i: int) -> bool:
        """Whether input i depends on the data input."""
        return self.has(i) and not self.graph.is_constant(self.node.input[i])

    def const(self, i: int) -> np.ndarray | None:
        """The float64 value of constant input i, or None."""
        value = self.graph.constant(self.node.input[i]) if self.has(i) else None
        return None if value is None else value.astype(np.float64)

    def lip(self, i: int) -> float:
        """L of input i (0 for constants, inf for a tensor never bounded)."""
        return self.lips.get(self.node.input[i], INF) if self.is_var(i) else 0.0

    def variables(self) -> list[int]:
        """Indices of the variable inputs."""
        return [i for i in range(len(self.node.input)) if self.is_var(i)]

    def shape(self, i: int | None = None) -> tuple[Dim, ...] | None:
        """Shape of input i (output 0 when i is None), if known."""
        tensor = self.node.output[0] if i is None else self.node.input[i]
        value = self.graph.constant(tensor)
        return tuple(value.shape) if value is not None else self.shapes.get(tensor)

    def spread(self, i: int) -> float:
        """Gain of broadcasting input i to the output shape (copies entries)."""
        return _copies(_broadcast_count(self.shape(i), self.shape()), self.norm)


Rule = Callable[[OpView], tuple[float, float]]  # -> (the op's own gain, L of its outputs)
UNBOUNDED = (INF, INF)


def times(a: float, b: float) -> float:
    """a * b with 0 * inf = 0 (a zero gain kills any variation)."""
    return 0.0 if a == 0.0 or b == 0.0 else a * b


def _copies(k: float | None, norm: str) -> float:
    """Norm of the map copying every entry k times (None: k unknown)."""
    return 1.0 if norm == "inf" else INF if k is None else float(k) if norm == "1" else math.sqrt(k)


def _stack(values: list[float], norm: str) -> float:
    """L of a tensor made of separate parts with bounds `values` (Concat-like)."""
    if norm == "inf":
        return max(values, default=0.0)
    return sum(values) if norm == "1" else math.sqrt(sum(v * v for v in values))


def _broadcast_count(src: tuple[Dim, ...] | None, out: tuple[Dim, ...] | None) -> int | None:
    """How many times broadcasting src to out copies each entry; None when unknown."""
    if src is None or out is None or len(src) > len(out):
        return None
    count = 1
    for a, b in zip((1,) * (len(out) - len(src)) + tuple(src), out):
        if a != b or a is None:
            if a != 1 or not isinstance(b, int):
                return None
            count *= b
    return count


def matrix_norm(m: np.ndarray, norm: str) -> float:
    """Induced r -> r norm of `y = m @ x` (m is [out, in]) in float64, the l2 one rounded up."""
    m = np.asarray(m, dtype=np.float64)
    if m.size == 0:
        return 0.0
    if norm == "2":
        return float(np.linalg.norm(m, 2)) * SPECTRAL_SAFETY
    return float(np.abs(m).sum(axis=1 if norm == "inf" else 0).max())


def _one_input(gain: Callable[[OpView], float]) -> Rule:
    """The rule of an op whose only variable input is the first: L_out = gain * L_in."""

    def rule(op: OpView) -> tuple[float, float]:
        if op.variables() != [0]:
            return UNBOUNDED  # e.g. data-dependent indices, pads or weights
        factor = gain(op)
        return factor, times(factor, op.lip(0))

    rule.__doc__ = gain.__doc__
    return rule


def _same(op: OpView) -> float:
    """Permutations, reshapes, slices, splits, float casts, max of disjoint groups: gain 1."""
    return 1.0 if op.node.op_type != "Cast" or op.attr("to") in _FLOAT_TYPES else INF  # int casts round


def _gemm(op: OpView) -> tuple[float, float]:
    """Y = alpha A op(B) + beta C with A variable (transA = 0) and B constant: rows of A times W."""
    w = op.const(1)
    if op.attr("transA", 0) or not op.is_var(0) or w is None:
        return UNBOUNDED
    gain = abs(op.attr("alpha", 1.0)) * matrix_norm(w if op.attr("transB", 0) else w.T, op.norm)
    lip = times(gain, op.lip(0))
    if op.is_var(2):
        lip += times(abs(op.attr("beta", 1.0)) * op.spread(2), op.lip(2))
    return gain, lip


def _var_and_const(op: OpView) -> tuple[int, np.ndarray | None]:
    """For a binary op: the index of its only variable operand and the other's value (or None)."""
    variables = op.variables()
    return (variables[0], op.const(1 - variables[0])) if len(variables) == 1 else (0, None)


def _matmul(op: OpView) -> tuple[float, float]:
    """MatMul with one constant operand: the same block on every row/column (block diagonal)."""
    var, c = _var_and_const(op)
    if c is None:
        return UNBOUNDED
    right = var == 0
    if c.ndim == 1:
        c = c[:, None] if right else c[None, :]
    # x @ B acts on each row by B^T, A @ X on each column by A. Several constant blocks are
    # stacked: each variable block meets each constant block at most once (broadcasting).
    gains = [matrix_norm(b.T if right else b, op.norm) for b in c.reshape(-1, *c.shape[-2:])]
    gain = gains[0] if len(gains) == 1 else _stack(gains, op.norm)
    return gain, times(gain, op.lip(var))


def _conv(op: OpView) -> float:
    """Conv bounded without unrolling (see the module docstring)."""
    w = op.const(1)
    if w is None:
        return INF
    per_group = np.split(w, int(op.attr("group", 1)), axis=0)
    if op.norm == "inf":
        return float(np.abs(w).reshape(w.shape[0], -1).sum(axis=1).max())
    if op.norm == "1":
        return max(float(np.abs(g).sum(axis=tuple(i for i in range(g.ndim) if i != 1)).max()) for g in per_group)
    taps = [g.reshape(g.shape[0], g.shape[1], -1) for g in per_group]
    return max(sum(float(np.linalg.norm(t[:, :, k], 2)) for k in range(t.shape[2])) for t in taps) * SPECTRAL_SAFETY


def _batch_norm(op: OpView) -> float:
    """Inference BatchNorm is diagonal: max_c |gamma_c| / sqrt(var_c + eps), in every norm."""
    gamma, var = op.const(1), op.const(4)
    if op.attr("training_mode", 0) or gamma is None or var is None or np.any(var + op.attr("epsilon", 1e-5) <= 0):
        return INF
    return float(np.max(np.abs(gamma) / np.sqrt(var + float(op.attr("epsilon", 1e-5)))))


def _add(op: OpView) -> tuple[float, float]:
    """Add/Sub/Sum/Mean: triangle inequality over the variable terms (constants only shift)."""
    terms = [(op.spread(i), op.lip(i)) for i in op.variables()]
    scale = 1.0 / len(op.node.input) if op.node.op_type == "Mean" else 1.0
    return scale * max((s for s, _ in terms), default=0.0), scale * sum(times(s, lip) for s, lip in terms)


def _mul(op: OpView) -> tuple[float, float]:
    """Mul by a constant: max |c| (a product of two variables has no global constant)."""
    var, c = _var_and_const(op)
    if c is None:
        return UNBOUNDED
    gain = times(float(np.max(np.abs(c), initial=0.0)), op.spread(var))
    return gain, times(gain, op.lip(var))


def _div(op: OpView) -> float:
    """Div by a non-zero constant: max |1/c| (division by a variable is unbounded)."""
    c = op.const(1)
    if c is None or np.any(c == 0):
        return INF
    return times(float(np.max(1.0 / np.abs(c), initial=0.0)), op.spread(0))


def _stacked(op: OpView) -> tuple[float, float]:
    """Concat, elementwise Max/Min: |max(a, b) - max(a', b')| <= max(|da|, |db|) entrywise."""
    spread = (lambda i: 1.0) if op.node.op_type == "Concat" else op.spread
    return 1.0, _stack([times(spread(i), op.lip(i)) for i in op.variables()], op.norm)


def _gather(op: OpView) -> float:
    """Gather with constant indices: entries repeat as often as their index does."""
    idx = op.const(1)
    if idx is None:
        return INF
    idx, shape = idx.astype(np.int64).ravel(), op.shape(0)
    dim = shape[int(op.attr("axis", 0))] if shape is not None else None
    if not isinstance(dim, int) and np.any(idx < 0):
        return _copies(idx.size, op.norm)  # -1 and n-1 may be the same entry
    _, counts = np.unique(np.where(idx < 0, idx + (dim or 0), idx), return_counts=True)
    return _copies(int(counts.max(initial=1)), op.norm)


def _copying(op: OpView) -> float:
    """Expand (a broadcast), Tile (prod(repeats) copies), Pad (constant mode adds constants only)."""
    if op.node.op_type == "Pad":
        return 1.0 if op.attr("mode", "constant") == "constant" else _copies(None, op.norm)
    reps = op.const(1) if op.node.op_type == "Tile" else None
    return _copies(int(np.prod(reps)), op.norm) if reps is not None else op.spread(0)


def _reduce(op: OpView) -> float:
    """ReduceSum/ReduceMean/GlobalAveragePool of k entries: sum k, 1, sqrt k; mean 1, 1/k, 1/sqrt k."""
    axes = op.const(1) if op.has(1) else op.attr("axes")
    shape = op.shape(0)
    if op.node.op_type == "GlobalAveragePool":
        axes = range(2, len(shape)) if shape is not None else None
    elif axes is None or len(axes) == 0:
        if op.attr("noop_with_empty_axes", 0):
            return 1.0
        axes = range(len(shape)) if shape is not None else None
    dims = [shape[int(a)] for a in axes] if shape is not None and axes is not None else [None]
    k = int(np.prod(dims)) if all(isinstance(d, int) for d in dims) else None
    if op.node.op_type == "ReduceSum":
        return {"inf": INF if k is None else k, "1": 1.0, "2": INF if k is None else math.sqrt(k)}[op.norm]
    return 1.0 if k is None else {"inf": 1.0, "1": 1.0 / k, "2": 1.0 / math.sqrt(k)}[op.norm]  # k >= 1


def pooling_gain(op: OpView) -> float:
    """AveragePool: row sum (inf), column sum (1), sqrt(row col) (2); MaxPool: 1, m, sqrt m."""
    kernel = list(op.attr("kernel_shape", []))
    n = len(kernel)
    shape = op.shape(0)
    sizes = list(shape[2:]) if shape is not None and len(shape) == n + 2 else [None] * n
    col, row, m = pool_sums(kernel, op.attr("strides", [1] * n), op.attr("dilations", [1] * n),
                            list(op.attr("pads", [0] * 2 * n)), bool(op.attr("ceil_mode", 0)),
                            op.attr("auto_pad", "NOTSET"), bool(op.attr("count_include_pad", 0)), sizes)
    if op.node.op_type == "MaxPool":
        return {"inf": 1.0, "1": m, "2": math.sqrt(m)}[op.norm]
    return {"inf": row, "1": col, "2": math.sqrt(row * col)}[op.norm]


_SAME = _one_input(_same)
RULES: dict[str, Rule] = {
    "Gemm": _gemm, "MatMul": _matmul, "Conv": _one_input(_conv), "BatchNormalization": _one_input(_batch_norm),
    "Add": _add, "Sub": _add, "Sum": _add, "Mean": _add, "Mul": _mul, "Div": _one_input(_div),
    "Concat": _stacked, "Max": _stacked, "Min": _stacked,
    "Gather": _one_input(_gather),
    **{op: _one_input(_copying) for op in ("Pad", "Tile", "Expand")},
    "ReduceSum": _one_input(_reduce), "ReduceMean": _one_input(_reduce),
    "GlobalAveragePool": _one_input(_reduce), "AveragePool": _one_input(pooling_gain),
    "MaxPool": _one_input(pooling_gain),
    **{op: _SAME for op in ("Neg", "Identity", "Dropout", "Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze",
                            "Split", "Slice", "Cast", "GlobalMaxPool", "ReduceMax", "ReduceMin")},
}
