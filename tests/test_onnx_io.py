"""load_model: specs of real files, and one typed error per kind of bad file."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from conftest import const, float_io, make_model, shipped_model
from onnx import TensorProto, helper, numpy_helper

from verifier import errors
from verifier.onnx_io import load_model


def _tiny(opset: int = 17) -> onnx.ModelProto:
    weight = np.arange(12, dtype=np.float32).reshape(3, 4) / 10
    nodes = [helper.make_node("Gemm", ["x", "w"], ["h"], name="gemm", transB=1),
             helper.make_node("Relu", ["h"], ["y"], name="relu")]
    return make_model(nodes, [float_io("x", ["batch", 4])], [float_io("y", ["batch", 3])], [const("w", weight)], opset)


def test_shipped_model_specs():
    info = load_model(shipped_model("mlp_relu")).info
    assert info.producer_name == "pytorch"
    assert info.opset == 18
    assert len(info.sha256) == 64
    (spec,) = info.inputs
    assert spec.dtype == "float32" and spec.shape[1:] == (64,) and isinstance(spec.shape[0], str)
    assert info.outputs[0].shape[1:] == (10,)


def test_symbolic_and_fixed_dims(save):
    info = load_model(save(_tiny())).info
    assert info.inputs[0].shape == ("batch", 4)
    assert info.outputs[0].shape == ("batch", 3)
    assert info.opsets == {"": 17}
    assert info.producer_name == "verifier-tests"


def test_missing_file(tmp_path):
    with pytest.raises(errors.ModelNotFoundError, match="not found"):
        load_model(tmp_path / "nope.onnx")


def test_text_file_is_not_onnx(tmp_path):
    path = tmp_path / "model.onnx"
    path.write_text("this is not a model at all, just some text\n")
    with pytest.raises(errors.NotOnnxError):
        load_model(path)


def test_empty_file_is_not_onnx(tmp_path):
    path = tmp_path / "empty.onnx"
    path.write_bytes(b"")
    with pytest.raises(errors.NotOnnxError):
        load_model(path)


def test_truncated_file(tmp_path):
    raw = shipped_model("mlp_relu").read_bytes()
    path = tmp_path / "cut.onnx"
    path.write_bytes(raw[: len(raw) // 2])
    with pytest.raises(errors.TruncatedModelError, match="truncated"):
        load_model(path)


def test_checker_failure_names_the_node(save):
    model = _tiny()
    model.graph.node[1].input[0] = "undefined_tensor"
    with pytest.raises(errors.CheckerError, match="relu"):
        load_model(save(model))


def test_shape_inference_failure(save):
    nodes = [helper.make_node("MatMul", ["x", "w"], ["y"], name="mm")]
    model = make_model(nodes, [float_io("x", [2, 4])], [float_io("y", [2, 3])], [const("w", np.ones((5, 3)))])
    with pytest.raises(errors.CheckerError, match="shape inference"):
        load_model(save(model))


def test_non_float_input(save):
    nodes = [helper.make_node("Cast", ["ids"], ["y"], name="cast", to=TensorProto.FLOAT)]
    model = make_model(nodes, [("ids", TensorProto.INT64, [1, 4])], [float_io("y", [1, 4])])
    with pytest.raises(errors.NonFloatInputError, match="int64"):
        load_model(save(model))


def test_two_data_inputs(save):
    nodes = [helper.make_node("Add", ["a", "b"], ["y"], name="add")]
    model = make_model(nodes, [float_io("a", [1, 4]), float_io("b", [1, 4])], [float_io("y", [1, 4])])
    with pytest.raises(errors.MultipleInputsError, match="a, b"):
        load_model(save(model))


def test_unknown_domain_names_op_and_node(save):
    nodes = [helper.make_node("FancyOp", ["x"], ["y"], name="mystery", domain="com.example")]
    model = make_model(nodes, [float_io("x", [1, 4])], [float_io("y", [1, 4])], extra_opsets=[("com.example", 1)])
    with pytest.raises(errors.UnknownDomainError, match=r"FancyOp.*com\.example.*mystery"):
        load_model(save(model))


def _external_model(tmp_path, location: str) -> os.PathLike:
    model = _tiny()
    tensor = model.graph.initializer[0]
    tensor.data_location = TensorProto.EXTERNAL
    raw = tensor.raw_data or numpy_helper.to_array(tensor).tobytes()
    tensor.ClearField("raw_data")
    tensor.ClearField("float_data")
    for key, value in (("location", location), ("offset", "0"), ("length", str(len(raw)))):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    path = tmp_path / "ext.onnx"
    path.write_bytes(model.SerializeToString())
    return path, raw


def test_external_data_in_own_folder(tmp_path):
    path, raw = _external_model(tmp_path, "weights.bin")
    (tmp_path / "weights.bin").write_bytes(raw)
    loaded = load_model(path)
    weight = numpy_helper.to_array(loaded.proto.graph.initializer[0])
    assert np.allclose(weight, np.arange(12, dtype=np.float32).reshape(3, 4) / 10)


@pytest.mark.parametrize("location", ["../weights.bin", "sub/../../weights.bin"])
def test_external_data_leaving_folder_refused(tmp_path, location):
    inner = tmp_path / "inner"
    inner.mkdir()
    path, raw = _external_model(inner, location)
    (tmp_path / "weights.bin").write_bytes(raw)
    with pytest.raises(errors.ExternalDataError, match="leaves"):
        load_model(path)


def test_external_data_absolute_path_refused(tmp_path):
    target = tmp_path / "abs.bin"
    path, raw = _external_model(tmp_path, str(target))
    target.write_bytes(raw)
    with pytest.raises(errors.ExternalDataError, match="leaves"):
        load_model(path)


def test_external_data_symlink_out_refused(tmp_path):
    inner = tmp_path / "inner"
    inner.mkdir()
    path, raw = _external_model(inner, "weights.bin")
    (tmp_path / "secret.bin").write_bytes(raw)
    (inner / "weights.bin").symlink_to(tmp_path / "secret.bin")
    with pytest.raises(errors.ExternalDataError, match="outside"):
        load_model(path)


def test_external_data_missing_or_short(tmp_path):
    path, raw = _external_model(tmp_path, "weights.bin")
    with pytest.raises(errors.ExternalDataError, match="not found"):
        load_model(path)
    (tmp_path / "weights.bin").write_bytes(raw[:10])
    with pytest.raises(errors.ExternalDataError, match="too short"):
        load_model(path)
