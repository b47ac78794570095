"""Normalising an ONNX graph before onnx2torch sees it.

Real exports break onnx2torch in a handful of known ways (see docs/architecture.md). This pass:
1. keeps only the numeric output path: non-tensor outputs fed by a ZipMap are replaced by its
   float input, integer outputs (labels) are dropped, and the sub-graph is cut with
   `onnx.utils.Extractor`;
2. exposes the head's logits (`verifier.head`: the input of a final Softmax/LogSoftmax/Sigmoid,
   `[0, z]` for one binary logit, `log(max(p, floor))` for probabilities) as an extra output;
3. rewrites a Clip without any finite bound as Identity, a HardSigmoid outside a HardSwish as
   `Clip(alpha x + beta, 0, 1)` (`hard_sigmoid.py`) and the ai.onnx.ml linear models and
   normalisers as standard ops (`ml_ops.py`), LSTM/GRU/RNN unrolled for the static sequence
   length (`rnn.py`) and GlobalMaxPool as ReduceMax (`global_pool.py`), then folds constants
   and shape computations with `onnxscript.optimizer` (those that read a dynamic batch size at
   run time, with the batch fixed to 1 and then freed again as in 5.; a fold at batch 2 shows
   which shape entry carries the batch where it is not the first, as in (L, N*H, d) heads); what
   the optimizer leaves of that arithmetic with every size static is folded by running it in
   onnxruntime (`fold.py`: torch's F.pad pads, `Shape → Gather → Add → Pad` chains);
4. gives every node a safe unique name: the names become torch module names and attributes in
   generated code, so a keyword, builtin or attribute of a GraphModule (`class`, `None`, `self`,
   `to`, `training`, `graph`, …), a name starting with `_`, or one taken already becomes
   `n{position}_{name}`; other names stay as they are (dots written as `/`, as onnx2torch does).
   The map back to the names `inspect` shows is kept;
5. makes a fixed batch of the data input dynamic when that is checked to be batch-generic
   (`batch.py`; `NormalizedModel.batch` says which way was taken);
6. moves `Reshape` (any `allowzero`) and constant-parameter `Slice` (opset >= 10 form, with
   inputs) to verifier's own domain, whose converters bake their constants in at conversion
   time (vmap-friendly).
"""

from __future__ import annotations

import builtins
import keyword
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from functools import cache

import onnx
import onnxscript
import torch
from torch import fx

from verifier.convert.batch import BatchAxis, batch_entries, make_batch_dynamic, reads_shapes, with_batch_fixed
from verifier.convert.fold import static_values_folded
from verifier.convert.global_pool import lower_global_max_pools
from verifier.convert.hard_sigmoid import lower_hard_sigmoids
from verifier.convert.ml_ops import lower_ml_ops
from verifier.convert.rnn import lower_rnns
from verifier.deadline import reraise_signal
from verifier.errors import UnsupportedOpsError
from verifier.graph import OperatorGraph, node_keys
from verifier.patterns import find_decomposed
from verifier.head import Head, choose_head, numeric_outputs
from verifier.head_logits import attach_logits

VERIFIER_DOMAIN = "verifier"
_NAME_PART_LENGTH = 40
_UNSAFE = re.compile(r"[^0-9A-Za-z_]")
_GENERATED = re.compile(r"n\d+_")
_BREAKS_CODEGEN = re.compile(r"[^\x21-\x7e]|[\"'\\`]")  # whitespace, quotes, backslashes, non-ASCII
# Names of fx's generated code and of the module onnx2torch builds, besides keywords and builtins.
_CODEGEN_NAMES = frozenset({"self", "torch", "device", "inf", "nan", "NoneType", "fx_pytree", "pytree", "math",
                            "operator", "initializers"})
_STANDARD_DOMAINS = ("", "ai.onnx")


@dataclass(frozen=True, eq=False)
class NormalizedModel:
    """The rewritten proto, its output names, which output holds the logits (and the head they
    come from), and for each node name of the proto the name the user's model gives that node."""

    proto: onnx.ModelProto
    input_name: str
    output_names: tuple[str, ...]
    logits_index: int
    original_names: dict[str, str] = field(default_factory=dict)
    head: Head | None = None
    batch: BatchAxis = BatchAxis()

    def original_name(self, name: str) -> str:
        """The user's name for a node of the normalised proto (itself if the node is new)."""
        return self.original_names.get(name, name)


def normalize_model(model: onnx.ModelProto, output: str | None = None) -> NormalizedModel:
    """Rewrite a checked model into the form verifier's onnx2torch converters accept; `output`
    names the head (`--output`), None: `verifier.head.choose_head`'s default."""
    graph = OperatorGraph(model)
    if len(graph.inputs) != 1:
        raise UnsupportedOpsError("conversion", [("<graph>", "inputs", f"{len(graph.inputs)} data inputs")])
    if not numeric_outputs(graph):
        raise UnsupportedOpsError("conversion", [("<graph>", "outputs", "no floating-point output to analyse")])
    head = choose_head(graph, output)
    logits = head.logits
    outputs = numeric_outputs(graph)
    if logits not in outputs:
        outputs.append(logits)
    named = onnx.ModelProto()
    named.CopyFrom(model)
    for key, node in zip(graph.nodes, named.graph.node):  # the keys inspect shows, for every node
        node.name = key
    _drop_identity_clips(named, graph)
    lower_hard_sigmoids(named, keep={key for match in find_decomposed(graph, graph.topological_order())
                                     for key in match.nodes})
    named = lower_global_max_pools(lower_rnns(attach_logits(named, head)))
    extracted = lower_ml_ops(onnx.utils.Extractor(named).extract_model(list(graph.inputs), outputs))
    optimized = onnxscript.optimizer.optimize(extracted)
    constants = {t.name for t in optimized.graph.initializer}
    input_name = next(vi.name for vi in optimized.graph.input if vi.name not in constants)
    optimized, batch = _shapes_folded(optimized, extracted, input_name) or make_batch_dynamic(
        _static_shapes_folded(optimized, input_name), extracted, input_name)
    original_names = _rename_nodes(optimized.graph)
    _move_to_own_domain(optimized)
    names = tuple(o.name for o in optimized.graph.output)
    return NormalizedModel(
        proto=optimized,
        input_name=input_name,
        output_names=names,
        logits_index=names.index(logits),
        head=head,
        original_names=original_names,
        batch=batch,
    )


def _shapes_folded(optimized: onnx.ModelProto, extracted: onnx.ModelProto,
                   input_name: str) -> tuple[onnx.ModelProto, BatchAxis] | None:
    """The graph with its run-time shape computations folded, the batch still dynamic: folded with
    the batch fixed to 1, then freed and checked in onnxruntime (the bounds have no rule for
    computing with shapes). None when nothing is left to fold or the freed graph fails its check."""
    if not reads_shapes(optimized) or (fixed := with_batch_fixed(extracted, input_name)) is None:
        return None
    at_one = _static_shapes_folded(onnxscript.optimizer.optimize(fixed), input_name)
    # a batch folded into another axis ((L, N*H, d) heads) shows as the entry that doubles at batch 2
    at_two = with_batch_fixed(extracted, input_name, 2)
    try:
        entries = batch_entries(at_one, _static_shapes_folded(onnxscript.optimizer.optimize(at_two), input_name)
                                ) if at_two is not None else {}
    except Exception as err:  # noqa: BLE001 - the optimizer's many failure types: fold as at batch 1 only
        reraise_signal(err)
        entries = {}
    folded, axis = make_batch_dynamic(at_one, fixed, input_name, entries)
    if not axis.rewritten or reads_shapes(folded):
        return None
    return folded, BatchAxis()


def _static_shapes_folded(model: onnx.ModelProto, input_name: str) -> onnx.ModelProto:
    """A graph with static sizes whose shape arithmetic the optimizer left, folded by running it
    (`verifier.convert.fold`) and optimised again; else the graph itself."""
    if not reads_shapes(model):
        return model
    folded = static_values_folded(model, input_name)
    return model if folded is None else onnxscript.optimizer.optimize(folded)


def _drop_identity_clips(model: onnx.ModelProto, graph: OperatorGraph) -> None:
    """Clip with no finite bound is the identity: write it as one (it is no activation site)."""
    for key, node in zip(graph.nodes, model.graph.node):
        original = graph.nodes[key]
        if original.op_type == "Clip" and original.domain in _STANDARD_DOMAINS and graph.is_identity_clip(original):
            node.op_type, node.domain = "Identity", ""
            del node.input[1:]
            del node.attribute[:]


@cache
def _reserved_names() -> frozenset[str]:
    """Words a node name must not be: keywords, builtins, a GraphModule's attributes, codegen names."""
    module = fx.GraphModule(torch.nn.Module(), fx.Graph())
    return frozenset({*keyword.kwlist, *keyword.softkwlist, *dir(builtins), *dir(module), *_CODEGEN_NAMES})


def safe_node_name(position: int, name: str, taken: Collection[str] = frozenset()) -> str:
    """`name` (dots as `/`) when it is safe as a torch module name and not taken, else
    `n{position}_{name with every non [0-9A-Za-z_] character as _}`, the name part cut short."""
    kept = name.replace(".", "/")
    unsafe = (not kept or kept.startswith("_") or kept in _reserved_names() or kept in taken
              or _GENERATED.match(kept) is not None or _BREAKS_CODEGEN.search(kept) is not None)
    return f"n{position}_{_UNSAFE.sub('_', name)[:_NAME_PART_LENGTH]}" if unsafe else kept


def _rename_nodes(graph: onnx.GraphProto) -> dict[str, str]:
    """Give every node a safe unique name; return safe name -> the name it had."""
    original: dict[str, str] = {}
    for position, (key, node) in enumerate(zip(node_keys(graph.node), graph.node)):
        name = safe_node_name(position, key, original.keys())
        original[name] = key
        node.name = name
    return original


def _move_to_own_domain(model: onnx.ModelProto) -> None:
    constants = {t.name for t in model.graph.initializer}
    moved = False
    for node in model.graph.node:
        if node.domain not in _STANDARD_DOMAINS:
            continue
        if node.op_type == "Reshape" or (
            node.op_type == "Slice" and len(node.input) >= 3 and all(t in constants for t in node.input[1:] if t)
        ):
            node.domain = VERIFIER_DOMAIN
            moved = True
    if moved and all(o.domain != VERIFIER_DOMAIN for o in model.opset_import):
        model.opset_import.append(onnx.helper.make_opsetid(VERIFIER_DOMAIN, 1))
