"""Loading an ONNX model safely: parse, external data, checker, shape inference, input specs.

`load_model` is the only door into the pipeline. It refuses, with a typed `VerifierError`,
anything the rest of verifier could not analyse honestly: a missing or damaged file (strings
that are not UTF-8 included), an opset newer than the tested range, a graph without nodes,
external data outside the model's folder or pointing at the model file (audits run on untrusted
files; every tensor of the file is checked, in functions, sub-graphs and sparse tensors too,
and read by its own size within the memory limit), a checker failure, an unknown operator
domain or undefined local function, control flow (`If`/`Loop`/`Scan`: sub-graphs are not
analysed), sparse tensors, NaN constants, a non-float data input, a data input with an empty
axis, or more than one data input. Model-local functions are
inlined and the `ai.onnx` alias of the default domain is written as `""`, so that every later
stage sees one flat graph of standard operators.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError
from google.protobuf.descriptor import FieldDescriptor
from onnx import inliner

from verifier.errors import (
    CheckerError,
    InputSpecError,
    ModelFileError,
    ModelNotFoundError,
    MultipleInputsError,
    NonFloatInputError,
    NotOnnxError,
    SparseTensorError,
    TruncatedModelError,
    UnknownDomainError,
    UnsupportedModelError,
    UnsupportedOpsError,
)
from verifier.external_data import is_repeated, load_external_data
from verifier.finite import nonfinite_constants, require_no_nan_constants
from verifier.resources import memory_limit, require_within

STANDARD_DOMAINS = frozenset({"", "ai.onnx", "ai.onnx.ml"})
DEFAULT_DOMAIN_ALIAS = "ai.onnx"
FLOAT_TYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
)
MAX_TESTED_OPSET = 21
_ONNX_FIRST_BYTES = frozenset({0x08, 0x12, 0x1A, 0x22, 0x2A, 0x32, 0x3A, 0x42})  # ModelProto field tags 1..8


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape (ints, symbolic names, or None for unknown) and dtype of a graph input/output."""

    name: str
    shape: tuple[int | str | None, ...] | None
    dtype: str

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"name": self.name, "shape": None if self.shape is None else list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class ModelInfo:
    """What a reviewer wants to know about a model file before trusting any analysis of it."""

    path: str
    sha256: str
    size_bytes: int
    ir_version: int
    opsets: dict[str, int]
    producer_name: str
    producer_version: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    infinite_constants: tuple[str, ...] = ()

    @property
    def opset(self) -> int:
        """The default-domain (ai.onnx) opset version."""
        return self.opsets.get("", self.opsets.get("ai.onnx", 0))

    @property
    def data_input(self) -> TensorSpec:
        """The single float input that analyses perturb."""
        return self.inputs[0]

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "path": self.path,
            "sha256": self.sha256,
            "size_bytes": self.size_bytes,
            "ir_version": self.ir_version,
            "opset": self.opset,
            "opsets": dict(self.opsets),
            "producer": {"name": self.producer_name, "version": self.producer_version},
            "inputs": [spec.to_dict() for spec in self.inputs],
            "outputs": [spec.to_dict() for spec in self.outputs],
            "infinite_constants": list(self.infinite_constants),
        }


@dataclass(frozen=True, eq=False)
class LoadedModel:
    """A checked model: the shape-inferred proto (external data loaded) and its `ModelInfo`."""

    proto: onnx.ModelProto = field(repr=False)
    info: ModelInfo


def load_model(path: str | os.PathLike[str], memory_limit_bytes: int | None = None,
               any_inputs: bool = False) -> LoadedModel:
    """Load, check and describe an ONNX model; raise a typed `VerifierError` on any problem.

    The file and its external data are size-checked against `memory_limit_bytes` (default:
    `resources.memory_limit()`) before they are read. `any_inputs` accepts several inputs and
    non-float ones (for `verifier.perturb`, which derives the one-float-input model).
    """
    model_path = Path(path)
    if model_path.is_dir():
        raise NotOnnxError(str(path), "it is a directory")
    if not model_path.is_file():
        raise ModelNotFoundError(str(path))
    limit = memory_limit(memory_limit_bytes)
    try:
        require_within(f"reading the model file {path}", model_path.stat().st_size, limit)
        raw = model_path.read_bytes()
    except OSError as err:
        raise ModelFileError(f"cannot read model file {path}: {err.strerror or err}") from err
    proto = _parse(raw, str(path))
    _check_opsets(proto)
    _canonical_default_domain(proto)
    load_external_data(proto, model_path.resolve(), limit)
    _check_domains(proto)
    proto = _inline_functions(proto)
    _refuse_undefined_functions(proto)
    _refuse_unanalysable(proto)
    require_no_nan_constants(proto.graph)
    _dynamic_placeholder_dims(proto)
    _run_checker(proto)
    inferred = _infer_shapes(proto)
    inputs = _data_inputs(inferred)
    if not any_inputs:
        _require_single_float_input(inputs)
        _require_nonempty_input(inputs[0])
    elif not inputs:
        raise MultipleInputsError([])
    info = ModelInfo(
        path=str(path),
        sha256=hashlib.sha256(raw).hexdigest(),
        size_bytes=len(raw),
        ir_version=int(inferred.ir_version),
        opsets={o.domain: int(o.version) for o in inferred.opset_import},
        producer_name=inferred.producer_name,
        producer_version=inferred.producer_version,
        inputs=tuple(tensor_spec(vi) for vi in inputs),
        outputs=tuple(tensor_spec(vi) for vi in inferred.graph.output),
        infinite_constants=tuple(c.describe() for c in nonfinite_constants(inferred.graph)),
    )
    return LoadedModel(proto=inferred, info=info)


def _parse(raw: bytes, path: str) -> onnx.ModelProto:
    looks_like_onnx = bool(raw) and raw[0] in _ONNX_FIRST_BYTES
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(raw)
    except (DecodeError, RuntimeError, ValueError) as err:
        if looks_like_onnx:
            raise TruncatedModelError(path, len(raw)) from err
        raise NotOnnxError(path, "not a protobuf file") from err
    if not proto.HasField("graph") or not proto.graph.output or proto.ir_version <= 0:
        if looks_like_onnx and proto.ir_version > 0:
            raise TruncatedModelError(path, len(raw))
        raise NotOnnxError(path, "no graph found")
    try:
        _decode_strings(proto)
    except UnicodeDecodeError as err:
        raise NotOnnxError(path, f"damaged: a name or string field is not valid UTF-8 ({err.reason})") from err
    if not proto.graph.node:
        raise UnsupportedModelError(f"{path}: the graph has no nodes (its outputs are its inputs): there is no "
                                    "model to analyse")
    return proto


def _decode_strings(message) -> None:
    """Refuse string fields that are not UTF-8 (a damaged name would otherwise fail deep inside a
    later stage)."""
    for descriptor, value in message.ListFields():
        if descriptor.type == FieldDescriptor.TYPE_STRING:
            # proto2 strings with invalid UTF-8 come back as bytes instead of raising
            broken = [item for item in (value if is_repeated(descriptor) else (value,)) if isinstance(item, bytes)]
            if broken:
                raise UnicodeDecodeError("utf-8", broken[0], 0, len(broken[0]),
                                         f"field {descriptor.name} holds {broken[0][:40]!r}")
        if descriptor.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        for item in value if is_repeated(descriptor) else (value,):
            _decode_strings(item)


def _check_opsets(proto: onnx.ModelProto) -> None:
    """Refuse default-domain opsets newer than the tested range (their ops may have changed)."""
    for opset in proto.opset_import:
        if opset.domain in ("", DEFAULT_DOMAIN_ALIAS) and opset.version > MAX_TESTED_OPSET:
            raise UnsupportedModelError(
                f"the model uses ai.onnx opset {opset.version}; verifier supports opsets up to {MAX_TESTED_OPSET} "
                f"(convert it with onnx.version_converter.convert_version(model, {MAX_TESTED_OPSET}) or re-export it)")


def _graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """A graph and, recursively, every sub-graph of its nodes' attributes."""
    yield graph
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("g"):
                yield from _graphs(attr.g)
            for sub in attr.graphs:
                yield from _graphs(sub)


def _node_lists(proto: onnx.ModelProto) -> Iterator[Sequence[onnx.NodeProto]]:
    """The node lists of the main graph, of every sub-graph, and of every model-local function
    body (and its sub-graphs)."""
    for graph in _graphs(proto.graph):
        yield graph.node
    for function in proto.functions:
        yield function.node
        for node in function.node:
            for attr in node.attribute:
                for sub in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
                    for graph in _graphs(sub):
                        yield graph.node


def _label(node: onnx.NodeProto, position: int) -> str:
    """How messages name a node: its name, else `{op_type}_{position in its graph}`."""
    return node.name or f"{node.op_type}_{position}"


def _canonical_default_domain(proto: onnx.ModelProto) -> None:
    """Write the legal alias `ai.onnx` of the default operator domain as `""` everywhere."""
    for imports in [proto.opset_import] + [f.opset_import for f in proto.functions]:
        aliases = [o for o in imports if o.domain == DEFAULT_DOMAIN_ALIAS]
        has_default = any(o.domain == "" for o in imports)
        for opset in aliases:
            if has_default:
                imports.remove(opset)
            else:
                opset.domain, has_default = "", True
    for nodes in _node_lists(proto):
        for node in nodes:
            if node.domain == DEFAULT_DOMAIN_ALIAS:
                node.domain = ""


def _check_domains(proto: onnx.ModelProto) -> None:
    """Refuse nodes of domains that are neither standard nor defined by a model-local function."""
    local = {f.domain for f in proto.functions}
    unknown = [
        (_label(node, i), node.op_type, node.domain)
        for nodes in _node_lists(proto)
        for i, node in enumerate(nodes)
        if node.domain not in STANDARD_DOMAINS and node.domain not in local
    ]
    if unknown:
        raise UnknownDomainError(unknown)


def _refuse_undefined_functions(inlined: onnx.ModelProto) -> None:
    """After inlining, a node left outside the standard domains calls a function the model lacks."""
    undefined = [(_label(node, i), node.op_type, f"calls the function {node.op_type} of domain "
                  f"{node.domain!r}, which the model does not define")
                 for i, node in enumerate(inlined.graph.node) if node.domain not in STANDARD_DOMAINS]
    if undefined:
        raise UnsupportedOpsError("analysis", undefined)


def _inline_functions(proto: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its model-local functions inlined (inspect and convert see the same graph)."""
    if not proto.functions:
        return proto
    try:
        return inliner.inline_local_functions(proto)
    except Exception as err:  # noqa: BLE001 - the inliner raises bare C++ errors of several kinds
        raise CheckerError("inlining model-local functions", _first_line(str(err))) from err


def _refuse_unanalysable(proto: onnx.ModelProto) -> None:
    """Refuse control flow (sub-graphs) and sparse tensors, naming every node or tensor."""
    control_flow = [
        (_label(node, i), node.op_type, "control flow: sub-graphs are not analysed; export the model without it")
        for i, node in enumerate(proto.graph.node)
        if any(attr.HasField("g") or attr.graphs for attr in node.attribute)
    ]
    if control_flow:
        raise UnsupportedOpsError("analysis", control_flow)
    sparse = [f"initializer {t.values.name or t.indices.name!r}" for t in proto.graph.sparse_initializer]
    sparse += [
        f"{node.op_type} node {_label(node, i)!r}"
        for i, node in enumerate(proto.graph.node)
        if any(attr.HasField("sparse_tensor") or attr.sparse_tensors for attr in node.attribute)
    ]
    if sparse:
        raise SparseTensorError(sparse)


_NODE_IN_MESSAGE = re.compile(r"name:\s*(\S+)\s+OpType|[Nn]ode \(([^)\s]+)\)|node name:\s*([^)\s,]+)")


def _first_line(message: str) -> str:
    """The message without onnx's context trailer, on one line, at most 300 characters."""
    text = " ".join(str(message).split("==> Context")[0].split())
    return (text[:297] + "...") if len(text) > 300 else (text or "unknown error")


def _node_named(message: str) -> str | None:
    match = _NODE_IN_MESSAGE.search(str(message))
    return next((g for g in match.groups() if g), None) if match else None


def _dynamic_placeholder_dims(proto: onnx.ModelProto) -> None:
    """A dimension written as -1 anywhere, or 0 on the batch axis (paddle2onnx, some converters),
    means "any size": make it unknown, like a symbolic one, so that no stage takes it for a fixed
    size. A 0 beyond the batch axis is a real empty axis (refused for the data input later)."""
    for value_info in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        if not (value_info.type.HasField("tensor_type") and value_info.type.tensor_type.HasField("shape")):
            continue
        for axis, dim in enumerate(value_info.type.tensor_type.shape.dim):
            if dim.HasField("dim_value") and (dim.dim_value < 0 or (dim.dim_value == 0 and axis == 0)):
                dim.Clear()


def _run_checker(proto: onnx.ModelProto) -> None:
    try:
        onnx.checker.check_model(proto)
    except onnx.checker.ValidationError as err:
        raise CheckerError("onnx.checker", _first_line(str(err)), _node_named(str(err))) from err
    except (ValueError, TypeError, RuntimeError) as err:  # onnx's C++ checker maps some failures to these
        raise CheckerError("onnx.checker", _first_line(str(err))) from err


def _infer_shapes(proto: onnx.ModelProto) -> onnx.ModelProto:
    try:
        return onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError) as err:
        raise CheckerError("shape inference", _first_line(str(err)), _node_named(str(err))) from err
    except (ValueError, TypeError, RuntimeError) as err:  # e.g. "Invalid tensor data type 33."
        raise CheckerError("shape inference", _first_line(str(err))) from err


def _data_inputs(proto: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    constants = {init.name for init in proto.graph.initializer}
    return [vi for vi in proto.graph.input if vi.name not in constants]


def _require_single_float_input(inputs: list[onnx.ValueInfoProto]) -> None:
    if len(inputs) != 1:
        raise MultipleInputsError([vi.name for vi in inputs])
    only = inputs[0]
    tensor_type = only.type.tensor_type if only.type.HasField("tensor_type") else None
    if tensor_type is None or tensor_type.elem_type not in FLOAT_TYPES:
        raise NonFloatInputError(only.name, _type_name(only.type))


def _require_nonempty_input(value_info: onnx.ValueInfoProto) -> None:
    """Refuse a data input with a zero-sized axis beyond the batch: there is nothing to perturb."""
    spec = tensor_spec(value_info)
    if spec.shape and any(d == 0 for d in spec.shape[1:]):
        raise InputSpecError(f"input {spec.name!r} has shape {list(spec.shape)}: an axis of size 0 "
                             "leaves no feature to perturb")


def _type_name(type_proto: onnx.TypeProto) -> str:
    kind = type_proto.WhichOneof("value")
    if kind == "tensor_type":
        return onnx.helper.tensor_dtype_to_np_dtype(type_proto.tensor_type.elem_type).name
    if kind == "sequence_type":
        return f"sequence<{_type_name(type_proto.sequence_type.elem_type)}>"
    if kind == "map_type":
        key = onnx.helper.tensor_dtype_to_np_dtype(type_proto.map_type.key_type).name
        return f"map<{key},{_type_name(type_proto.map_type.value_type)}>"
    return kind or "unknown"


def tensor_spec(value_info: onnx.ValueInfoProto) -> TensorSpec:
    """The `TensorSpec` of a value info (a dimension without a value or name is None)."""
    shape: tuple[int | str | None, ...] | None = None
    if value_info.type.HasField("tensor_type") and value_info.type.tensor_type.HasField("shape"):
        shape = tuple(
            int(d.dim_value) if d.HasField("dim_value") else (d.dim_param if d.HasField("dim_param") else None)
            for d in value_info.type.tensor_type.shape.dim
        )
    return TensorSpec(name=value_info.name, shape=shape, dtype=_type_name(value_info.type))
