"""W_2 attacks: the curve attack's W-PGD candidates (closed form on a linear model, never below
W-PGD, the grid's points unchanged, budgets in float64) and WDA++'s refinement without a flip."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import const, float_io, make_model, shipped_data, shipped_model
from onnx import helper
from test_attacks_linear import _linear, exact_risk

from verifier.attacks import _target, attack
from verifier.attacks.curve import CurveAttack
from verifier.attacks.wdapp import WDAPlusPlus
from verifier.certify.allocation import allocate
from verifier.convert import convert_model
from verifier.deadline import NEVER
from verifier.losses import loss_values
from verifier.onnx_io import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def mlp():
    loaded = load_model(shipped_model("mlp_relu"))
    data = np.load(shipped_data("mlp_relu"))
    return loaded, convert_model(loaded), data["x"][:12], data["y"][:12]


def _float64_cost(result, x: np.ndarray, norm: str) -> float:
    atoms = result.atoms.numpy().astype(np.float64).reshape(len(result.weights), -1)
    sources = x.astype(np.float64).reshape(len(x), -1)[result.source.numpy()]
    distance = np.linalg.norm(atoms - sources, ord={"inf": np.inf, "2": 2}[norm], axis=1)
    return float((result.weights.numpy() * distance**2).sum() ** 0.5)


@pytest.mark.parametrize("norm", ["2", "inf"])
def test_curve_reaches_the_closed_form_at_a_small_w2_budget(save, norm):
    # at a small budget the first-order allocation (W-PGD's per-sample radii) is what the exact
    # value needs; the shared grid alone stopped at 99.8 % of the excess risk
    loaded, model, x, y, weight, logits = _linear(save, classes=4)
    delta = 0.05
    report = attack(model, loaded, x, y, ["wpgd", "wda-curve"], [delta], p=2.0, norm=norm, loss="margin", steps=15)
    wpgd, curve = report.results
    exact = exact_risk(weight, logits, y, norm, 2.0, delta)
    assert curve.risk <= exact + 1e-6
    assert curve.risk - curve.clean_risk >= 0.9999 * (exact - curve.clean_risk)
    assert curve.risk >= wpgd.risk - 1e-9
    assert _float64_cost(curve, x, norm) <= delta * (1 + 1e-6)


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_curve_never_below_wpgd_on_the_shipped_mlp(mlp, norm):
    loaded, model, x, y = mlp
    deltas = [2 / 255, 8 / 255]
    report = attack(model, loaded, x, y, ["wpgd", "wda-curve"], deltas, p=2.0, norm=norm, loss="ce", box=(0.0, 1.0))
    by = {(r.method, r.delta): r for r in report.results}
    for delta in deltas:
        curve = by["wda-curve", delta]
        assert curve.risk >= by["wpgd", delta].risk - 1e-7
        assert _float64_cost(curve, x, norm) <= delta * (1 + 1e-6)
        assert not curve.flags, curve.flags


def test_wpgd_candidates_leave_the_grid_points_unchanged(mlp):
    loaded, model, x, y = mlp
    target = _target(model, x, y, 2.0, "2", "ce", (0.0, 1.0), torch.device("cpu"), NEVER)
    deltas = [0.05, 0.2]
    store = CurveAttack(target, steps=4, box=(0.0, 1.0))._points(deltas)
    alone = CurveAttack(target, steps=4, box=(0.0, 1.0), wpgd=False)._points(deltas)
    distance, gain, alone_distance, alone_gain = store.distance, store.gain, alone.distance, alone.gain
    grid = alone_distance.shape[1]
    assert distance.shape[1] == grid + 2 * len(deltas)  # the engine at W-PGD's radii, and W-PGD's atoms
    torch.testing.assert_close(distance[:, :grid], alone_distance, rtol=0, atol=0)
    torch.testing.assert_close(gain[:, :grid], alone_gain, rtol=0, atol=0)
    common = set(store.atoms) & set(alone.atoms)
    assert common and all(torch.equal(store.atoms[key], alone.atoms[key]) for key in common)
    # the engine searched inside each W-PGD atom's own radius
    assert bool((distance[:, grid:grid + len(deltas)] <= distance[:, grid + len(deltas):] + 1e-12).all())
    # more candidates: each delta's knapsack value can only grow, and it covers W-PGD's own allocation
    zero = torch.zeros(len(x), 1, dtype=torch.float64)
    for k, delta in enumerate(deltas):
        budget = (delta * (1 - 1e-6)) ** 2
        value = allocate(torch.cat([zero, distance**2], 1), torch.cat([zero, gain], 1), budget).gain
        assert value >= allocate(torch.cat([zero, alone_distance**2], 1), torch.cat([zero, alone_gain], 1),
                                 budget).gain - 1e-12
        assert value >= float(gain[:, grid + len(deltas) + k].mean()) - 1e-12  # W-PGD's atoms at delta


def test_wdapp_refinement_without_any_flip_keeps_the_walk(mlp):
    loaded, model, x, y = mlp
    target = _target(model, x, y, 2.0, "inf", "ce", (0.0, 1.0), torch.device("cpu"), NEVER)
    attack_ = WDAPlusPlus(target)
    adversarial = torch.zeros_like(target.flat)
    correct = loss_values(target.logits(target.x), target.y, "margin") < 0
    assert bool(correct.any())
    distance = torch.where(correct, 1e-9, 0.0).to(torch.float64)  # no flip exists this close
    attack_._closer(adversarial, distance)  # raised on the empty bisection before
    assert bool((distance == torch.where(correct, 1e-9, 0.0)).all()) and bool((adversarial == 0).all())


def test_wdapp_finds_the_fractional_flip_beyond_the_full_flip_reach(save):
    # z_1 - z_0 = x_0 - 0.5: sample i (class 0) flips at l_2 distance d_i along e_0. The budget pays
    # the flip at 0.01 and a tenth of the one at 0.4, farther than the walk's full-flip reach
    # (2 delta N^(1/2) = 0.25): accuracy 1 - (1 + 0.1) / 4 (0.75 when the walk stopped at the reach)
    weight = np.array([[0, 0, 0, 0], [1, 0, 0, 0]], dtype=np.float32)
    proto = make_model([helper.make_node("Gemm", ["x", "W", "b"], ["logits"], transB=1)],
                       [float_io("x", ["N", 4])], [float_io("logits", ["N", 2])],
                       [const("W", weight), const("b", np.array([0.0, -0.5], dtype=np.float32))])
    loaded = load_model(save(proto, "halfplane.onnx"))
    d = np.array([0.01, 0.4, 0.45, 0.48])
    x = np.full((4, 4), 0.5, dtype=np.float32)
    x[:, 0] = 0.5 - d
    delta = float(np.sqrt((0.01**2 + 0.1 * 0.4**2) / 4))
    report = attack(convert_model(loaded), loaded, x, np.zeros(4, dtype=np.int64), ["wdapp"], [delta], p=2.0,
                    norm="2", loss="ce", box=(0.0, 1.0))
    result = report.results[0]
    assert result.robust_accuracy == pytest.approx(1 - 1.1 / 4, abs=1e-3)
    assert _float64_cost(result, x, "2") <= delta * (1 + 1e-6)
