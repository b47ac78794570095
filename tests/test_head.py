"""Reading the classifier head right (issue 17): each case against onnxruntime and a closed form."""

from __future__ import annotations

import json

import head_models as hm
import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from verifier import cli
from verifier.attacks import attack
from verifier.certify.certificate import certify
from verifier.convert import convert_model
from verifier.data import fit_box
from verifier.errors import DataError, UsageError
from verifier.graph import OperatorGraph
from verifier.head import PROBABILITY_FLOOR, choose_head, output_candidates
from verifier.onnx_io import load_model
from verifier.validate import validate_against_onnxruntime

X = np.random.default_rng(3).uniform(0, 1, size=(24, 4)).astype(np.float32)

# case -> (builder, binary head?, expected kind, tensor read as logits)
CASES = {
    "softmax_identity": (hm.softmax_identity, False, "logits", "z"),
    "batch_minus_one": (lambda: hm.softmax_identity(batch=-1), False, "logits", "z"),
    "sigmoid_binary": (hm.sigmoid_binary, True, "binary", "z"),
    "logit_column": (hm.logit_column, True, "binary", "z"),
    "logit_vector": (hm.logit_vector, True, "binary", "z1"),
    "pass_through_first": (hm.pass_through_first, False, "logits", "logits"),
}


def _labels(binary: bool) -> np.ndarray:
    """Labels that are neither all right nor all wrong: the true argmax, a few flipped."""
    y = hm.true_logits(X, binary).argmax(1)
    y[:5] = (y[:5] + 1) % (2 if binary else 3)
    return y


@pytest.fixture
def loaded_case(save, request):
    build, binary, kind, tensor = CASES[request.param]
    return load_model(save(build())), binary, kind, tensor


@pytest.mark.parametrize("loaded_case", sorted(CASES), indirect=True)
def test_head_logits_match_closed_form_and_onnxruntime(loaded_case, one_thread):
    loaded, binary, kind, tensor = loaded_case
    converted = convert_model(loaded)
    assert (converted.head.kind, converted.head.tensor) == (kind, tensor)
    logits = converted.logits(torch.from_numpy(X)).detach().numpy()
    assert logits.shape == (len(X), 2 if binary else 3)
    assert np.allclose(logits, hm.true_logits(X, binary), atol=1e-5)
    y = _labels(binary)
    report = validate_against_onnxruntime(loaded, converted, X, y=y, device="cpu")
    assert report.passed and report.top1_agreement == 1.0
    expected_accuracy = float(np.mean(hm.true_logits(X, binary).argmax(1) == y))
    assert report.accuracy_onnxruntime == report.accuracy_torch == pytest.approx(expected_accuracy)
    # onnxruntime on the user's own file agrees with the closed form on its own outputs
    session = ort.InferenceSession(loaded.proto.SerializeToString(), providers=["CPUExecutionProvider"])
    first = session.run(None, {"x": X})[list(o.name for o in loaded.proto.graph.output).index(converted.head.output)]
    closed = hm.true_logits(X, binary)
    if kind == "binary" and "sigmoid" in loaded.proto.graph.node[-1].op_type.lower():
        assert np.allclose(first.ravel(), 1 / (1 + np.exp(-closed[:, 1])), atol=1e-6)
    elif converted.head.cut and converted.head.cut[-1] == "Softmax":
        assert np.allclose(first, np.exp(closed) / np.exp(closed).sum(1, keepdims=True), atol=1e-6)


@pytest.mark.parametrize("loaded_case", sorted(CASES), indirect=True)
def test_certify_and_attack_clean_numbers_are_softmax_ce_of_true_logits(loaded_case, one_thread):
    loaded, binary, _, _ = loaded_case
    converted = convert_model(loaded)
    y = _labels(binary)
    expected_ce = hm.softmax_ce(hm.true_logits(X, binary), y)
    expected_accuracy = float(np.mean(hm.true_logits(X, binary).argmax(1) == y))
    result = certify(converted, X, y, [0.01], p=2.0, norm="inf", box=(0.0, 1.0), grid_points=4)
    row = result.results[0]
    assert row.clean_risk == pytest.approx(expected_ce, abs=1e-5)
    assert result.clean_accuracy == pytest.approx(expected_accuracy)
    assert row.clean_risk <= row.certificate < np.inf
    assert row.global_bound is not None and row.certificate <= row.global_bound + 1e-9
    report = attack(converted, loaded, X, y, ["pgd"], [0.01], box=(0.0, 1.0), steps=5, device="cpu")
    assert report.results[0].clean_risk == pytest.approx(expected_ce, abs=1e-5)
    assert report.results[0].clean_accuracy == pytest.approx(expected_accuracy)


def test_batch_minus_one_is_dynamic(save):
    loaded = load_model(save(hm.softmax_identity(batch=-1)))
    assert loaded.info.data_input.shape == (None, 4)
    assert not isinstance(loaded.info.outputs[0].shape[0], int) and loaded.info.outputs[0].shape[1] == 3


def test_probabilities_only_use_log_with_floor(save, one_thread):
    loaded = load_model(save(hm.normalised_scores()))
    converted = convert_model(loaded)
    assert converted.head.kind == "probabilities" and "1e-12" in converted.head.reason
    scores = 1 / (1 + np.exp(-hm.true_logits(X).astype(np.float64)))
    probabilities = scores / scores.sum(1, keepdims=True)
    logits = converted.logits(torch.from_numpy(X)).detach().numpy()
    assert np.allclose(logits, np.log(np.maximum(probabilities, PROBABILITY_FLOOR)), atol=1e-5)
    y = _labels(False)
    assert validate_against_onnxruntime(loaded, converted, X, y=y, device="cpu").passed
    result = certify(converted, X, y, [0.01], box=(0.0, 1.0), grid_points=4)
    expected = float(-np.log(probabilities[np.arange(len(y)), y]).mean())
    assert result.results[0].clean_risk == pytest.approx(expected, abs=1e-5)


def test_default_head_skips_a_pass_through_and_output_chooses(save):
    graph = OperatorGraph(load_model(save(hm.pass_through_first())).proto)
    notes = {c.name: c.note for c in output_candidates(graph)}
    assert notes == {"echo": "a pass-through of the input", "logits": "float output"}
    head = choose_head(graph)
    assert head.output == "logits" and "skipped echo" in head.reason and head.chosen_by == "default"
    chosen = choose_head(graph, "echo")
    assert (chosen.output, chosen.tensor, chosen.chosen_by) == ("echo", "x", "--output")
    with pytest.raises(UsageError, match="'nope' is not an output of the model; its outputs: echo"):
        choose_head(graph, "nope")


@pytest.mark.parametrize("build, cut", [
    (hm.softmax_identity, ("Identity", "Softmax")),
    (lambda: _log_softmax_then(["Flatten", "Cast"]), ("Cast", "Flatten", "LogSoftmax")),
])
def test_cut_through_data_movement(save, build, cut):
    head = choose_head(OperatorGraph(load_model(save(build())).proto))
    assert head.cut == cut and head.kind == "logits" and head.tensor == "z"


def _log_softmax_then(ops: list[str]) -> onnx.ModelProto:
    nodes = [helper.make_node("Gemm", ["x", "W", "B"], ["z"], transB=1),
             helper.make_node("LogSoftmax", ["z"], ["t0"], axis=1)]
    for i, op in enumerate(ops):
        attrs = {"to": TensorProto.FLOAT} if op == "Cast" else {}
        nodes.append(helper.make_node(op, [f"t{i}"], [f"t{i + 1}"], **attrs))
    return hm._model(nodes, [(f"t{len(ops)}", ["N", 3])], {"W": hm.W3, "B": hm.B3})


def test_box_tolerates_the_dtype_rounding_and_names_the_worst_value():
    x = np.full((3, 2), 0.5, dtype=np.float32)
    x[1, 0] = np.float32(2.64)  # 2.6400001 as float32
    low, high = fit_box(x, (0.0, 2.64), "data.npz")
    assert low == 0.0 and high == float(np.float32(2.64)) > 2.64
    x[2, 1] = np.float32(2.7)
    with pytest.raises(DataError, match=r"1 sample\(s\) in data.npz .*furthest: sample 2, feature 1, value 2.7 "):
        fit_box(x, (0.0, 2.64), "data.npz")
    assert fit_box(x.astype(np.float64), None, "d") is None


CLIP_REFUSAL = "cell clipping (clip) is not supported: unrolling writes the unclipped cell"


def _lstm() -> onnx.ModelProto:
    hidden = 3
    nodes = [helper.make_node("LSTM", ["x", "W", "R"], ["Y", "Yh"], hidden_size=hidden, clip=1.0),  # clip: refused
             helper.make_node("Squeeze", ["Yh", "axes"], ["h"])]
    inits = {"W": np.ones((1, 4 * hidden, 4), np.float32), "R": np.ones((1, 4 * hidden, hidden), np.float32),
             "axes": np.array([0], dtype=np.int64)}
    graph = helper.make_graph(nodes, "lstm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [5, "N", 4])],
                              [helper.make_tensor_value_info("h", TensorProto.FLOAT, ["N", hidden])],
                              [numpy_helper.from_array(v, k) for k, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_inspect_lists_unsupported_ops_first_and_exits_2(save, capsys):
    path = save(_lstm())
    code, out, err = run_cli(capsys, "inspect", path)
    assert code == 2
    assert out.splitlines()[0].startswith("UNSUPPORTED LSTM (opset 17) at node 'LSTM_0'")
    assert err.strip().splitlines() == ["verifier: error: unsupported for conversion: 1 node(s): LSTM (opset 17) "
                                        f"at node 'LSTM_0' ({CLIP_REFUSAL})"]
    code, out, _ = run_cli(capsys, "inspect", path, "--json")
    payload = json.loads(out)
    assert code == 2 and payload["error_type"] == "UnsupportedOpsError"
    assert payload["unsupported_ops"] == [{"node": "LSTM_0", "op": "LSTM (opset 17)", "reason": CLIP_REFUSAL}]


def test_inspect_names_head_and_candidates(save, capsys):
    path = save(hm.pass_through_first())
    code, out, _ = run_cli(capsys, "inspect", path)
    assert code == 0
    assert "output     echo: float32 (N, 4)  [a pass-through of the input]" in out
    assert "output     logits: float32 (N, 3)  [head: logits]" in out
    code, out, _ = run_cli(capsys, "inspect", path, "--json", "--output", "echo")
    payload = json.loads(out)
    assert payload["head"]["output"] == "echo" and payload["head"]["chosen_by"] == "--output"
    assert [c["name"] for c in payload["output_candidates"]] == ["echo", "logits"]
    assert payload["unsupported_ops"] == []


def test_cli_binary_labels_and_output_choice(save, tmp_path, capsys):
    y = _labels(True)
    data = tmp_path / "d.npz"
    np.savez(data, x=X, y=y)
    path = save(hm.logit_vector())
    code, out, err = run_cli(capsys, "validate", path, "--data", data, "--json")
    assert code == 0, err
    assert json.loads(out)["accuracy"]["onnxruntime"] == pytest.approx(np.mean(hm.true_logits(X, True).argmax(1) == y))
    code, out, err = run_cli(capsys, "certify", path, "--data", data, "--box", "0,1", "--delta", "0.01",
                             "--grid-points", "4", "--json")
    assert code == 0, err
    payload = json.loads(out)
    assert payload["head"]["kind"] == "binary"
    assert payload["results"][0]["clean_risk"] == pytest.approx(hm.softmax_ce(hm.true_logits(X, True), y), abs=1e-5)
    code, out, err = run_cli(capsys, "certify", save(hm.pass_through_first(), "p.onnx"), "--data", data,
                             "--output", "nope")
    assert code == 2 and out == ""
    assert err.strip().splitlines() == ["verifier: error: --output 'nope' is not an output of the model; its outputs: "
                                        "echo (float32 (N, 4)), logits (float32 (N, 3))"]


def test_cli_box_rounding_accepted_and_outside_refused(save, tmp_path, capsys):
    x = (X * 2.64).astype(np.float32)
    x[0, 0] = np.float32(2.64)
    data = tmp_path / "d.npz"
    np.savez(data, x=x, y=_labels(False))
    path = save(hm.softmax_identity())
    code, _, err = run_cli(capsys, "attack", path, "--data", data, "--box", "0,2.64", "--method", "pgd",
                           "--steps", "2", "--delta", "0.01")
    assert code == 0, err
    x[3, 2] = 2.9
    np.savez(data, x=x, y=_labels(False))
    code, out, err = run_cli(capsys, "certify", path, "--data", data, "--box", "0,2.64")
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert "furthest: sample 3, feature 2, value 2.9 (float32)" in err


def test_skl2onnx_mlp_heads_give_sklearn_cross_entropy(tmp_path, one_thread):
    pytest.importorskip("sklearn")
    skl2onnx = pytest.importorskip("skl2onnx")
    from sklearn.neural_network import MLPClassifier

    rng = np.random.default_rng(0)
    x = rng.uniform(size=(120, 4)).astype(np.float32)
    for y, kind in (((x[:, 0] > 0.5).astype(int) + (x[:, 1] > 0.5), "logits"),
                    ((x[:, 0] + x[:, 1] > 1).astype(int), "binary")):
        classifier = MLPClassifier(hidden_layer_sizes=(6,), max_iter=200, random_state=0).fit(x, y)
        for zipmap in (False, True):
            path = tmp_path / f"skl_{kind}_{zipmap}.onnx"
            path.write_bytes(skl2onnx.to_onnx(classifier, x[:1], options={"zipmap": zipmap}).SerializeToString())
            converted = convert_model(load_model(path))
            assert converted.head.kind == kind
            expected = float(-np.log(classifier.predict_proba(x[:30])[np.arange(30), y[:30]]).mean())
            result = certify(converted, x[:30], y[:30], [0.0], box=(0.0, 1.0), grid_points=3)
            assert result.results[0].clean_risk == pytest.approx(expected, abs=1e-5)
            assert result.clean_accuracy == pytest.approx(np.mean(classifier.predict(x[:30]) == y[:30]))


def test_audit_takes_the_output_choice(save, tmp_path, one_thread):
    from verifier.audit import AuditSettings, audit

    y = _labels(False)
    data = tmp_path / "d.npz"
    np.savez(data, x=X, y=y)
    path = save(hm.pass_through_first())
    settings = AuditSettings(deltas=(0.01,), attacks=("pgd",), box=(0.0, 1.0), steps=2, grid_points=4,
                             device="cpu", output="logits")
    outcome = audit(path, data, settings, tmp_path / "report")
    assert outcome.report["model"]["head"]["chosen_by"] == "--output"
    clean = outcome.report["results"][0]["clean_risk"]
    assert clean == pytest.approx(hm.softmax_ce(hm.true_logits(X), y), abs=1e-5)
    bad = AuditSettings(**{**settings.__dict__, "output": "nope"})
    with pytest.raises(UsageError, match="'nope' is not an output"):
        audit(path, data, bad, tmp_path / "never")
    assert not (tmp_path / "never").exists()


def _time_first(batch: int | str = "N", last_step: bool = False) -> onnx.ModelProto:
    """x (batch, 5, 3) -> Transpose to time first -> MatMul: `logits` (5, batch, 4), per time step;
    with `last_step` also `last` = logits[-1] (batch, 4), a batch-first head."""
    weight = numpy_helper.from_array(np.random.default_rng(0).normal(size=(3, 4)).astype(np.float32), "W")
    index = numpy_helper.from_array(np.asarray(4, dtype=np.int64), "four")
    nodes = [helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2]),
             helper.make_node("MatMul", ["t", "W"], ["logits"])]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [5, batch, 4])]
    if last_step:
        nodes.append(helper.make_node("Gather", ["logits", "four"], ["last"], axis=0))
        outputs.append(helper.make_tensor_value_info("last", TensorProto.FLOAT, [batch, 4]))
    graph = helper.make_graph(nodes, "time_first", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 5, 3])],
                              outputs, [weight, index])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize("batch", ["N", 1, 3])
def test_time_first_output_is_refused_with_why_and_what_works(batch):
    graph = OperatorGraph(_time_first(batch))
    (candidate,) = output_candidates(graph)
    assert not candidate.usable and candidate.note.startswith("the batch on axis 1")
    with pytest.raises(UsageError, match=r"'logits' has the batch on axis 1 .* no batch-first float output"):
        choose_head(graph)
    with pytest.raises(UsageError, match="not one row of class scores per sample"):
        choose_head(graph, "logits")


def test_a_batch_first_output_beside_a_time_first_one_is_the_head(tmp_path):
    graph = OperatorGraph(_time_first(last_step=True))
    head = choose_head(graph)
    assert head.output == "last" and "skipped logits (the batch on axis 1" in head.reason
    with pytest.raises(UsageError, match=r"name a batch-first output with --output \(last\)"):
        choose_head(graph, "logits")
    x = np.random.default_rng(1).normal(size=(6, 5, 3)).astype(np.float32)
    (expected, last) = ort.InferenceSession(_time_first(last_step=True).SerializeToString()).run(None, {"x": x})
    np.testing.assert_allclose(last, expected[-1])
    path = tmp_path / "last.onnx"
    onnx.save(_time_first(last_step=True), str(path))
    converted = convert_model(load_model(str(path)))
    np.testing.assert_allclose(converted.logits(torch.as_tensor(x)).detach().numpy(), last, rtol=1e-5, atol=1e-6)


def test_audit_of_a_time_first_model_exits_2_in_one_line(tmp_path, capsys):
    path, data = tmp_path / "time_first.onnx", tmp_path / "d.npz"
    onnx.save(_time_first(), str(path))
    np.savez(data, x=np.zeros((4, 5, 3), np.float32), y=np.zeros(4, np.int64))
    code, _, err = run_cli(capsys, "audit", path, "--data", data, "--out", tmp_path / "out")
    error = err.strip().splitlines()
    assert code == 2 and len(error) == 1 and "the batch on axis 1" in error[0]
    assert not (tmp_path / "out").exists()
