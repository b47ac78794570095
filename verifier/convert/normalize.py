"""Normalising an ONNX graph before onnx2torch sees it.

Real exports break onnx2torch in a handful of known ways (see docs/architecture.md). This pass:
1. keeps only the numeric output path: non-tensor outputs fed by a ZipMap are replaced by its
   float input, integer outputs (labels) are dropped, and the sub-graph is cut with
   `onnx.utils.Extractor`;
2. exposes the logits as an extra output when the primary output comes from Softmax/LogSoftmax;
3. folds constants and shape computations with `onnxscript.optimizer`;
4. names every node uniquely (the names become torch module names, used to hook sites);
5. moves `Reshape` (any `allowzero`) and constant-parameter `Slice` to verifier's own domain,
   whose converters bake their constants in at conversion time (vmap-friendly).
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx
import onnxscript

from verifier.errors import UnsupportedOpsError
from verifier.graph import OperatorGraph

VERIFIER_DOMAIN = "verifier"


@dataclass(frozen=True, eq=False)
class NormalizedModel:
    """The rewritten proto, its output names, and which output holds the logits."""

    proto: onnx.ModelProto
    input_name: str
    output_names: tuple[str, ...]
    logits_index: int


def normalize_model(model: onnx.ModelProto) -> NormalizedModel:
    """Rewrite a checked model into the form verifier's onnx2torch converters accept."""
    graph = OperatorGraph(model)
    if len(graph.inputs) != 1:
        raise UnsupportedOpsError("conversion", [("<graph>", "inputs", f"{len(graph.inputs)} data inputs")])
    outputs = graph.numeric_outputs()
    logits = graph.logits_tensor()
    if logits is None:
        raise UnsupportedOpsError("conversion", [("<graph>", "outputs", "no floating-point output to analyse")])
    if logits not in outputs:
        outputs.append(logits)
    extracted = onnx.utils.Extractor(model).extract_model(list(graph.inputs), outputs)
    optimized = onnxscript.optimizer.optimize(extracted)
    _rename_nodes(optimized.graph)
    _move_to_own_domain(optimized)
    names = tuple(o.name for o in optimized.graph.output)
    return NormalizedModel(
        proto=optimized,
        input_name=graph.inputs[0],
        output_names=names,
        logits_index=names.index(logits),
    )


def _rename_nodes(graph: onnx.GraphProto) -> None:
    taken: set[str] = set()
    for position, node in enumerate(graph.node):
        base = (node.name or f"{node.op_type}_{position}").replace(".", "/")
        name, suffix = base, 1
        while name in taken:
            name, suffix = f"{base}_{suffix}", suffix + 1
        node.name = name
        taken.add(name)


def _move_to_own_domain(model: onnx.ModelProto) -> None:
    constants = {t.name for t in model.graph.initializer}
    moved = False
    for node in model.graph.node:
        if node.domain not in ("", "ai.onnx"):
            continue
        if node.op_type == "Reshape" or (
            node.op_type == "Slice" and all(t in constants for t in node.input[1:] if t)
        ):
            node.domain = VERIFIER_DOMAIN
            moved = True
    if moved and all(o.domain != VERIFIER_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(VERIFIER_DOMAIN, 1))

