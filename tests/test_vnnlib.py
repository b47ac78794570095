"""VNN-LIB: our parser on hand-written properties, answers with known truth (a linear model's
closed form, a tiny ReLU net by brute force), counterexamples re-checked and read back."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from verifier import cli
from verifier.convert import convert_model
from verifier.errors import UsageError
from verifier.onnx_io import load_model
from verifier.vnnlib import parse_property, read_counterexample
from verifier.vnnlib_check import check_property

pytestmark = pytest.mark.usefixtures("one_thread")
RNG = np.random.default_rng(11)
W = RNG.normal(size=(3, 2)).astype(np.float32)
LOW, HIGH = np.array([-1.0, 0.0, 0.5]), np.array([1.0, 0.5, 1.5])


def _model(nodes, initializers, inputs: int, outputs: int, path, batch=1) -> str:
    graph = helper.make_graph(nodes, "m", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, inputs])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, outputs])],
                              [numpy_helper.from_array(v, k) for k, v in initializers.items()])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return str(path)


def _box_text(low, high) -> str:
    lines = [f"(declare-const X_{i} Real)" for i in range(len(low))] + ["(declare-const Y_0 Real)",
                                                                      "(declare-const Y_1 Real)"]
    for i, (lo, hi) in enumerate(zip(low, high)):
        lines += [f"(assert (>= X_{i} {lo}))", f"(assert (<= X_{i} {hi}))"]
    return "\n".join(lines) + "\n"


def test_parser_reads_the_vnncomp_subset():
    text = """; a comment
    (declare-const X_0 Real) (declare-const X_1 Real)
    (declare-const Y_0 Real) (declare-const Y_1 Real) (declare-const Y_2 Real)
    (assert (<= X_0 0.5)) (assert (>= X_0 -0.5)) (assert (<= X_1 1e-1)) (assert (>= X_1 -2))
    (assert (or (and (>= Y_0 Y_1) (>= Y_0 Y_2)) (and (<= (- Y_2 (* 2 Y_1)) -0.25))))
    """
    prop = parse_property(text)
    assert prop.low.tolist() == [-0.5, -2.0] and prop.high.tolist() == [0.5, 0.1] and prop.outputs == 3
    first, second = prop.unsafe
    np.testing.assert_array_equal(first.coefficients, [[-1, 1, 0], [-1, 0, 1]])  # Y_1 - Y_0 <= 0, Y_2 - Y_0 <= 0
    np.testing.assert_array_equal(second.coefficients, [[0, -2, 1]])
    np.testing.assert_array_equal(second.offsets, [0.25])
    assert prop.violated_by(np.array([[3.0, 1.0, 2.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])).tolist() == [
        True, True, False]
    for bad, message in [("(declare-const X_0 Real)(declare-const Y_0 Real)(assert (>= Y_0 0))", "finite"),
                         ("(declare-const X_0 Real)(declare-const Y_0 Real)(assert (<= X_0 1))(assert (>= X_0 0))"
                          "(assert (<= (* Y_0 Y_0) 1))", "linear"), ("(assert (<= X_0 1)", "unbalanced")]:
        with pytest.raises(UsageError, match=message):
            parse_property(bad)


@pytest.mark.parametrize("shift, expected", [(0.3, "unsat"), (-0.3, "sat")])
def test_linear_model_matches_its_closed_form(tmp_path, shift, expected):
    """Unsafe: Y_0 <= Y_1. min over the box of y0 - y1 = g·c - |g|·h (g = w0 - w1, c centre, h half-width)."""
    gap = W[:, 0] - W[:, 1]
    closed_min = float(gap @ ((LOW + HIGH) / 2) - np.abs(gap) @ ((HIGH - LOW) / 2))
    bias = np.array([shift - closed_min, 0.0], np.float32)  # min(y0 - y1) = shift
    path = _model([helper.make_node("MatMul", ["x", "W"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
                  {"W": W, "b": bias}, 3, 2, tmp_path / "lin.onnx")
    prop = parse_property(_box_text(LOW, HIGH) + "(assert (<= Y_0 Y_1))")
    loaded = load_model(path)
    result = check_property(loaded, convert_model(loaded), prop)
    assert result.status == expected
    if expected == "sat":
        x, y = result.counterexample
        assert np.all(x >= LOW) and np.all(x <= HIGH)
        again = ort.InferenceSession(path).run(None, {"x": x.reshape(1, 3).astype(np.float32)})[0][0]
        assert again[0] <= again[1]


def test_relu_net_answers_agree_with_brute_force(tmp_path):
    hidden = RNG.normal(size=(2, 8)).astype(np.float32)
    out = RNG.normal(size=(8, 2)).astype(np.float32)
    path = _model([helper.make_node("MatMul", ["x", "A"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
                   helper.make_node("MatMul", ["r", "B"], ["y"])], {"A": hidden, "B": out}, 2, 2,
                  tmp_path / "relu.onnx", batch="N")
    low, high = np.array([-1.0, -1.0]), np.array([1.0, 1.0])
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, 401)] * 2), -1).reshape(-1, 2).astype(np.float32)
    values = np.maximum(grid @ hidden, 0) @ out
    top = float(values[:, 0].max())  # brute force; the true max exceeds it by at most L * step
    lipschitz = float(np.abs(hidden).sum(0) @ np.abs(out[:, 0])) * 2 / 400
    loaded = load_model(path)
    converted = convert_model(loaded)
    for threshold, expected in [(top + lipschitz + 0.05, "unsat"), (top - 0.05, "sat")]:
        prop = parse_property(_box_text(low, high) + f"(assert (>= Y_0 {threshold}))")
        result = check_property(loaded, converted, prop)
        assert result.status == expected, (threshold, result.reason)


def test_cli_writes_a_counterexample_that_reads_back(tmp_path, capsys):
    path = _model([helper.make_node("MatMul", ["x", "W"], ["y"])], {"W": W}, 3, 2, tmp_path / "m.onnx")
    prop = tmp_path / "p.vnnlib"
    prop.write_text(_box_text(LOW, HIGH) + "(assert (or (and (<= Y_0 Y_1)) (and (>= Y_0 Y_1))))")  # always sat
    result_file = tmp_path / "result.txt"
    code = cli.main(["vnnlib", path, str(prop), "--counterexample", str(result_file), "--json"])
    payload = json.loads(capsys.readouterr().out)
    assert code == 1 and payload["status"] == "sat"
    text = result_file.read_text()
    assert text.startswith("sat\n")
    x, y = read_counterexample(text)
    np.testing.assert_allclose(y, ort.InferenceSession(path).run(None, {"x": x.reshape(1, 3).astype(np.float32)})[0][0],
                               rtol=1e-6)
    prop.write_text(_box_text(LOW, HIGH) + "(assert (<= Y_0 -1000))")
    assert cli.main(["vnnlib", path, str(prop)]) == 0 and capsys.readouterr().out.startswith("unsat")
    prop.write_text("(declare-const X_0 Real)(declare-const Y_0 Real)(assert (<= X_0 1))(assert (>= X_0 0))"
                    "(assert (<= Y_0 0))")
    assert cli.main(["vnnlib", path, str(prop)]) == 2 and "declares 1 inputs" in capsys.readouterr().err
