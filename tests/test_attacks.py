"""Attacks on the shipped digits models: budgets, certificates, WDA++ vs PGD, replay, determinism."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from conftest import shipped_data, shipped_model

from verifier.attacks import METHODS, attack
from verifier.certify.certificate import certify
from verifier.convert import convert_model
from verifier.errors import UsageError
from verifier.onnx_io import load_model

ORDER = {"inf": np.inf, "2": 2, "1": 1}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mlp():
    loaded = load_model(shipped_model("mlp_relu"))
    data = np.load(shipped_data("mlp_relu"))
    return loaded, convert_model(loaded), data["x"], data["y"]


def _coupling_cost(atoms, weights, source, x: np.ndarray, p: float, norm: str) -> float:
    """W_p cost of one coupling, recomputed here in float64 with numpy."""
    atoms = atoms.numpy().astype(np.float64).reshape(len(weights), -1)
    sources = x.astype(np.float64).reshape(len(x), -1)[source.numpy()]
    distance = np.linalg.norm(atoms - sources, ord=ORDER[norm], axis=1)
    weights = weights.numpy()
    if math.isinf(p):
        return float(distance[weights > 0].max(initial=0.0))
    return float((weights * distance**p).sum() ** (1 / p))


def _cost(result, x: np.ndarray, p: float, norm: str) -> float:
    """The returned couplings' cost: the risk's, and the accuracy's when it was measured on another
    distribution (e.g. carried from a smaller delta), whichever is larger (`AttackResult.transport_cost`)."""
    cost = _coupling_cost(result.atoms, result.weights, result.source, x, p, norm)
    if result.accuracy_atoms is not None:
        weights = result.weights if result.accuracy_weights is None else result.accuracy_weights
        source = result.source if result.accuracy_source is None else result.accuracy_source
        cost = max(cost, _coupling_cost(result.accuracy_atoms, weights, source, x, p, norm))
    return cost


@pytest.mark.parametrize("p", [1.0, 2.0, math.inf])
@pytest.mark.parametrize("norm", ["inf", "2", "1"])
def test_every_distribution_is_within_budget(mlp, p, norm):
    loaded, model, x, y = mlp
    x, y = x[:16], y[:16]
    deltas = {"inf": [0.02, 0.08], "2": [0.2, 0.6], "1": [0.5, 2.0]}[norm]
    report = attack(model, loaded, x, y, ["all"], deltas, p=p, norm=norm, loss="ce", box=(0.0, 1.0), steps=8)
    expected = [m for m in METHODS if not (m == "wpgd" and p == 1)]
    assert [r.method for r in report.results] == [m for m in expected for _ in deltas]
    for result in report.results:
        cost = _cost(result, x, p, norm)
        assert cost <= result.delta * (1 + 1e-6), (result.method, result.delta)
        assert cost == pytest.approx(result.transport_cost, rel=1e-9, abs=1e-12)
        assert float(result.weights.sum()) == pytest.approx(1.0, abs=1e-12)
        assert bool((result.weights > 0).all())
        per_sample = np.bincount(result.source.numpy(), minlength=len(x))
        assert per_sample.max() <= 2 and per_sample.min() >= 1  # every sample's mass is somewhere
        masses = np.bincount(result.source.numpy(), weights=result.weights.numpy(), minlength=len(x))
        np.testing.assert_allclose(masses, 1 / len(x), atol=1e-12)
        atoms = result.atoms.numpy()
        assert atoms.dtype == np.float32 and atoms.min() >= 0.0 and atoms.max() <= 1.0
        assert result.clean_risk <= result.risk + 1e-6
        assert result.replayed_in_onnxruntime and not result.flags, result.flags


@pytest.mark.parametrize("p", [1.0, 2.0])
def test_attacks_stay_below_the_certificate_and_wdapp_beats_pgd(mlp, p):
    loaded, model, x, y = mlp
    x, y = x[:24], y[:24]
    norm, delta = "2", 0.5
    certificate = certify(model, x, y, [delta], p=p, norm=norm, loss="ce", box=(0.0, 1.0)).results[0]
    report = attack(model, loaded, x, y, ["all"], [delta], p=p, norm=norm, loss="ce", box=(0.0, 1.0), steps=10)
    by_method = {r.method: r for r in report.results}
    for result in report.results:
        assert certificate.clean_risk == pytest.approx(result.clean_risk, abs=1e-5)
        assert result.clean_risk - 1e-6 <= result.risk <= certificate.certificate + 1e-5, result.method
        assert result.risk <= certificate.global_bound
        assert result.robust_accuracy >= certificate.certified_accuracy - 1e-9, result.method
    assert by_method["wdapp"].robust_accuracy <= by_method["pgd"].robust_accuracy
    # the explicit curve distribution is the strongest on the risk
    assert by_method["wda-curve"].risk >= max(r.risk for r in report.results) - 1e-9
    assert by_method["wda-curve"].risk > by_method["pgd"].risk


def test_fixed_seed_gives_the_same_report(mlp):
    loaded, model, x, y = mlp

    def run():
        report = attack(model, loaded, x[:12], y[:12], ["all"], [0.3], p=2.0, norm="2",
                        box=(0.0, 1.0), steps=6, seed=3)
        out = report.to_dict()
        for result in out["results"]:
            result.pop("seconds")
        return out

    first, second = run(), run()
    assert first == second
    json.dumps(first, allow_nan=False)
    assert set(first) == {"p", "norm", "loss", "box", "samples", "seed", "results", "skipped"}
    assert [r["method"] for r in first["results"]] == list(METHODS)
    assert first["results"][METHODS.index("pgd")]["atoms"] == 12


def test_report_text_and_kappa_mixture(mlp):
    loaded, model, x, y = mlp
    report = attack(model, loaded, x[:10], y[:10], ["wda"], [0.2, 0.4], p=2.0, norm="2", box=(0.0, 1.0),
                    steps=5, kappa=4.0)
    lines = report.to_text().splitlines()
    assert len(lines) == 2 + 2 and lines[2].startswith("wda")
    result = report.results[1]
    assert len(result.weights) == 20
    np.testing.assert_allclose(sorted(set(result.weights.tolist())), [0.25 / 10, 0.75 / 10])
    # the moved quarter of the mass travels up to kappa^(1/p) delta = 2 delta
    moved = (result.atoms[10:] - torch.as_tensor(x[:10])).flatten(1).norm(dim=1)
    assert float(moved.max()) > 0.4 and result.transport_cost <= 0.4 * (1 + 1e-6)


def test_image_model_shapes(mlp):
    loaded = load_model(shipped_model("cnn"))
    data = np.load(shipped_data("cnn"))
    x, y = data["x"][:8], data["y"][:8]
    report = attack(convert_model(loaded), loaded, x, y, ["pgd", "wdapp", "wda-curve"], [0.1], p=2.0, norm="inf",
                    box=(0.0, 1.0), steps=4)
    for result in report.results:
        assert tuple(result.atoms.shape[1:]) == (1, 8, 8)
        assert _cost(result, x, 2.0, "inf") <= 0.1 * (1 + 1e-6)
        assert result.replayed_in_onnxruntime and not result.flags


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"p": 0.5}, "p must be >= 1"),
    ({"deltas": [-0.1]}, "delta must be finite and >= 0"),
    ({"methods": ["fgsm"]}, "unknown attack method 'fgsm'"),
    ({"methods": ["wpgd"], "p": 1.0}, "wpgd is not defined for p = 1"),
    ({"kappa": 0.5}, "kappa must be >= 1"),
    ({"loss": "hinge"}, "unknown loss"),
    ({"norm": "3"}, "unknown norm"),
    ({"radii": [[0.1]]}, "radii must be"),
    ({"methods": ["pgd"], "steps": 0}, "steps must be >= 1"),
])
def test_bad_arguments_are_usage_errors(mlp, kwargs, message):
    loaded, model, x, y = mlp
    arguments = {"methods": ["pgd"], "deltas": [0.1], **kwargs}
    with pytest.raises(UsageError, match=message):
        attack(model, loaded, x[:4], y[:4], **arguments)


def test_all_skips_wpgd_for_p_one(mlp):
    loaded, model, x, y = mlp
    report = attack(model, loaded, x[:6], y[:6], ["all"], [0.0], p=1.0, norm="2", steps=2)
    assert "wpgd" not in {r.method for r in report.results}
    assert report.skipped and report.skipped[0].startswith("wpgd")
    for result in report.results:  # delta = 0: nothing moves
        assert result.risk == pytest.approx(result.clean_risk, abs=1e-12)
        assert result.transport_cost == 0.0
