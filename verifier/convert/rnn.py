"""LSTM, GRU and RNN (ONNX ops) unrolled into primitive ops for the model's static sequence length.

onnx2torch has no converter for the recurrent ops and the bounds have no rule for them, but for
a fixed sequence length each is a fixed composition of MatMul, Add, Mul, Sub and the gate
activations (Sigmoid, Tanh, Relu): written that way during normalisation, conversion, the
activation sites (sigmoid, tanh), products of variables, Jacobians and bounds all apply with no
new rule. With ONNX's notation (per direction; `[W|R]{gate}` the rows of that gate, `(.)` the
elementwise product; f, g, h the activations, default Sigmoid, Tanh, Tanh):

- RNN: `H_t = f(X_t W^T + H_{t-1} R^T + Wb + Rb)` (default f = Tanh);
- GRU (gates z, r, h): `z = f(X_t Wz^T + H_{t-1} Rz^T + Wbz + Rbz)`, r alike,
  `h = g(X_t Wh^T + (r (.) H_{t-1}) Rh^T + Rbh + Wbh)`, or with `linear_before_reset`
  `h = g(X_t Wh^T + r (.) (H_{t-1} Rh^T + Rbh) + Wbh)`; `H_t = (1 - z) (.) h + z (.) H_{t-1}`;
- LSTM (gates i, o, f, c; peepholes P = [Pi, Po, Pf]): `i = f(X_t Wi^T + H_{t-1} Ri^T +
  Pi (.) C_{t-1} + Wbi + Rbi)`, f alike with Pf, `c = g(X_t Wc^T + H_{t-1} Rc^T + Wbc + Rbc)`,
  `C_t = f (.) C_{t-1} + i (.) c`, `o = f(X_t Wo^T + H_{t-1} Ro^T + Po (.) C_t + Wbo + Rbo)`,
  `H_t = o (.) h(C_t)`.

Every tensor of the unrolled graph is batch first (the bounds and the batched Jacobians take
axis 0 for the samples): the time-first input and outputs of `layout = 0` are Transposes that
`onnxscript.optimizer` fuses with the model's own (torch exports wrap the op in them). The input
projection `X W_gate^T + bias` of every step is one MatMul over the whole sequence; a step reads
its column with a constant `Gather`. A reverse direction runs t = T-1 .. 0 and writes
`H_t` at position t, as ONNX does. An initial state that is absent, or zeros (a constant, or a
`ConstantOfShape` of zeros behind Slice/Reshape, as torch exports write it), starts the
recurrence at 0 with no term for it.

Refused with a clear line: a sequence length the shapes do not fix, `clip`, LSTM
`input_forget`, per-sample `sequence_lens` (unless constant and equal to the length), weights
that are not constants, and activations other than Sigmoid, Tanh and Relu.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import helper, numpy_helper

from verifier.convert.rewrite import STANDARD_DOMAINS, NodeWriter, constant_values, standard_opset
from verifier.errors import UnsupportedOpsError

RECURRENT_OPS = ("LSTM", "GRU", "RNN")
_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
_DEFAULT_ACTIVATIONS = {"LSTM": ("Sigmoid", "Tanh", "Tanh"), "GRU": ("Sigmoid", "Tanh"), "RNN": ("Tanh",)}
_ACTIVATIONS = {"sigmoid": "Sigmoid", "tanh": "Tanh", "relu": "Relu"}
_ZERO_CARRIERS = ("Slice", "Reshape", "Identity", "Squeeze", "Unsqueeze", "Expand", "Transpose")


class _Refused(Exception):
    """One recurrent node cannot be unrolled (the message says why)."""


def lower_rnns(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with every LSTM/GRU/RNN node unrolled (the model itself when it has none);
    raises `UnsupportedOpsError` listing every recurrent node that cannot be."""
    if not any(n.op_type in RECURRENT_OPS and n.domain in STANDARD_DOMAINS for n in model.graph.node):
        return model
    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    graph = lowered.graph
    constants = constant_values(graph)
    shapes = _static_shapes(graph)
    producers = {out: node for node in graph.node for out in node.output}
    opset = standard_opset(lowered)
    nodes: list[onnx.NodeProto] = []
    problems: list[tuple[str, str, str]] = []
    for position, node in enumerate(graph.node):
        if node.op_type not in RECURRENT_OPS or node.domain not in STANDARD_DOMAINS:
            nodes.append(node)
            continue
        writer = NodeWriter(f"verifier_rnn{position}", graph, constants, opset)
        try:
            _unroll(writer, node, shapes, producers)
        except _Refused as why:
            problems.append((node.name or node.output[0], f"{node.op_type} (opset {opset})", str(why)))
            continue
        nodes.extend(writer.nodes)
    if problems:
        raise UnsupportedOpsError("conversion", problems)
    del graph.node[:]
    graph.node.extend(nodes)
    return lowered


@dataclass(frozen=True)
class _Weights:
    """One direction's per-gate matrices (transposed for `x @ w`) and biases."""

    inputs: tuple[np.ndarray, ...]  # W_gate^T, (input, hidden)
    recurrent: tuple[np.ndarray, ...]  # R_gate^T, (hidden, hidden)
    input_bias: tuple[np.ndarray, ...]  # Wb_gate
    recurrent_bias: tuple[np.ndarray, ...]  # Rb_gate
    peepholes: tuple[np.ndarray, ...] | None  # LSTM: Pi, Po, Pf


def _unroll(w: NodeWriter, node: onnx.NodeProto, shapes: dict[str, tuple], producers: dict) -> None:
    op = node.op_type
    attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    text = {k: v.decode() if isinstance(v, bytes) else v for k, v in attributes.items()}
    if "clip" in attributes:
        raise _Refused("cell clipping (clip) is not supported: unrolling writes the unclipped cell")
    if op == "LSTM" and int(attributes.get("input_forget", 0)):
        raise _Refused("coupled input and forget gates (input_forget=1) are not supported")
    inputs = [*node.input, *[""] * (8 - len(node.input))]
    layout = int(attributes.get("layout", 0))
    steps = _sequence_length(node, shapes, layout)
    direction = str(text.get("direction", "forward"))
    if direction not in ("forward", "reverse", "bidirectional"):
        raise _Refused(f"direction {direction!r} is not one of forward, reverse, bidirectional")
    directions = 2 if direction == "bidirectional" else 1
    activations = _activations(op, text.get("activations"), directions)
    weight, recurrent = _constant(w, inputs[1], "W"), _constant(w, inputs[2], "R")
    hidden = int(attributes.get("hidden_size", recurrent.shape[-1]))
    gates = _GATES[op]
    bias = _constant(w, inputs[3], "B") if inputs[3] else np.zeros((directions, 2 * gates * hidden), weight.dtype)
    peepholes = _constant(w, inputs[7], "P") if op == "LSTM" and inputs[7] else None
    _check_lengths(w, inputs[4], steps)
    sequence = inputs[0] if layout else w.add("Transpose", [inputs[0]], perm=[1, 0, 2])  # (N, T, input)
    initial_h = None if _is_zero(inputs[5], w.constants, producers) else inputs[5]
    initial_c = None if op != "LSTM" or _is_zero(inputs[6], w.constants, producers) else inputs[6]
    outputs: list[list[str]] = [[], [], []]  # Y per direction, Y_h, Y_c
    for d in range(directions):
        weights = _split(weight[d], recurrent[d], bias[d], gates, hidden,
                         None if peepholes is None else peepholes[d])
        projections = [_project(w, sequence, weights, g, op, attributes) for g in range(gates)]
        state = _Recurrence(w, op, weights, activations[d], int(attributes.get("linear_before_reset", 0)))
        hidden_state = None if initial_h is None else _row(w, initial_h, d, axis=layout)
        cell = None if initial_c is None else _row(w, initial_c, d, axis=layout)
        reverse = direction == "reverse" or d == 1
        per_step: dict[int, str] = {}
        for t in (range(steps - 1, -1, -1) if reverse else range(steps)):
            hidden_state, cell = state.step([_row(w, p, t, axis=1) for p in projections], hidden_state, cell)
            per_step[t] = hidden_state
        outputs[0].append(w.with_axes("Unsqueeze", w.add("Concat", [w.with_axes("Unsqueeze", per_step[t], [1])
                                                                    for t in range(steps)], axis=1), [2]))
        outputs[1].append(w.with_axes("Unsqueeze", hidden_state, [1]))
        if cell is not None:
            outputs[2].append(w.with_axes("Unsqueeze", cell, [1]))
    _write_outputs(w, node, outputs, layout)


def _sequence_length(node: onnx.NodeProto, shapes: dict[str, tuple], layout: int) -> int:
    shape = shapes.get(node.input[0])
    length = shape[layout] if shape is not None and len(shape) == 3 else None
    if not isinstance(length, int) or length <= 0:
        raise _Refused(f"its sequence length (axis {layout} of {node.input[0]!r}) is not fixed by the model's "
                       "shapes, and unrolling needs it (with --perturb INPUT the model's free axes are fixed to "
                       "the data's shape)")
    return length


def _activations(op: str, given, directions: int) -> list[tuple[str, ...]]:
    count = len(_DEFAULT_ACTIVATIONS[op])
    names = [a.decode() if isinstance(a, bytes) else str(a) for a in given] if given else []
    names = names or list(_DEFAULT_ACTIVATIONS[op]) * directions
    if len(names) != count * directions:
        raise _Refused(f"{len(names)} activations given, {count * directions} expected")
    unknown = sorted({n for n in names if n.lower() not in _ACTIVATIONS})
    if unknown:
        raise _Refused(f"activation(s) {', '.join(unknown)} are not supported (only Sigmoid, Tanh, Relu)")
    canonical = [_ACTIVATIONS[n.lower()] for n in names]
    return [tuple(canonical[d * count:(d + 1) * count]) for d in range(directions)]


def _constant(w: NodeWriter, name: str, role: str) -> np.ndarray:
    if name not in w.constants:
        raise _Refused(f"its {role} input {name!r} is not a constant")
    return np.asarray(w.constants[name])


def _check_lengths(w: NodeWriter, name: str, steps: int) -> None:
    if not name:
        return
    lengths = w.constants.get(name)
    if lengths is None or not np.all(np.asarray(lengths) == steps):
        raise _Refused("per-sample sequence_lens are not supported (only absent, or every length = the sequence's)")


def _is_zero(name: str, constants: dict[str, np.ndarray], producers: dict[str, onnx.NodeProto]) -> bool:
    """The tensor is absent or certainly all zeros (a zero constant or ConstantOfShape, moved)."""
    while name:
        if name in constants:
            return not np.any(constants[name])
        node = producers.get(name)
        if node is None:
            return False
        if node.op_type == "ConstantOfShape":
            value = next((a.t for a in node.attribute if a.name == "value"), None)
            return value is None or not np.any(numpy_helper.to_array(value))
        if node.op_type not in _ZERO_CARRIERS:
            return False
        name = node.input[0]
    return True


def _split(weight: np.ndarray, recurrent: np.ndarray, bias: np.ndarray, gates: int, hidden: int,
           peepholes: np.ndarray | None) -> _Weights:
    rows = [slice(g * hidden, (g + 1) * hidden) for g in range(gates)]
    return _Weights(
        inputs=tuple(np.ascontiguousarray(weight[r].T) for r in rows),
        recurrent=tuple(np.ascontiguousarray(recurrent[r].T) for r in rows),
        input_bias=tuple(bias[:gates * hidden][r] for r in rows),
        recurrent_bias=tuple(bias[gates * hidden:][r] for r in rows),
        peepholes=None if peepholes is None else tuple(peepholes[r] for r in rows[:3]),
    )


def _project(w: NodeWriter, sequence: str, weights: _Weights, gate: int, op: str, attributes: dict) -> str:
    """`X W_gate^T + bias` over the whole sequence, (N, T, hidden); the GRU candidate with
    `linear_before_reset` keeps its recurrent bias inside the reset product."""
    inner = op == "GRU" and gate == 2 and int(attributes.get("linear_before_reset", 0))
    bias = weights.input_bias[gate] + (0.0 if inner else weights.recurrent_bias[gate])
    product = w.add("MatMul", [sequence, w.constant(f"W{gate}_", weights.inputs[gate])])
    return w.add("Add", [product, w.constant(f"b{gate}_", np.asarray(bias, weights.inputs[gate].dtype))])


def _row(w: NodeWriter, tensor: str, index: int, axis: int = 0) -> str:
    """`tensor[index]` along `axis` (a constant Gather drops the axis)."""
    return w.add("Gather", [tensor, w.constant("i", np.asarray(index, np.int64))], axis=axis)


class _Recurrence:
    """One direction's step `(projections of X_t, H_{t-1}, C_{t-1}) -> (H_t, C_t)`; None states are 0."""

    def __init__(self, w: NodeWriter, op: str, weights: _Weights, activations: tuple[str, ...],
                 linear_before_reset: int) -> None:
        self.w, self.op, self.activations = w, op, activations
        self.linear_before_reset = linear_before_reset
        # Each constant once per direction, shared by every step.
        self.recurrent = [w.constant(f"R{g}_", r) for g, r in enumerate(weights.recurrent)]
        self.peepholes = None if weights.peepholes is None else [w.constant(f"P{k}_", p)
                                                                 for k, p in enumerate(weights.peepholes)]
        if op == "GRU":
            dtype = weights.recurrent[2].dtype
            self.candidate_bias = w.constant("Rb2_", np.asarray(weights.recurrent_bias[2], dtype))
            self.one = w.constant("one", np.ones((), dtype))

    def _recurrent(self, state: str | None, gate: int, projection: str) -> str:
        if state is None:
            return projection
        product = self.w.add("MatMul", [state, self.recurrent[gate]])
        return self.w.add("Add", [projection, product])

    def _peephole(self, value: str, cell: str | None, which: int) -> str:
        if cell is None or self.peepholes is None:
            return value
        scaled = self.w.add("Mul", [cell, self.peepholes[which]])
        return self.w.add("Add", [value, scaled])

    def _act(self, index: int, value: str) -> str:
        return self.w.add(self.activations[index], [value])

    def step(self, x: list[str], h: str | None, c: str | None) -> tuple[str, str | None]:
        """The next hidden (and, for LSTM, cell) state."""
        if self.op == "RNN":
            return self._act(0, self._recurrent(h, 0, x[0])), None
        if self.op == "GRU":
            return self._gru(x, h), None
        return self._lstm(x, h, c)

    def _gru(self, x: list[str], h: str | None) -> str:
        w = self.w
        update = self._act(0, self._recurrent(h, 0, x[0]))
        if h is None:  # r (.) 0 = 0: the candidate sees only its input (and, before reset, Rbh (.) r)
            if self.linear_before_reset:
                reset = self._act(0, x[1])
                candidate = self._act(1, w.add("Add", [x[2], w.add("Mul", [reset, self.candidate_bias])]))
            else:
                candidate = self._act(1, x[2])
            return w.add("Mul", [w.add("Sub", [self.one, update]), candidate])
        reset = self._act(0, self._recurrent(h, 1, x[1]))
        if self.linear_before_reset:
            inner = w.add("Add", [w.add("MatMul", [h, self.recurrent[2]]), self.candidate_bias])
            candidate = self._act(1, w.add("Add", [x[2], w.add("Mul", [reset, inner])]))
        else:
            candidate = self._act(1, self._recurrent(w.add("Mul", [reset, h]), 2, x[2]))
        # H_t = (1 - z) (.) h + z (.) H_{t-1} = h + z (.) (H_{t-1} - h)
        return w.add("Add", [candidate, w.add("Mul", [update, w.add("Sub", [h, candidate])])])

    def _lstm(self, x: list[str], h: str | None, c: str | None) -> tuple[str, str]:
        w = self.w
        input_gate = self._act(0, self._peephole(self._recurrent(h, 0, x[0]), c, 0))
        forget_gate = self._act(0, self._peephole(self._recurrent(h, 2, x[2]), c, 2))
        candidate = self._act(1, self._recurrent(h, 3, x[3]))
        written = w.add("Mul", [input_gate, candidate])
        cell = written if c is None else w.add("Add", [w.add("Mul", [forget_gate, c]), written])
        output_gate = self._act(0, self._peephole(self._recurrent(h, 1, x[1]), cell, 1))
        return w.add("Mul", [output_gate, self._act(2, cell)]), cell


def _write_outputs(w: NodeWriter, node: onnx.NodeProto, outputs: list[list[str]], layout: int) -> None:
    """Y (T, D, N, H), Y_h and Y_c (D, N, H) from the batch-first parts; as they are for layout 1."""
    axes = (2, 1, 1)
    perms = ([1, 2, 0, 3], [1, 0, 2], [1, 0, 2])
    for index, parts in enumerate(outputs):
        target = node.output[index] if len(node.output) > index and node.output[index] else None
        if target is None or not parts:
            continue
        joined = parts[0] if len(parts) == 1 else w.add("Concat", parts, axis=axes[index])
        if layout:
            w.add("Identity", [joined], target)
        else:
            w.add("Transpose", [joined], target, perm=perms[index])


def _static_shapes(graph: onnx.GraphProto) -> dict[str, tuple]:
    """Tensor name -> shape (ints where known, None elsewhere) from the graph's value infos."""
    shapes: dict[str, tuple] = {}
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            shapes[vi.name] = tuple(int(d.dim_value) if d.HasField("dim_value") else None
                                    for d in vi.type.tensor_type.shape.dim)
    return shapes
