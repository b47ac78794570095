"""A fixed batch axis made dynamic in the normalised graph, when that is provably batch-generic.

Many exports (every VNN-COMP net) fix the batch of their data input, most often to 1. The torch
module converted from such a graph only runs that many samples per pass, which rules out bound
propagation and makes Jacobians and attacks run sample after sample. `make_batch_dynamic`
rewrites the normalised (standard-domain) graph:
1. the data input's dim 0 becomes the symbolic `batch` (so do outputs whose dim 0 is the batch);
2. every shape constant that hard-codes the batch is rewritten: a `Reshape` shape whose first
   entry is the batch gets 0 ("copy dim 0", `allowzero=0`, when its data input's dim 0 is the
   batch) or -1 (when no other entry is -1, nor 0 under `allowzero=1`); an `Expand` shape whose
   first entry is the batch gets 1 when its input already carries the batch; a shape whose batch
   entry is another one (`batch_entries`: the entry that doubles between folds at batch 1 and 2)
   gets -1 there (Reshape) or 1 (Expand). `Flatten`, `Gemm`,
   `Conv`, … are batch-generic as they are. `ConstantOfShape`/`Tile` are left alone: the check
   below decides whether they broadcast;
3. shapes are inferred again (strict) and the model checked;
4. the rewritten graph runs in onnxruntime on 2B+1 seeded uniform [0, 1) samples at once (and on
   one sample), and is compared per sample with the user's graph (cut to the analysed outputs,
   before any optimisation) run B samples at a time (the last chunk padded by repeating its last
   sample): every output must agree within `1e-4 * max(1, max |reference|)` (the check is
   skipped, and the batch kept, when its samples would exceed `CHECK_ELEMENTS` numbers).
Anything that fails keeps the fixed batch (`BatchAxis.rewritten` False, with the reason): every
later stage then runs the module in chunks of B (one sample after another for B = 1), padding a
short last chunk by repeating its last sample and dropping the padding from the results
(`pad_rows`, `FixedBatchModule`).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from verifier.convert.rewrite import constant_values
from verifier.deadline import reraise_signal

BATCH_PARAM = "batch"
# float32 kernels sum in an order that depends on the batch size: magika's logits (a real, truly
# batch-generic model, run as published) differ by 1.7e-5 of their scale between batch 3 and 1 on
# uniform inputs (1.28e-4 at max |ref| 7.7); samples that interact differ by far more than 1e-4.
CHECK_RTOL = 1e-4
CHECK_ELEMENTS = 2**24  # at most this many input numbers in the check (64 MiB of float32)
_STANDARD_DOMAINS = ("", "ai.onnx")
SHAPE_READERS = frozenset({"Shape", "Size"})


@dataclass(frozen=True)
class BatchAxis:
    """How the batch axis of the data input is handled: the file's fixed batch (None: dynamic),
    whether the normalised graph was rewritten to a dynamic batch, and why not when it was not."""

    fixed: int | None = None
    rewritten: bool = False
    reason: str = ""

    @property
    def module_batch(self) -> int | None:
        """The batch the converted module requires per pass (None: any)."""
        return None if self.rewritten else self.fixed

    def describe(self) -> str:
        """One line for `inspect` and `validate`."""
        if self.fixed is None:
            return "dynamic"
        if self.rewritten:
            return f"fixed batch {self.fixed} rewritten to dynamic (checked in onnxruntime)"
        runs = "one sample after another" if self.fixed == 1 else f"in chunks of {self.fixed} (last one padded)"
        return f"fixed batch {self.fixed} kept ({self.reason}): samples run {runs}"

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"fixed": self.fixed, "rewritten": self.rewritten, "reason": self.reason or None,
                "module_batch": self.module_batch}


def reads_shapes(model: onnx.ModelProto) -> bool:
    """Whether the graph computes with tensor shapes at run time (`Shape`, `Size`)."""
    return any(n.op_type in SHAPE_READERS and n.domain in _STANDARD_DOMAINS for n in model.graph.node)


def with_batch_fixed(model: onnx.ModelProto, input_name: str, batch: int = 1) -> onnx.ModelProto | None:
    """A copy of `model` whose data input (and every output) has dim 0 fixed to `batch`; None when
    the input's dim 0 is fixed already. Exports that build Reshape/Expand shapes or zero states
    from the batch size at run time (tf2onnx's Flatten, jax2tf, torch) fold to constants only with
    a fixed batch, which `make_batch_dynamic` then frees again where onnxruntime confirms it."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    value_info = next(vi for vi in fixed.graph.input if vi.name == input_name)
    dims = value_info.type.tensor_type.shape.dim
    if not dims or dims[0].HasField("dim_value"):
        return None
    dims[0].dim_value = batch
    for output in fixed.graph.output:
        out = output.type.tensor_type.shape.dim
        if out and not out[0].HasField("dim_value"):
            out[0].dim_value = batch
    del fixed.graph.value_info[:]
    return fixed


def fixed_batch_of(model: onnx.ModelProto, input_name: str) -> int | None:
    """The data input's fixed dim 0 (None when it is symbolic or unknown)."""
    value_info = next(vi for vi in model.graph.input if vi.name == input_name)
    dims = value_info.type.tensor_type.shape.dim
    return int(dims[0].dim_value) if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0 else None


def make_batch_dynamic(model: onnx.ModelProto, reference: onnx.ModelProto, input_name: str,
                       entries: dict[str, int] | None = None) -> tuple[onnx.ModelProto, BatchAxis]:
    """`model` with a dynamic batch when the rewrite is checked against `reference` (the user's
    graph with the same outputs) in onnxruntime; else `model` itself and the reason. `entries`
    (`batch_entries`): shape constants that carry the batch in another entry than the first."""
    batch = fixed_batch_of(model, input_name)
    if batch is None:
        return model, BatchAxis()
    try:
        rewritten = _rewrite(model, input_name, batch, entries)
        _check_in_onnxruntime(rewritten, reference, input_name, batch)
    except _NotBatchGeneric as err:
        return model, BatchAxis(batch, False, str(err))
    return rewritten, BatchAxis(batch, True)


class _NotBatchGeneric(Exception):
    """The rewrite does not apply or did not pass its check (the message says why)."""


def _rewrite(model: onnx.ModelProto, input_name: str, batch: int,
             entries: dict[str, int] | None = None) -> onnx.ModelProto:
    value_info = next(vi for vi in model.graph.input if vi.name == input_name)
    if any(not d.HasField("dim_value") for d in value_info.type.tensor_type.shape.dim[1:]):
        raise _NotBatchGeneric("the input has unknown sizes beyond the batch axis")
    try:
        shapes = _dim0(onnx.shape_inference.infer_shapes(model, strict_mode=True))
    except (onnx.shape_inference.InferenceError, ValueError, TypeError, RuntimeError) as err:
        raise _NotBatchGeneric(f"shape inference failed before the rewrite: {_short(err)}") from err
    proto = onnx.ModelProto()
    proto.CopyFrom(model)
    graph = proto.graph
    del graph.value_info[:]
    for vi in [*(v for v in graph.input if v.name == input_name), *graph.output]:
        dims = vi.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value == batch:
            dims[0].dim_param = BATCH_PARAM
    constants = _shape_constants(graph)
    for position, node in enumerate(graph.node):
        if node.domain not in _STANDARD_DOMAINS or node.op_type not in ("Reshape", "Expand") or len(node.input) < 2:
            continue
        data, shape_name = node.input[0], node.input[1]
        if data in constants or shape_name not in constants or constants[shape_name].size == 0:
            continue
        shape = constants[shape_name].astype(np.int64).copy()
        inner = (entries or {}).get(node.name)
        if shape[0] == batch and shapes.get(data) == batch and inner in (None, 0):
            shape[0] = _batch_entry(node, shape, batch)
        elif inner is not None:
            shape[inner] = _inner_batch_entry(node, shape, inner)
        else:
            continue
        new_name = f"{shape_name}__dynamic_batch_{position}"
        graph.initializer.append(numpy_helper.from_array(shape, new_name))
        node.input[1] = new_name
    _drop_unused_initializers(graph)
    try:
        inferred = onnx.shape_inference.infer_shapes(proto, strict_mode=True)
        onnx.checker.check_model(inferred, full_check=True)
    except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, ValueError, TypeError,
            RuntimeError) as err:
        raise _NotBatchGeneric(f"the rewritten graph fails shape inference: {_short(err)}") from err
    return inferred


def _batch_entry(node: onnx.NodeProto, shape: np.ndarray, batch: int) -> int:
    """The first entry of a batch-carrying shape constant, written batch-generically."""
    if node.op_type == "Expand":
        return 1  # the input carries the batch already: broadcasting keeps it
    allowzero = any(a.name == "allowzero" and a.i for a in node.attribute)
    if not allowzero:
        return 0
    if -1 not in shape[1:] and 0 not in shape[1:]:
        return -1
    raise _NotBatchGeneric(f"Reshape {node.name!r} (allowzero=1) already has a -1 or 0 beside batch {batch}")


def _inner_batch_entry(node: onnx.NodeProto, shape: np.ndarray, index: int) -> int:
    """Entry `index` of a shape constant that carries the batch (a multiple of it) off axis 0."""
    if node.op_type == "Expand":
        return 1  # broadcasting keeps the batch the input carries there (onnxruntime checks it)
    if -1 in np.delete(shape, index):
        raise _NotBatchGeneric(f"Reshape {node.name!r} already has a -1 beside the batch entry {index}")
    return -1


def batch_entries(at_one: onnx.ModelProto, at_two: onnx.ModelProto) -> dict[str, int]:
    """Node name -> the entry of its Reshape/Expand shape constant that carries the batch, from the
    same graph folded with the batch fixed to 1 and to 2: the one entry that doubles (nodes whose
    constants differ otherwise, or where no single entry doubles, are left out)."""
    first, second = _shape_constants(at_one.graph), _shape_constants(at_two.graph)
    found: dict[str, int] = {}
    shapes_two = {n.name: n.input[1] for n in at_two.graph.node if n.op_type in ("Reshape", "Expand")
                  and len(n.input) > 1 and n.name}
    for node in at_one.graph.node:
        name = shapes_two.get(node.name)
        if name is None or len(node.input) < 2 or node.input[1] not in first or name not in second:
            continue
        one, two = first[node.input[1]], second[name]
        differ = np.flatnonzero(one != two) if one.shape == two.shape else []
        if len(differ) == 1 and two[differ[0]] == 2 * one[differ[0]]:
            found[node.name] = int(differ[0])
    return found


def _dim0(model: onnx.ModelProto) -> dict[str, int | None]:
    """Tensor name -> its inferred fixed dim 0 (None when unknown or symbolic)."""
    found: dict[str, int | None] = {}
    for vi in [*model.graph.input, *model.graph.value_info, *model.graph.output]:
        dims = vi.type.tensor_type.shape.dim if vi.type.HasField("tensor_type") else []
        found[vi.name] = int(dims[0].dim_value) if len(dims) and dims[0].HasField("dim_value") else None
    return found


def _shape_constants(graph: onnx.GraphProto) -> dict[str, np.ndarray]:
    """Integer 1-D constants (initializers and Constant nodes' tensors), by tensor name."""
    return {name: value for name, value in constant_values(graph).items() if value.ndim == 1 and value.dtype.kind in "iu"}


def _drop_unused_initializers(graph: onnx.GraphProto) -> None:
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def _check_in_onnxruntime(rewritten: onnx.ModelProto, reference: onnx.ModelProto, input_name: str,
                          batch: int) -> None:
    """Per sample, the rewritten graph on 2B+1 samples (and on one) matches the reference in chunks of B."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise _NotBatchGeneric("onnxruntime is not installed to check a rewrite") from err
    names = [o.name for o in rewritten.graph.output]
    value_info = next(vi for vi in rewritten.graph.input if vi.name == input_name)
    element = value_info.type.tensor_type
    sizes = [d.dim_value for d in element.shape.dim[1:]]
    dtype = onnx.helper.tensor_dtype_to_np_dtype(element.elem_type)
    count = 2 * batch + 1
    if count * int(np.prod(sizes)) > CHECK_ELEMENTS:
        raise _NotBatchGeneric(f"{count} check samples of shape {tuple(sizes)} are too large to run")
    x = np.random.default_rng(0).random((count, *sizes)).astype(dtype)
    options = ort.SessionOptions()
    options.log_severity_level = 4
    try:
        original = ort.InferenceSession(reference.SerializeToString(), options, providers=["CPUExecutionProvider"])
        expected = _chunked(original, names, input_name, x, batch)
    except _NotBatchGeneric:
        raise
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
        reraise_signal(err)
        raise _NotBatchGeneric(f"onnxruntime cannot run the fixed-batch graph: {_short(err)}") from err
    try:
        dynamic = ort.InferenceSession(rewritten.SerializeToString(), options, providers=["CPUExecutionProvider"])
        together = dynamic.run(names, {input_name: x})
        alone = dynamic.run(names, {input_name: x[:1]})
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
        reraise_signal(err)
        raise _NotBatchGeneric(f"onnxruntime cannot run the rewritten graph on {count} samples: "
                               f"{_short(err)}") from err
    for name, want, got, one in zip(names, expected, together, alone):
        got, one = np.asarray(got, dtype=np.float64), np.asarray(one, dtype=np.float64)
        if got.shape != want.shape or one.shape != want[:1].shape:
            raise _NotBatchGeneric(f"output {name!r} is not one row per sample with a dynamic batch")
        scale = CHECK_RTOL * max(1.0, float(np.nan_to_num(np.abs(want), posinf=0.0).max(initial=0.0)))
        worst = max(_max_diff(got, want), _max_diff(one, want[:1]))
        if not worst <= scale:
            raise _NotBatchGeneric(f"output {name!r} differs by {worst:.3g} from the fixed-batch graph "
                                   "(samples interact across the batch axis)")


def _chunked(session, names: list[str], input_name: str, x: np.ndarray, batch: int) -> list[np.ndarray]:
    """Outputs of a fixed-batch session, B samples at a time (last chunk padded), one row per sample."""
    parts: list[list[np.ndarray]] = []
    for start in range(0, len(x), batch):
        chunk = pad_rows(x[start:start + batch], batch)
        outputs = session.run(names, {input_name: chunk})
        for output in outputs:
            if np.ndim(output) == 0 or np.shape(output)[0] != batch:
                raise _NotBatchGeneric("an output of the fixed-batch graph has no batch axis")
        parts.append([np.asarray(o, dtype=np.float64)[: len(x) - start] for o in outputs])
    return [np.concatenate([p[i] for p in parts]) for i in range(len(names))]


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    same = (a == b) | (np.isnan(a) & np.isnan(b))
    with np.errstate(invalid="ignore"):
        return float(np.where(same, 0.0, np.nan_to_num(np.abs(a - b), nan=np.inf)).max(initial=0.0))


def pad_rows(x: np.ndarray | torch.Tensor, size: int) -> np.ndarray | torch.Tensor:
    """`x` (numpy array or torch tensor) with its last row repeated up to `size` rows."""
    missing = size - len(x)
    if missing <= 0:
        return x
    if isinstance(x, np.ndarray):
        return np.concatenate([x, np.repeat(x[-1:], missing, axis=0)])
    return torch.cat([x, x[-1:].expand(missing, *x.shape[1:])])


class FixedBatchModule(torch.nn.Module):
    """A module that needs exactly `batch` samples per pass, run on any number of samples: chunks
    of `batch`, the last one padded by repeating its last sample, the padding dropped."""

    def __init__(self, module: torch.nn.Module, batch: int) -> None:
        super().__init__()
        self.module, self.batch = module, batch

    def forward(self, x: torch.Tensor):  # noqa: D102
        parts = []
        for start in range(0, len(x), self.batch):
            chunk = x[start:start + self.batch]
            out = self.module(pad_rows(chunk, self.batch))
            parts.append(tuple(o[: len(chunk)] for o in out) if isinstance(out, (tuple, list)) else out[: len(chunk)])
        if parts and isinstance(parts[0], tuple):
            return tuple(torch.cat(column) for column in zip(*parts))
        return torch.cat(parts)


def _short(err: Exception) -> str:
    text = " ".join(str(err).split("==> Context")[0].split()) or type(err).__name__
    return text if len(text) <= 200 else text[:197] + "..."
