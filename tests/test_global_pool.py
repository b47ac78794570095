"""GlobalMaxPool lowered to ReduceMax (`verifier.convert.global_pool`): onnxruntime agreement
through conversion at opsets before and after Reduce*-18, still a nonlinearity that is no
activation site for `verifier.graph`, and sound interval/linear bounds through it (sampling never exceeds them)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from verifier.bounds.margins import margin_bounds
from verifier.convert import convert_model
from verifier.convert.global_pool import lower_global_max_pools
from verifier.onnx_io import load_model
from verifier.validate import validate_against_onnxruntime

pytestmark = pytest.mark.usefixtures("one_thread")


def _pooled_net(opset: int, rank: int) -> onnx.ModelProto:
    """x (N, 2, 5[, 5]) -> Conv 3 channels -> Relu -> GlobalMaxPool -> Flatten -> Gemm 3 logits."""
    rng = np.random.default_rng(rank)
    spatial = [5] * (rank - 2)
    kernel = [3] * (rank - 2)
    nodes = [helper.make_node("Conv", ["x", "w", "b"], ["c"], kernel_shape=kernel),
             helper.make_node("Relu", ["c"], ["r"]),
             helper.make_node("GlobalMaxPool", ["r"], ["p"]),
             helper.make_node("Flatten", ["p"], ["f"], axis=1),
             helper.make_node("Gemm", ["f", "hw", "hb"], ["logits"])]
    weights = [numpy_helper.from_array(rng.normal(size=(3, 2, *kernel)).astype(np.float32), "w"),
               numpy_helper.from_array(rng.normal(size=3).astype(np.float32), "b"),
               numpy_helper.from_array(rng.normal(size=(3, 3)).astype(np.float32), "hw"),
               numpy_helper.from_array(rng.normal(size=3).astype(np.float32), "hb")]
    graph = helper.make_graph(nodes, "gmp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 2, *spatial])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], weights)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


@pytest.mark.parametrize("opset,rank", [(13, 4), (15, 3), (18, 4)])
def test_global_max_pool_converts_and_bounds_are_sound(tmp_path, opset: int, rank: int) -> None:
    model = _pooled_net(opset, rank)
    lowered = lower_global_max_pools(onnx.shape_inference.infer_shapes(model))
    assert [n.op_type for n in lowered.graph.node].count("ReduceMax") == 1
    path = tmp_path / "gmp.onnx"
    onnx.save(model, str(path))
    loaded = load_model(path)
    converted = convert_model(loaded)
    rng = np.random.default_rng(opset)
    x = rng.normal(size=(5, 2, *[5] * (rank - 2))).astype(np.float32)
    assert validate_against_onnxruntime(loaded, converted, x).passed
    assert converted.uncovered_nonlinear and not converted.piecewise_linear  # a kink no cell sees, as before
    y = converted.logits(torch.as_tensor(x)).detach().numpy().argmax(1)
    radius = 0.1
    upper = margin_bounds(converted, x, y, radius=radius, norm="inf", box=None).upper.numpy()
    assert np.isfinite(upper).all()
    for i in range(len(x)):
        noise = rng.uniform(-radius, radius, size=(3000, *x.shape[1:])).astype(np.float32)
        logits = converted.logits(torch.as_tensor(x[i] + noise)).detach().numpy().astype(np.float64)
        assert np.all((logits - logits[:, [y[i]]]).max(0) <= upper[i] + 1e-5)
