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
ML = "ai.onnx.ml"


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
    w, b = _affine_of(fitted)
    _assert_exact_worst_accuracy(report, x @ w.T + b, y, w, settings.deltas)


def _assert_exact_worst_accuracy(report: dict, logits: np.ndarray, y: np.ndarray, w: np.ndarray,
                                 deltas: tuple[float, ...]) -> None:
    """A linear model's exact flip distance (l2, no box) is min_j margin_j / ||w_y - w_j||_2 (w: the
    weights on the perturbed coordinates); the worst accuracy within W_2 distance delta is the clean
    accuracy minus a fractional knapsack: the certified accuracy lies just below it."""
    margins = logits[np.arange(len(y)), y][:, None] - logits
    gaps = np.linalg.norm(w[y][:, None, :] - w[None], axis=-1)
    radius = np.where(gaps > 0, margins / np.where(gaps > 0, gaps, 1), np.inf).min(1)
    for row, delta in zip(report["results"], deltas):
        costs, budget, flipped = np.sort(radius[radius > 0] ** 2), delta ** 2 * len(y), 0.0
        for cost in costs:
            take = min(1.0, budget / cost)
            flipped, budget = flipped + take, budget - take * cost
            if budget <= 0:
                break
        exact = float((radius > 0).mean()) - flipped / len(y)
        assert row["certified_accuracy"] <= exact + 1e-9
        assert row["certified_accuracy"] >= exact - 0.02  # radii found by bisection, slightly inside


@pytest.mark.parametrize("elem, opset", [(onnx.TensorProto.INT64, 17), (onnx.TensorProto.INT64, 11),
                                         (onnx.TensorProto.FLOAT, 17), (onnx.TensorProto.DOUBLE, 13)])
def test_one_hot_encoder_lowering_matches_onnxruntime(elem, opset):
    import onnxruntime as ort
    from onnx import helper

    node = helper.make_node("OneHotEncoder", ["X"], ["Y"], domain="ai.onnx.ml", cats_int64s=[-3, 0, 2, 7], zeros=1)
    graph = helper.make_graph([node], "one_hot", [helper.make_tensor_value_info("X", elem, [None, 3])],
                              [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [None, 3, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset), helper.make_opsetid(ML, 1)])
    values = [[-3, 0, 2], [7, 1, -4], [5, 2, 0], [0, 0, 7]]  # known, unknown (all zeros) and repeated categories
    if elem != onnx.TensorProto.INT64:  # onnxruntime truncates a float input towards zero
        values += [[-3.5, 0.4, 2.9], [7.0, -0.7, -2.5], [-0.2, 2.0, 6.99]]
    x = np.asarray(values, dtype=helper.tensor_dtype_to_np_dtype(elem))
    (expected,) = ort.InferenceSession(model.SerializeToString()).run(None, {"X": x})
    lowered = lower_ml_ops(model)
    assert all(n.domain != ML for n in lowered.graph.node)
    (got,) = ort.InferenceSession(lowered.SerializeToString()).run(None, {"X": x})
    assert got.shape == expected.shape and expected.sum() > 0
    np.testing.assert_array_equal(got, expected)


def test_one_hot_encoder_of_strings_is_refused_with_its_reason():
    from onnx import helper

    node = helper.make_node("OneHotEncoder", ["X"], ["Y"], domain=ML, cats_strings=["a", "b"])
    graph = helper.make_graph([node], "one_hot", [helper.make_tensor_value_info("X", onnx.TensorProto.STRING, [None])],
                              [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [None, 2])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ML, 1)])
    assert lower_ml_ops(model).graph.node[0].op_type == "OneHotEncoder"
    from verifier.convert.ml_ops import refusal_reason

    assert "string categories" in refusal_reason("OneHotEncoder")


def test_column_pipeline_with_a_held_integer_input_audits_in_closed_form(tmp_path):
    """skl2onnx's two-input export of ColumnTransformer(StandardScaler | OneHotEncoder) + LogisticRegression:
    `--perturb numeric` with the int64 `categorical` held per sample; the model is affine in `numeric`.
    The box is wide enough that every flip within the budgets lies inside it (the closed form has no box);
    without a box the certificate is infinite: the global Lipschitz bound sees the held input's integer
    cast, which the threat never moves (a limit of verifier.bounds.global_lipschitz)."""
    from corpus_sklearn import column_pipeline, export_columns

    rng = np.random.default_rng(4)
    rows, features = 24, 4
    categorical = np.stack([rng.integers(0, 3, rows), rng.integers(0, 2, rows)], 1).astype(np.int64)
    numeric = rng.normal(size=(rows, features)).clip(-3, 3).astype(np.float32)
    y = ((numeric[:, 0] + categorical[:, 0] + rng.normal(size=rows) * 0.5) > 1).astype(np.int64) \
        + (numeric[:, 1] + categorical[:, 1] > 0.8)
    pipeline = column_pipeline(LogisticRegression(), features, [np.arange(3), np.arange(2)])
    pipeline.fit(np.hstack([numeric, categorical]).astype(np.float64), y)
    path, data = tmp_path / "columns.onnx", tmp_path / "columns.npz"
    path.write_bytes(export_columns(pipeline, numeric, categorical))
    np.savez(data, numeric=numeric, categorical=categorical, y=y)
    settings = AuditSettings(deltas=(0.05, 0.2), p=2.0, norm="2", loss="ce", attacks=("wdapp", "pgd"),
                             grid_points=8, steps=5, perturb="numeric", box=(-5.0, 5.0))
    outcome = audit(str(path), str(data), settings, tmp_path / "out")
    assert outcome.exit_code == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["model"]["perturbation"]["held"][0]["name"] == "categorical"
    full = np.hstack([numeric, categorical]).astype(np.float64)
    assert report["results"][0]["clean_accuracy"] == pytest.approx(float((pipeline.predict(full) == y).mean()))
    for row in report["results"]:
        assert np.isfinite(row["certificate"])
        assert row["clean_risk"] <= row["best_attack_risk"] + 1e-9 <= row["certificate"] + 2e-9
        assert row["certified_accuracy"] <= row["best_attack_accuracy"] <= row["clean_accuracy"]
    scaler, classifier = pipeline[0].named_transformers_["numeric"], pipeline[-1]
    w = classifier.coef_[:, :features] / scaler.scale_  # the decision function's weights on `numeric`
    _assert_exact_worst_accuracy(report, pipeline.decision_function(full), y, w, settings.deltas)


def test_nan_imputer_is_the_identity_on_finite_inputs_and_a_number_imputer_is_refused():
    import onnxruntime as ort
    from onnx import helper

    def imputer(**attributes) -> onnx.ModelProto:
        node = helper.make_node("Imputer", ["X"], ["Y"], domain=ML, imputed_value_floats=[0.5, -1.0], **attributes)
        graph = helper.make_graph([node], "imputer", [helper.make_tensor_value_info("X", onnx.TensorProto.FLOAT, [None, 2])],
                                  [helper.make_tensor_value_info("Y", onnx.TensorProto.FLOAT, [None, 2])])
        return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ML, 1)])

    x = np.asarray([[0.0, 3.0], [-2.0, 0.0], [1.5, 7.0]], dtype=np.float32)
    model = imputer(replaced_value_float=float("nan"))
    (expected,) = ort.InferenceSession(model.SerializeToString()).run(None, {"X": x})
    lowered = lower_ml_ops(model)
    assert [n.op_type for n in lowered.graph.node] == ["Identity"]
    (got,) = ort.InferenceSession(lowered.SerializeToString()).run(None, {"X": x})
    np.testing.assert_array_equal(got, expected)
    # replacing zeros is a jump at 0: onnxruntime imputes there, and the node stays for the refusal
    zeros = imputer(replaced_value_float=0.0)
    (imputed,) = ort.InferenceSession(zeros.SerializeToString()).run(None, {"X": x})
    assert imputed[0, 0] == 0.5 and imputed[1, 1] == -1.0
    assert lower_ml_ops(zeros).graph.node[0].op_type == "Imputer"


@pytest.mark.parametrize("elem", [onnx.TensorProto.FLOAT, onnx.TensorProto.INT64, onnx.TensorProto.DOUBLE])
def test_feature_vectorizer_lowering_matches_onnxruntime(elem):
    import onnxruntime as ort
    from onnx import TensorProto, helper

    node = helper.make_node("FeatureVectorizer", ["age", "fare", "kids"], ["Y"], domain=ML, inputdimensions=[1, 2, 1])
    widths = {"age": 1, "fare": 2, "kids": 1}
    inputs = [helper.make_tensor_value_info(name, elem, [None, width]) for name, width in widths.items()]
    graph = helper.make_graph([node], "vectorizer", inputs, [helper.make_tensor_value_info("Y", TensorProto.FLOAT,
                                                                                          [None, 4])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ML, 1)])
    rng = np.random.default_rng(2)
    dtype = helper.tensor_dtype_to_np_dtype(elem)
    feeds = {name: (rng.normal(size=(5, width)) * 5).astype(dtype) for name, width in widths.items()}
    (expected,) = ort.InferenceSession(model.SerializeToString()).run(None, feeds)
    lowered = lower_ml_ops(model)
    assert all(n.domain != ML for n in lowered.graph.node)
    (got,) = ort.InferenceSession(lowered.SerializeToString()).run(None, feeds)
    assert got.shape == (5, 4) and np.abs(got).sum() > 0
    np.testing.assert_array_equal(got, expected)
