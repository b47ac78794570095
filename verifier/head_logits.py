"""The ONNX nodes that turn a classifier head's values into logits (`verifier.head` chooses the head).

`attach_logits` appends them to a copy of the model, so that the converted module and the
onnxruntime oracle compute the same tensor: `[0, z]` for a binary logit, `log(max(p, floor))` for
probabilities, the raw scores (or their log-sigmoids) of an `ai.onnx.ml.LinearClassifier`.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from verifier.graph import OperatorGraph
from verifier.head import (LOGITS_NAME, ML_DOMAIN, PROBABILITY_FLOOR, STANDARD_DOMAINS, Head, attribute_text,
                           is_binary_classifier)

_CLIP_BOUNDS_AS_INPUTS = 11  # Clip-11 takes min/max as inputs (attributes before)


def attach_logits(model: onnx.ModelProto, head: Head) -> onnx.ModelProto:
    """A copy of `model` that also outputs `head.logits` (nodes appended for binary and
    probability heads; the model itself is returned when the head already is logits)."""
    if head.kind == "logits":
        return model
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    graph = copy.graph
    elem = _elem_type(copy, head.tensor)
    dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
    make = onnx.helper.make_node

    def name(suffix: str) -> str:
        return f"{LOGITS_NAME}_{suffix}"

    if head.kind == "scores":
        raw, binary = _raw_scores(graph, head.tensor, name)
        if binary:  # a binary model's raw scores are [1 - s, s] or [-s, s]: s is column 1
            graph.initializer.append(numpy_helper.from_array(np.array([1], dtype=np.int64), name("positive")))
            graph.node.append(make("Gather", [raw, name("positive")], [name("positive_score")], axis=1,
                                   name=name("positive_score")))
            _binary_logits(graph, name("positive_score"), dtype, name)
            width = 2
        elif _classifier_post(graph, head.tensor) == "LOGISTIC":  # log sigmoid(s) = -softplus(-s)
            graph.node.extend([make("Neg", [raw], [name("negated")], name=name("negated")),
                               make("Softplus", [name("negated")], [name("softplus")], name=name("softplus")),
                               make("Neg", [name("softplus")], [LOGITS_NAME], name=LOGITS_NAME)])
            width = _width(OperatorGraph(model).shape(head.tensor))
        else:
            graph.node.append(make("Identity", [raw], [LOGITS_NAME], name=LOGITS_NAME))
            width = _width(OperatorGraph(model).shape(head.tensor))
    elif head.kind == "binary":
        _binary_logits(graph, head.tensor, dtype, name)
        width = 2
    else:
        opset = next((o.version for o in copy.opset_import if o.domain in STANDARD_DOMAINS), 0)
        lowest = max(PROBABILITY_FLOOR, float(np.finfo(dtype).tiny))  # float16 cannot hold 1e-12
        if opset >= _CLIP_BOUNDS_AS_INPUTS:  # Clip, not Max: a clip is an activation site with bound rules
            graph.initializer.append(numpy_helper.from_array(np.array(lowest, dtype=dtype), name("floor")))
            floor = make("Clip", [head.tensor, name("floor")], [name("floored")], name=name("floored"))
        else:
            floor = make("Clip", [head.tensor], [name("floored")], min=lowest, name=name("floored"))
        graph.node.extend([floor, make("Log", [name("floored")], [LOGITS_NAME], name=LOGITS_NAME)])
        width = _width(OperatorGraph(model).shape(head.tensor))
    graph.output.append(onnx.helper.make_tensor_value_info(LOGITS_NAME, elem, [None, width]))
    return copy


def _width(shape: tuple | None) -> int | None:
    return shape[-1] if shape and isinstance(shape[-1], int) else None


def _binary_logits(graph: onnx.GraphProto, logit: str, dtype: np.dtype, name) -> None:
    """Append `[0, z]` of one logit z as LOGITS_NAME."""
    make = onnx.helper.make_node
    graph.initializer.extend([numpy_helper.from_array(np.array([-1, 1], dtype=np.int64), name("shape")),
                              numpy_helper.from_array(np.zeros((), dtype=dtype), name("zero"))])
    graph.node.extend([
        make("Reshape", [logit, name("shape")], [name("column")], name=name("column")),
        make("Mul", [name("column"), name("zero")], [name("zeros")], name=name("zeros")),
        make("Concat", [name("zeros"), name("column")], [LOGITS_NAME], axis=1, name=LOGITS_NAME),
    ])


def _classifier_post(graph: onnx.GraphProto, scores: str) -> str:
    classifier = next(n for n in graph.node if n.domain == ML_DOMAIN and len(n.output) > 1 and n.output[1] == scores)
    return attribute_text(classifier, "post_transform", "NONE")


def _raw_scores(graph: onnx.GraphProto, scores: str, name) -> tuple[str, bool]:
    """Append a copy of the LinearClassifier that makes `scores`, with post_transform NONE;
    returns its scores tensor and whether the model is binary (one coefficient row)."""
    classifier = next(n for n in graph.node if n.domain == ML_DOMAIN and len(n.output) > 1 and n.output[1] == scores)
    clone = onnx.NodeProto()
    clone.CopyFrom(classifier)
    clone.name = name("raw_scores")
    del clone.output[:]
    clone.output.extend([name("label"), name("raw_scores")])
    for attribute in clone.attribute:
        if attribute.name == "post_transform":
            attribute.s = b"NONE"
    graph.node.append(clone)
    return name("raw_scores"), is_binary_classifier(classifier)


def _elem_type(model: onnx.ModelProto, tensor: str) -> int:
    graph = model.graph
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        if vi.name == tensor and vi.type.HasField("tensor_type") and vi.type.tensor_type.elem_type:
            return vi.type.tensor_type.elem_type
    return onnx.TensorProto.FLOAT
