"""LSTM/GRU/RNN unrolled (`verifier.convert.rnn`): onnxruntime agreement of the unrolled graph
for every direction, layout, initial state, peepholes and `linear_before_reset`; the whole
pipeline (conversion, validation) on a tiny LSTM classifier; sound margin bounds (sampling
never exceeds them); clear refusals."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from verifier.bounds.margins import margin_bounds
from verifier.convert import convert_model, unsupported_nodes
from verifier.convert.rnn import lower_rnns
from verifier.errors import UnsupportedOpsError
from verifier.onnx_io import load_model
from verifier.validate import validate_against_onnxruntime

pytestmark = pytest.mark.usefixtures("one_thread")
STEPS, BATCH, FEATURES, HIDDEN = 4, 3, 5, 3
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def _recurrent_model(op: str, direction: str = "forward", layout: int = 0, initial: bool = False,
                     peepholes: bool = False, seed: int = 0, steps: int | None = STEPS, **attributes) -> onnx.ModelProto:
    """One recurrent node with random constant weights; outputs Y, Y_h (and Y_c for LSTM)."""
    rng = np.random.default_rng(seed)
    dirs, gates = (2 if direction == "bidirectional" else 1), GATES[op]
    weights = {"W": rng.normal(size=(dirs, gates * HIDDEN, FEATURES)), "R": rng.normal(size=(dirs, gates * HIDDEN, HIDDEN)),
               "B": rng.normal(size=(dirs, 2 * gates * HIDDEN))}
    inputs = ["X", "W", "R", "B", ""]
    x_shape = [steps, BATCH, FEATURES] if layout == 0 else [BATCH, steps, FEATURES]
    graph_inputs = [helper.make_tensor_value_info("X", TensorProto.FLOAT, x_shape)]
    state_shape = [dirs, BATCH, HIDDEN] if layout == 0 else [BATCH, dirs, HIDDEN]
    states = ["initial_h", "initial_c"] if op == "LSTM" else ["initial_h"]
    if initial:
        inputs += states
        graph_inputs += [helper.make_tensor_value_info(s, TensorProto.FLOAT, state_shape) for s in states]
    if peepholes:
        inputs += [""] * (7 - len(inputs)) + ["P"]
        weights["P"] = rng.normal(size=(dirs, 3 * HIDDEN))
    outputs = ["Y", "Y_h", "Y_c"] if op == "LSTM" else ["Y", "Y_h"]
    node = helper.make_node(op, inputs, outputs, hidden_size=HIDDEN, direction=direction, layout=layout, **attributes)
    graph = helper.make_graph([node], op, graph_inputs,
                              [helper.make_tensor_value_info(o, TensorProto.FLOAT, None) for o in outputs],
                              [numpy_helper.from_array(v.astype(np.float32) * 0.6, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)])
    return onnx.shape_inference.infer_shapes(model)


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _feeds(model: onnx.ModelProto, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {vi.name: rng.normal(size=[d.dim_value for d in vi.type.tensor_type.shape.dim]).astype(np.float32)
            for vi in model.graph.input}


def _assert_agrees(model: onnx.ModelProto, expected: list[np.ndarray] | None = None,
                   feeds: dict[str, np.ndarray] | None = None) -> None:
    """The unrolled graph gives onnxruntime's outputs of `model` (or `expected`) to 1e-5."""
    lowered = lower_rnns(model)
    assert not any(n.op_type in GATES for n in lowered.graph.node)
    feeds = feeds or _feeds(model)
    expected = expected or _run(model, feeds)
    for want, got in zip(expected, _run(lowered, feeds), strict=True):
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("op", sorted(GATES))
@pytest.mark.parametrize("direction", ["forward", "reverse", "bidirectional"])
def test_unrolled_matches_onnxruntime(op: str, direction: str) -> None:
    _assert_agrees(_recurrent_model(op, direction))


@pytest.mark.parametrize("op", sorted(GATES))
def test_batch_first_layout_matches_the_time_first_model(op: str) -> None:
    """onnxruntime refuses layout = 1: compare with the same weights at layout 0, transposed."""
    time_first = _recurrent_model(op, "bidirectional", layout=0, initial=True)
    feeds = _feeds(time_first)
    expected = _run(time_first, feeds)
    batch_first = _recurrent_model(op, "bidirectional", layout=1, initial=True)
    moved = {k: v.transpose(1, 0, 2) for k, v in feeds.items()}
    _assert_agrees(batch_first, [expected[0].transpose(2, 0, 1, 3), *(e.transpose(1, 0, 2) for e in expected[1:])],
                   moved)


@pytest.mark.parametrize("direction", ["forward", "bidirectional"])
def test_lstm_with_peepholes_and_initial_state(direction: str) -> None:
    _assert_agrees(_recurrent_model("LSTM", direction, initial=True, peepholes=True, seed=2))


@pytest.mark.parametrize("initial", [False, True])
def test_gru_linear_before_reset(initial: bool) -> None:
    _assert_agrees(_recurrent_model("GRU", "bidirectional", initial=initial, seed=3, linear_before_reset=1))


def test_explicit_activations() -> None:
    model = _recurrent_model("RNN", "bidirectional", seed=4, activations=["Relu", "Sigmoid"])
    _assert_agrees(model)


def _classifier(op: str = "LSTM") -> onnx.ModelProto:
    """x (N, STEPS, FEATURES) -> time first -> LSTM -> last hidden state -> Gemm -> 3 logits."""
    recurrent = _recurrent_model(op, "forward", seed=5)
    rng = np.random.default_rng(6)
    graph = recurrent.graph
    graph.input[0].CopyFrom(helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", STEPS, FEATURES]))
    graph.node.insert(0, helper.make_node("Transpose", ["x"], ["X"], perm=[1, 0, 2]))
    graph.node.extend([
        helper.make_node("Transpose", ["Y_h"], ["h_batch"], perm=[1, 0, 2]),
        helper.make_node("Flatten", ["h_batch"], ["h"], axis=1),
        helper.make_node("Gemm", ["h", "head_w", "head_b"], ["logits"]),
    ])
    graph.initializer.extend([numpy_helper.from_array(rng.normal(size=(HIDDEN, 3)).astype(np.float32), "head_w"),
                              numpy_helper.from_array(rng.normal(size=3).astype(np.float32), "head_b")])
    del graph.output[:]
    del graph.value_info[:]
    graph.output.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3]))
    return onnx.shape_inference.infer_shapes(recurrent)


def test_lstm_classifier_converts_validates_and_bounds_are_sound(tmp_path) -> None:
    path = tmp_path / "lstm.onnx"
    onnx.save(_classifier(), str(path))
    loaded = load_model(path)
    converted = convert_model(loaded)
    rng = np.random.default_rng(7)
    x = rng.normal(size=(6, STEPS, FEATURES)).astype(np.float32)
    assert validate_against_onnxruntime(loaded, converted, x).passed
    logits = converted.logits(torch.as_tensor(x)).detach().numpy()
    y = logits.argmax(1)
    radius = 0.05
    bounds = margin_bounds(converted, x, y, radius=radius, norm="inf", box=None).upper.numpy()
    for i in range(len(x)):
        noise = rng.uniform(-radius, radius, size=(4000, STEPS, FEATURES))
        noise[:8] = np.sign(rng.normal(size=(8, STEPS, FEATURES))) * radius  # corners too
        moved = converted.logits(torch.as_tensor(x[i] + noise, dtype=torch.float32)).detach().numpy().astype(np.float64)
        margins = moved - moved[:, [y[i]]]
        assert np.all(margins.max(0) <= bounds[i] + 1e-5)
        assert np.isfinite(bounds[i]).all()


def test_refusals_name_the_node_and_the_reason(tmp_path) -> None:
    with pytest.raises(UnsupportedOpsError, match="clip"):
        lower_rnns(_recurrent_model("LSTM", clip=1.0))
    with pytest.raises(UnsupportedOpsError, match="not supported .only Sigmoid, Tanh, Relu"):
        lower_rnns(_recurrent_model("RNN", activations=["Softsign"]))
    dynamic = _recurrent_model("GRU", steps=None)
    path = tmp_path / "dynamic.onnx"
    onnx.save(dynamic, str(path))
    error = unsupported_nodes(load_model(path))
    assert error is not None and "sequence length" in str(error) and "GRU" in str(error)


def _torch_style_classifier() -> onnx.ModelProto:
    """As torch exports an LSTM: a free sequence axis, time first by a Transpose, and the initial
    state a ConstantOfShape of zeros sized from the batch at run time."""
    model = _classifier()
    graph = model.graph
    graph.input[0].type.tensor_type.shape.dim[1].dim_param = "T"
    lstm = next(n for n in graph.node if n.op_type == "LSTM")
    lstm.input.extend(["h0", "c0"])  # after X, W, R, B and an empty sequence_lens
    graph.initializer.extend([numpy_helper.from_array(np.array([1], np.int64), "one"),
                              numpy_helper.from_array(np.array([HIDDEN], np.int64), "width"),
                              numpy_helper.from_array(np.array(1, np.int64), "batch_axis"),
                              numpy_helper.from_array(np.array([0], np.int64), "axis0")])
    prefix = [helper.make_node("Shape", ["X"], ["shape"]),
              helper.make_node("Gather", ["shape", "batch_axis"], ["n"], axis=0),
              helper.make_node("Unsqueeze", ["n", "axis0"], ["n1"]),
              helper.make_node("Concat", ["one", "n1", "width"], ["state_shape"], axis=0),
              helper.make_node("ConstantOfShape", ["state_shape"], ["h0"]),
              helper.make_node("Identity", ["h0"], ["c0"])]
    nodes = [graph.node[0], *prefix, *graph.node[1:]]
    del graph.node[:]
    graph.node.extend(nodes)
    del graph.value_info[:]
    return onnx.shape_inference.infer_shapes(model)


def test_free_sequence_axis_is_fixed_from_the_data_by_perturb(tmp_path) -> None:
    from verifier.perturb import load_for_analysis

    path, data = tmp_path / "torch_style.onnx", tmp_path / "d.npz"
    onnx.save(_torch_style_classifier(), str(path))
    x = np.random.default_rng(8).normal(size=(5, STEPS, FEATURES)).astype(np.float32)
    np.savez(data, x=x)
    error = unsupported_nodes(load_model(path))
    assert error is not None and "sequence length" in str(error) and "--perturb" in str(error)
    loaded, samples, _ = load_for_analysis(path, data, "x")
    converted = convert_model(loaded)
    assert validate_against_onnxruntime(loaded, converted, samples.x).passed
    kinds = {n.op_type for n in converted.normalized.graph.node}
    assert "LSTM" not in kinds and "ConstantOfShape" not in kinds  # the zero state adds no term
