"""ONNX -> torch.fx conversion with onnx2torch, plus hooks on every activation site.

`convert_model` normalises the graph (`normalize.py`), checks that every node has a converter
(listing *all* offenders before any work), converts with onnx2torch (own converters in
`converters.py`), and returns a `ConvertedModel`: the eval-mode `GraphModule`, which output is
the logits, and the activation sites of the normalised graph mapped to fx nodes so that later
stages can read pre-activation values and activation patterns (`probe_module`).

Node names of the normalised graph are safe torch module names (an unsafe one, such as `class`
or `to`, becomes `n{position}_{name}`, see `normalize.py`); `node_names` maps them back to the
names the user's model (and `verifier inspect`) gives, and messages use those.
"""

from __future__ import annotations

import copy

import operator
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property

import onnx
import torch
from torch import fx

from verifier.convert import converters  # noqa: F401  (registers verifier's converters)
from verifier.convert.compat import import_onnx2torch
from verifier.convert.batch import BatchAxis, pad_rows
from verifier.convert.ml_ops import ML_DOMAIN, refusal_reason
from verifier.convert.normalize import NormalizedModel, normalize_model
from verifier.deadline import reraise_signal
from verifier.errors import ConversionError, UnsupportedOpsError
from verifier.graph import PIECEWISE_LINEAR_KINDS, ActivationSite, OperatorGraph
from verifier.head import Head
from verifier.onnx_io import LoadedModel, TensorSpec

onnx2torch = import_onnx2torch()
from onnx2torch.node_converters.registry import get_converter  # noqa: E402
from onnx2torch.onnx_graph import OnnxGraph  # noqa: E402


_TORCH_DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
                 "bfloat16": torch.bfloat16}


@dataclass(frozen=True, eq=False)
class ConvertedModel:
    """A torch view of an ONNX model: outputs, logits, and hookable activation sites."""

    module: fx.GraphModule = field(repr=False)
    input_spec: TensorSpec
    output_names: tuple[str, ...]
    logits_index: int
    sites: tuple[ActivationSite, ...]  # every site; `logit_sites` are those the logits depend on
    normalized: onnx.ModelProto = field(repr=False)
    tensor_nodes: dict[str, str] = field(repr=False)
    logit_sites: tuple[ActivationSite, ...] = ()
    node_names: dict[str, str] = field(default_factory=dict, repr=False)  # normalised key -> user's name
    uncovered_nonlinear: tuple[str, ...] = ()  # nonlinear nodes before the logits that are no site
    head: Head | None = None  # which output the logits come from, and how (verifier.head)
    batch: BatchAxis = BatchAxis()  # the file's fixed batch, and whether the module takes any batch

    @property
    def module_batch(self) -> int | None:
        """The batch the torch module needs per pass (None: any; a fixed batch that was not
        rewritten to a dynamic one, see `verifier.convert.batch`)."""
        return self.batch.module_batch

    @property
    def input_dtype(self) -> torch.dtype:
        """The torch dtype of the model's data input (float32 when the file says nothing usable)."""
        return _TORCH_DTYPES.get(self.input_spec.dtype, torch.float32)

    @property
    def piecewise_linear(self) -> bool:
        """Every nonlinearity the logits depend on is a piecewise-linear activation site: the
        model is affine on each activation cell (what `verifier.cells` relies on)."""
        return not self.uncovered_nonlinear and all(s.kind in PIECEWISE_LINEAR_KINDS for s in self.logit_sites)

    def display_name(self, key: str) -> str:
        """The user's name (as `inspect` shows it) of a node key of the normalised graph."""
        return self.node_names.get(key, key)

    def outputs(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """All normalised outputs (original float outputs, then the logits if they were exposed)."""
        result = self.module(x)
        return tuple(result) if isinstance(result, (tuple, list)) else (result,)

    @cached_property
    def logits_module(self) -> fx.GraphModule:
        """A GraphModule computing only the logits from the input."""
        return self._rewired(lambda nodes: nodes[self.output_names[self.logits_index]])

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch."""
        return self.logits_module(x)

    def probe_module(self, sites: Sequence[int] | None = None) -> fx.GraphModule:
        """A GraphModule returning `(logits, {site index: (pre-activation, post-activation)})`."""
        chosen = [s for s in self.sites if sites is None or s.index in set(sites)]

        def outputs(nodes: dict[str, fx.Node]):
            probes = {site.index: (nodes[site.input], nodes[site.output]) for site in chosen}
            return (nodes[self.output_names[self.logits_index]], probes)

        return self._rewired(outputs)

    def _rewired(self, choose) -> fx.GraphModule:
        graph = fx.Graph()
        value_map: dict[fx.Node, fx.Node] = {}
        graph.graph_copy(self.module.graph, value_map)
        by_name = {node.name: node for node in graph.nodes}
        nodes = {tensor: by_name[name] for tensor, name in self.tensor_nodes.items() if name in by_name}
        missing = _multi_output_getitems(self, graph, by_name)
        nodes.update(missing)
        graph.output(choose(nodes))
        # Own copies of the weights: moving a probe to another dtype/device must not change the model.
        module = fx.GraphModule(copy.deepcopy(self.module), graph)
        module.graph.eliminate_dead_code()
        module.recompile()
        return module.eval()


def _multi_output_getitems(model: ConvertedModel, graph: fx.Graph, by_name: dict[str, fx.Node]) -> dict:
    """getitem nodes for outputs of multi-output ops that the original graph never indexed."""
    added: dict[str, fx.Node] = {}
    for tensor, name in model.tensor_nodes.items():
        if name.startswith("__multi__:"):
            _, owner, index = name.split(":")
            with graph.inserting_after(by_name[owner]):
                added[tensor] = graph.call_function(operator.getitem, (by_name[owner], int(index)))
    return added


def convert_model(model: LoadedModel, output: str | None = None) -> ConvertedModel:
    """Convert a loaded model to a `ConvertedModel` (eval mode), or explain every blocking node.
    `output` names the graph output that is the classifier head (None: `choose_head`'s default)."""
    normalized = normalize_model(model.proto, output)
    onnx_graph = OnnxGraph(normalized.proto.graph)
    _check_supported(normalized, onnx_graph)
    try:
        module = onnx2torch.convert(normalized.proto)
    except Exception as err:  # noqa: BLE001 - onnx2torch raises bare exceptions of many kinds
        detail = " ".join(str(err).split())[:300]
        raise ConversionError(f"onnx2torch failed: {type(err).__name__}: {detail}") from err
    module.eval()
    tensor_nodes = _tensor_to_fx(normalized, onnx_graph, module)
    graph = OperatorGraph(normalized.proto)
    sites = graph.find_activations()
    logits = normalized.output_names[normalized.logits_index]
    upstream = graph.ancestors_of_tensors([logits])
    return ConvertedModel(
        module=module,
        input_spec=model.info.data_input,
        output_names=normalized.output_names,
        logits_index=normalized.logits_index,
        sites=tuple(sites),
        normalized=normalized.proto,
        tensor_nodes=tensor_nodes,
        logit_sites=tuple(site for site in sites if set(site.nodes) & upstream),
        node_names=dict(normalized.original_names),
        uncovered_nonlinear=tuple(graph.uncovered_nonlinear(sites, logits)),
        head=normalized.head,
        batch=normalized.batch,
    )


def unsupported_nodes(model: LoadedModel, output: str | None = None) -> UnsupportedOpsError | None:
    """The error `convert_model` would raise for unsupported ops (every offending node), or None."""
    return conversion_check(model, output)[1]


def conversion_check(model: LoadedModel,
                     output: str | None = None) -> tuple[NormalizedModel | None, UnsupportedOpsError | None]:
    """The normalised graph (None when normalising is refused) and the error `convert_model`
    would raise for unsupported ops (every offending node), or None."""
    try:
        normalized = normalize_model(model.proto, output)
    except UnsupportedOpsError as err:
        return None, err
    try:
        _check_supported(normalized, OnnxGraph(normalized.proto.graph))
    except UnsupportedOpsError as err:
        return normalized, err
    return normalized, None


def _check_supported(normalized: NormalizedModel, onnx_graph: OnnxGraph) -> None:
    opsets = {o.domain: o.version for o in normalized.proto.opset_import}
    problems: list[tuple[str, str, str]] = []
    for node in onnx_graph.nodes.values():
        name = normalized.original_name(node.name)
        domain = node.domain
        label = node.operation_type if domain in ("", "ai.onnx") else f"{domain}.{node.operation_type}"
        try:
            converter = get_converter(
                domain=domain, operation_type=node.operation_type, version=opsets.get(domain, 1)
            )
            converter(node, onnx_graph)
        except NotImplementedError as err:
            why = refusal_reason(node.operation_type) if domain == ML_DOMAIN else None
            problems.append((name, f"{label} (opset {opsets.get(domain, 1)})", why or _reason(err)))
        except Exception as err:  # noqa: BLE001 - a converter choking on attributes is also unsupported
            reraise_signal(err)
            problems.append((name, label, f"{type(err).__name__}: {err}"))
    if problems:
        raise UnsupportedOpsError("conversion", problems)


def _reason(err: Exception) -> str:
    text = str(err)
    return "no converter" if "Converter is not implemented" in text else text


def _tensor_to_fx(normalized: NormalizedModel, onnx_graph: OnnxGraph, module: fx.GraphModule) -> dict[str, str]:
    """ONNX tensor name -> fx node name (or `__multi__:owner:index` for unindexed outputs)."""
    fx_nodes = {node.name: node for node in module.graph.nodes}
    by_target = {node.target: node for node in module.graph.nodes if node.op == "call_module"}
    mapping: dict[str, str] = {}
    for node in module.graph.nodes:
        if node.op == "placeholder":
            mapping[normalized.input_name] = node.name
    for unique_name, onnx_node in onnx_graph.nodes.items():
        fx_node = by_target.get(unique_name)
        if fx_node is None:
            continue
        outputs = onnx_node.output_values
        if len(outputs) == 1:
            mapping[outputs[0]] = fx_node.name
            continue
        for index, tensor in enumerate(outputs):
            user = next(
                (u for u in fx_node.users if u.op == "call_function" and u.target is operator.getitem
                 and u.args[1] == index),
                None,
            )
            mapping[tensor] = user.name if user is not None else f"__multi__:{fx_node.name}:{index}"
    missing = [t for t in normalized.output_names if t not in mapping]
    if missing or any(n not in fx_nodes and not n.startswith("__multi__") for n in mapping.values()):
        raise ConversionError(f"cannot map outputs {missing} to the converted module")
    return mapping


__all__ = ["BatchAxis", "ConvertedModel", "conversion_check", "convert_model", "pad_rows", "unsupported_nodes"]
