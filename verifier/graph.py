"""The operator graph of an ONNX model and its activation sites.

`OperatorGraph` wraps a `networkx.DiGraph` whose nodes are ONNX operators and whose edges carry
the tensors between them; initializers and `Constant` outputs are known constants. On it,
`find_activations` lists every activation site (standalone ops and decomposed GELU / SiLU /
HardSwish patterns, recognised from structure and constants, see `verifier.patterns`) and
`model_family` classifies the part of the model that computes the logits (which tensor that is:
`verifier.head`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import onnx
from onnx import numpy_helper

from verifier import patterns

PIECEWISE_LINEAR_KINDS = frozenset({"relu", "leaky_relu", "prelu", "clip", "max_pool", "abs"})
SMOOTH_KINDS = frozenset({"gelu", "silu", "hard_swish", "sigmoid", "tanh", "softplus", "softmax"})
ACTIVATION_KINDS = PIECEWISE_LINEAR_KINDS | SMOOTH_KINDS

_STANDALONE_KINDS = {
    "Relu": "relu",
    "LeakyRelu": "leaky_relu",
    "PRelu": "prelu",
    "Clip": "clip",
    "MaxPool": "max_pool",
    "Abs": "abs",
    "Gelu": "gelu",
    "HardSwish": "hard_swish",
    "Sigmoid": "sigmoid",
    "Tanh": "tanh",
    "Softplus": "softplus",
    "Softmax": "softmax",
}
# Ops that are affine in their variable input (with constant other operands) or only move data.
_LINEAR_OPS = frozenset(
    """Gemm MatMul Conv ConvTranspose BatchNormalization Add Sub Mul Div Neg Sum Mean Flatten Reshape
    Transpose Concat Split Slice Gather Squeeze Unsqueeze Identity Dropout Pad AveragePool
    GlobalAveragePool ReduceMean ReduceSum Expand Tile Cast Shape Size Constant ConstantOfShape
    Range Einsum DepthToSpace SpaceToDepth Resize""".split()
)
_PIECEWISE_LINEAR_OPS = frozenset(
    {"Max", "Min", "ReduceMax", "ReduceMin", "GlobalMaxPool", "ReduceL1", "HardSigmoid", "ThresholdedRelu", "Shrink"}
)
_STANDARD_DOMAINS = ("", "ai.onnx")
_MAX_POOL_ATTRIBUTES = ("kernel_shape", "strides", "pads", "dilations", "ceil_mode", "auto_pad", "storage_order")
_SOFTMAX_DEFAULT_AXIS_CHANGED = 13  # Softmax-13: default axis -1 and one-axis semantics (before: 1, coerced 2-D)
_SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})
_ML_DOMAIN = "ai.onnx.ml"
_ML_AFFINE_OPS = frozenset({"LinearClassifier", "LinearRegressor", "Scaler", "ArrayFeatureExtractor", "ZipMap"})


@dataclass(frozen=True)
class ActivationSite:
    """One activation in the model: its kind, the ONNX nodes it covers, and its tensors."""

    index: int
    kind: str
    nodes: tuple[str, ...]
    input: str
    output: str
    params: dict[str, float | str | list[int]] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "index": self.index,
            "kind": self.kind,
            "nodes": list(self.nodes),
            "input": self.input,
            "output": self.output,
            "params": json_safe(dict(self.params)),
        }


class OperatorGraph:
    """Operators of one ONNX graph as a DiGraph (node key -> NodeProto), with tensor bookkeeping."""

    def __init__(self, model: onnx.ModelProto) -> None:
        graph = model.graph
        self.model = model
        self.nx = nx.DiGraph()
        self.nodes: dict[str, onnx.NodeProto] = {}
        self.producer: dict[str, str] = {}
        self.consumers: dict[str, list[str]] = {}
        self.constants: dict[str, np.ndarray] = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
        self.inputs = [vi.name for vi in graph.input if vi.name not in self.constants]
        self.outputs = [vi.name for vi in graph.output]
        for key, (position, node) in zip(node_keys(graph.node), enumerate(graph.node)):
            self.nodes[key] = node
            self.nx.add_node(key, op_type=node.op_type, domain=node.domain, position=position)
            for tensor in node.output:
                if tensor:
                    self.producer[tensor] = key
            for tensor in node.input:
                if tensor:
                    self.consumers.setdefault(tensor, []).append(key)
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                value = _constant_node_value(node)
                if value is not None:
                    self.constants[node.output[0]] = value
        for tensor, users in self.consumers.items():
            source = self.producer.get(tensor)
            if source is None:
                continue
            for user in users:
                if not self.nx.has_edge(source, user):
                    self.nx.add_edge(source, user, tensors=[tensor])
                elif tensor not in self.nx.edges[source, user]["tensors"]:  # Mul(h, h): one entry
                    self.nx.edges[source, user]["tensors"].append(tensor)
        self.opset = next((int(o.version) for o in model.opset_import if o.domain in _STANDARD_DOMAINS), 0)
        self._shapes = {vi.name: _value_shape(vi) for vi in [*graph.input, *graph.value_info, *graph.output]}

    def topological_order(self) -> list[str]:
        """Node keys in a topological order that keeps the file's order where it is free."""
        return list(nx.lexicographical_topological_sort(self.nx, key=lambda k: self.nx.nodes[k]["position"]))

    def op_histogram(self) -> dict[str, int]:
        """How many nodes of each op type (domain-qualified when not standard)."""
        counts = Counter(
            n.op_type if n.domain in ("", "ai.onnx") else f"{n.domain}.{n.op_type}" for n in self.nodes.values()
        )
        return dict(sorted(counts.items()))

    def constant(self, tensor: str) -> np.ndarray | None:
        """The value of a tensor known at load time (initializer or Constant output), else None."""
        return self.constants.get(tensor)

    def scalar(self, tensor: str) -> float | None:
        """A load-time constant with exactly one element, as a float; else None."""
        return _scalar(self.constant(tensor))

    def shape(self, tensor: str) -> tuple[int | str | None, ...] | None:
        """A tensor's shape from the model's value infos (ints, symbolic names, None), or None if unknown."""
        if tensor in self.constants:
            return tuple(int(d) for d in self.constants[tensor].shape)
        return self._shapes.get(tensor)

    def is_constant(self, tensor: str) -> bool:
        """Whether the tensor's value does not depend on the data input."""
        return tensor in self.dynamic_free

    @property
    def dynamic_free(self) -> set[str]:
        """Tensors that do not depend on the data input's values (constants, shapes of it)."""
        cached = getattr(self, "_dynamic_free", None)
        if cached is None:
            dynamic = set(self.inputs)
            for key in self.topological_order():
                node = self.nodes[key]
                if node.op_type in _SHAPE_ONLY_OPS:
                    continue
                if any(t in dynamic for t in node.input if t):
                    dynamic.update(t for t in node.output if t)
            every = set(self.producer) | set(self.constants) | set(self.inputs)
            cached = every - dynamic
            self._dynamic_free = cached
        return cached

    def ancestors_of_tensors(self, tensors: Iterable[str]) -> set[str]:
        """Node keys that contribute to any of the tensors (the producing nodes included)."""
        keys = {self.producer[t] for t in tensors if t in self.producer}
        found = set(keys)
        for key in keys:
            found |= nx.ancestors(self.nx, key)
        return found

    def find_activations(self) -> list[ActivationSite]:
        """Every activation site: decomposed patterns first, then the standalone ops left over."""
        sites: list[tuple[int, str, tuple[str, ...], str, str, dict]] = []
        covered: set[str] = set()
        order = self.topological_order()
        for match in patterns.find_decomposed(self, order):
            if self.is_constant(match.input):
                continue  # an activation of weights or shapes: part of a constant, not of the network
            covered.update(match.nodes)
            sites.append((self.nx.nodes[match.nodes[-1]]["position"], match.kind, match.nodes,
                          match.input, match.output, match.params))
        for key in order:
            node = self.nodes[key]
            kind = _STANDALONE_KINDS.get(node.op_type)
            if key in covered or kind is None or node.domain not in _STANDARD_DOMAINS:
                continue
            if not node.input or not node.input[0] or self.is_constant(node.input[0]):
                continue
            if node.op_type == "Clip" and self.is_identity_clip(node):
                continue
            sites.append((self.nx.nodes[key]["position"], kind, (key,), node.input[0], node.output[0],
                          self._standalone_params(node)))
        sites.sort(key=lambda s: s[0])
        return [
            ActivationSite(index=i, kind=kind, nodes=nodes, input=inp, output=out, params=params)
            for i, (_, kind, nodes, inp, out, params) in enumerate(sites)
        ]

    def _standalone_params(self, node: onnx.NodeProto) -> dict[str, float | str]:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "LeakyRelu":
            return {"alpha": float(attrs.get("alpha", 0.01))}
        if node.op_type == "Gelu":
            approx = attrs.get("approximate", b"none")
            return {"approximate": approx.decode() if isinstance(approx, bytes) else str(approx)}
        if node.op_type == "Clip":
            low, high, _ = self._clip_bounds(node)
            return {k: v for k, v in (("min", low), ("max", high)) if v is not None}
        if node.op_type == "Softmax":
            return self._softmax_params(node, attrs)
        if node.op_type == "MaxPool":
            return {k: (list(v) if isinstance(v, list) else v.decode() if isinstance(v, bytes) else v)
                    for k, v in attrs.items() if k in _MAX_POOL_ATTRIBUTES}
        return {}

    def _clip_bounds(self, node: onnx.NodeProto) -> tuple[float | None, float | None, bool]:
        """Clip's (min, max) as floats, None where there is no bound (absent, empty name or
        infinite), and whether every given bound is a known constant."""
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        bounds: list[float | None] = [attrs.get("min"), attrs.get("max")]
        known = True
        for slot in (0, 1):
            if len(node.input) > slot + 1 and node.input[slot + 1]:
                bounds[slot] = self.scalar(node.input[slot + 1])
                known &= bounds[slot] is not None
        low, high = (None if v is None else float(v) for v in bounds)
        low = None if low is not None and low == -math.inf else low
        high = None if high is not None and high == math.inf else high
        return low, high, known

    def is_identity_clip(self, node: onnx.NodeProto) -> bool:
        """A Clip without any finite constant bound computes its input unchanged."""
        low, high, known = self._clip_bounds(node)
        return known and low is None and high is None

    def _softmax_params(self, node: onnx.NodeProto, attrs: dict) -> dict[str, int | bool]:
        """The effective axis (default 1 before opset 13, -1 from 13); `coerce_2d` when an
        opset < 13 Softmax normalises over all dimensions from `axis` on, not just one."""
        old = 0 < self.opset < _SOFTMAX_DEFAULT_AXIS_CHANGED
        axis = int(attrs.get("axis", 1 if old else -1))
        params: dict[str, int | bool] = {"axis": axis}
        shape = self.shape(node.input[0])
        if old and (shape is None or (axis % len(shape) if shape else 0) < len(shape) - 1):
            params["coerce_2d"] = True
        return params

    def uncovered_nonlinear(self, sites: list[ActivationSite], logits: str | None) -> list[str]:
        """Nodes the logits depend on that are nonlinear but belong to no activation site
        (e.g. `Max(h, 3h)`, `Mul(h, h)`, `ReduceMax`): the cell analysis cannot see their kinks.
        `logits` is the head's tensor (`verifier.head`); None: every output."""
        relevant = self.ancestors_of_tensors([logits] if logits else self.outputs)
        covered = {key for site in sites for key in site.nodes}
        return sorted(key for key in relevant - covered if self._op_nonlinearity(self.nodes[key]) != "none")

    def model_family(self, sites: list[ActivationSite], logits: str | None) -> str:
        """`linear`, `piecewise-linear`, `smooth` or `mixed`, judged on what computes `logits`
        (the head's tensor, `verifier.head`; None: every output)."""
        relevant = self.ancestors_of_tensors([logits] if logits else self.outputs)
        covered = {key for site in sites for key in site.nodes}
        kinds = {site.kind for site in sites if set(site.nodes) & relevant}
        has_pl = bool(kinds & PIECEWISE_LINEAR_KINDS)
        has_smooth = bool(kinds & SMOOTH_KINDS)
        for key in relevant - covered:
            effect = self._op_nonlinearity(self.nodes[key])
            has_pl |= effect == "piecewise-linear"
            has_smooth |= effect == "smooth"
        if has_pl and has_smooth:
            return "mixed"
        if has_pl:
            return "piecewise-linear"
        return "smooth" if has_smooth else "linear"

    def _op_nonlinearity(self, node: onnx.NodeProto) -> str:
        """Nonlinearity of an op outside any site: none, piecewise-linear or smooth."""
        variable_inputs = [t for t in node.input if t and not self.is_constant(t)]
        if not variable_inputs or node.op_type in _SHAPE_ONLY_OPS:
            return "none"
        if node.op_type == "Clip" and node.domain in _STANDARD_DOMAINS and self.is_identity_clip(node):
            return "none"
        if node.domain == _ML_DOMAIN:
            return _ml_nonlinearity(node)
        if node.op_type in _PIECEWISE_LINEAR_OPS:
            return "piecewise-linear"
        kind = _STANDALONE_KINDS.get(node.op_type)
        if kind is not None:
            return "piecewise-linear" if kind in PIECEWISE_LINEAR_KINDS else "smooth"
        if node.op_type in ("Mul", "MatMul", "Gemm", "Einsum") and len(variable_inputs) > 1:
            return "smooth"
        if node.op_type == "Div" and not self.is_constant(node.input[1]):
            return "smooth"
        if node.op_type in _LINEAR_OPS:
            return "none"
        return "smooth"


def _ml_nonlinearity(node: onnx.NodeProto) -> str:
    """ai.onnx.ml ops: the linear models without a post-transform and the scaler are affine."""
    post = next((a.s for a in node.attribute if a.name == "post_transform"), b"NONE")
    return "none" if node.op_type in _ML_AFFINE_OPS and post in (b"NONE", "NONE") else "smooth"


def node_keys(nodes: Iterable[onnx.NodeProto]) -> list[str]:
    """A unique key per node: its name; `{op_type}_{position}` when unnamed; a `_k` suffix for a
    repeated name. Real names keep priority, so no generated key can take another node's name."""
    nodes = list(nodes)
    real = {node.name for node in nodes if node.name}
    taken: set[str] = set()
    keys: list[str] = []
    for position, node in enumerate(nodes):
        base = node.name or f"{node.op_type}_{position}"
        key, suffix = base, 1
        while key in taken or (key != node.name and key in real):
            key, suffix = f"{base}_{suffix}", suffix + 1
        taken.add(key)
        keys.append(key)
    return keys


def json_safe(value):
    """`value` with every non-finite float written as the string "NaN", "Infinity" or "-Infinity"
    (strict JSON has no such numbers; see docs/cli.md)."""
    if isinstance(value, (float, np.floating)) and not math.isfinite(value):
        return "NaN" if math.isnan(value) else ("Infinity" if value > 0 else "-Infinity")
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def _value_shape(value_info: onnx.ValueInfoProto) -> tuple[int | str | None, ...] | None:
    if not (value_info.type.HasField("tensor_type") and value_info.type.tensor_type.HasField("shape")):
        return None
    return tuple(
        int(d.dim_value) if d.HasField("dim_value") else (d.dim_param if d.HasField("dim_param") else None)
        for d in value_info.type.tensor_type.shape.dim
    )


def _constant_node_value(node: onnx.NodeProto) -> np.ndarray | None:
    for attr in node.attribute:
        if attr.name == "value":
            return numpy_helper.to_array(attr.t)
        if attr.name in ("value_float", "value_int"):
            return np.array(onnx.helper.get_attribute_value(attr))
        if attr.name in ("value_floats", "value_ints"):
            return np.array(list(onnx.helper.get_attribute_value(attr)))
    return None


def _scalar(value: np.ndarray | None) -> float | None:
    if value is None or value.size != 1:
        return None
    return float(value.reshape(()))


def find_activations(model: onnx.ModelProto) -> list[ActivationSite]:
    """Activation sites of a model (see `OperatorGraph.find_activations`)."""
    return OperatorGraph(model).find_activations()
