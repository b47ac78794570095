"""Bound rules added for real exports (magika's LayerNorm and its decomposed softmax): Max/Min
with a constant and ReduceMax (non-decreasing), Reciprocal (decreasing on each side of 0); and
the softmax written out as `Exp(a) / ReduceSum(Exp(a))` read as its logits by the head. Sound:
sampled margins never exceed the bounds."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from verifier.bounds.margins import margin_bounds
from verifier.convert import convert_model
from verifier.onnx_io import load_model
from verifier.validate import validate_against_onnxruntime

pytestmark = pytest.mark.usefixtures("one_thread")


def _model(path, written_softmax: bool) -> None:
    """x (N, 4) -> Gemm -> Max(., -0.5) = u; r = 1 / (0.5 + max(u)^2); logits z = Gemm(u * r);
    with `written_softmax` the output is jax2tf's Exp(z - max z) / Expand(ReduceSum(Exp)) of them."""
    rng = np.random.default_rng(1)
    const = {"w1": rng.normal(size=(4, 5)), "b1": rng.normal(size=5) * 0.1, "floor": np.array(-0.5),
             "half": np.array(0.5), "w2": rng.normal(size=(5, 3)), "b2": np.zeros(3),
             "axes": np.array([-1], np.int64), "ninf": np.array(-np.inf), "shape": np.array([1, 3], np.int64)}
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"]),
             helper.make_node("Max", ["h", "floor"], ["u"]),
             helper.make_node("ReduceMax", ["u"], ["peak"], axes=[-1], keepdims=1),
             helper.make_node("Mul", ["peak", "peak"], ["square"]),
             helper.make_node("Add", ["square", "half"], ["positive"]),
             helper.make_node("Reciprocal", ["positive"], ["r"]),
             helper.make_node("Mul", ["u", "r"], ["scaled"]),
             helper.make_node("Gemm", ["scaled", "w2", "b2"], ["z"])]
    output = "z"
    if written_softmax:
        nodes += [helper.make_node("ReduceMax", ["z"], ["zmax"], axes=[-1], keepdims=1),
                  helper.make_node("Max", ["ninf", "zmax"], ["zpeak"]),
                  helper.make_node("Sub", ["z", "zpeak"], ["shifted"]),
                  helper.make_node("Exp", ["shifted"], ["e"]),
                  helper.make_node("ReduceSum", ["e", "axes"], ["total"], keepdims=1),
                  helper.make_node("Expand", ["total", "shape"], ["spread"]),
                  helper.make_node("Div", ["e", "spread"], ["probabilities"])]
        output = "probabilities"
    initializers = [numpy_helper.from_array(v.astype(np.float32) if v.dtype != np.int64 else v, k)
                    for k, v in const.items()]
    graph = helper.make_graph(nodes, "rules", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info(output, TensorProto.FLOAT, ["N", 3])], initializers)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))


@pytest.mark.parametrize("written_softmax", [False, True])
def test_bounds_through_max_reduce_max_and_reciprocal_are_sound(tmp_path, written_softmax: bool) -> None:
    path = tmp_path / "rules.onnx"
    _model(path, written_softmax)
    loaded = load_model(path)
    converted = convert_model(loaded)
    if written_softmax:
        assert converted.head.tensor == "z" and "Exp(a) / ReduceSum(Exp(a))" in converted.head.reason
    rng = np.random.default_rng(2)
    x = rng.normal(size=(6, 4)).astype(np.float32)
    assert validate_against_onnxruntime(loaded, converted, x).passed
    y = converted.logits(torch.as_tensor(x)).detach().numpy().argmax(1)
    radius = 0.1
    upper = margin_bounds(converted, x, y, radius=radius, norm="inf", box=None).upper.numpy()
    assert np.isfinite(upper).all()
    _sampling_stays_below(converted, x, y, upper, radius, 4000, rng)


def test_bounds_through_a_scalar_per_sample(tmp_path) -> None:
    """A reduction over all of a sample's axes (jax2tf's LayerNorm sums, shape (N,)) in the linear
    bounds: the back-substitution has no unit axis there (was an IndexError); sound by sampling."""
    rng = np.random.default_rng(3)
    nodes = [helper.make_node("ReduceSum", ["x", "axes"], ["total"], keepdims=0),
             helper.make_node("Mul", ["total", "total"], ["square"]),  # a product: its input is tightened
             helper.make_node("Unsqueeze", ["square", "axes"], ["column"]),
             helper.make_node("Mul", ["x", "column"], ["scaled"]),
             helper.make_node("Gemm", ["scaled", "w", "b"], ["logits"])]
    initializers = [numpy_helper.from_array(np.array([1], np.int64), "axes"),
                    numpy_helper.from_array(rng.normal(size=(4, 3)).astype(np.float32), "w"),
                    numpy_helper.from_array(np.zeros(3, np.float32), "b")]
    graph = helper.make_graph(nodes, "scalar", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], initializers)
    path = tmp_path / "scalar.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    converted = convert_model(load_model(path))
    x = rng.normal(size=(5, 4)).astype(np.float32)
    y = converted.logits(torch.as_tensor(x)).detach().numpy().argmax(1)
    radius = 0.05
    upper = margin_bounds(converted, x, y, radius=radius, norm="inf", box=None).upper.numpy()
    assert np.isfinite(upper).all()
    _sampling_stays_below(converted, x, y, upper, radius, 3000, rng)


def _sampling_stays_below(converted, x, y, upper, radius: float, count: int, rng) -> None:
    """`count` uniform points of each sample's l_inf ball never exceed its margin bounds `upper`."""
    for i in range(len(x)):
        noise = rng.uniform(-radius, radius, size=(count, x.shape[1])).astype(np.float32)
        logits = converted.logits(torch.as_tensor(x[i] + noise)).detach().numpy().astype(np.float64)
        assert np.all((logits - logits[:, [y[i]]]).max(0) <= upper[i] + 1e-5)
