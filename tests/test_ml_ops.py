"""scikit-learn linear models (ai.onnx.ml) through conversion, bounds and audit: onnxruntime
agreement, the head on the raw scores, closed-form worst margins, refusal of tree ensembles."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
import torch

from verifier.audit import AuditSettings, audit
from verifier.bounds.margins import margin_bounds
from verifier.convert import convert_model, unsupported_nodes
from verifier.convert.ml_ops import lower_ml_ops
from verifier.onnx_io import load_model
from verifier.validate import validate_against_onnxruntime

sklearn = pytest.importorskip("sklearn")
skl2onnx = pytest.importorskip("skl2onnx")
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.pipeline import make_pipeline  # noqa: E402
from sklearn.preprocessing import StandardScaler  # noqa: E402
from sklearn.svm import LinearSVC  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")
FEATURES = 6


def _data(classes: int, rows: int = 80) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(classes)
    centres = rng.normal(size=(classes, FEATURES)) * 1.5
    y = rng.integers(0, classes, rows)
    x = (centres[y] + rng.normal(size=(rows, FEATURES))).astype(np.float32)
    return x, y.astype(np.int64)


def _export(estimator, x: np.ndarray, y: np.ndarray, path) -> tuple[object, str]:
    fitted = estimator.fit(x, y)
    proto = skl2onnx.to_onnx(fitted, x[:1], target_opset=17)
    onnx.save(proto, str(path))
    return fitted, str(path)


def _affine_of(fitted) -> tuple[np.ndarray, np.ndarray]:
    """(W, b) of the decision function in input space (a scaler pipeline folded in)."""
    model = fitted[-1] if hasattr(fitted, "steps") else fitted
    w, b = np.atleast_2d(model.coef_), np.atleast_1d(model.intercept_)
    if hasattr(fitted, "steps"):
        scaler = fitted[0]
        w, b = w / scaler.scale_, b - (w / scaler.scale_) @ scaler.mean_
    if w.shape[0] == 1:  # binary: logits [0, s]
        w, b = np.vstack([np.zeros_like(w), w]), np.concatenate([[0.0], b])
    return w, b


CASES = {
    "logreg-3": lambda: (LogisticRegression(), 3),
    "logreg-2": lambda: (LogisticRegression(), 2),
    "linearsvc-3": lambda: (LinearSVC(), 3),
    "linearsvc-2": lambda: (LinearSVC(), 2),
    "scaler-logreg-3": lambda: (make_pipeline(StandardScaler(), LogisticRegression()), 3),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_linear_models_convert_agree_and_bound_in_closed_form(case, tmp_path):
    estimator, classes = CASES[case]()
    x, y = _data(classes)
    fitted, path = _export(estimator, x, y, tmp_path / f"{case}.onnx")
    loaded = load_model(path)
    converted = convert_model(loaded)
    assert all(n.domain != "ai.onnx.ml" for n in converted.normalized.graph.node)
    report = validate_against_onnxruntime(loaded, converted, x)
    assert report.passed and report.top1_agreement == 1.0
    w, b = _affine_of(fitted)
    logits = converted.logits(torch.as_tensor(x)).detach().numpy()
    # the raw scores (up to a shift per row that no margin sees: LOGISTIC heads are log-sigmoids)
    np.testing.assert_allclose(logits - logits[:, :1], (x @ w.T + b) - (x @ w.T + b)[:, :1], atol=1e-4)
    assert (logits.argmax(1) == fitted.predict(x)).all()
    radius = 0.2
    for norm, dual in (("inf", 1), ("2", 2)):
        bounds = margin_bounds(converted, x[:10], y[:10], radius=radius, norm=norm, box=None)
        diff = w[None, :, :] - w[y[:10]][:, None, :]  # (N, C, F): w_j - w_y
        closed = np.einsum("ncf,nf->nc", diff, x[:10]) + b[None] - b[y[:10]][:, None] \
            + radius * np.linalg.norm(diff, ord=dual, axis=-1)
        np.testing.assert_allclose(bounds.upper.numpy(), closed, atol=1e-4)


def test_scores_head_cuts_softmax_normalizer_and_zipmap(tmp_path):
    x, y = _data(3)
    _, path = _export(LogisticRegression(), x, y, tmp_path / "lr.onnx")
    converted = convert_model(load_model(path))
    head = converted.head
    assert head.kind == "scores" and head.output == "output_probability"
    assert head.cut == ("ZipMap", "Normalizer(L1)", "LinearClassifier.post_transform=SOFTMAX")


def test_lowering_matches_onnxruntime_on_scaler_and_normalizer():
    import onnxruntime as ort
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Scaler", ["X"], ["s"], domain="ai.onnx.ml", offset=[0.5, -1.0, 2.0], scale=[2.0, 0.5, 1.5]),
        helper.make_node("Normalizer", ["s"], ["l2"], domain="ai.onnx.ml", norm="L2"),
        helper.make_node("Normalizer", ["s"], ["l1"], domain="ai.onnx.ml", norm="L1"),
        helper.make_node("Normalizer", ["s"], ["mx"], domain="ai.onnx.ml", norm="MAX"),
        helper.make_node("LinearRegressor", ["s"], ["r"], domain="ai.onnx.ml", coefficients=[1.0, -2.0, 0.5, 3.0, 0.0,
                                                                                             1.0], intercepts=[0.1, -0.2],
                         targets=2),
    ]
    outputs = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [None, None]) for n in ("l2", "l1", "mx", "r")]
    graph = helper.make_graph(nodes, "ml", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [None, 3])], outputs)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("ai.onnx.ml", 1)])
    x = np.random.default_rng(0).normal(size=(7, 3)).astype(np.float32) + 3.0
    expected = ort.InferenceSession(model.SerializeToString()).run(None, {"X": x})
    lowered = lower_ml_ops(model)
    assert all(n.domain != "ai.onnx.ml" for n in lowered.graph.node)
    got = ort.InferenceSession(lowered.SerializeToString()).run(None, {"X": x})
    for want, have in zip(expected, got):
        np.testing.assert_allclose(have, want, rtol=1e-5, atol=1e-6)


def test_tree_ensemble_is_refused_with_its_reason(tmp_path):
    from sklearn.tree import DecisionTreeClassifier

    x, y = _data(3)
    _, path = _export(DecisionTreeClassifier(max_depth=3, random_state=0), x, y, tmp_path / "tree.onnx")
    error = unsupported_nodes(load_model(path))
    assert error is not None and "TreeEnsemble" in str(error) and "piecewise constant" in str(error)


def test_logistic_regression_audit_end_to_end(tmp_path):
    x, y = _data(3, rows=24)
    fitted, path = _export(LogisticRegression(), x, y, tmp_path / "lr.onnx")
    data = tmp_path / "data.npz"
    np.savez(data, x=x, y=y)
    settings = AuditSettings(deltas=(0.05, 0.2), p=2.0, norm="2", loss="ce", attacks=("wdapp", "pgd"),
                             grid_points=8, steps=5)
    outcome = audit(path, str(data), settings, tmp_path / "out")
    assert outcome.exit_code == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    clean = report["results"][0]["clean_accuracy"]
    assert clean == pytest.approx(float((fitted.predict(x) == y).mean()))
    for row in report["results"]:
        assert row["clean_risk"] <= row["best_attack_risk"] + 1e-9 <= row["certificate"] + 2e-9
        assert row["certified_accuracy"] <= row["best_attack_accuracy"] <= row["clean_accuracy"]
    # a linear model's exact flip distance (l2, no box) is min_j margin_j / ||w_y - w_j||_2; the
    # worst accuracy within W_2 distance delta is the clean accuracy minus a fractional knapsack
    w, b = _affine_of(fitted)
    logits = x @ w.T + b
    margins = logits[np.arange(len(y)), y][:, None] - logits
    gaps = np.linalg.norm(w[y][:, None, :] - w[None], axis=-1)
    radius = np.where(gaps > 0, margins / np.where(gaps > 0, gaps, 1), np.inf).min(1)
    for row, delta in zip(report["results"], settings.deltas):
        costs, budget, flipped = np.sort(radius[radius > 0] ** 2), delta ** 2 * len(y), 0.0
        for cost in costs:
            take = min(1.0, budget / cost)
            flipped, budget = flipped + take, budget - take * cost
            if budget <= 0:
                break
        exact = float((radius > 0).mean()) - flipped / len(y)
        assert row["certified_accuracy"] <= exact + 1e-9
        assert row["certified_accuracy"] >= exact - 0.02  # radii found by bisection, slightly inside
