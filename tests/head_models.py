"""Tiny classifier heads built with onnx.helper: the cases of issue 17 (read real models right)."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

RNG = np.random.default_rng(17)
W3 = RNG.normal(size=(3, 4)).astype(np.float32)
B3 = RNG.normal(size=3).astype(np.float32)
W1 = RNG.normal(size=(1, 4)).astype(np.float32)
B1 = (-W1.sum(1) * 0.5 + 0.1).astype(np.float32)


def _model(nodes, outputs, inits, batch="N", opset=17) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 4])
    outs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, s) for n, s in outputs]
    graph = helper.make_graph(nodes, "heads", [x], outs, [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="heads-tests")
    model.ir_version = 8
    return model


def softmax_identity(batch="N") -> onnx.ModelProto:
    """Gemm -> Softmax -> Identity (skl2onnx MLPClassifier zipmap=False, paddle2onnx)."""
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["z"], transB=1),
             helper.make_node("Softmax", ["z"], ["p"], axis=1),
             helper.make_node("Identity", ["p"], ["probabilities"])]
    return _model(nodes, [("probabilities", [batch, 3])], {"W": W3, "B": B3}, batch)


def sigmoid_binary() -> onnx.ModelProto:
    """One logit through a Sigmoid: p = P(class 1), shape (N, 1)."""
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["z"], transB=1),
             helper.make_node("Sigmoid", ["z"], ["p"])]
    return _model(nodes, [("p", ["N", 1])], {"W": W1, "B": B1})


def logit_column() -> onnx.ModelProto:
    """One logit of shape (N, 1)."""
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["z"], transB=1)]
    return _model(nodes, [("z", ["N", 1])], {"W": W1, "B": B1})


def logit_vector() -> onnx.ModelProto:
    """One logit of shape (N,)."""
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["z1"], transB=1),
             helper.make_node("Squeeze", ["z1", "axis"], ["z"])]
    return _model(nodes, [("z", ["N"])], {"W": W1, "B": B1, "axis": np.array([1], dtype=np.int64)})


def pass_through_first() -> onnx.ModelProto:
    """First output a copy of the input, the classifier head second."""
    nodes = [helper.make_node("Identity", ["x"], ["echo"]),
             helper.make_node("Gemm", ["x", "W", "B"], ["logits"], transB=1)]
    return _model(nodes, [("echo", ["N", 4]), ("logits", ["N", 3])], {"W": W3, "B": B3})


def true_logits(x: np.ndarray, binary: bool = False) -> np.ndarray:
    """The logits the heads compute, by numpy (binary: [0, z])."""
    if binary:
        z = x @ W1.T + B1
        return np.concatenate([np.zeros_like(z), z], axis=1)
    return x @ W3.T + B3


def softmax_ce(logits: np.ndarray, y: np.ndarray) -> float:
    """Mean softmax cross-entropy in float64."""
    z = logits.astype(np.float64)
    z = z - z.max(1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(1, keepdims=True))
    return float(-log_p[np.arange(len(y)), y].mean())


def normalised_scores() -> onnx.ModelProto:
    """Only probabilities: sigmoid scores normalised by their sum (p = a / sum a)."""
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["z"], transB=1),
             helper.make_node("Sigmoid", ["z"], ["a"]),
             helper.make_node("ReduceSum", ["a", "axes"], ["total"], keepdims=1),
             helper.make_node("Div", ["a", "total"], ["p"])]
    return _model(nodes, [("p", ["N", 3])], {"W": W3, "B": B3, "axes": np.array([1], dtype=np.int64)})
