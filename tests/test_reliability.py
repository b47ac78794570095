"""Hostile models and data files: one line naming the cause and exit 2, never NaN, never a traceback.

Each case is one the issue tracker measured failing (NaN certificates at exit 0, internal errors,
silently accepted opsets, onnxruntime log noise); docs/reliability.md lists what is guarded.
"""

from __future__ import annotations

import io
import json
import struct
import zipfile

import numpy as np
import onnx
import pytest
from conftest import float_io, make_model, shipped_data, shipped_model
from onnx import TensorProto, helper, numpy_helper

from verifier import cli
from verifier.errors import NonFiniteError, ResourceLimitError
from verifier.finite import first_nan
from verifier.onnx_io import load_model
from verifier.resources import parse_size

N = helper.make_node
RNG = np.random.default_rng(0)


def run_cli(capfd, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *fragments: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2, err
    assert len(lines) == 1 and lines[0].startswith("verifier: error: "), err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


def mlp_with_weight(value: float) -> onnx.ModelProto:
    model = onnx.load(str(shipped_model("mlp_relu")))
    first = model.graph.initializer[0]
    weights = numpy_helper.to_array(first).copy()
    weights[0, 0] = value
    first.CopyFrom(numpy_helper.from_array(weights, first.name))
    return model


def digits(tmp_path, count: int = 8, **changes) -> str:
    data = np.load(shipped_data("mlp_relu"))
    arrays = {"x": data["x"][:count].copy(), "y": data["y"][:count].copy(), **changes}
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return str(path)


# --- non-finite constants, inputs, logits ---------------------------------------------------

@pytest.mark.parametrize("command", ["inspect", "validate", "certify", "attack", "audit"])
def test_nan_weight_is_refused_by_every_command(capfd, save, tmp_path, command):
    path = save(mlp_with_weight(np.nan))
    extra = [] if command == "inspect" else ["--data", digits(tmp_path)]
    extra += ["--out", tmp_path / "report"] if command == "audit" else []
    extra += ["--method", "pgd"] if command == "attack" else []
    code, out, err = run_cli(capfd, command, path, *extra)
    assert_one_line_error(code, err, "NaN constants", "net.0.weight", "1 NaN")
    assert out == "" and not (tmp_path / "report").exists()


def test_nan_attribute_is_refused(capfd, save):
    model = make_model([N("LeakyRelu", ["x"], ["y"], alpha=float("nan"))], [float_io("x", ["n", 4])],
                       [float_io("y", ["n", 4])])
    code, _, err = run_cli(capfd, "inspect", save(model))
    assert_one_line_error(code, err, "attribute alpha of LeakyRelu", "1 NaN")


def test_infinite_weight_is_reported_by_inspect_and_refused_at_the_logits(capfd, save, tmp_path):
    path = save(mlp_with_weight(np.inf))
    code, out, _ = run_cli(capfd, "inspect", path, "--json")
    assert code == 0 and json.loads(out)["infinite_constants"] == ["initializer 'net.0.weight' (1 Inf)"]
    code, out, _ = run_cli(capfd, "inspect", path)
    assert "constant with infinite values: initializer 'net.0.weight'" in out
    # pixel 0 of every digit is 0, and 0 * inf is NaN: every clean logit is NaN
    code, _, err = run_cli(capfd, "certify", path, "--data", digits(tmp_path), "--box", "0,1")
    assert_one_line_error(code, err, "logits", "NaN or infinite on 8 sample(s)")


def test_inputs_overflowing_float32_name_the_sample(capfd, tmp_path):
    x = np.load(shipped_data("mlp_relu"))["x"][:8].astype(np.float64)
    x[3, 5] = 1e39  # finite in float64, infinite in the model's float32
    path = digits(tmp_path, x=x)
    for command in ("certify", "attack", "validate"):
        code, _, err = run_cli(capfd, command, shipped_model("mlp_relu"), "--data", path)
        assert_one_line_error(code, err, "NaN or Inf", "float32", "1 sample(s) (index 3)")


def test_inputs_overflowing_float16(capfd, save, tmp_path):
    model = onnx.load(str(shipped_model("mlp_relu")))
    for index, tensor in enumerate(model.graph.initializer):
        model.graph.initializer[index].CopyFrom(
            numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), tensor.name))
    for value in (model.graph.input[0], model.graph.output[0]):
        value.type.tensor_type.elem_type = TensorProto.FLOAT16
    del model.graph.value_info[:]
    x = np.load(shipped_data("mlp_relu"))["x"][:8].copy()
    x[0, 0] = 70000.0  # float16 tops out at 65504
    code, _, err = run_cli(capfd, "certify", save(model), "--data", digits(tmp_path, x=x))
    assert_one_line_error(code, err, "float16", "index 0", "6.55e+04")


def test_certify_api_checks_inputs_in_the_model_dtype():
    """The Python API gates too: float64 inputs that overflow the float32 model are refused."""
    from verifier.certify.certificate import certify
    from verifier.convert import convert_model

    converted = convert_model(load_model(shipped_model("mlp_relu")))
    x = np.zeros((2, 64))
    x[1, 0] = 1e39
    with pytest.raises(NonFiniteError, match=r"index 1"):
        certify(converted, x, np.zeros(2, np.int64), [0.01])


def test_first_nan_names_the_path():
    assert first_nan({"results": [{"certificate": 1.0}, {"certificate": float("nan")}]}) == "results[1].certificate"
    assert first_nan({"slopes": np.array([1.0, np.nan])}) == "slopes[1]"
    assert first_nan({"bound": float("inf"), "name": "NaN"}) is None  # inf is a (vacuous) bound; strings are text


# --- degenerate shapes and graphs -----------------------------------------------------------

def test_zero_width_input(capfd, save):
    model = make_model([N("ReduceSum", ["x"], ["s"], keepdims=1), N("Concat", ["s", "s"], ["y"], axis=1)],
                       [float_io("x", ["n", 0])], [float_io("y", ["n", 2])], opset=13)
    code, _, err = run_cli(capfd, "validate", save(model))
    assert_one_line_error(code, err, "axis of size 0")


def test_graph_without_nodes(capfd, save):
    model = make_model([], [float_io("x", ["n", 4])], [float_io("x", ["n", 4])])
    code, _, err = run_cli(capfd, "inspect", save(model))
    assert_one_line_error(code, err, "no nodes")


@pytest.mark.parametrize("shape,what", [(["n", 10**10], "64 random input(s)"), ([10**9, 10], "1000000000 random")])
def test_huge_declared_shapes_are_refused_before_allocating(capfd, save, shape, what):
    model = make_model([N("Relu", ["x"], ["y"])], [float_io("x", shape)], [float_io("y", shape)])
    code, _, err = run_cli(capfd, "validate", save(model))
    assert_one_line_error(code, err, what, "over the memory limit", "--memory-limit")


def test_memory_limit_option(capfd, tmp_path):
    code, _, err = run_cli(capfd, "validate", shipped_model("mlp_relu"), "--samples", "1000", "--memory-limit", "100K")
    assert_one_line_error(code, err, "1000 random input(s)", "needs 750 KiB, over the memory limit of 100 KiB")
    code, _, err = run_cli(capfd, "validate", shipped_model("mlp_relu"), "--memory-limit", "lots")
    assert_one_line_error(code, err, "--memory-limit: 'lots'")
    assert parse_size("1.5G") == 3 * 2**29 and parse_size("512") == 512 and parse_size("8GiB") == 8 * 2**30


@pytest.mark.parametrize("opset", [22, 23])
def test_untested_opsets_are_refused(capfd, save, opset):
    model = make_model([N("Relu", ["x"], ["y"])], [float_io("x", ["n", 4])], [float_io("y", ["n", 4])], opset=opset)
    model.ir_version = 11
    code, _, err = run_cli(capfd, "inspect", save(model))
    assert_one_line_error(code, err, f"opset {opset}", "up to 21")


def test_function_calling_an_undefined_op(capfd, save):
    body = helper.make_function("local", "F", ["a"], ["b"], [N("Nope", ["a"], ["b"], domain="local")],
                                [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)])
    model = make_model([N("F", ["x"], ["y"], domain="local")], [float_io("x", ["n", 4])], [float_io("y", ["n", 4])],
                       extra_opsets=[("local", 1)])
    model.functions.append(body)
    code, _, err = run_cli(capfd, "inspect", save(model))
    assert_one_line_error(code, err, "Nope", "does not define")


# --- external data --------------------------------------------------------------------------

def _external(model: onnx.ModelProto, location: str, **entries: str) -> onnx.ModelProto:
    tensor = model.graph.initializer[0]
    tensor.data_location = TensorProto.EXTERNAL
    del tensor.external_data[:]
    tensor.external_data.add(key="location", value=location)
    for key, value in entries.items():
        tensor.external_data.add(key=key, value=value)
    tensor.ClearField("raw_data")
    return model


def test_external_data_pointing_to_the_model_itself(capfd, save):
    model = _external(onnx.load(str(shipped_model("mlp_relu"))), "model.onnx")
    code, _, err = run_cli(capfd, "inspect", save(model, "model.onnx"))
    assert_one_line_error(code, err, "the model file itself")


def test_external_tensor_is_read_by_its_size_not_the_whole_file(save, tmp_path):
    """A 2.5 GB sparse file next to the model: only the tensor's own 16 KiB are read."""
    original = onnx.load(str(shipped_model("mlp_relu")))
    weights = numpy_helper.to_array(original.graph.initializer[0])
    with open(tmp_path / "big.bin", "wb") as handle:
        handle.write(weights.tobytes())
        handle.truncate(2_500_000_000)
    loaded = load_model(save(_external(original, "big.bin")))
    np.testing.assert_array_equal(numpy_helper.to_array(loaded.proto.graph.initializer[0]), weights)


def test_external_tensor_over_the_memory_limit_is_refused_before_reading(save, tmp_path):
    model = make_model([N("Add", ["x", "w"], ["y"])], [float_io("x", ["n", 2**28])], [float_io("y", ["n", 2**28])],
                       [numpy_helper.from_array(np.zeros(4, np.float32), "w")])
    model.graph.initializer[0].ClearField("dims")
    model.graph.initializer[0].dims.append(2**28)  # 1 GiB of float32
    with open(tmp_path / "w.bin", "wb") as handle:
        handle.truncate(2**30)
    path = save(_external(model, "w.bin"))
    with pytest.raises(ResourceLimitError, match=r"external tensor 'w' .* needs 1 GiB, over the memory limit of 1 MiB"):
        load_model(path, memory_limit_bytes=2**20)


def test_external_length_must_match_the_shape(capfd, save, tmp_path):
    (tmp_path / "w.bin").write_bytes(bytes(64 * 64 * 4))
    model = _external(onnx.load(str(shipped_model("mlp_relu"))), "w.bin", length="100")
    code, _, err = run_cli(capfd, "inspect", save(model))
    assert_one_line_error(code, err, "length 100 bytes", "need 16384")


# --- data archives --------------------------------------------------------------------------

def _archive_bytes() -> bytearray:
    data = np.load(shipped_data("mlp_relu"))
    buffer = io.BytesIO()
    np.savez(buffer, x=data["x"][:8], y=data["y"][:8])
    return bytearray(buffer.getvalue())


def _set_header_field(raw: bytearray, local_offset: int, central_offset: int, value: int) -> bytearray:
    """Write a 2-byte field in every local and central zip header."""
    for signature, offset in ((b"PK\x03\x04", local_offset), (b"PK\x01\x02", central_offset)):
        at = raw.find(signature)
        while at >= 0:
            raw[at + offset: at + offset + 2] = struct.pack("<H", value)
            at = raw.find(signature, at + 4)
    return raw


def _raw_members(path):
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", b"hello")
        archive.writestr("y.npy", b"\x00\x01")


def _corrupt_deflate(path):
    data = np.load(shipped_data("mlp_relu"))
    np.savez_compressed(path, x=data["x"][:8], y=data["y"][:8])
    raw = bytearray(path.read_bytes())
    raw[200:260] = b"\xff" * 60
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("build,message", [
    (_raw_members, "are not .npy arrays"),
    (_corrupt_deflate, "not a readable .npz"),
    (lambda p: p.write_bytes(bytes(_set_header_field(_archive_bytes(), 8, 10, 99))), "compression method"),
    (lambda p: p.write_bytes(bytes(_set_header_field(_archive_bytes(), 6, 8, 1))), "encrypted members"),
    (lambda p: np.savez(p, x=np.float32(1.0), y=np.zeros(1, np.int64)), "leading sample axis"),
])
def test_damaged_archives(capfd, tmp_path, build, message):
    path = tmp_path / "data.npz"
    build(path)
    code, _, err = run_cli(capfd, "certify", shipped_model("mlp_relu"), "--data", path)
    assert_one_line_error(code, err, message)


# --- command line and runtime noise ---------------------------------------------------------

def test_negative_box_values_are_accepted(capfd, tmp_path):
    code, out, _ = run_cli(capfd, "certify", shipped_model("mlp_relu"), "--data", digits(tmp_path, 4), "--box",
                           "-1,1", "--delta", "0.01", "--json")
    assert code == 0 and json.loads(out)["box"] == [-1.0, 1.0]


def test_box_whose_width_overflows(capfd, tmp_path):
    code, _, err = run_cli(capfd, "certify", shipped_model("mlp_relu"), "--data", digits(tmp_path, 4),
                           "--box", "-1e308,1e308")
    assert_one_line_error(code, err, "width HIGH - LOW overflows")


def test_onnxruntime_failure_is_one_line(capfd, save):
    """onnxruntime's own logger is silenced: only our line reaches stderr (checked at the fd level)."""
    model = make_model([N("Reshape", ["x", "s"], ["r"]), N("Relu", ["r"], ["y"])], [float_io("x", ["n", 64])],
                       [float_io("y", [None, 7])], [numpy_helper.from_array(np.array([-1, 7], np.int64), "s")])
    code, _, err = run_cli(capfd, "validate", save(model), "--samples", "3")
    assert_one_line_error(code, err, "onnxruntime cannot run the model")


def test_node_names_with_quotes_and_newlines_convert(capfd, save):
    model = onnx.load(str(shipped_model("mlp_relu")))
    model.graph.node[1].name = 'bad"name\nwith\'quotes\\'
    code, out, _ = run_cli(capfd, "validate", save(model), "--samples", "4", "--json")
    assert code == 0 and json.loads(out)["passed"] is True


def test_cell_analysis_is_sized_to_the_memory_limit(one_thread):
    """Small chunks give the same certificate; a limit below one sample skips the cell route, soundly."""
    from verifier.attacks import attack
    from verifier.certify.certificate import certify
    from verifier.convert import convert_model
    from verifier.data import load_samples

    loaded = load_model(shipped_model("mlp_relu"))
    converted = convert_model(loaded)
    samples = load_samples(shipped_data("mlp_relu"), loaded.info.data_input, 12)
    args = (converted, samples.x, samples.y, [2 / 255, 8 / 255])
    options = dict(p=2.0, norm="inf", loss="ce", box=(0.0, 1.0), grid_points=8)
    default = certify(*args, **options)
    # one differentiated row of an MLP sample needs (64 + 3 x (64 + 192)) x 8 B = 6.5 KiB, a sample's
    # logits and one unit 11 rows: 100 KiB makes chunks of one sample, and of 1 or 2 units per pass
    chunked = certify(*args, **options, memory_limit_bytes=100_000)
    assert [r.certificate for r in chunked.results] == pytest.approx([r.certificate for r in default.results],
                                                                     rel=1e-12)
    skipped = certify(*args, **options, memory_limit_bytes=50_000)
    assert any(f.startswith("cells skipped:") and "cell analysis of one sample" in f for f in skipped.fallbacks)
    attacked = attack(converted, loaded, samples.x, samples.y, ["pgd"], [2 / 255, 8 / 255], p=2.0, norm="inf",
                      loss="ce", box=(0.0, 1.0), steps=20, device="cpu")
    for row, with_cells, found in zip(skipped.results, default.results, attacked.results):
        assert found.risk <= row.certificate <= row.global_bound
        assert row.certificate >= with_cells.certificate - 1e-12  # fewer routes can only loosen the bound


def test_budget_scale_warning_closed_forms():
    from verifier.data import budget_scale_warning

    pixels = RNG.uniform(0, 1, size=(20, 64))
    assert budget_scale_warning(pixels, [8 / 255], "inf", (0.0, 1.0)) is None
    raw = pixels * 255  # raw 0..255 pixels: 8/255 is 1/8160 of the range
    warning = budget_scale_warning(raw, [1 / 255, 8 / 255], "inf")
    assert warning is not None and "largest 0.0314" in warning and "8/255 of a 0..255 pixel range is 8" in warning
    assert budget_scale_warning(raw, [8.0], "inf") is None
    # the l_2 scale of one sample is the spread times sqrt(D) = 8: a budget of 9 moves past it
    assert "exceed one sample's scale" in budget_scale_warning(pixels, [9.0], "2", (0.0, 1.0))
    assert budget_scale_warning(pixels, [7.0], "2", (0.0, 1.0)) is None
    assert budget_scale_warning(pixels, [0.0], "inf") is None  # delta 0 alone is the clean risk


def test_certify_reports_the_budget_scale_warning(capfd, tmp_path):
    x = np.load(shipped_data("mlp_relu"))["x"][:6] * 255
    code, out, err = run_cli(capfd, "certify", shipped_model("mlp_relu"), "--data", digits(tmp_path, 6, x=x),
                             "--delta", "8/255", "--grid-points", "4", "--json")
    assert code == 0 and err.startswith("verifier: warning: the budgets (largest 0.0314) are under 1e-3")
    assert json.loads(out)["warnings"] == [err.strip().removeprefix("verifier: warning: ")]
