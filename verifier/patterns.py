"""Recognising activations that exporters write as several elementwise ONNX nodes.

GELU (erf and tanh forms, any operand order), SiLU (`x * Sigmoid(x)`) and HardSwish
(`x * HardSigmoid(x)`) are found from structure and constants, never from node names:
1. every `Erf`, `Tanh`, `Sigmoid` or `HardSigmoid` node is an anchor;
2. its input is traced back through single-use arithmetic nodes to exactly one variable tensor
   `x` (all other leaves must be constants with one repeated value that, broadcast against
   `x`, leave its shape unchanged);
3. the region is grown forward through single-use arithmetic nodes whose other operands are
   constants, `x`, or single-use arithmetic of `x`;
4. the deepest region output whose function of `x`, evaluated in float64 from the graph's own
   constants, equals a known activation on a grid of points is the site.
Inner nodes are thereby owned by the site and never reported again.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from verifier.graph import OperatorGraph

_ANCHORS = frozenset({"Erf", "Tanh", "Sigmoid", "HardSigmoid"})
_ARITHMETIC = frozenset({"Add", "Sub", "Mul", "Div", "Pow", "Neg", "Sqrt", "Reciprocal"})
_MAX_FORWARD_STEPS = 6
_STANDARD_DOMAINS = ("", "ai.onnx")
_GRID = np.linspace(-8.0, 8.0, 321)
_TOLERANCE = 1e-5

_erf = np.vectorize(math.erf)


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _hard_sigmoid(x: np.ndarray, alpha: float = 0.2, beta: float = 0.5) -> np.ndarray:
    return np.clip(alpha * x + beta, 0.0, 1.0)


_KNOWN: tuple[tuple[str, dict[str, str], Callable[[np.ndarray], np.ndarray]], ...] = (
    ("gelu", {"approximate": "none"}, lambda x: 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)))),
    ("gelu", {"approximate": "tanh"},
     lambda x: 0.5 * x * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))),
    ("silu", {}, lambda x: x * _sigmoid(x)),
    ("hard_swish", {}, lambda x: x * _hard_sigmoid(x, 1.0 / 6.0, 0.5)),
)


@dataclass(frozen=True)
class PatternMatch:
    """A decomposed activation: kind, covered node keys (topological), input and output tensors."""

    kind: str
    nodes: tuple[str, ...]
    input: str
    output: str
    params: dict[str, str] = field(default_factory=dict)


def find_decomposed(graph: OperatorGraph, order: list[str]) -> Iterator[PatternMatch]:
    """Yield every decomposed GELU / SiLU / HardSwish in `graph` (keys in `order`)."""
    covered: set[str] = set()
    for key in order:
        node = graph.nodes[key]
        if key in covered or node.op_type not in _ANCHORS or node.domain not in ("", "ai.onnx"):
            continue
        match = _match_at(graph, key)
        if match is not None:
            covered.update(match.nodes)
            yield match


def _scalar_constant(graph: OperatorGraph, tensor: str) -> float | None:
    value = graph.constant(tensor)
    if value is None or value.size == 0 or not np.issubdtype(value.dtype, np.number):
        return None
    flat = value.astype(np.float64).ravel()
    return float(flat[0]) if np.all(flat == flat[0]) else None


def _is_single_use_arithmetic(graph: OperatorGraph, tensor: str) -> bool:
    key = graph.producer.get(tensor)
    return (
        key is not None
        and graph.nodes[key].op_type in _ARITHMETIC
        and graph.nodes[key].domain in _STANDARD_DOMAINS
        and len(graph.consumers.get(tensor, [])) == 1
        and tensor not in graph.outputs
    )


def _backward_cone(graph: OperatorGraph, tensor: str, stop: str | None) -> tuple[set[str], set[str]] | None:
    """Nodes of the single-use arithmetic cone above `tensor`, and its variable leaves."""
    nodes: set[str] = set()
    leaves: set[str] = set()
    stack = [tensor]
    while stack:
        current = stack.pop()
        if graph.constant(current) is not None:
            if _scalar_constant(graph, current) is None:
                return None
            continue
        if current == stop or not _is_single_use_arithmetic(graph, current):
            leaves.add(current)
            continue
        key = graph.producer[current]
        if key not in nodes:
            nodes.add(key)
            stack.extend(t for t in graph.nodes[key].input if t)
    return nodes, leaves


def _match_at(graph: OperatorGraph, anchor: str) -> PatternMatch | None:
    anchor_node = graph.nodes[anchor]
    cone = _backward_cone(graph, anchor_node.input[0], stop=None)
    if cone is None or len(cone[1]) != 1:
        return None
    region, (x,) = cone[0] | {anchor}, tuple(cone[1])
    current = anchor_node.output[0]
    candidates: list[tuple[str, frozenset[str]]] = []
    for _ in range(_MAX_FORWARD_STEPS):
        users = graph.consumers.get(current, [])
        if current in graph.outputs or len(users) != 1:
            break
        user = graph.nodes[users[0]]
        if user.op_type not in _ARITHMETIC or user.domain not in ("", "ai.onnx"):
            break
        extra: set[str] = set()
        for operand in user.input:
            if operand in (current, x) or _scalar_constant(graph, operand) is not None:
                continue
            operand_cone = _backward_cone(graph, operand, stop=x)
            if operand_cone is None or operand_cone[1] != {x}:
                return _best(graph, x, candidates)
            extra |= operand_cone[0]
        region |= extra | {users[0]}
        current = user.output[0]
        candidates.append((current, frozenset(region)))
    return _best(graph, x, candidates)


def _best(graph: OperatorGraph, x: str, candidates: list[tuple[str, frozenset[str]]]) -> PatternMatch | None:
    for output, region in reversed(candidates):
        values = _evaluate(graph, x, output, region)
        if values is None:
            continue
        for kind, params, reference in _KNOWN:
            expected = reference(_GRID)
            if np.all(np.abs(values - expected) <= _TOLERANCE * (1.0 + np.abs(expected))):
                ordered = tuple(sorted(region, key=lambda k: graph.nx.nodes[k]["position"]))
                return PatternMatch(kind=kind, nodes=ordered, input=x, output=output, params=dict(params))
    return None


def _keeps_shape(constant: np.ndarray, x_shape: tuple | None) -> bool:
    """Whether broadcasting `constant` against x leaves x's shape unchanged (x's shape unknown:
    a constant of rank <= 1 with one element, as exporters write scalars)."""
    if x_shape is None:
        return constant.ndim <= 1 and constant.size == 1
    if constant.ndim > len(x_shape):
        return False
    return all(c == 1 or c == d for c, d in zip(reversed(constant.shape), reversed(x_shape)))


def _evaluate(graph: OperatorGraph, x: str, output: str, region: frozenset[str]) -> np.ndarray | None:
    """The region's output as a float64 function of `x` on `_GRID`, or None if not evaluable
    (a non-scalar operand, or a constant that would broadcast x to another shape)."""
    x_shape = graph.shape(x)
    values: dict[str, np.ndarray] = {x: _GRID}
    with np.errstate(all="ignore"):
        for key in sorted(region, key=lambda k: graph.nx.nodes[k]["position"]):
            node = graph.nodes[key]
            args = []
            for tensor in node.input:
                if tensor in values:
                    args.append(values[tensor])
                else:
                    scalar = _scalar_constant(graph, tensor)
                    if scalar is None or not _keeps_shape(graph.constant(tensor), x_shape):
                        return None
                    args.append(np.float64(scalar))
            result = _apply(node, args)
            if result is None:
                return None
            values[node.output[0]] = np.broadcast_to(result, _GRID.shape)
    return values.get(output)


def _apply(node, args: list[np.ndarray]) -> np.ndarray | None:
    op = node.op_type
    attrs = {a.name: a for a in node.attribute}
    binary = {
        "Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Div": np.divide, "Pow": np.power,
    }
    if op in binary and len(args) == 2:
        return binary[op](args[0], args[1])
    unary = {
        "Neg": np.negative, "Sqrt": np.sqrt, "Reciprocal": np.reciprocal, "Erf": _erf, "Tanh": np.tanh,
        "Sigmoid": _sigmoid,
    }
    if op in unary and len(args) == 1:
        return unary[op](args[0])
    if op == "HardSigmoid" and len(args) == 1:
        alpha = attrs["alpha"].f if "alpha" in attrs else 0.2
        beta = attrs["beta"].f if "beta" in attrs else 0.5
        return _hard_sigmoid(args[0], alpha, beta)
    return None
