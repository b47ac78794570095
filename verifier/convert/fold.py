"""Folding what onnxscript's optimizer leaves of a graph's shape arithmetic, by running it.

With every input size static (the batch fixed), a tensor's shape is a constant, and so is every
value computed only from shapes and constants (`Shape → Gather → Add/Div → Concat → Pad`,
`ConstantOfShape` of such a value, …). Some exports keep such chains after the optimizer
(opennsfw's torch export: 40 nodes of run-time padding arithmetic), and the bounds have no rule
for computing with shapes. Here onnxruntime evaluates the chains once — on two different inputs,
which must agree — and their results become initializers; the caller re-optimises the graph and
checks the freed-batch rewrite against the user's graph as before (`batch.make_batch_dynamic`).
"""

from __future__ import annotations

import onnx
from onnx import helper, numpy_helper

_STANDARD_DOMAINS = ("", "ai.onnx")
_SHAPE_READERS = frozenset({"Shape", "Size"})
# ops whose output may depend on the input's values even where their inputs are "static" here
_RANDOM = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                     "Bernoulli"})
_MAX_ELEMENTS = 1 << 24  # a frontier value larger than this is left to run time


def static_values_folded(model: onnx.ModelProto, input_name: str) -> onnx.ModelProto | None:
    """`model` with every value that depends on the input only through its shape replaced by an
    initializer; None when there is nothing to fold, a size of the input is not static, or the
    values could not be computed (or differed between two inputs)."""
    graph = model.graph
    value_info = next((vi for vi in graph.input if vi.name == input_name), None)
    if value_info is None:
        return None
    element = value_info.type.tensor_type
    sizes = [d.dim_value if d.HasField("dim_value") else 0 for d in element.shape.dim]
    if not sizes or any(s <= 0 for s in sizes):
        return None
    static = {t.name for t in graph.initializer}
    static_nodes = []
    for node in graph.node:  # the graph's nodes are in topological order (onnx.checker)
        inputs = [t for t in node.input if t]
        is_static = node.domain in _STANDARD_DOMAINS and node.op_type not in _RANDOM and (
            node.op_type in _SHAPE_READERS or all(t in static for t in inputs))
        if is_static and not _has_subgraph(node):
            static.update(t for t in node.output if t)
            static_nodes.append(node)
    if not any(n.op_type in _SHAPE_READERS for n in static_nodes):
        return None
    kept = [n for n in graph.node if n not in static_nodes]
    read = {t for n in kept for t in n.input if t} | {o.name for o in graph.output}
    produced = {t for n in static_nodes for t in n.output if t}
    frontier = sorted(produced & read)
    if not frontier:
        return None
    values = _evaluate(model, input_name, element.elem_type, sizes, frontier)
    if values is None or any(v.size > _MAX_ELEMENTS for v in values.values()):
        return None
    folded = onnx.ModelProto()
    folded.CopyFrom(model)
    del folded.graph.node[:]
    folded.graph.node.extend(kept)
    folded.graph.initializer.extend(numpy_helper.from_array(values[name], name) for name in frontier)
    return folded


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _evaluate(model: onnx.ModelProto, input_name: str, elem_type: int, sizes: list[int],
              names: list[str]) -> dict | None:
    """The values of `names` computed by onnxruntime on two inputs (zeros, then ones); None when it
    cannot run them or they differ (a value that reads the input's data is not static after all)."""
    try:
        import numpy as np
        import onnxruntime as ort
    except ImportError:
        return None
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in names)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    try:
        session = ort.InferenceSession(probe.SerializeToString(), options, providers=["CPUExecutionProvider"])
        first = session.run(names, {input_name: np.zeros(sizes, dtype)})
        second = session.run(names, {input_name: np.ones(sizes, dtype)})
    except Exception:  # noqa: BLE001 - onnxruntime raises its own exception types
        return None
    if any(a.shape != b.shape or not np.array_equal(a, b) for a, b in zip(first, second)):
        return None
    return {name: np.asarray(value) for name, value in zip(names, first)}
