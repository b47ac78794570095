"""GlobalMaxPool written as `ReduceMax` over the spatial axes during normalisation.

onnx2torch has no GlobalMaxPool converter. `GlobalMaxPool(x)` for `x` of rank r is exactly
`ReduceMax(x, axes = 2 .. r-1, keepdims = 1)`, which converts (verifier's Reduce converter),
has a bound rule (monotone in its input: the interval image is the reduction of the ends) and
is the same kind of node for `verifier.graph` (a nonlinearity that is no activation site, as
GlobalMaxPool was). A node whose input rank the shapes do not give is left in place, for the
support check to list.
"""

from __future__ import annotations

import onnx

from verifier.convert.rewrite import STANDARD_DOMAINS, NodeWriter, constant_values, standard_opset


def lower_global_max_pools(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with every GlobalMaxPool of known input rank as a ReduceMax (the model
    itself when there is none)."""
    if not any(n.op_type == "GlobalMaxPool" and n.domain in STANDARD_DOMAINS for n in model.graph.node):
        return model
    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    graph = lowered.graph
    ranks = {vi.name: len(vi.type.tensor_type.shape.dim) for vi in [*graph.input, *graph.value_info]
             if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape")}
    constants, opset = constant_values(graph), standard_opset(lowered)
    nodes: list[onnx.NodeProto] = []
    for position, node in enumerate(graph.node):
        rank = ranks.get(node.input[0]) if node.op_type == "GlobalMaxPool" else None
        if node.domain not in STANDARD_DOMAINS or rank is None or rank < 3:
            nodes.append(node)
            continue
        writer = NodeWriter(f"verifier_gmp{position}", graph, constants, opset)
        writer.with_axes("ReduceMax", node.input[0], list(range(2, rank)), node.output[0], keepdims=1)
        nodes.extend(writer.nodes)
    del graph.node[:]
    graph.node.extend(nodes)
    return lowered
