"""The `verifier` CLI: documented JSON, exit codes, one-line errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import SHIPPED, float_io, make_model, shipped_data, shipped_model
from onnx import TensorProto, helper, numpy_helper

from verifier import cli

INSPECT_KEYS = {"activation_counts", "activation_sites", "family", "opset", "inputs", "outputs", "op_histogram",
                "producer", "sha256", "ir_version", "logits", "node_count"}
VALIDATE_KEYS = {"max_abs_diff", "max_rel_diff", "top1_agreement", "providers", "passed", "samples", "outputs"}


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_inspect_json_on_shipped_models(capsys, name):
    code, out, _ = run_cli(capsys, "inspect", shipped_model(name), "--json")
    assert code == 0
    payload = json.loads(out)
    assert INSPECT_KEYS <= set(payload)
    assert payload["opset"] == 18
    assert payload["inputs"][0]["dtype"] == "float32"
    assert sum(payload["activation_counts"].values()) == len(payload["activation_sites"]) > 0
    assert payload["family"] in {"piecewise-linear", "smooth"}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_validate_json_on_shipped_models(capsys, name):
    code, out, _ = run_cli(capsys, "validate", shipped_model(name), "--data", shipped_data(name),
                           "--samples", "50", "--json")
    payload = json.loads(out)
    assert code == 0 and payload["passed"] is True
    assert VALIDATE_KEYS <= set(payload)
    assert payload["samples"] == 50
    assert payload["max_abs_diff"] <= 1e-5 and payload["top1_agreement"] == 1.0
    assert "CPUExecutionProvider" in payload["providers"]
    assert payload["accuracy"]["onnxruntime"] == payload["accuracy"]["torch"] >= 0.9


def test_validate_without_data_uses_random_inputs(capsys):
    code, out, _ = run_cli(capsys, "validate", shipped_model("mlp_gelu"), "--samples", "8")
    assert code == 0
    assert "random uniform" in out and "PASS" in out


def test_validate_mismatch_exits_1(capsys, monkeypatch):
    """A converted module that disagrees with onnxruntime fails the check (exit 1)."""
    import verifier.convert as convert_module

    original = convert_module.convert_model

    def tampered(loaded, output=None):
        converted = original(loaded, output)
        with torch.no_grad():
            next(iter(converted.module.parameters())).add_(0.1)
        return converted

    monkeypatch.setattr(convert_module, "convert_model", tampered)
    code, out, _ = run_cli(capsys, "validate", shipped_model("mlp_relu"), "--samples", "8", "--json")
    payload = json.loads(out)
    assert code == 1 and payload["passed"] is False and payload["max_abs_diff"] > 1e-3


def _bad_inputs(tmp_path):
    text = tmp_path / "text.onnx"
    text.write_text("not a model")
    raw = shipped_model("mlp_relu").read_bytes()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(raw[: len(raw) // 3])
    int_input = tmp_path / "int.onnx"
    int_input.write_bytes(make_model([helper.make_node("Cast", ["ids"], ["y"], to=TensorProto.FLOAT)],
                                     [("ids", TensorProto.INT64, [1, 3])], [float_io("y", [1, 3])]).SerializeToString())
    two = tmp_path / "two.onnx"
    two.write_bytes(make_model([helper.make_node("Add", ["a", "b"], ["y"])],
                               [float_io("a", [1, 3]), float_io("b", [1, 3])], [float_io("y", [1, 3])]).SerializeToString())
    domain = tmp_path / "domain.onnx"
    domain.write_bytes(make_model([helper.make_node("Magic", ["x"], ["y"], name="m", domain="com.acme")],
                                  [float_io("x", [1, 3])], [float_io("y", [1, 3])],
                                  extra_opsets=[("com.acme", 1)]).SerializeToString())
    unsupported = tmp_path / "unsupported.onnx"
    unsupported.write_bytes(make_model([helper.make_node("Hardmax", ["x"], ["y"], name="hm")],
                                       [float_io("x", [2, 3])], [float_io("y", [2, 3])]).SerializeToString())
    return {
        "missing": (tmp_path / "missing.onnx", "not found"),
        "text": (text, "not an ONNX model"),
        "truncated": (cut, "truncated"),
        "int_input": (int_input, "int64"),
        "two_inputs": (two, "2 data inputs"),
        "unknown_domain": (domain, "com.acme"),
        "unsupported": (unsupported, "Hardmax"),
    }


@pytest.mark.parametrize("case", ["missing", "text", "truncated", "int_input", "two_inputs", "unknown_domain",
                                  "unsupported"])
def test_bad_models_exit_2_with_one_line(capsys, tmp_path, case):
    path, expected = _bad_inputs(tmp_path)[case]
    # inspect describes a model with several or integer inputs (and lists --perturb candidates); the
    # analyses refuse it without --perturb
    command = "validate" if case in ("unsupported", "int_input", "two_inputs") else "inspect"
    code, out, err = run_cli(capsys, command, path)
    assert code == 2
    assert expected in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


def _npz(tmp_path, **arrays):
    path = tmp_path / "data.npz"
    np.savez(path, **arrays)
    return path


@pytest.mark.parametrize("case,expected", [
    ("wrong_shape", "expects"), ("nan", "NaN"), ("no_x", "no array 'x'"), ("int_x", "floating point"),
    ("bad_y", "'y'"), ("not_npz", "not an .npz (zip) archive"), ("missing", "not found"),
])
def test_bad_data_exit_2(capsys, tmp_path, case, expected):
    good = np.zeros((4, 64), dtype=np.float32)
    if case == "wrong_shape":
        path = _npz(tmp_path, x=np.zeros((4, 8, 8), dtype=np.float32))
    elif case == "nan":
        bad = good.copy()
        bad[1, 3] = np.nan
        path = _npz(tmp_path, x=bad)
    elif case == "no_x":
        path = _npz(tmp_path, inputs=good)
    elif case == "int_x":
        path = _npz(tmp_path, x=good.astype(np.int32))
    elif case == "bad_y":
        path = _npz(tmp_path, x=good, y=np.zeros(3, dtype=np.int64))
    elif case == "not_npz":
        path = tmp_path / "data.npz"
        path.write_text("hello")
    else:
        path = tmp_path / "absent.npz"
    code, _, err = run_cli(capsys, "validate", shipped_model("mlp_relu"), "--data", path)
    assert code == 2 and expected in err and "Traceback" not in err


def test_labels_outside_class_range_exit_2(capsys, tmp_path):
    path = _npz(tmp_path, x=np.zeros((4, 64), dtype=np.float32), y=np.array([0, 1, 2, 10]))
    code, _, err = run_cli(capsys, "validate", shipped_model("mlp_relu"), "--data", path)
    assert code == 2 and "[0, 9]" in err


def test_directory_is_not_a_model(capsys, tmp_path):
    code, _, err = run_cli(capsys, "inspect", tmp_path)
    assert code == 2 and "directory" in err


def test_bad_usage_exits_2(capsys):
    with pytest.raises(SystemExit) as caught:
        cli.main(["validate", str(shipped_model("mlp_relu")), "--device", "tpu"])
    assert caught.value.code == 2
    code, _, err = run_cli(capsys, "validate", shipped_model("mlp_relu"), "--atol", "-1")
    assert code == 2 and "--atol" in err


def test_json_error_object(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "inspect", tmp_path / "nothing.onnx", "--json")
    assert code == 2
    assert json.loads(out)["error_type"] == "ModelNotFoundError"


def test_console_script_runs():
    """The installed entry point works end to end in a fresh process."""
    result = subprocess.run([sys.executable, "-m", "verifier.cli", "inspect", str(shipped_model("cnn"))],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "family     piecewise-linear" in result.stdout and "max_pool 2" in result.stdout


def _strict_json(text: str) -> dict:
    """Parse JSON refusing the NaN / Infinity tokens that strict JSON does not have."""
    def refuse(token):
        raise ValueError(f"non-standard JSON token {token}")

    return json.loads(text, parse_constant=refuse)


def test_inspect_json_is_strict_with_non_finite_params(capsys, tmp_path):
    path = tmp_path / "leaky.onnx"
    path.write_bytes(make_model([helper.make_node("LeakyRelu", ["x"], ["y"], alpha=float("inf"))],
                                [float_io("x", ["n", 3])], [float_io("y", ["n", 3])]).SerializeToString())
    code, out, _ = run_cli(capsys, "inspect", path, "--json")
    assert code == 0
    assert _strict_json(out)["activation_sites"][0]["params"]["alpha"] == "Infinity"


def test_validate_json_with_nan_outputs(capsys, tmp_path):
    """NaN in both runtimes agrees, and the JSON stays strict."""
    path = tmp_path / "sqrt.onnx"
    path.write_bytes(make_model([helper.make_node("Sqrt", ["x"], ["y"])], [float_io("x", ["n", 3])],
                                [float_io("y", ["n", 3])]).SerializeToString())
    data = tmp_path / "data.npz"
    np.savez(data, x=-np.ones((4, 3), dtype=np.float32))
    code, out, _ = run_cli(capsys, "validate", path, "--data", data, "--json")
    payload = _strict_json(out)
    assert code == 0 and payload["passed"] is True and payload["max_abs_diff"] == 0.0


@pytest.mark.parametrize("case,expected", [("hard_coded_batch", "hard-code its batch"),
                                           ("duplicate_names", "same node name")])
def test_runtime_failures_exit_2_with_one_line(capsys, tmp_path, case, expected):
    if case == "hard_coded_batch":
        model = make_model([helper.make_node("Reshape", ["x", "s"], ["y"])], [float_io("x", ["n", 4, 5])],
                           [float_io("y", [1, 20])], [numpy_helper.from_array(np.array([1, 20]), "s")])
    else:
        model = make_model([helper.make_node("Relu", ["x"], ["h"], name="a"),
                            helper.make_node("Abs", ["h"], ["y"], name="a")],
                           [float_io("x", ["n", 3])], [float_io("y", ["n", 3])])
    path = tmp_path / "model.onnx"
    path.write_bytes(model.SerializeToString())
    code, _, err = run_cli(capsys, "validate", path)
    assert code == 2 and "onnxruntime cannot run the model" in err and expected in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


CERTIFY_KEYS = {"delta", "clean_risk", "certificate", "global_bound", "first_order_estimate", "certified_accuracy",
                "exact", "fallbacks", "realised_risk", "realised_accuracy", "in_cell_mass"}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_certify_json_on_shipped_models(capsys, tmp_path, name):
    out_file = tmp_path / "dist.npz"
    code, out, _ = run_cli(capsys, "certify", shipped_model(name), "--data", shipped_data(name), "--samples", "6",
                           "--p", "2", "--norm", "inf", "--delta", "1/255,4/255", "--loss", "ce", "--box", "0,1",
                           "--grid-points", "6", "--save-distributions", out_file, "--json")
    assert code == 0
    payload = json.loads(out)
    assert payload["samples"] == 6 and payload["p"] == 2.0 and payload["norm"] == "inf"
    assert "exact_up_to_delta" in payload and len(payload["certified_radii"]) == 6
    assert [r["delta"] for r in payload["results"]] == pytest.approx([1 / 255, 4 / 255])
    for row in payload["results"]:
        assert CERTIFY_KEYS <= set(row)
        assert row["clean_risk"] <= row["realised_risk"] + 1e-12 <= row["certificate"] + 2e-12
        global_bound = row["global_bound"]
        assert global_bound is None or global_bound == "Infinity" or row["certificate"] <= global_bound + 1e-12
    saved = np.load(out_file)
    assert saved["weights_0"].sum() == pytest.approx(1.0)
    assert saved["atoms_1"].shape[1:] == np.load(shipped_data(name))["x"].shape[1:]


def test_certify_optimise_slopes_is_sound_and_no_looser(capsys):
    common = [shipped_model("mlp_relu"), "--data", shipped_data("mlp_relu"), "--samples", "8", "--p", "inf",
              "--norm", "inf", "--delta", "8/255", "--loss", "margin", "--box", "0,1", "--grid-points", "6",
              "--exact", "off", "--json"]
    plain, optimised, intermediate = (json.loads(run_cli(capsys, "certify", *extra, *common)[1])["results"][0]
                                      for extra in ([], ["--optimise-slopes"], ["--optimise-intermediate"]))
    assert optimised["realised_risk"] <= optimised["certificate"] + 1e-12
    assert optimised["certificate"] < plain["certificate"] - 1e-4  # measured -2.5131 against -2.5100
    assert intermediate["realised_risk"] <= intermediate["certificate"] <= optimised["certificate"] + 1e-12  # -2.5156


@pytest.mark.parametrize("argv,message", [
    (["--delta", "-0.1"], "finite and >= 0"),
    (["--delta", "8/0"], "not a number or a fraction"),
    (["--delta", "abc"], "not a number or a fraction"),
    (["--p", "0.5"], "--p must be >= 1"),
    (["--p", "two"], "not a number"),
    (["--norm", "3"], "unknown norm"),
    (["--loss", "hinge"], "unknown loss"),
    (["--box", "1,0"], "LOW < HIGH"),
    (["--box", "0"], "two numbers"),
    (["--samples", "0"], "at least 1"),
])
def test_certify_bad_arguments_exit_2(capsys, argv, message):
    code, out, err = run_cli(capsys, "certify", shipped_model("mlp_relu"), "--data", shipped_data("mlp_relu"),
                             "--samples", "2", *argv)
    assert code == 2 and out == ""
    assert message in err and err.count("\n") == 1 and "Traceback" not in err


@pytest.mark.parametrize("change,message", [
    (lambda x, y: (x[:, :10], y), "expects"),
    (lambda x, y: (np.where(np.arange(64) == 3, np.nan, x).astype(np.float32), y), "NaN or Inf"),
    (lambda x, y: (x, y + 10), "labels must lie in [0, 9] for this model's 10 classes"),
    (lambda x, y: (x * 3, y), "outside the box"),
    (lambda x, y: (x, None), "no labels"),
])
def test_certify_bad_data_exit_2(capsys, tmp_path, change, message):
    data = np.load(shipped_data("mlp_relu"))
    x, y = change(data["x"][:4], data["y"][:4])
    path = tmp_path / "data.npz"
    np.savez(path, **({"x": x} if y is None else {"x": x, "y": y}))
    code, _, err = run_cli(capsys, "certify", shipped_model("mlp_relu"), "--data", path, "--box", "0,1")
    assert code == 2 and message in err and "Traceback" not in err


ATTACK_KEYS = {"method", "delta", "risk", "robust_accuracy", "clean_accuracy", "transport_cost",
               "replayed_in_onnxruntime"}


def test_attack_json_all_methods_within_budget(capsys, tmp_path):
    out_file = tmp_path / "adv.npz"
    code, out, _ = run_cli(capsys, "attack", shipped_model("mlp_relu"), "--data", shipped_data("mlp_relu"),
                           "--samples", "12", "--method", "all", "--p", "2", "--norm", "inf", "--delta", "2/255",
                           "--box", "0,1", "--steps", "5", "--save-adversarial", out_file, "--json")
    assert code == 0
    payload = json.loads(out)
    assert {r["method"] for r in payload["results"]} == {"wdapp", "wda", "pgd", "wpgd", "wda-curve"}
    for row in payload["results"]:
        assert ATTACK_KEYS <= set(row)
        assert row["transport_cost"] <= 2 / 255 * (1 + 1e-6)
        assert row["replayed_in_onnxruntime"] is True
    saved = np.load(out_file)
    assert list(saved["methods"]) == [r["method"] for r in payload["results"]]
    assert saved["weights_0"].sum() == pytest.approx(1.0)


@pytest.mark.parametrize("argv,message", [
    (["--method", "fgsm"], "unknown attack method"),
    (["--method", "wpgd", "--p", "1"], "not defined for p = 1"),
    (["--kappa", "0.5"], "kappa must be >= 1"),
    (["--delta=-1/255"], "finite and >= 0"),
])
def test_attack_bad_arguments_exit_2(capsys, argv, message):
    code, _, err = run_cli(capsys, "attack", shipped_model("mlp_relu"), "--data", shipped_data("mlp_relu"),
                           "--samples", "2", *argv)
    assert code == 2 and message in err and "Traceback" not in err


@pytest.mark.parametrize("content,message", [
    ("npy", "is a .npy array"),
    ("text", "not an .npz (zip) archive"),
    ("empty", "contains no samples"),
])
def test_data_file_kinds_exit_2(capsys, tmp_path, content, message):
    path = tmp_path / "data.npz"
    if content == "npy":
        with open(path, "wb") as handle:
            np.save(handle, np.zeros((2, 64), np.float32))
    elif content == "text":
        path.write_text("x,y\n0,1\n")
    else:
        np.savez(path, x=np.zeros((0, 64), np.float32), y=np.zeros(0, np.int64))
    code, _, err = run_cli(capsys, "certify", shipped_model("mlp_relu"), "--data", path)
    assert code == 2 and message in err and "Traceback" not in err


def test_save_distributions_into_a_folder_exit_2(capsys, tmp_path):
    code, _, err = run_cli(capsys, "certify", shipped_model("mlp_relu"), "--data", shipped_data("mlp_relu"),
                           "--samples", "2", "--grid-points", "4", "--save-distributions", tmp_path)
    assert code == 2 and "it is a folder" in err
