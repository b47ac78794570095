"""Attacks on a linear classifier (a single Gemm), where R(delta) has a closed form: the margin
loss grows like max_j (m_ij + rho ||a_j - a_y||_*) - max_j m_ij with no box."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import const, float_io, make_model
from onnx import helper
from scipy.optimize import minimize_scalar

from verifier.attacks import attack, transport_cost
from verifier.convert import convert_model
from verifier.onnx_io import load_model

DUAL = {"inf": 1, "2": 2, "1": np.inf}


pytestmark = pytest.mark.usefixtures("one_thread")


def _linear(save, classes: int, dim: int = 6, seed: int = 1):
    rng = np.random.default_rng(seed)
    weight = rng.normal(size=(classes, dim)).astype(np.float32)
    bias = rng.normal(scale=0.3, size=classes).astype(np.float32)
    proto = make_model([helper.make_node("Gemm", ["x", "W", "b"], ["logits"], transB=1)],
                       [float_io("x", ["N", dim])], [float_io("logits", ["N", classes])],
                       [const("W", weight), const("b", bias)])
    loaded = load_model(save(proto, f"linear{classes}.onnx"))
    x = rng.normal(scale=0.5, size=(12, dim)).astype(np.float32)
    logits = x.astype(np.float64) @ weight.T.astype(np.float64) + bias
    y = np.argsort(-logits, axis=1)[:, 0]
    y[::3] = np.argsort(-logits[::3], axis=1)[:, 1]  # a few misclassified samples
    return loaded, convert_model(loaded), x, y, weight.astype(np.float64), logits


def _pieces(weight, logits, y, norm):
    """Per sample and wrong class j: offset m_ij - max_k m_ik and slope ||a_j - a_y||_*."""
    rows = np.arange(len(y))
    margins = logits - logits[rows, y][:, None]
    margins[rows, y] = -np.inf
    slopes = np.linalg.norm(weight[None] - weight[y][:, None], ord=DUAL[norm], axis=-1)
    offsets = margins - margins.max(1, keepdims=True)
    return offsets, slopes, margins.max(1).mean()


def exact_risk(weight, logits, y, norm, p, delta):
    """R(delta) for the margin loss of a linear model without a box (exact dual for 1 < p < inf)."""
    offsets, slopes, clean = _pieces(weight, logits, y, norm)
    if math.isinf(p):
        return clean + np.max(offsets + delta * slopes, axis=1).mean()
    if p == 1:
        return clean + delta * slopes[np.isfinite(offsets)].max()
    q = p / (p - 1)
    # inner sup_rho (offset + L rho - lam rho^p) = offset + (p-1) (L/p)^q lam^(1-q) for each piece

    def dual(log_lam):
        lam = math.exp(log_lam)
        inner = offsets + (p - 1) * (slopes / p) ** q * lam ** (1 - q)
        return lam * delta**p + np.max(inner, axis=1).mean()

    best = minimize_scalar(dual, bounds=(-30, 30), method="bounded", options={"xatol": 1e-12})
    return clean + best.fun


def test_pgd_reaches_the_closed_form_on_two_classes(save):
    loaded, model, x, y, weight, logits = _linear(save, classes=2)
    for norm in ("inf", "2", "1"):
        report = attack(model, loaded, x, y, ["pgd"], [0.3], p=math.inf, norm=norm, loss="margin", steps=20)
        expected = exact_risk(weight, logits, y, norm, math.inf, 0.3)
        assert report.results[0].risk == pytest.approx(expected, abs=1e-3)


def test_wda_reaches_the_closed_form_with_several_classes(save):
    loaded, model, x, y, weight, logits = _linear(save, classes=4)
    for norm in ("inf", "2"):
        report = attack(model, loaded, x, y, ["wda", "wda-curve"], [0.4], p=math.inf, norm=norm, loss="margin",
                        steps=20)
        expected = exact_risk(weight, logits, y, norm, math.inf, 0.4)
        for result in report.results:
            assert result.risk == pytest.approx(expected, abs=1e-3), result.method


@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
def test_no_attack_exceeds_the_exact_risk(save, p):
    loaded, model, x, y, weight, logits = _linear(save, classes=4)
    delta = 0.3
    report = attack(model, loaded, x, y, ["all"], [delta], p=p, norm="2", loss="margin", steps=15)
    exact = exact_risk(weight, logits, y, "2", p, delta)
    assert exact <= exact_risk(weight, logits, y, "2", 1.0, delta) + 1e-9  # W_1 <= W_p: R_p <= R_1
    risks = {r.method: r.risk for r in report.results}
    clean = report.results[0].clean_risk
    for method, risk in risks.items():
        assert clean - 1e-6 <= risk <= exact + 1e-5, method
    # the curve attack's explicit distribution comes close to the exact value
    assert risks["wda-curve"] - clean >= 0.9 * (exact - clean)
    for result in report.results:
        cost = transport_cost(result.atoms, result.weights, result.source, torch.as_tensor(x), p, "2")
        assert cost <= delta * (1 + 1e-6)


def test_fixed_batch_model_and_zero_gradient_flag(save):
    weight = np.zeros((3, 4), dtype=np.float32)  # constant logits: every gradient vanishes
    proto = make_model([helper.make_node("Gemm", ["x", "W", "b"], ["logits"], transB=1)],
                       [float_io("x", [1, 4])], [float_io("logits", [1, 3])],
                       [const("W", weight), const("b", np.array([0.5, 0.0, -0.5], dtype=np.float32))])
    loaded = load_model(save(proto, "fixed.onnx"))
    x = np.random.default_rng(0).random((5, 4)).astype(np.float32)
    y = np.array([0, 0, 1, 0, 2])
    report = attack(convert_model(loaded), loaded, x, y, ["pgd", "wdapp"], [0.2], p=2.0, norm="2", loss="margin",
                    box=(0.0, 1.0), steps=3)
    for result in report.results:
        assert result.replayed_in_onnxruntime
        assert result.risk == pytest.approx(result.clean_risk)
        assert result.risk == pytest.approx((-0.5 - 0.5 + 0.5 - 0.5 + 1.0) / 5, abs=1e-9)
        assert result.robust_accuracy == pytest.approx(0.6)
    assert "zero-gradient (5 of 5 samples)" in report.results[0].flags


def test_curve_with_given_radii_and_progress(save, capsys):
    loaded, model, x, y, weight, logits = _linear(save, classes=4)
    report = attack(model, loaded, x, y, ["wda-curve"], [0.2], p=2.0, norm="1", loss="margin", steps=10,
                    radii=torch.tensor([0.1, 0.4, 1.5]), progress=True)
    result = report.results[0]
    exact = exact_risk(weight, logits, y, "1", 2.0, 0.2)
    assert result.clean_risk < result.risk <= exact + 1e-5
    assert result.transport_cost <= 0.2 * (1 + 1e-6)
    distances = (result.atoms - torch.as_tensor(x)[result.source]).abs().flatten(1).sum(1)
    moved = {round(float(d), 4) for d in distances if d > 1e-9}  # atoms sit on the given radii (and delta)
    assert moved <= {0.1, 0.2, 0.4, 1.5}
    captured = capsys.readouterr()
    assert captured.out == "" and "attacks" in captured.err
