"""The finiteness gate: NaN and infinities are stopped where they enter, never reported as numbers.

Checked at every boundary of the pipeline: constants and float attributes of the model
(`nonfinite_constants`, used by `onnx_io.load_model`), inputs after the cast to the model's
dtype (`require_finite_inputs`: x = 1e39 is finite in float64 and infinite in float32), the
clean logits (`require_finite_logits`), and every number of a result (`first_nan`: a
certificate or a risk is never NaN). Each failure is a `NonFiniteError` naming the tensor or
the samples.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from verifier.errors import NonFiniteError

_SHOWN = 5


@dataclass(frozen=True)
class NonFiniteConstant:
    """A constant tensor or float attribute holding NaN or +-Inf values."""

    where: str
    nan: int
    inf: int

    def describe(self) -> str:
        """`'net.0.weight' (1 NaN, 2 Inf)`."""
        counts = [f"{n} {label}" for n, label in ((self.nan, "NaN"), (self.inf, "Inf")) if n]
        return f"{self.where} ({', '.join(counts)})"


def nonfinite_constants(graph: onnx.GraphProto) -> list[NonFiniteConstant]:
    """Every initializer, Constant value and float attribute of `graph` with NaN or Inf values."""
    found = []
    for where, values in _float_constants(graph):
        nan, inf = int(np.isnan(values).sum()), int(np.isinf(values).sum())
        if nan or inf:
            found.append(NonFiniteConstant(where, nan, inf))
    return found


def _float_constants(graph: onnx.GraphProto) -> Iterator[tuple[str, np.ndarray]]:
    for tensor in graph.initializer:
        yield from _if_float(f"initializer {tensor.name!r}", tensor)
    for position, node in enumerate(graph.node):
        label = f"{node.op_type} node {node.name or f'{node.op_type}_{position}'!r}"
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.FLOAT:
                yield f"attribute {attr.name} of {label}", np.array([attr.f])
            elif attr.type == onnx.AttributeProto.FLOATS:
                yield f"attribute {attr.name} of {label}", np.array(attr.floats)
            elif attr.type == onnx.AttributeProto.TENSOR:
                yield from _if_float(f"attribute {attr.name} of {label}", attr.t)


def _if_float(where: str, tensor: onnx.TensorProto) -> Iterator[tuple[str, np.ndarray]]:
    if tensor.data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                                onnx.TensorProto.BFLOAT16):
        return
    try:
        values = numpy_helper.to_array(tensor)
    except (ValueError, TypeError):  # a damaged tensor: onnx.checker names it later
        return
    yield where, np.asarray(values, dtype=np.float64)


def require_no_nan_constants(graph: onnx.GraphProto) -> None:
    """Refuse a model whose constants or float attributes hold NaN (Inf may be meant: masks, Clip)."""
    bad = [c for c in nonfinite_constants(graph) if c.nan]
    if bad:
        listed = "; ".join(c.describe() for c in bad[:_SHOWN]) + ("; ..." if len(bad) > _SHOWN else "")
        raise NonFiniteError(f"the model holds NaN constants, so no analysis of it means anything: {listed}")


def _numpy(values) -> np.ndarray:
    """A torch tensor or array-like as a NumPy array (torch is not imported here: duck typing)."""
    if hasattr(values, "detach"):
        values = values.detach().cpu()
        values = values.double() if str(values.dtype) == "torch.bfloat16" else values
        return values.numpy()
    return np.asarray(values)


def _rows(values) -> np.ndarray:
    """Indices of the samples (rows) with a non-finite entry."""
    array = _numpy(values)
    if array.ndim == 0:
        return np.arange(0 if np.isfinite(array) else 1)
    return np.flatnonzero(~np.isfinite(array.reshape(len(array), -1)).all(axis=1))


def _samples(rows: np.ndarray) -> str:
    shown = ", ".join(str(int(i)) for i in rows[:_SHOWN])
    return f"{len(rows)} sample(s) (index {shown}{', ...' if len(rows) > _SHOWN else ''})"


def require_finite_inputs(x, source: str) -> None:
    """Refuse inputs (already in the model's dtype) holding NaN or Inf, naming the samples."""
    rows = _rows(x)
    if len(rows):
        dtype = str(getattr(x, "dtype", "")).replace("torch.", "")
        limit = _dtype_max(dtype)
        overflow = f"; values beyond {limit:.4g} overflow {dtype}" if limit else ""
        raise NonFiniteError(f"{source} contains NaN or Inf values in the model's dtype {dtype} in "
                             f"{_samples(rows)}{overflow}")


def _dtype_max(dtype: str) -> float | None:
    try:
        return float(np.finfo(np.dtype(dtype)).max)
    except (TypeError, ValueError):
        return 3.3895e38 if dtype == "bfloat16" else None


def require_finite_logits(logits, runtime: str) -> None:
    """Refuse clean logits holding NaN or Inf: the model overflows or holds non-finite weights."""
    rows = _rows(logits)
    if len(rows):
        raise NonFiniteError(f"the model's logits ({runtime}) are NaN or infinite on {_samples(rows)} of the "
                             "clean data: the model overflows its dtype or holds non-finite weights "
                             "(see `verifier inspect`)")


def first_nan(value, path: str = "") -> str | None:
    """The path (e.g. `results[0].certificate`) of the first NaN float in a JSON-like value, else None
    (call it before `json_safe` writes NaN as a string)."""
    if isinstance(value, (float, np.floating)):
        return (path or "value") if math.isnan(value) else None
    if isinstance(value, dict):
        items = ((f"{path}.{k}" if path else str(k), v) for k, v in value.items())
    elif isinstance(value, (list, tuple)):
        items = ((f"{path}[{i}]", v) for i, v in enumerate(value))
    elif hasattr(value, "detach") or (isinstance(value, np.ndarray) and value.dtype.kind == "f"):
        value = _numpy(value)
        if value.dtype.kind != "f":
            return None
        bad = np.flatnonzero(np.isnan(value))
        return f"{path}[{int(bad[0])}]" if len(bad) else None
    else:
        return None
    for where, item in items:
        found = first_nan(item, where)
        if found:
            return found
    return None


def require_no_nan(result, what: str) -> None:
    """Refuse a result holding NaN anywhere (a NaN is never a certificate, a risk or a slope)."""
    where = first_nan(result)
    if where:
        raise NonFiniteError(f"{what} came out NaN at {where}: the model or the data overflow in the analysis, "
                             "so no number is reported")
