"""verifier's own converters, registered through onnx2torch's public registry.

onnx2torch keys converters by the exact `since_version` of an op's schema and stops at
opset 16, so exports at opsets 17-21 miss converters for ops whose schema only widened its types.
Those get an *alias* to the newest older converter (with a guard where the new version added a
feature). Ops whose semantics changed get a converter here: `Gelu`-20, `Split`-18, the
`Reduce*`-18/20 family (axes became an input), and verifier-domain `Reshape`/`Slice` whose
constant operands are baked in at conversion time so that `torch.func.vmap` can trace them.
`Clip`-11/12/13 replaces onnx2torch's own, which refuses an empty bound name (`Clip(x, "", max)`,
what both torch exporters write for `clamp(max=...)`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from verifier.convert.compat import import_onnx2torch
from verifier.convert.normalize import VERIFIER_DOMAIN

onnx2torch = import_onnx2torch()
from onnx2torch.node_converters import registry  # noqa: E402
from onnx2torch.node_converters.registry import add_converter, get_converter  # noqa: E402
from onnx2torch.onnx_graph import OnnxGraph  # noqa: E402
from onnx2torch.onnx_node import OnnxNode  # noqa: E402
from onnx2torch.utils.common import (  # noqa: E402
    OnnxMapping,
    OnnxToTorchModule,
    OperationConverterResult,
    get_const_value,
)

Guard = Callable[[OnnxNode], str | None]


def _constant(graph: OnnxGraph, name: str) -> torch.Tensor | None:
    if not name or name not in graph.initializers:
        return None
    return graph.initializers[name].to_torch()


def _data_only(node: OnnxNode) -> OnnxMapping:
    """Map only the first input: the others were baked into the module."""
    return OnnxMapping(inputs=(node.input_values[0],), outputs=node.output_values)


def _result(module: nn.Module, mapping: OnnxMapping) -> OperationConverterResult:
    return OperationConverterResult(torch_module=module, onnx_mapping=mapping)


class BakedReshape(nn.Module, OnnxToTorchModule):
    """ONNX Reshape with its target shape fixed at conversion (allowzero handled)."""

    def __init__(self, shape: Sequence[int], allowzero: bool) -> None:
        super().__init__()
        self.shape = [int(s) for s in shape]
        self.allowzero = allowzero

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        target = self.shape if self.allowzero else [x.shape[i] if s == 0 else s for i, s in enumerate(self.shape)]
        return torch.reshape(x, target)


class DynamicReshape(nn.Module, OnnxToTorchModule):
    """ONNX Reshape whose shape is computed in the graph (not vmap-traceable)."""

    def __init__(self, allowzero: bool) -> None:
        super().__init__()
        self.allowzero = allowzero

    def forward(self, x: torch.Tensor, shape: torch.Tensor) -> torch.Tensor:  # noqa: D102
        dims = [int(s) for s in shape.tolist()]
        if not self.allowzero:
            dims = [x.shape[i] if s == 0 else s for i, s in enumerate(dims)]
        return torch.reshape(x, dims)


class BakedSlice(nn.Module, OnnxToTorchModule):
    """ONNX Slice with constant starts/ends/axes/steps (Python slice semantics match ONNX's)."""

    def __init__(self, starts: list[int], ends: list[int], axes: list[int], steps: list[int]) -> None:
        super().__init__()
        self.parts = list(zip(axes, starts, ends, steps))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        for axis, start, end, step in self.parts:
            axis = axis % x.dim()
            if step > 0:
                index = [slice(None)] * axis + [slice(start, end, step)]
                x = x[tuple(index)]
            else:
                picks = range(*slice(start, end, step).indices(x.shape[axis]))
                x = torch.index_select(x, axis, torch.tensor(list(picks), dtype=torch.long, device=x.device))
        return x


class Clamp(nn.Module, OnnxToTorchModule):
    """ONNX Clip with constant bounds; None is no bound."""

    def __init__(self, low: float | None, high: float | None) -> None:
        super().__init__()
        self.low, self.high = low, high

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return torch.clamp(x, self.low, self.high)


class Reduce(nn.Module, OnnxToTorchModule):
    """ONNX Reduce* (opset 18+: axes as an input) with constant axes.

    With no axes and `noop_with_empty_axes`, nothing is reduced but the elementwise part of the
    reduction still applies (as in onnxruntime and ONNX's reference): |x| for L1/L2, x*x for
    SumSquare, log x for LogSum, x for the others (LogSumExp: log(exp x) = x).
    """

    _OPS: dict[str, Callable[[torch.Tensor, list[int], bool], torch.Tensor]] = {
        "ReduceMean": lambda x, d, k: torch.mean(x, dim=d, keepdim=k),
        "ReduceSum": lambda x, d, k: torch.sum(x, dim=d, keepdim=k),
        "ReduceMax": lambda x, d, k: torch.amax(x, dim=d, keepdim=k),
        "ReduceMin": lambda x, d, k: torch.amin(x, dim=d, keepdim=k),
        "ReduceProd": lambda x, d, k: _prod(x, d, k),
        "ReduceL1": lambda x, d, k: torch.sum(torch.abs(x), dim=d, keepdim=k),
        "ReduceL2": lambda x, d, k: torch.sqrt(torch.sum(x * x, dim=d, keepdim=k)),
        "ReduceSumSquare": lambda x, d, k: torch.sum(x * x, dim=d, keepdim=k),
        "ReduceLogSum": lambda x, d, k: torch.log(torch.sum(x, dim=d, keepdim=k)),
        "ReduceLogSumExp": lambda x, d, k: torch.logsumexp(x, dim=d, keepdim=k),
    }
    _ELEMENTWISE: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "ReduceL1": torch.abs,
        "ReduceL2": torch.abs,
        "ReduceSumSquare": lambda x: x * x,
        "ReduceLogSum": torch.log,
    }

    def __init__(self, op_type: str, axes: list[int] | None, keepdims: bool, noop_with_empty_axes: bool) -> None:
        super().__init__()
        self.op_type, self.axes, self.keepdims, self.noop = op_type, axes, keepdims, noop_with_empty_axes

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        if not self.axes:
            if self.noop:
                elementwise = self._ELEMENTWISE.get(self.op_type)
                return x if elementwise is None else elementwise(x)
            return self._OPS[self.op_type](x, list(range(x.dim())), self.keepdims)
        return self._OPS[self.op_type](x, self.axes, self.keepdims)


def _prod(x: torch.Tensor, dims: list[int], keepdim: bool) -> torch.Tensor:
    for dim in sorted((d % x.dim() for d in dims), reverse=True):
        x = torch.prod(x, dim=dim, keepdim=keepdim)
    return x


class SplitSizes(nn.Module, OnnxToTorchModule):
    """ONNX Split-18 with constant sizes, or `num_outputs` chunks of ceil(n / num_outputs): the
    last ones smaller, possibly empty (width 6 in 4 outputs: 2, 2, 2, 0)."""

    def __init__(self, axis: int, sizes: list[int] | None, num_outputs: int) -> None:
        super().__init__()
        self.axis, self.sizes, self.num_outputs = axis, sizes, num_outputs

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:  # noqa: D102
        if self.sizes is not None:
            return tuple(torch.split(x, self.sizes, dim=self.axis))
        width = x.shape[self.axis]
        chunk = -(-width // self.num_outputs)
        sizes = [max(0, min(chunk, width - i * chunk)) for i in range(self.num_outputs)]
        return tuple(torch.split(x, sizes, dim=self.axis))


@add_converter(operation_type="Reshape", version=1, domain=VERIFIER_DOMAIN)
def _reshape(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    allowzero = bool(node.attributes.get("allowzero", 0))
    shape = _constant(graph, node.input_values[1])
    if shape is None:
        return _result(DynamicReshape(allowzero), OnnxMapping(node.input_values[:2], node.output_values))
    return _result(BakedReshape(shape.tolist(), allowzero), _data_only(node))


@add_converter(operation_type="Slice", version=1, domain=VERIFIER_DOMAIN)
def _slice(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    inputs = list(node.input_values) + [""] * (5 - len(node.input_values))
    starts = _constant(graph, inputs[1]).tolist()
    ends = _constant(graph, inputs[2]).tolist()
    axes_t, steps_t = _constant(graph, inputs[3]), _constant(graph, inputs[4])
    axes = axes_t.tolist() if axes_t is not None else list(range(len(starts)))
    steps = steps_t.tolist() if steps_t is not None else [1] * len(starts)
    return _result(BakedSlice(starts, ends, axes, steps), _data_only(node))


def _replace_converter(operation_type: str, version: int):
    """Register a converter for a standard op version in place of onnx2torch's own."""
    description = registry.OperationDescription(domain="", operation_type=operation_type, version=version)
    registry._CONVERTER_REGISTRY.pop(description, None)  # noqa: SLF001 - onnx2torch has no public override
    return add_converter(operation_type=operation_type, version=version)


def _clip(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    """Clip-11+: bounds are optional inputs; a missing or empty name is no bound."""
    bounds: list[float | None] = []
    for slot in (1, 2):
        name = node.input_values[slot] if len(node.input_values) > slot else ""
        if not name:
            bounds.append(None)
            continue
        try:
            value = get_const_value(name, graph)
        except KeyError as err:
            raise NotImplementedError("Clip with bounds computed in the graph") from err
        bounds.append(float(torch.as_tensor(value).reshape(())))
    module = nn.Identity() if bounds == [None, None] else Clamp(*bounds)
    return _result(module, _data_only(node))


for _version in (11, 12, 13):
    _replace_converter("Clip", _version)(_clip)


class CastToFloat(nn.Module, OnnxToTorchModule):
    """ONNX Cast to a float type: to the dtype of a buffer made in that type, which follows the
    module's `.to(dtype)` — native runs cast as the file says, float64 analyses stay float64 (an
    integer held input cast to float32 would otherwise meet float64 weights)."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.register_buffer("reference", torch.zeros((), dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # noqa: D102
        return x.to(self.reference.dtype)


_FLOAT_CASTS = {1: torch.float32, 10: torch.float16, 11: torch.float64, 16: torch.bfloat16}  # TensorProto codes


def _cast(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    """Cast-9/13: float targets follow the module's dtype (`CastToFloat`), others as onnx2torch does."""
    target = _FLOAT_CASTS.get(int(node.attributes.get("to", 0)))
    if target is None:
        return _ONNX2TORCH_CAST(node, graph)
    return _result(CastToFloat(target), _data_only(node))


_ONNX2TORCH_CAST = get_converter(operation_type="Cast", version=13)
for _version in (9, 13):
    _replace_converter("Cast", _version)(_cast)


@add_converter(operation_type="Gelu", version=20)
def _gelu(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:  # noqa: ARG001
    approximate = node.attributes.get("approximate", "none")
    if isinstance(approximate, bytes):
        approximate = approximate.decode()
    return _result(nn.GELU(approximate=approximate), _data_only(node))


def _constant_input(node: OnnxNode, graph: OnnxGraph, position: int, what: str) -> torch.Tensor | None:
    """An optional input that must be a constant when given (baked into the module)."""
    name = node.input_values[position] if len(node.input_values) > position else ""
    value = _constant(graph, name)
    if name and value is None:
        raise NotImplementedError(f"{what} computed in the graph")
    return value


@add_converter(operation_type="Split", version=18)
def _split(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    sizes = _constant_input(node, graph, 1, "Split sizes")
    module = SplitSizes(
        axis=int(node.attributes.get("axis", 0)),
        sizes=None if sizes is None else [int(s) for s in sizes.tolist()],
        num_outputs=int(node.attributes.get("num_outputs", len(node.output_values))),
    )
    return _result(module, _data_only(node))


def _reduce(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
    axes = _constant_input(node, graph, 1, "axes")
    module = Reduce(
        node.operation_type,
        None if axes is None else [int(a) for a in axes.tolist()],
        keepdims=bool(node.attributes.get("keepdims", 1)),
        noop_with_empty_axes=bool(node.attributes.get("noop_with_empty_axes", 0)),
    )
    return _result(module, _data_only(node))


for _op in Reduce._OPS:
    for _version in (18, 20) if _op in ("ReduceMax", "ReduceMin") else (18,):
        add_converter(operation_type=_op, version=_version)(_reduce)


def _no_dilations(node: OnnxNode) -> str | None:
    dilations = node.attributes.get("dilations")
    return None if not dilations or all(d == 1 for d in dilations) else "dilations are not supported"


def _pad_guard(node: OnnxNode) -> str | None:
    if len(node.input_values) > 3 and node.input_values[3]:
        return "Pad with an axes input is not supported"
    mode = node.attributes.get("mode", "constant")
    return "Pad mode 'wrap' is not supported" if mode in ("wrap", b"wrap") else None


def _no_reduction(node: OnnxNode) -> str | None:
    return None if node.attributes.get("reduction", "none") in ("none", b"none") else "reduction is not supported"


# (op, new since_version) -> (older since_version whose converter is equivalent, guard)
_ALIASES: dict[tuple[str, int], tuple[int, Guard | None]] = {
    ("AveragePool", 19): (11, _no_dilations),
    ("Cast", 19): (13, None), ("Cast", 21): (13, None),
    ("Constant", 19): (13, None), ("Constant", 21): (13, None),
    ("ConstantOfShape", 20): (9, None), ("ConstantOfShape", 21): (9, None),
    ("Equal", 19): (13, None),
    ("Flatten", 21): (13, None),
    ("GreaterOrEqual", 16): (12, None), ("LessOrEqual", 16): (12, None),
    ("Identity", 19): (16, None), ("Identity", 21): (16, None),
    ("IsInf", 20): (10, None), ("IsNaN", 20): (13, None),
    ("Pad", 18): (13, _pad_guard), ("Pad", 19): (13, _pad_guard), ("Pad", 21): (13, _pad_guard),
    ("ScatterND", 18): (16, _no_reduction),
    ("Shape", 19): (15, None), ("Shape", 21): (15, None),
    ("Squeeze", 21): (13, None), ("Unsqueeze", 21): (13, None),
    ("Transpose", 21): (13, None),
}


def _alias(op_type: str, older: int, guard: Guard | None):
    def convert(node: OnnxNode, graph: OnnxGraph) -> OperationConverterResult:
        problem = guard(node) if guard else None
        if problem:
            raise NotImplementedError(problem)
        return get_converter(operation_type=op_type, version=older)(node, graph)

    return convert


def _register_aliases() -> None:
    for (op_type, version), (older, guard) in _ALIASES.items():
        try:
            get_converter(operation_type=op_type, version=version)
        except NotImplementedError:
            add_converter(operation_type=op_type, version=version)(_alias(op_type, older, guard))


_register_aliases()
