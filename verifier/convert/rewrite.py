"""A small writer for the standard-op replacement of one ONNX node (shared by the lowering passes).

`ml_ops.py` (ai.onnx.ml linear models) and `rnn.py` (LSTM/GRU/RNN unrolled) replace a node by
a few standard ops during normalisation; `NodeWriter` gives them fresh tensor names under one
prefix, constants as initializers, and the opset-dependent forms of the ops whose operands
moved from attributes to inputs (Unsqueeze-13, Reduce*-18).
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

STANDARD_DOMAINS = ("", "ai.onnx")
_AXES_AS_INPUT = {"Unsqueeze": 13, "Squeeze": 13, "ReduceSum": 13}
_REDUCE_AXES_AS_INPUT = 18  # the other Reduce* take axes as an input from opset 18


def standard_opset(model: onnx.ModelProto) -> int:
    """The model's default-domain opset (0 when it imports none)."""
    return next((o.version for o in model.opset_import if o.domain in STANDARD_DOMAINS), 0)


def constant_values(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Initializers and the outputs of `Constant` nodes with a tensor (or integer-list) value, as arrays."""
    values = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant" and node.domain in STANDARD_DOMAINS:
            for attribute in node.attribute:
                if attribute.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attribute.t)
                elif attribute.name == "value_ints":
                    values[node.output[0]] = np.asarray(attribute.ints, dtype=np.int64)
    return values


class NodeWriter:
    """Writes replacement nodes under `prefix`: fresh names, constants, opset-aware axes."""

    def __init__(self, prefix: str, graph: onnx.GraphProto, constants: dict[str, np.ndarray], opset: int) -> None:
        self.prefix, self.graph, self.constants, self.opset = prefix, graph, constants, opset
        self.nodes: list[onnx.NodeProto] = []
        self._count = 0

    def constant(self, suffix: str, value: np.ndarray) -> str:
        """A fresh initializer `{prefix}_{suffix}{n}` holding `value`; returns its name."""
        name = f"{self.prefix}_{suffix}{self._count}"
        self._count += 1
        self.graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
        self.constants[name] = np.asarray(value)
        return name

    def add(self, op_type: str, inputs: list[str], output: str | None = None, **attributes) -> str:
        """Append one node; returns its (fresh unless given) output name."""
        output = output or f"{self.prefix}_{op_type}{self._count}"
        self._count += 1
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attributes))
        return output

    def with_axes(self, op_type: str, data: str, axes: list[int], output: str | None = None, **attributes) -> str:
        """Unsqueeze/Squeeze/Reduce* over `axes`, as an input or an attribute as the opset wants."""
        since = _AXES_AS_INPUT.get(op_type, _REDUCE_AXES_AS_INPUT)
        if self.opset >= since:
            axes_name = self.constant("axes", np.asarray(axes, dtype=np.int64))
            return self.add(op_type, [data, axes_name], output, **attributes)
        return self.add(op_type, [data], output, axes=axes, **attributes)
