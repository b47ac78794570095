"""HardSigmoid outside a HardSwish, rewritten as `Clip(alpha * x + beta, 0, 1)` during normalisation.

`HardSigmoid(x) = max(0, min(1, alpha x + beta))` (ONNX defaults alpha = 0.2, beta = 0.5) is an
affine map followed by a Clip, so written that way it gets the Clip activation site's bound rule,
relaxation and cells instead of no bound rule at all. A HardSigmoid inside a decomposed activation
that `verifier.patterns` recognises (HardSwish, `x * HardSigmoid(x)` with alpha = 1/6) is left
alone: that activation has its own, tighter relaxation.
"""

from __future__ import annotations

from collections.abc import Collection

import numpy as np
import onnx
from onnx import helper, numpy_helper

_STANDARD_DOMAINS = ("", "ai.onnx")


def lower_hard_sigmoids(model: onnx.ModelProto, keep: Collection[str] = ()) -> None:
    """Rewrite, in place, every HardSigmoid whose node name is not in `keep` (the pattern-covered ones)."""
    graph = model.graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*graph.input, *graph.value_info, *graph.output]}
    opset = next((o.version for o in model.opset_import if o.domain in _STANDARD_DOMAINS), 1)
    rewritten: list[onnx.NodeProto] = []
    for node in graph.node:
        if node.op_type != "HardSigmoid" or node.domain not in _STANDARD_DOMAINS or node.name in keep:
            rewritten.append(node)
            continue
        rewritten += _as_clip(graph, node, types.get(node.input[0], onnx.TensorProto.FLOAT), opset)
    del graph.node[:]
    graph.node.extend(rewritten)


def _as_clip(graph: onnx.GraphProto, node: onnx.NodeProto, elem_type: int, opset: int) -> list[onnx.NodeProto]:
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    dtype = helper.tensor_dtype_to_np_dtype(elem_type)
    prefix = f"{node.output[0]}/hard_sigmoid"
    values = {"alpha": attributes.get("alpha", 0.2), "beta": attributes.get("beta", 0.5), "zero": 0.0, "one": 1.0}
    for name, value in values.items():
        graph.initializer.append(numpy_helper.from_array(np.array(value, dtype=dtype), f"{prefix}/{name}"))
    scaled, shifted = f"{prefix}/scaled", f"{prefix}/shifted"
    name = node.name or node.output[0]
    nodes = [helper.make_node("Mul", [node.input[0], f"{prefix}/alpha"], [scaled], name=f"{name}/scale"),
             helper.make_node("Add", [scaled, f"{prefix}/beta"], [shifted], name=f"{name}/shift")]
    if opset >= 11:
        nodes.append(helper.make_node("Clip", [shifted, f"{prefix}/zero", f"{prefix}/one"], list(node.output),
                                      name=f"{name}/clip"))
    else:  # Clip took its bounds as attributes before opset 11
        nodes.append(helper.make_node("Clip", [shifted], list(node.output), name=f"{name}/clip", min=0.0, max=1.0))
    return nodes
