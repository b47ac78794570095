"""Models that build their shapes from the batch size at run time (jax2tf, torch exports:
`Shape -> Slice -> Concat -> Reshape`; tf2onnx's Flatten: `Shape -> Gather -> Concat -> Reshape`),
as published and through `--perturb`: normalisation fixes the batch to 1 so that every shape
computation folds, then frees it again (checked in onnxruntime); the bounds, which have no rule
for `Shape`, then apply, and give a linear model's closed form."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from verifier.bounds.margins import margin_bounds
from verifier.bounds.network import BoundNetwork
from verifier.convert import convert_model
from verifier.onnx_io import load_model
from verifier.perturb import load_for_analysis
from verifier.validate import validate_against_onnxruntime

pytestmark = pytest.mark.usefixtures("one_thread")
WEIGHT = np.random.default_rng(0).normal(size=(12, 3)).astype(np.float32)
BIAS = np.random.default_rng(2).normal(size=(1, 12)).astype(np.float32)


@pytest.fixture()
def shape_reader(tmp_path):
    """x (N, 4, 3) -> Reshape [-1, 12] -> + Expand(bias, Cast(Concat(Cast(Shape(x))[0:1], [12]))) ->
    MatMul W -> 3 logits (jax2tf's int32 detour to a run-time shape, which onnxscript's optimizer
    cannot fold with a free batch)."""
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Cast", ["shape"], ["shape32"], to=TensorProto.INT32),
             helper.make_node("Slice", ["shape32", "zero", "one"], ["n"]),
             helper.make_node("Concat", ["n", "width"], ["row_shape32"], axis=0),
             helper.make_node("Cast", ["row_shape32"], ["row_shape"], to=TensorProto.INT64),
             helper.make_node("Expand", ["bias", "row_shape"], ["rows"]),
             helper.make_node("Reshape", ["x", "flat_shape"], ["flat"]),
             helper.make_node("Add", ["flat", "rows"], ["shifted"]),
             helper.make_node("MatMul", ["shifted", "W"], ["logits"])]
    constants = [numpy_helper.from_array(np.array([0], np.int64), "zero"),
                 numpy_helper.from_array(np.array([1], np.int64), "one"),
                 numpy_helper.from_array(np.array([12], np.int32), "width"),
                 numpy_helper.from_array(np.array([-1, 12], np.int64), "flat_shape"),
                 numpy_helper.from_array(BIAS, "bias"), numpy_helper.from_array(WEIGHT, "W")]
    graph = helper.make_graph(nodes, "jaxlike", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], constants)
    path = tmp_path / "jaxlike.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    x = np.random.default_rng(1).uniform(size=(6, 4, 3)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x, y=((x.reshape(6, -1) + BIAS) @ WEIGHT).argmax(1))
    return path, tmp_path / "d.npz", x


def _closed_form_margins(x: np.ndarray, y: np.ndarray, radius: float) -> np.ndarray:
    """The worst l_inf margins of the linear model `(flat(x) + BIAS) @ WEIGHT` (no box)."""
    flat = x.reshape(len(x), -1).astype(np.float64)
    gains = WEIGHT.T[None, :, :] - WEIGHT.T[y][:, None, :]  # (N, C, D): the margins' gradients
    logits = (flat + BIAS) @ WEIGHT
    return logits - logits[np.arange(len(x)), y][:, None] + radius * np.abs(gains).sum(-1)


@pytest.mark.parametrize("perturbed", [False, True], ids=["as-published", "perturb"])
def test_shapes_fold_and_the_bounds_apply(shape_reader, perturbed):
    path, data, x = shape_reader
    loaded, samples, _ = load_for_analysis(path, data, "x" if perturbed else None)
    converted = convert_model(loaded)
    assert converted.module_batch is None
    assert not any(node.op_type in ("Shape", "Size") for node in converted.normalized.graph.node)
    assert validate_against_onnxruntime(loaded, converted, samples.x).passed
    radius = 0.05
    bounds = margin_bounds(converted, samples.x, samples.y, radius=radius, norm="inf", box=None).upper.numpy()
    np.testing.assert_allclose(bounds, _closed_form_margins(x, samples.y, radius), atol=1e-5)


def test_tf2onnx_flatten_of_a_dynamic_batch_folds(tmp_path):
    """tf2onnx writes Keras' Flatten as `Reshape(x, Concat(Unsqueeze(Gather(Shape(x), 0)), [-1]))`."""
    nodes = [helper.make_node("Shape", ["x"], ["shape"]),
             helper.make_node("Gather", ["shape", "zero"], ["n"], axis=0),
             helper.make_node("Unsqueeze", ["n", "axes"], ["n1"]),
             helper.make_node("Concat", ["n1", "minus_one"], ["flat_shape"], axis=0),
             helper.make_node("Reshape", ["x", "flat_shape"], ["flat"]),
             helper.make_node("Add", ["flat", "bias"], ["shifted"]),
             helper.make_node("MatMul", ["shifted", "W"], ["logits"])]
    constants = [numpy_helper.from_array(np.array(0, np.int64), "zero"),
                 numpy_helper.from_array(np.array([0], np.int64), "axes"),
                 numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
                 numpy_helper.from_array(BIAS, "bias"), numpy_helper.from_array(WEIGHT, "W")]
    graph = helper.make_graph(nodes, "tf2onnx_flatten",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["unk__1", 4, 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["unk__1", 3])], constants)
    path = tmp_path / "flatten.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    x = np.random.default_rng(4).uniform(size=(5, 4, 3)).astype(np.float32)
    y = ((x.reshape(5, -1) + BIAS) @ WEIGHT).argmax(1)
    converted = convert_model(load_model(path))
    assert converted.module_batch is None
    BoundNetwork.from_model(converted)  # raised "Shape: no bound rule" before the fold
    bounds = margin_bounds(converted, x, y, radius=0.02, norm="inf", box=None).upper.numpy()
    np.testing.assert_allclose(bounds, _closed_form_margins(x, y, 0.02), atol=1e-5)
