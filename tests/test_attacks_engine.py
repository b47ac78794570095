"""The point-wise engine of attacks/base.py: APGD's checkpoints, the two-optimum best iterate, the
new default against the plain PGD it replaced, closed forms on a linear model, budgets of both
atom sets, and WDA++ rows that depend on their own delta only."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from conftest import shipped_data, shipped_model
from test_attacks_linear import DUAL, _linear

from verifier.attacks import _target, attack
from verifier.attacks.base import ASCEND_COPIES, Best
from verifier.attacks.steps import checkpoints
from verifier.resources import WORKING_FRACTION
from verifier.attacks.pgd import PGD
from verifier.attacks.replay import Replayer, clean_numbers, measure
from verifier.convert import convert_model
from verifier.deadline import NEVER
from verifier.onnx_io import load_model

pytestmark = pytest.mark.usefixtures("one_thread")


def test_checkpoints_follow_the_apgd_rule():
    # p_0 = 0, p_1 = 0.22, p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06), times the step count
    assert sorted(checkpoints(100)) == [22, 41, 57, 70, 80, 87, 93, 99]
    assert sorted(checkpoints(10)) == list(range(2, 10))


def test_best_keeps_the_highest_loss_and_the_misclassified_point():
    zero = torch.zeros(2, 3, dtype=torch.float64)
    best = Best.at(zero, torch.tensor([0.1, 0.1], dtype=torch.float64), torch.tensor([-1.0, -1.0]).double())
    correct_high = torch.ones(2, 3, dtype=torch.float64)  # loss 2, still correct
    wrong_low = -torch.ones(2, 3, dtype=torch.float64)  # loss 0.8, misclassified on row 0 only
    best.update(correct_high, torch.tensor([2.0, 2.0]).double(), torch.tensor([-0.1, -0.5]).double())
    best.update(wrong_low, torch.tensor([0.8, 0.8]).double(), torch.tensor([0.3, -0.7]).double())
    assert torch.equal(best.d, correct_high) and torch.equal(best.value, torch.tensor([2.0, 2.0]).double())
    assert best.misclassified.tolist() == [True, False]
    assert torch.equal(best.accuracy_d(), torch.stack([wrong_low[0], correct_high[1]]))


@pytest.mark.parametrize(("name", "eps"), [("mlp_relu", 8 / 255), ("mlp_silu", 16 / 255), ("cnn", 16 / 255),
                                         ("transformer", 16 / 255)])
def test_default_never_leaves_a_higher_accuracy_than_the_old_pgd(name, eps):
    loaded = load_model(shipped_model(name))
    model = convert_model(loaded)
    data = np.load(shipped_data(name))
    x, y = data["x"][:24], data["y"][:24]
    replayer = Replayer(loaded, model, torch.device("cpu"))
    target = _target(model, x, y, math.inf, "inf", "ce", (0.0, 1.0), torch.device("cpu"), NEVER)
    clean = clean_numbers(target, replayer)
    results = {}
    for label, options in (("old", {"steps": 50, "topk": 0, "plain": True}), ("new", {})):
        (dist,) = PGD(target, generator=torch.Generator().manual_seed(0), **options).run([eps])
        results[label] = measure("pgd", eps, dist, target, replayer, clean)
    assert results["new"].robust_accuracy <= results["old"].robust_accuracy
    assert results["new"].transport_cost <= eps * (1 + 1e-6) and not results["new"].flags


@pytest.mark.parametrize(("norm", "chunked"), [("inf", False), ("2", False), ("inf", True)])
def test_pgd_reaches_the_exact_robust_accuracy_of_a_linear_model(save, norm, chunked):
    # without a box, sample i can be flipped within delta iff max_j m_ij + delta ||a_j - a_y||_* >= 0
    # chunked: the engine in chunks of 2 rows (a working share of the limit that holds ASCEND_COPIES
    # float64 tensors of 6 inputs x (9 targets + 1) for 2 rows, not 3)
    limit = int((2 * ASCEND_COPIES * 8 * 6 * 10 + 100) / WORKING_FRACTION) if chunked else None
    loaded, model, x, y, weight, logits = _linear(save, classes=5)
    rows = np.arange(len(y))
    margins = logits - logits[rows, y][:, None]
    slopes = np.linalg.norm(weight[None] - weight[y][:, None], ord=DUAL[norm], axis=-1)
    for delta in (0.05, 0.15, 0.3):
        reach = margins + delta * slopes
        reach[rows, y] = -np.inf
        exact = float((reach.max(1) < 0).mean())
        report = attack(model, loaded, x, y, ["pgd"], [delta], p=math.inf, norm=norm, loss="ce", steps=20,
                        memory_limit_bytes=limit)
        assert report.results[0].robust_accuracy == pytest.approx(exact), delta


def test_accuracy_atoms_are_within_budget_and_not_above_the_risk_atoms_accuracy(save):
    loaded, model, x, y, weight, logits = _linear(save, classes=5)
    for method in ("pgd", "wda", "wpgd"):
        report = attack(model, loaded, x, y, [method], [0.3], p=2.0 if method == "wpgd" else math.inf, norm="inf",
                        loss="ce", box=(-2.0, 2.0), steps=15)
        result = report.results[0]
        for atoms in (result.atoms, result.accuracy_atoms):
            if atoms is None:
                continue
            moved = atoms.numpy().astype(np.float64) - x.astype(np.float64)[result.source.numpy()]
            size = np.abs(moved).max(1)
            cost = size.max() if method != "wpgd" else float((result.weights.numpy() * size**2).sum() ** 0.5)
            assert cost <= 0.3 * (1 + 1e-6), method
        target = _target(model, x, y, 2.0, "inf", "ce", (-2.0, 2.0), torch.device("cpu"), NEVER)
        risk_atoms_accuracy = float((target.logits(result.atoms).argmax(-1).numpy() == y[result.source]).mean())
        assert result.robust_accuracy <= risk_atoms_accuracy + 1e-12, method


def test_wdapp_row_does_not_depend_on_the_other_deltas(save):
    loaded, model, x, y, weight, logits = _linear(save, classes=4)
    kwargs = dict(p=2.0, norm="2", loss="ce", box=(-3.0, 3.0), steps=30, seed=1)
    alone = attack(model, loaded, x, y, ["wdapp"], [0.2], **kwargs).to_dict()["results"][0]
    together = attack(model, loaded, x, y, ["wdapp"], [0.05, 0.2, 1.5], **kwargs).to_dict()["results"][1]
    for row in (alone, together):
        row.pop("seconds")
    assert alone == together
