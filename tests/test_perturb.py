"""`--perturb`: several inputs (the others held per sample) and internal tensors (the model cut
there): onnxruntime agreement, held coordinates that never move, closed-form worst margins, and
audits end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from verifier import cli
from verifier.attacks import attack
from verifier.audit import AuditSettings, audit
from verifier.bounds.global_lipschitz import global_lipschitz
from verifier.bounds.margins import margin_bounds
from verifier.certify.certificate import _normalized, certify
from verifier.convert import convert_model
from verifier.errors import MultipleInputsError, NonFloatInputError, UsageError
from verifier.onnx_io import load_model
from verifier.perturb import fitted_threat_box, load_for_analysis, perturbation_candidates
from verifier.validate import validate_against_onnxruntime

pytestmark = pytest.mark.usefixtures("one_thread")
RNG = np.random.default_rng(7)
W_A = RNG.normal(size=(5, 3)).astype(np.float32)
W_B = RNG.normal(size=(3, 3)).astype(np.float32) * 3
EMBEDDING = RNG.normal(size=(30, 4)).astype(np.float32)
TOKENS = 6


def _save(nodes, inputs, initializers, path) -> str:
    graph = helper.make_graph(nodes, "m", inputs, [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                                                                 ["N", 3])],
                              [numpy_helper.from_array(v, k) for k, v in initializers.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return str(path)


def _run(path: str, feeds: dict) -> np.ndarray:
    return ort.InferenceSession(path).run(None, feeds)[0]


@pytest.fixture(scope="module")
def two_inputs(tmp_path_factory):
    """logits = a W_A + b W_B (linear), b an integer input; data keyed by input name."""
    folder = tmp_path_factory.mktemp("two")
    nodes = [helper.make_node("Cast", ["b"], ["bf"], to=TensorProto.FLOAT),
             helper.make_node("MatMul", ["a", "WA"], ["ha"]), helper.make_node("MatMul", ["bf", "WB"], ["hb"]),
             helper.make_node("Add", ["ha", "hb"], ["logits"])]
    path = _save(nodes, [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 5]),
                         helper.make_tensor_value_info("b", TensorProto.INT64, ["N", 3])],
                 {"WA": W_A, "WB": W_B}, folder / "two.onnx")
    a = RNG.uniform(size=(24, 5)).astype(np.float32)
    b = RNG.integers(-3, 4, size=(24, 3)).astype(np.int64)
    y = _run(path, {"a": a, "b": b}).argmax(1)
    y[:4] = (y[:4] + 1) % 3  # a few misclassified samples
    data = folder / "two.npz"
    np.savez(data, a=a, b=b, y=y)
    return path, str(data), a, b, y


@pytest.fixture(scope="module")
def tokens(tmp_path_factory):
    """Gather embedding -> Reshape -> MatMul -> Relu -> MatMul over integer token ids."""
    folder = tmp_path_factory.mktemp("tokens")
    hidden = RNG.normal(size=(TOKENS * 4, 10)).astype(np.float32) / 3
    head = RNG.normal(size=(10, 3)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["E", "ids"], ["emb"], axis=0),
             helper.make_node("Reshape", ["emb", "shape"], ["flat"]),
             helper.make_node("MatMul", ["flat", "A"], ["h"]), helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("MatMul", ["r", "B"], ["logits"])]
    path = _save(nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", TOKENS])],
                 {"E": EMBEDDING, "shape": np.array([-1, TOKENS * 4], np.int64), "A": hidden, "B": head},
                 folder / "tokens.onnx")
    ids = RNG.integers(0, len(EMBEDDING), size=(20, TOKENS)).astype(np.int64)
    y = _run(path, {"ids": ids}).argmax(1)
    data = folder / "tokens.npz"
    np.savez(data, x=ids, y=y)
    return path, str(data), ids, y


def test_several_inputs_are_refused_without_perturb_and_named_with_it(two_inputs):
    path, data, a, b, _ = two_inputs
    with pytest.raises(MultipleInputsError, match="--perturb NAME"):
        load_model(path)
    loaded, samples, point = load_for_analysis(path, data, "a")
    assert [s.name for s in loaded.info.inputs] == ["verifier_packed"] and samples.x.shape == (24, 8)
    assert point.free == 5 and [p.name for p in point.held] == ["b"]
    np.testing.assert_array_equal(point.free_values(samples.x), a)
    converted = convert_model(loaded)
    assert validate_against_onnxruntime(loaded, converted, samples.x).passed
    np.testing.assert_allclose(converted.logits(torch.as_tensor(samples.x)).detach().numpy(),
                               _run(path, {"a": a, "b": b}), atol=1e-5)


@pytest.mark.parametrize("norm, dual", [("inf", 1), ("2", 2)])
def test_held_input_never_moves_in_bounds(two_inputs, norm, dual):
    """Worst margin over ||a' - a|| <= r, b held: margin + r ||w_j - w_y||_* of the a-weights only."""
    path, data, a, b, y = two_inputs
    loaded, samples, point = load_for_analysis(path, data, "a")
    box, _, _ = fitted_threat_box(samples, None, point)
    bounds = margin_bounds(convert_model(loaded), samples.x, y, radius=0.3, norm=norm, box=box)
    logits = a @ W_A + b.astype(np.float32) @ W_B
    diff = W_A.T[None, :, :] - W_A.T[y][:, None, :]
    closed = logits - logits[np.arange(len(y)), y][:, None] + 0.3 * np.linalg.norm(diff, ord=dual, axis=-1)
    np.testing.assert_allclose(bounds.upper.numpy(), closed, atol=1e-4)


@pytest.mark.parametrize("norm, dual", [("inf", 1), ("2", 2)])
def test_global_constant_ignores_the_held_integer_input(two_inputs, norm, dual, tmp_path):
    """The held `b` (behind an integer Cast) never moves: the logits' global constant is that of
    `a W_A` alone, ||W_A||_{norm -> inf} (max over classes of the dual norm of a column); counting
    the Cast (it rounds) as a variable made it infinite, and every no-box certificate with it."""
    path, data, _, _, _ = two_inputs
    loaded, _, point = load_for_analysis(path, data, "a")
    packed = _normalized(convert_model(loaded))
    assert math.isinf(global_lipschitz(packed, norm).logits_constant)
    bound = global_lipschitz(packed, norm, free=point.free).logits_constant
    alone = _save([helper.make_node("MatMul", ["a", "WA"], ["logits"])],
                  [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 5])], {"WA": W_A},
                  tmp_path / "alone.onnx")
    assert bound == global_lipschitz(_normalized(convert_model(load_model(alone))), norm).logits_constant
    assert bound >= np.linalg.norm(W_A.astype(np.float64), ord=dual, axis=0).max() - 1e-9


def test_attacks_and_certificate_keep_held_inputs(two_inputs):
    path, data, a, b, y = two_inputs
    loaded, samples, point = load_for_analysis(path, data, "a")
    box, _, _ = fitted_threat_box(samples, (0.0, 1.0), point)
    converted = convert_model(loaded)
    report = attack(converted, loaded, samples.x, y, ["pgd", "wdapp"], [0.2], p=2, norm="inf", box=box, steps=5)
    certificate = certify(converted, samples.x, y, [0.2], p=2, norm="inf", box=box, grid_points=6)
    for result in report.results:
        atoms = result.atoms.numpy().reshape(len(result.atoms), -1)
        origin = samples.x.reshape(len(samples.x), -1)[result.source.numpy()]
        np.testing.assert_array_equal(atoms[:, 5:], origin[:, 5:])  # b never moves
        assert atoms[:, :5].min() >= 0 and atoms[:, :5].max() <= 1
        assert result.risk <= certificate.results[0].certificate + 1e-9


def test_token_model_cut_at_its_embedding(tokens):
    path, data, ids, y = tokens
    with pytest.raises(NonFloatInputError, match="--perturb TENSOR"):
        load_model(path)
    assert perturbation_candidates(load_model(path, any_inputs=True).proto) == ["emb"]
    loaded, samples, point = load_for_analysis(path, data, "emb")
    assert point.internal and not point.held and point.cut_inputs == ("ids",)
    np.testing.assert_array_equal(samples.x, EMBEDDING[ids])  # clean values from onnxruntime
    converted = convert_model(loaded)
    assert validate_against_onnxruntime(loaded, converted, samples.x).passed
    assert (converted.logits(torch.as_tensor(samples.x)).argmax(1).numpy() == y).all()
    with pytest.raises(UsageError, match="candidate tensors: emb"):
        load_for_analysis(path, data, "nowhere")


def test_token_model_audit_through_its_embedding(tokens, tmp_path):
    path, data, ids, y = tokens
    settings = AuditSettings(deltas=(0.02, 0.1), p=2.0, norm="2", attacks=("wdapp", "pgd"), grid_points=6, steps=5,
                             perturb="emb")
    outcome = audit(path, data, settings, tmp_path / "out")
    assert outcome.exit_code == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["model"]["perturbation"]["tensor"] == "emb" and report["model"]["perturbation"]["internal"]
    assert any(w.startswith("threat model: perturbing internal tensor 'emb'") for w in report["warnings"])
    for row in report["results"]:
        assert row["clean_accuracy"] == 1.0
        assert row["clean_risk"] <= row["best_attack_risk"] + 1e-9 <= row["certificate"] + 2e-9
    assert "threat model: perturbing internal tensor" in (tmp_path / "out" / "report.md").read_text()


def test_two_input_audit_from_the_command_line(two_inputs, tmp_path, capsys):
    path, data, *_ = two_inputs
    code = cli.main(["audit", path, "--data", data, "--perturb", "a", "--box", "0,1", "--delta", "0.05",
                     "--attacks", "pgd", "--out", str(tmp_path / "o"),
                     "--quiet", "--json"])
    payload = json.loads(capsys.readouterr().out)
    assert code == 0 and payload["model"]["perturbation"]["held"][0]["name"] == "b"
    code = cli.main(["certify", path, "--data", data, "--delta", "0.05", "--json"])
    assert code == 2 and "--perturb NAME" in capsys.readouterr().err
