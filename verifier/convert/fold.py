"""Folding what onnxscript's optimizer leaves of a graph's shape arithmetic, by running it.

With every input size static (the batch fixed), a tensor's shape is a constant, and so is every
value computed only from shapes and constants (`Shape → Gather → Add/Div → Concat → Pad`,
`ConstantOfShape` of such a value, …). Some exports keep such chains after the optimizer
(opennsfw's torch export: 40 nodes of run-time padding arithmetic), and the bounds have no rule
for computing with shapes. Here onnxruntime evaluates the chains — on three probe inputs, which
must agree — and their results become initializers, kept only if the folded graph computes
the same outputs as the unfolded one on those inputs. A chain is folded only where every tensor a
Shape reads has a shape set by the input's sizes alone (no NonZero, control flow or custom op on
its way, no Reshape to a shape computed from data), so the values cannot change with the data.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from verifier.convert.batch import SHAPE_READERS
from verifier.convert.rewrite import STANDARD_DOMAINS
from verifier.deadline import reraise_signal

# ops whose output may depend on the input's values even where their inputs are "static" here
_RANDOM = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                     "Bernoulli"})
_MAX_ELEMENTS = 1 << 24  # a frontier value larger than this is left to run time
# ops whose output shape depends on their inputs' values: the input itself (NonZero, control flow), or
# the inputs at these positions (a shape, pads, repeats, axes, k, ...), which must then be static
_DATA_SHAPED = frozenset({"NonZero", "Unique", "Compress", "If", "Loop", "Scan", "SequenceAt", "SplitToSequence",
                          "ConcatFromSequence", "StringSplit", "RegexFullMatch"})
_SHAPE_PARAMETERS = {"Reshape": (1,), "Expand": (1,), "Tile": (1,), "Slice": (1, 2, 3, 4), "Pad": (1, 2, 3),
                     "ConstantOfShape": (0,), "Range": (0, 1, 2), "OneHot": (1,), "Resize": (1, 2, 3),
                     "Upsample": (1,), "TopK": (1,), "Squeeze": (1,), "Unsqueeze": (1,), "Split": (1,),
                     "ReduceSum": (1,), "ReduceMean": (1,), "ReduceMax": (1,), "ReduceMin": (1,),
                     "ReduceProd": (1,), "ReduceL1": (1,), "ReduceL2": (1,), "ReduceLogSum": (1,),
                     "ReduceLogSumExp": (1,), "ReduceSumSquare": (1,), "CenterCropPad": (1,), "Col2Im": (1, 2),
                     "MaxUnpool": (2,), "DFT": (1,), "STFT": (2, 3)}


def static_values_folded(model: onnx.ModelProto, input_name: str) -> onnx.ModelProto | None:
    """`model` with every value that depends on the input only through its shape replaced by an
    initializer; None when there is nothing to fold, a size of the input is not static, or the
    values could not be computed (or differed between the probe inputs, or the folded graph's outputs did)."""
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
        is_static = node.domain in STANDARD_DOMAINS and node.op_type not in _RANDOM and (
            node.op_type in SHAPE_READERS or all(t in static for t in inputs))
        if is_static and not _has_subgraph(node):
            static.update(t for t in node.output if t)
            static_nodes.append(node)
    if not any(n.op_type in SHAPE_READERS for n in static_nodes):
        return None
    if not _shapes_follow_sizes(graph, input_name, static):
        return None
    folded_ids = {id(n) for n in static_nodes}
    kept = [n for n in graph.node if id(n) not in folded_ids]
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
    return folded if _same_outputs(model, folded, input_name, element.elem_type, sizes) else None


def _shapes_follow_sizes(graph: onnx.GraphProto, input_name: str, static: set[str]) -> bool:
    """Whether every tensor a Shape/Size reads has a shape fixed by the input's sizes alone: on its
    way from the input no op shapes its output by the values it reads (NonZero, control flow, a
    custom op) or by a parameter input that is not static (a Reshape to a shape computed from data).
    Otherwise a value folded on one input would be wrong on another."""
    sized = {input_name} | static  # tensors whose shape does not depend on the input's values
    for node in graph.node:
        parameters = _SHAPE_PARAMETERS.get(node.op_type, ())
        follows = (node.domain in STANDARD_DOMAINS and node.op_type not in _DATA_SHAPED
                   and not _has_subgraph(node)
                   and all(t in sized for t in node.input if t)
                   and all(node.input[i] in static for i in parameters if i < len(node.input) and node.input[i]))
        if node.op_type in SHAPE_READERS and node.domain in STANDARD_DOMAINS and node.input[0] not in sized:
            return False
        if follows:
            sized.update(t for t in node.output if t)
    return True


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _evaluate(model: onnx.ModelProto, input_name: str, elem_type: int, sizes: list[int],
              names: list[str]) -> dict | None:
    """The values of `names` computed by onnxruntime on three inputs (zeros, ones, uniform noise);
    None when it cannot run them or they differ (a value that reads the input's data is not static)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    probe.graph.output.extend(helper.make_empty_tensor_value_info(name) for name in names)
    try:
        session = _session(probe, optimised=False)
        runs = [session.run(names, {input_name: x}) for x in _probes(sizes, elem_type)]
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
        reraise_signal(err)
        return None
    first = runs[0]
    if any(a.shape != b.shape or not np.array_equal(a, b) for other in runs[1:] for a, b in zip(first, other)):
        return None
    return {name: np.asarray(value) for name, value in zip(names, first)}


def _probes(sizes: list[int], elem_type: int) -> list[np.ndarray]:
    """The inputs every fold is computed and checked on: zeros, ones and uniform noise."""
    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    noise = np.random.default_rng(0).uniform(-1.0, 1.0, sizes) * 3.7
    return [np.zeros(sizes, dtype), np.ones(sizes, dtype), noise.astype(dtype)]


def _session(model: onnx.ModelProto, optimised: bool = True):
    """A quiet CPU onnxruntime session (`optimised=False`: no graph rewrites, e.g. for a probe that
    reads intermediate values)."""
    import onnxruntime as ort  # here: a refusal before conversion never imports it

    options = ort.SessionOptions()
    options.log_severity_level = 4
    if not optimised:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _same_outputs(model: onnx.ModelProto, folded: onnx.ModelProto, input_name: str, elem_type: int,
                  sizes: list[int]) -> bool:
    """The folded graph computes the user's outputs on the probe inputs (to float rounding)."""
    names = [o.name for o in model.graph.output]
    try:
        sessions = [_session(m) for m in (model, folded)]
        for x in _probes(sizes, elem_type):
            want, got = (session.run(names, {input_name: x}) for session in sessions)
            for a, b in zip(want, got):
                a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
                if a.shape != b.shape or not np.allclose(a, b, rtol=1e-5, atol=1e-6, equal_nan=True):
                    return False
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
        reraise_signal(err)
        return False
    return True
