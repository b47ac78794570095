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


def _external_tensor(name: str, location: str, array: np.ndarray, **entries: str) -> onnx.TensorProto:
    tensor = numpy_helper.from_array(array, name)
    tensor.ClearField("raw_data")
    tensor.data_location = TensorProto.EXTERNAL
    for key, value in (("location", location), *entries.items()):
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    return tensor


WEIGHT = np.arange(20, dtype=np.float32).reshape(4, 5)


def _function_model(location: str) -> onnx.ModelProto:
    """y = x @ W where W is a Constant inside a model-local function body, stored externally."""
    body = [helper.make_node("Constant", [], ["W"], value=_external_tensor("fw", location, WEIGHT)),
            helper.make_node("MatMul", ["X", "W"], ["Y"])]
    function = helper.make_function("local", "F", ["X"], ["Y"], body, opset_imports=[helper.make_opsetid("", 17)])
    model = make_model([helper.make_node("F", ["x"], ["y"], domain="local", name="f")], [float_io("x", ["n", 4])],
                       [float_io("y", ["n", 5])], extra_opsets=[("local", 1)])
    model.functions.append(function)
    return model


def _sparse_constant_model(values: onnx.TensorProto) -> onnx.ModelProto:
    indices = numpy_helper.from_array(np.arange(20, dtype=np.int64), "si")
    sparse = helper.make_sparse_tensor(values, indices, [4, 5])
    nodes = [helper.make_node("Constant", [], ["w"], sparse_value=sparse, name="sparse_w"),
             helper.make_node("MatMul", ["x", "w"], ["y"])]
    return make_model(nodes, [float_io("x", ["n", 4])], [float_io("y", ["n", 5])])


@pytest.fixture
def secret_in_cwd(tmp_path, monkeypatch):
    """An empty model folder, and a `secret.bin` in a different working directory."""
    model_dir, cwd = tmp_path / "model", tmp_path / "cwd"
    model_dir.mkdir()
    cwd.mkdir()
    (cwd / "secret.bin").write_bytes(WEIGHT.tobytes())
    monkeypatch.chdir(cwd)
    return model_dir


def test_external_data_in_function_body_is_read_from_the_model_folder(secret_in_cwd):
    model_dir = secret_in_cwd
    path = model_dir / "fn.onnx"
    path.write_bytes(_function_model("secret.bin").SerializeToString())
    with pytest.raises(errors.ExternalDataError, match="not found"):
        load_model(path)
    path.write_bytes(_function_model("../cwd/secret.bin").SerializeToString())
    with pytest.raises(errors.ExternalDataError, match="leaves"):
        load_model(path)
    (model_dir / "w.bin").write_bytes(WEIGHT.tobytes())
    path.write_bytes(_function_model("w.bin").SerializeToString())
    loaded = load_model(path)
    (constant,) = [n for n in loaded.proto.graph.node if n.op_type == "Constant"]
    assert np.array_equal(numpy_helper.to_array(constant.attribute[0].t), WEIGHT)


def test_external_data_in_sparse_constant_is_checked(secret_in_cwd):
    model_dir = secret_in_cwd
    path = model_dir / "sparse.onnx"
    path.write_bytes(_sparse_constant_model(_external_tensor("sv", "secret.bin", WEIGHT.ravel())).SerializeToString())
    with pytest.raises(errors.ExternalDataError, match="not found"):
        load_model(path)


def test_sparse_constant_is_refused(save):
    model = _sparse_constant_model(numpy_helper.from_array(WEIGHT.ravel(), "sv"))
    with pytest.raises(errors.SparseTensorError, match="sparse_w"):
        load_model(save(model))


@pytest.mark.parametrize("location,entries,expected", [
    ("weights.bin", {"offset": "-8"}, "offset"),
    ("weights.bin", {"offset": "abc"}, "offset"),
    ("weights.bin", {"length": "-1"}, "length"),
    ("loop1", {}, "cannot read"),
    ("loop1/w.bin", {}, "cannot read"),
    ("a" * 300, {}, "cannot read"),
    ("\x00", {}, "NUL"),
])
def test_bad_external_locations_are_typed_errors(tmp_path, location, entries, expected):
    (tmp_path / "weights.bin").write_bytes(np.arange(12, dtype=np.float32).tobytes())
    (tmp_path / "loop1").symlink_to("loop2")
    (tmp_path / "loop2").symlink_to("loop1")
    model = _tiny()
    weight = numpy_helper.to_array(model.graph.initializer[0])
    model.graph.initializer[0].CopyFrom(_external_tensor("w", location, weight, **entries))
    path = tmp_path / "ext.onnx"
    path.write_bytes(model.SerializeToString())
    with pytest.raises(errors.ExternalDataError, match=expected):
        load_model(path)


def _branch_output(name: str) -> onnx.ValueInfoProto:
    return helper.make_tensor_value_info(name, TensorProto.FLOAT, ["n", 4])


def _if_model(then_nodes, extra_opsets=()) -> onnx.ModelProto:
    """x -> Relu -> h; If(constant True) with then_nodes / Sigmoid(h) branches reading h from outside."""
    then_graph = helper.make_graph(then_nodes, "then", [], [_branch_output("t_out")])
    else_graph = helper.make_graph([helper.make_node("Sigmoid", ["h"], ["e_out"])], "else", [],
                                   [_branch_output("e_out")])
    nodes = [helper.make_node("Relu", ["x"], ["h"]),
             helper.make_node("Constant", [], ["cond"], value=helper.make_tensor("c", TensorProto.BOOL, [], [True])),
             helper.make_node("If", ["cond"], ["y"], then_branch=then_graph, else_branch=else_graph, name="branch")]
    return make_model(nodes, [float_io("x", ["n", 4])], [float_io("y", ["n", 4])], extra_opsets=extra_opsets)


def test_control_flow_is_refused_naming_the_node(save):
    with pytest.raises(errors.UnsupportedOpsError, match="If at node 'branch'.*control flow"):
        load_model(save(_if_model([helper.make_node("Relu", ["h"], ["t_out"])])))


def test_unknown_domain_inside_a_subgraph_is_refused(save):
    inner = [helper.make_node("Foo", ["h"], ["t_out"], domain="com.evil", name="evil")]
    with pytest.raises(errors.UnknownDomainError, match="com.evil.*evil"):
        load_model(save(_if_model(inner, extra_opsets=[("com.evil", 1)])))


def test_local_functions_are_inlined(save):
    body = [helper.make_node("Sigmoid", ["X"], ["S"]), helper.make_node("Mul", ["X", "S"], ["Y"])]
    function = helper.make_function("local", "Act", ["X"], ["Y"], body, opset_imports=[helper.make_opsetid("", 17)])
    model = make_model([helper.make_node("Act", ["x"], ["y"], domain="local", name="act")], [float_io("x", ["n", 4])],
                       [float_io("y", ["n", 4])], extra_opsets=[("local", 1)])
    model.functions.append(function)
    loaded = load_model(save(model))
    assert not loaded.proto.functions
    assert sorted(n.op_type for n in loaded.proto.graph.node) == ["Mul", "Sigmoid"]


def test_ai_onnx_alias_of_the_default_domain(save):
    nodes = [helper.make_node("Relu", ["x"], ["y"], domain="ai.onnx")]
    model = make_model(nodes, [float_io("x", ["n", 4])], [float_io("y", ["n", 4])])
    model.opset_import[0].domain = "ai.onnx"
    loaded = load_model(save(model))
    assert loaded.info.opset == 17 and loaded.info.opsets == {"": 17}
    assert all(node.domain == "" for node in loaded.proto.graph.node)
