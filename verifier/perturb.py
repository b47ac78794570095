"""Where the threat acts (`--perturb NAME`): one input of several, or a tensor inside the graph.

Every later stage analyses a function of one float tensor. `perturb_at` turns the user's model
and data into exactly that, once, at the boundary:

1. **an internal tensor** (e.g. the output of an embedding `Gather`): the model is cut there with
   `onnx.utils.Extractor` (the tensor becomes an input, everything before it is dropped) and
   the clean values of the tensor come from onnxruntime running the user's model on the user's
   data. The threat model (norm, budgets, box) is then in that tensor's space;
2. **inputs held fixed**: the inputs of the (cut) model other than the perturbed tensor are
   read per sample from the data file (npz keys = input names; `x` stands for a model's only
   input) and **packed behind the perturbed tensor** into one float input `verifier_packed`
   `(N, free + held)`; a `Slice -> Reshape -> Cast` prefix unpacks them for the user's nodes.
   Each row carries its own fixed inputs, so every stage (batched Jacobians, chunks, attack
   atoms, onnxruntime replay) sees a one-input function with no bookkeeping, and the box
   (`verifier.box.Box`, `free` = the perturbed tensor's size) holds the packed coordinates at
   their values: zero displacement in every bound, cell radius and attack projection.

The derived model replaces the user's as the oracle of `validate` and of the attacks' replay: it
is the user's own nodes (after the cut) behind an exact unpacking (integer values are checked to
survive the float round trip). `perturbation_candidates` lists what `inspect` suggests.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from verifier.box import Box, normalised_box
from verifier.data import Samples, file_box, load_arrays
from verifier.errors import DataError, NonFloatInputError, RuntimeRunError, UsageError
from verifier.finite import require_finite_inputs
from verifier.graph import OperatorGraph
from verifier.onnx_io import FLOAT_TYPES, LoadedModel, tensor_spec

PACKED_NAME = "verifier_packed"
_PACK_PREFIX = "verifier_pack"


@dataclass(frozen=True)
class Part:
    """One tensor inside the packed input: its name, per-sample shape and dtype."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    @property
    def size(self) -> int:
        """Values per sample."""
        return math.prod(self.shape)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"name": self.name, "shape": list(self.shape), "dtype": self.dtype}


@dataclass(frozen=True)
class Perturbation:
    """The perturbed tensor (`parts[0]`), whether it is inside the graph, and the held inputs."""

    tensor: str
    internal: bool
    parts: tuple[Part, ...]
    cut_inputs: tuple[str, ...] = ()  # the user's inputs dropped by the cut (only feed the tensor)

    @property
    def held(self) -> tuple[Part, ...]:
        """The inputs held fixed per sample, packed behind the perturbed tensor."""
        return self.parts[1:]

    @property
    def free(self) -> int:
        """How many leading coordinates of a (packed) sample the threat may move."""
        return self.parts[0].size

    def threat_box(self, box: tuple[float, float] | Box | None) -> tuple[float, float] | Box | None:
        """The box every stage uses: `box` on the perturbed tensor, held inputs at their values."""
        if not self.held:
            return box
        if box is None:
            return Box(-math.inf, math.inf, self.parts[0].shape)
        low, high = (box.low, box.high) if isinstance(box, Box) else box
        return Box(low, high, self.parts[0].shape)

    def free_values(self, x: np.ndarray) -> np.ndarray:
        """The perturbed tensor's values `(N, *shape)` inside samples `x` (packed or not)."""
        return np.asarray(x).reshape(len(x), -1)[:, :self.free].reshape(len(x), *self.parts[0].shape)

    def describe(self) -> str:
        """One line for reports: what moves, in which space, and what is held."""
        where = (f"internal tensor {self.tensor!r} (the model is cut there; its clean values come from "
                 f"onnxruntime on the data; budgets, norm and box are in this tensor's space)"
                 if self.internal else f"input {self.tensor!r}")
        text = f"threat model: perturbing {where}, shape {_shape_text(self.parts[0].shape)}"
        if self.held:
            text += "; held fixed per sample from the data file: " + ", ".join(
                f"{p.name} ({p.dtype} {_shape_text(p.shape)})" for p in self.held)
        return text

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"tensor": self.tensor, "internal": self.internal, "perturbed": self.parts[0].to_dict(),
                "held": [p.to_dict() for p in self.held], "cut_inputs": list(self.cut_inputs),
                "description": self.describe()}


def perturb_at(loaded: LoadedModel, data_path: str | os.PathLike[str], name: str, limit: int | None = None,
               memory_limit_bytes: int | None = None) -> tuple[LoadedModel, Samples, Perturbation]:
    """The one-input model, its samples (labels kept) and the `Perturbation` for `--perturb name`."""
    graph = OperatorGraph(loaded.proto)
    types = _elem_types(loaded.proto)
    if name not in graph.inputs and name not in graph.producer:
        candidates = ", ".join(perturbation_candidates(loaded.proto)) or "none"
        raise UsageError(f"--perturb {name!r} is neither an input nor a tensor of the model; its inputs: "
                         f"{', '.join(graph.inputs)}; candidate tensors: {candidates}")
    if types.get(name) not in FLOAT_TYPES:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(types[name]).name if name in types else "unknown"
        raise NonFloatInputError(name, dtype)
    arrays = load_arrays(data_path, memory_limit_bytes)
    feeds = _feeds(loaded, graph, arrays, str(data_path), limit)
    labels = _labels(arrays, len(next(iter(feeds.values()))), str(data_path), limit)
    internal = name not in graph.inputs
    proto, cut_inputs = _fixed_to_data(loaded.proto, feeds), ()
    if internal:
        needed = _inputs_behind(graph, name)
        cut_inputs = tuple(i for i in graph.inputs if i not in needed)
        values = _clean_values(proto, name, feeds)
        proto = onnx.utils.Extractor(proto).extract_model([name, *needed], list(graph.outputs))
        feeds = {name: values, **{i: feeds[i] for i in needed}}
    order = [name] + [i for i in OperatorGraph(proto).inputs if i != name]
    parts = tuple(Part(i, tuple(int(d) for d in feeds[i].shape[1:]), feeds[i].dtype.name) for i in order)
    perturbation = Perturbation(name, internal, parts, cut_inputs)
    dtype = np.dtype(parts[0].dtype)
    if len(parts) == 1:
        x = np.ascontiguousarray(feeds[name])
    else:
        proto = _pack(proto, parts)
        x = _packed_values(feeds, parts, dtype, str(data_path))
    require_finite_inputs(x, f"the perturbed tensor {name!r}")
    derived = _describe(proto, loaded)
    box = file_box(arrays, parts[0].shape, str(data_path))
    return derived, Samples(x=x, y=labels, source=str(data_path), box=box), perturbation


def perturbation_candidates(model: onnx.ModelProto) -> list[str]:
    """Tensors worth perturbing: float outputs of the nodes that turn integer data into floats
    (an embedding `Gather`, a `Cast` of ids), and the float inputs of a model with several inputs."""
    graph = OperatorGraph(model)
    types = _elem_types(model)
    integer = {t for t in graph.inputs if types.get(t) not in FLOAT_TYPES}
    found: list[str] = []
    for key in graph.topological_order():
        node = graph.nodes[key]
        variable = [t for t in node.input if t and not graph.is_constant(t)]
        if any(t in integer for t in variable):
            for out in node.output:
                if types.get(out) in FLOAT_TYPES:
                    found.append(out)
                elif out:
                    integer.add(out)
    if len(graph.inputs) > 1:
        found = [t for t in graph.inputs if types.get(t) in FLOAT_TYPES] + found
    return found


def _elem_types(model: onnx.ModelProto) -> dict[str, int]:
    graph = model.graph
    found = {vi.name: vi.type.tensor_type.elem_type for vi in [*graph.input, *graph.value_info, *graph.output]
             if vi.type.HasField("tensor_type")}
    found.update({t.name: t.data_type for t in graph.initializer})
    return found


def _feeds(loaded: LoadedModel, graph: OperatorGraph, arrays: dict[str, np.ndarray], source: str,
           limit: int | None) -> dict[str, np.ndarray]:
    """Every input of the user's model from the data file, in the input's dtype, first `limit` rows."""
    specs = {s.name: s for s in loaded.info.inputs}
    feeds: dict[str, np.ndarray] = {}
    for name in graph.inputs:
        key = name if name in arrays else ("x" if len(graph.inputs) == 1 and "x" in arrays else None)
        if key is None:
            raise DataError(f"{source} has no array {name!r} for the model's input {name!r} (found: "
                            f"{', '.join(sorted(arrays)) or 'nothing'}); the npz keys are the input names")
        value = arrays[key][:limit] if limit is not None else arrays[key]
        if value.ndim == 0 or len(value) == 0:
            raise DataError(f"{key!r} in {source} has no samples")
        dtype = np.dtype(specs[name].dtype) if name in specs else value.dtype
        feeds[name] = np.ascontiguousarray(value.astype(dtype, copy=False))
    lengths = {len(v) for v in feeds.values()}
    if len(lengths) != 1:
        raise DataError(f"the inputs in {source} have different numbers of samples: "
                        + ", ".join(f"{k} {len(v)}" for k, v in feeds.items()))
    return feeds


def _labels(arrays: dict[str, np.ndarray], count: int, source: str, limit: int | None) -> np.ndarray | None:
    y = arrays.get("y")
    if y is None:
        return None
    y = y[:limit] if limit is not None else y
    if not np.issubdtype(y.dtype, np.integer) or y.shape != (count,):
        raise DataError(f"'y' in {source} must be a 1-D integer array with one label per sample "
                        f"(got dtype {y.dtype}, shape {y.shape}, {count} samples)")
    return y.astype(np.int64)


def _fixed_to_data(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> onnx.ModelProto:
    """`model` with every free axis of its inputs but the batch axis (a symbolic or unknown
    size, e.g. a sequence length) fixed to the data's, shapes inferred again (the model itself
    when none is free). Unrolling a recurrent op needs its length (`verifier.convert.rnn`)."""
    fixed: dict[str, int] = {}
    specialised = onnx.ModelProto()
    specialised.CopyFrom(model)
    for value_info in specialised.graph.input:
        if value_info.name not in feeds or not value_info.type.tensor_type.HasField("shape"):
            continue
        for axis, dim in enumerate(value_info.type.tensor_type.shape.dim[1:], start=1):
            if not dim.HasField("dim_value") and axis < feeds[value_info.name].ndim:
                if dim.HasField("dim_param"):
                    fixed[dim.dim_param] = int(feeds[value_info.name].shape[axis])
                dim.dim_value = int(feeds[value_info.name].shape[axis])
    if not fixed and specialised.graph.input == model.graph.input:
        return model
    for value_info in specialised.graph.output:
        for dim in value_info.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in fixed:
                dim.dim_value = fixed[dim.dim_param]
    del specialised.graph.value_info[:]
    return onnx.shape_inference.infer_shapes(specialised, data_prop=True)


def _inputs_behind(graph: OperatorGraph, tensor: str) -> list[str]:
    """The user's inputs the outputs still need once `tensor` is given (the cut's other inputs)."""
    needed: set[str] = set()
    seen: set[str] = set()
    stack = list(graph.outputs)
    reaches = False
    while stack:
        current = stack.pop()
        if current in seen or not current:
            continue
        seen.add(current)
        if current == tensor:
            reaches = True
            continue
        if current in graph.inputs:
            needed.add(current)
            continue
        key = graph.producer.get(current)
        if key is not None:
            stack.extend(graph.nodes[key].input)
    if not reaches:
        raise UsageError(f"--perturb {tensor!r}: no output of the model depends on that tensor")
    return [i for i in graph.inputs if i in needed]


def _clean_values(model: onnx.ModelProto, tensor: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
    """The tensor's values on the user's data, from onnxruntime running the user's model."""
    import torch

    from verifier.validate import onnxruntime_session, with_outputs

    session = onnxruntime_session(with_outputs(model, (tensor,)), torch.device("cpu"))
    try:
        (values,) = session.run([tensor], feeds)
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own types
        detail = " ".join(str(err).split())[:300] or type(err).__name__
        raise RuntimeRunError("onnxruntime", detail) from err
    return np.ascontiguousarray(values)


def _packed_values(feeds: dict[str, np.ndarray], parts: tuple[Part, ...], dtype: np.dtype,
                   source: str) -> np.ndarray:
    """Rows `[perturbed | held ...]` flattened in `dtype`; held values must survive the round trip."""
    count = len(feeds[parts[0].name])
    columns = []
    for part in parts:
        flat = feeds[part.name].reshape(count, -1)
        cast = flat.astype(dtype)
        if part is not parts[0] and not np.array_equal(cast.astype(flat.dtype), flat):
            raise DataError(f"input {part.name!r} in {source} holds values that {dtype.name} cannot represent "
                            f"exactly; it cannot be packed behind the perturbed tensor")
        columns.append(cast)
    return np.ascontiguousarray(np.concatenate(columns, axis=1))


def _pack(model: onnx.ModelProto, parts: tuple[Part, ...]) -> onnx.ModelProto:
    """`model` with its inputs replaced by one packed float input and a prefix that unpacks it."""
    packed = onnx.ModelProto()
    packed.CopyFrom(model)
    graph = packed.graph
    names = {p.name for p in parts}
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(parts[0].dtype))
    width = sum(p.size for p in parts)
    kept = [vi for vi in graph.input if vi.name not in names]
    del graph.input[:]
    graph.input.extend([helper.make_tensor_value_info(PACKED_NAME, elem, ["N", width]), *kept])
    prefix: list[onnx.NodeProto] = []
    offset = 0
    for k, part in enumerate(parts):
        stem = f"{_PACK_PREFIX}{k}"
        graph.initializer.extend([
            numpy_helper.from_array(np.array([offset], np.int64), f"{stem}_start"),
            numpy_helper.from_array(np.array([offset + part.size], np.int64), f"{stem}_end"),
            numpy_helper.from_array(np.array([1], np.int64), f"{stem}_axis"),
            numpy_helper.from_array(np.array([-1, *part.shape], np.int64), f"{stem}_shape"),
        ])
        target_elem = helper.np_dtype_to_tensor_dtype(np.dtype(part.dtype))
        reshaped = part.name if target_elem == elem else f"{stem}_reshaped"
        prefix += [
            helper.make_node("Slice", [PACKED_NAME, f"{stem}_start", f"{stem}_end", f"{stem}_axis"],
                             [f"{stem}_slice"], name=f"{stem}_slice"),
            helper.make_node("Reshape", [f"{stem}_slice", f"{stem}_shape"], [reshaped], name=f"{stem}_reshape"),
        ]
        if reshaped != part.name:
            prefix.append(helper.make_node("Cast", [reshaped], [part.name], to=target_elem, name=f"{stem}_cast"))
        offset += part.size
    nodes = prefix + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    return packed


def _describe(proto: onnx.ModelProto, original: LoadedModel) -> LoadedModel:
    """The derived proto, checked and shape-inferred, with the user's file identity kept."""
    onnx.checker.check_model(proto)
    inferred = onnx.shape_inference.infer_shapes(proto, check_type=True, strict_mode=True, data_prop=True)
    constants = {t.name for t in inferred.graph.initializer}
    inputs = tuple(tensor_spec(vi) for vi in inferred.graph.input if vi.name not in constants)
    info = dataclasses.replace(original.info, inputs=inputs,
                               outputs=tuple(tensor_spec(vi) for vi in inferred.graph.output))
    return LoadedModel(proto=inferred, info=info)


def _shape_text(shape: tuple[int, ...]) -> str:
    return "x".join(str(d) for d in shape) or "scalar"


def load_for_analysis(model_path: str | os.PathLike[str], data_path: str | os.PathLike[str] | None,
                      perturb: str | None, limit: int | None = None, memory_limit_bytes: int | None = None,
                      ) -> tuple[LoadedModel, Samples | None, Perturbation | None]:
    """The model every stage analyses, its samples (None without `data_path`) and the
    perturbation: the user's model and `load_samples` when `perturb` is None, else `perturb_at`."""
    from verifier.data import load_samples
    from verifier.onnx_io import load_model

    loaded = load_model(model_path, memory_limit_bytes, any_inputs=perturb is not None)
    if perturb is None:
        samples = None if data_path is None else load_samples(data_path, loaded.info.data_input, limit,
                                                              memory_limit_bytes)
        return loaded, samples, None
    if data_path is None:
        raise UsageError("--perturb needs --data: the held inputs and the clean values come from the data file")
    return perturb_at(loaded, data_path, perturb, limit, memory_limit_bytes)


def fitted_threat_box(samples: Samples, box: tuple[float, float] | None, perturbation: Perturbation | None,
                      normalisation: tuple[tuple[float, ...], tuple[float, ...]] | None = None,
                      ) -> tuple[tuple[float, float] | Box | None, np.ndarray, tuple[float, float] | None]:
    """The box every stage uses (held inputs pinned), the perturbed values alone and the user's box
    (`--box`, or the data file's `lo`/`hi`, or `--mean`/`--std` with `--box` as the raw range,
    default [0, 1]: `box.normalised_box`) fitted to them (`data.fit_box`; both for the
    budget-scale check)."""
    from verifier.data import fit_box

    if samples.box is not None and (box is not None or normalisation is not None):
        given = "--box" if normalisation is None else "--mean/--std"
        raise UsageError(f"{samples.source} gives a per-input box (lo, hi) and {given} was given too; keep one")
    values = samples.x if perturbation is None else perturbation.free_values(samples.x)
    if normalisation is not None:
        box = normalised_box(*normalisation, tuple(values.shape[1:]), box or (0.0, 1.0))
    fitted = fit_box(values, box if samples.box is None else samples.box, samples.source)
    return (fitted if perturbation is None else perturbation.threat_box(fitted)), values, fitted
