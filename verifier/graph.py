"""The operator graph of an ONNX model and its activation sites.

`OperatorGraph` wraps a `networkx.DiGraph` whose nodes are ONNX operators and whose edges carry
the tensors between them; initializers and `Constant` outputs are known constants. On it,
`find_activations` lists every activation site (standalone ops and decomposed GELU / SiLU /
HardSwish patterns, recognised from structure and constants, see `verifier.patterns`) and
`model_family` classifies the part of the model that computes the logits.
"""

from __future__ import annotations

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
_PIECEWISE_LINEAR_OPS = frozenset({"Max", "Min", "ReduceMax", "ReduceMin", "GlobalMaxPool", "ReduceL1"})
_MAX_POOL_ATTRIBUTES = ("kernel_shape", "strides", "pads", "dilations", "ceil_mode", "auto_pad", "storage_order")
_OUTPUT_TRANSFORMS = frozenset({"Softmax", "LogSoftmax"})
_SHAPE_ONLY_OPS = frozenset({"Shape", "Size"})
_FLOAT_ELEM_TYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
)


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
            "params": dict(self.params),
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
        seen: Counter[str] = Counter()
        for position, node in enumerate(graph.node):
            key = node.name or f"{node.op_type}_{position}"
            seen[key] += 1
            if seen[key] > 1:
                key = f"{key}_{seen[key] - 1}"
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
                if self.nx.has_edge(source, user):
                    self.nx.edges[source, user]["tensors"].append(tensor)
                else:
                    self.nx.add_edge(source, user, tensors=[tensor])

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

    def logits_of(self, output: str) -> str:
        """The tensor holding logits for a graph output: Softmax/LogSoftmax's input, else itself."""
        key = self.producer.get(output)
        if key is not None and self.nodes[key].op_type in _OUTPUT_TRANSFORMS:
            return self.nodes[key].input[0]
        return output

    def numeric_outputs(self) -> list[str]:
        """Float tensor outputs; an output made by ZipMap (skl2onnx) stands for ZipMap's input."""
        kept: list[str] = []
        for out in self.model.graph.output:
            name = out.name
            key = self.producer.get(name)
            if key is not None and self.nodes[key].op_type == "ZipMap":
                name = self.nodes[key].input[0]
            elif not (out.type.HasField("tensor_type") and out.type.tensor_type.elem_type in _FLOAT_ELEM_TYPES):
                continue
            if name not in kept:
                kept.append(name)
        return kept

    def logits_tensor(self) -> str | None:
        """The logits: from the first numeric output, through a final Softmax/LogSoftmax."""
        outputs = self.numeric_outputs()
        return self.logits_of(outputs[0]) if outputs else None

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
            covered.update(match.nodes)
            sites.append((self.nx.nodes[match.nodes[-1]]["position"], match.kind, match.nodes,
                          match.input, match.output, match.params))
        for key in order:
            node = self.nodes[key]
            kind = _STANDALONE_KINDS.get(node.op_type)
            if key in covered or kind is None or node.domain not in ("", "ai.onnx"):
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
            low, high = attrs.get("min"), attrs.get("max")
            if len(node.input) > 1 and node.input[1]:
                low = _scalar(self.constant(node.input[1]))
            if len(node.input) > 2 and node.input[2]:
                high = _scalar(self.constant(node.input[2]))
            return {k: float(v) for k, v in (("min", low), ("max", high)) if v is not None}
        if node.op_type in ("Softmax", "MaxPool"):
            keep = ("axis",) if node.op_type == "Softmax" else _MAX_POOL_ATTRIBUTES
            return {k: (list(v) if isinstance(v, list) else v.decode() if isinstance(v, bytes) else v)
                    for k, v in attrs.items() if k in keep}
        return {}

    def model_family(self, sites: list[ActivationSite]) -> str:
        """`linear`, `piecewise-linear`, `smooth` or `mixed`, judged on what computes the logits."""
        logits = self.logits_tensor()
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
        if node.op_type in _PIECEWISE_LINEAR_OPS:
            return "piecewise-linear"
        if node.op_type in ("Mul", "MatMul", "Gemm", "Einsum") and len(variable_inputs) > 1:
            return "smooth"
        if node.op_type == "Div" and not self.is_constant(node.input[1]):
            return "smooth"
        if node.op_type in _LINEAR_OPS:
            return "none"
        return "smooth"


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
