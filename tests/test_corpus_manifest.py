"""tools/corpus.json is well-formed and tools/corpus.py labels synthesised data with the model's argmax."""

from __future__ import annotations

import json
import re

import numpy as np
import onnx
import onnxruntime
import pytest
from onnx import TensorProto, helper, numpy_helper

import corpus

REQUIRED = ("name", "kind", "package", "version", "member", "sha256", "size", "input", "classes",
            "producer", "box", "data")


def test_manifest_entries_are_complete() -> None:
    raw = json.loads(corpus.MANIFEST.read_text())["models"]
    assert len(raw) >= 6
    assert len({item["name"] for item in raw}) == len(raw)
    for item in raw:
        missing = [key for key in REQUIRED if key not in item]
        assert not missing, (item.get("name"), missing)
        assert re.fullmatch(r"[0-9a-f]{64}", item["sha256"]), item["name"]
        assert isinstance(item["size"], int) and item["size"] > 0
        low, high = item["box"]
        assert low < high, item["name"]
        assert item["input"]["shape"][0] >= 1 and item["classes"] >= 2
        assert item["kind"] in ("wheel", "sklearn") and item["data"] in ("synthetic", "digits", "wine-columns")
        for extra in item.get("extra_members", []):
            assert re.fullmatch(r"[0-9a-f]{64}", extra["sha256"]) and extra["size"] > 0
    entries = corpus.load_manifest()
    assert sum(entry.kind == "wheel" for entry in entries) >= 5


def tiny_classifier(classes: int = 3, features: int = 4) -> bytes:
    """Linear model `x @ W + b` with a batch dimension, built in memory."""
    rng = np.random.default_rng(1)
    weight = numpy_helper.from_array(rng.normal(size=(features, classes)).astype(np.float32), "W")
    bias = numpy_helper.from_array(rng.normal(size=classes).astype(np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["xw"]), helper.make_node("Add", ["xw", "b"], ["logits"])],
        "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", features])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", classes])], [weight, bias])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    return model.SerializeToString()


def test_synthesised_labels_are_the_onnxruntime_argmax() -> None:
    model = tiny_classifier()
    x, y = corpus.synthesise(model, [32, 4], (-1.0, 2.0), seed=3)
    assert x.shape == (32, 4) and x.dtype == np.float32 and y.dtype == np.int64
    assert x.min() >= -1.0 and x.max() <= 2.0
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    expected = session.run(None, {"x": x})[0].argmax(axis=1)
    np.testing.assert_array_equal(y, expected)


@pytest.mark.parametrize(("shape", "batch_axis"), [((5, 3), 0), ((7, 5, 3), 1)])
def test_head_labels_take_the_batch_axis_and_the_last_step(shape: tuple[int, ...], batch_axis: int) -> None:
    output = np.random.default_rng(0).normal(size=shape)
    labels = corpus.head_labels(output, 5)
    expected = output.argmax(-1) if batch_axis == 0 else output[-1].argmax(-1)
    np.testing.assert_array_equal(labels, expected)
