"""The attacks' working memory is sized from the memory limit (`verifier.resources`): the row counts
of their chunks follow from the limit and the shapes, and chunking changes no result."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch
from conftest import shipped_data, shipped_model

from verifier.attacks import _target
from verifier.attacks.base import ASCEND_COPIES, Attack
from verifier.attacks.curve import CurveAttack
from verifier.attacks.wda import WDA
from verifier.attacks.wdapp import WDAPlusPlus
from verifier.certify.allocation import upper_hull
from verifier.convert import convert_model
from verifier.deadline import NEVER
from verifier.onnx_io import load_model
from verifier.resources import PASS_FRACTION, WORKING_FRACTION, pass_bytes, rows_fitting, working_bytes

pytestmark = pytest.mark.usefixtures("one_thread")
WIDTH = 64  # inputs of the shipped MLP


@pytest.fixture(scope="module")
def target():
    loaded = load_model(shipped_model("mlp_relu"))
    data = np.load(shipped_data("mlp_relu"))
    return _target(convert_model(loaded), data["x"][:6], data["y"][:6], 2.0, "2", "ce", (0.0, 1.0),
                   torch.device("cpu"), NEVER)


def _starved(target, rows: int, copies: int):
    """The target with a working memory that holds `rows` rows of `copies` float64 tensors, not one more."""
    return replace(target, working_bytes=rows * copies * WIDTH * 8 + copies * WIDTH * 8 - 1)


def test_the_limit_is_shared_in_one_place():
    limit = 4 * 2**30
    assert pass_bytes(limit) == int(limit * PASS_FRACTION) and working_bytes(limit) == int(limit * WORKING_FRACTION)
    assert PASS_FRACTION + WORKING_FRACTION < 1  # the model, the session and the results keep the rest
    assert rows_fitting(1000, 300) == 3 and rows_fitting(10, 300) == 1  # at least one row


def test_rows_at_once_follow_from_the_limit_and_the_shapes(target):
    limited = replace(target, working_bytes=working_bytes(2**30))
    # a 1 GiB limit leaves 2**28 bytes of working memory; a search row with 9 targets holds
    # ASCEND_COPIES * (1 + 9) float64 tensors of the MLP's 64 inputs
    assert limited.rows_at_once(ASCEND_COPIES * 10) == 2**28 // (ASCEND_COPIES * 10 * 8 * WIDTH)
    assert _starved(target, 3, ASCEND_COPIES * 10).rows_at_once(ASCEND_COPIES * 10) == 3


def test_search_chunks_are_sized_from_the_working_memory_and_change_no_row(target, monkeypatch):
    rows, radius = Attack(target).rows(4), torch.full((24,), 0.4, dtype=torch.float64)
    whole = Attack(target, seed=3, topk=2).search(rows, radius, 4)
    sizes = []
    real = Attack._search

    def spy(self, rows, *args):
        sizes.append(len(rows))
        return real(self, rows, *args)

    monkeypatch.setattr(Attack, "_search", spy)
    parted = Attack(_starved(target, 5, ASCEND_COPIES * 3), seed=3, topk=2).search(rows, radius, 4)
    assert sizes == [5, 5, 5, 5, 4]  # 24 rows, 5 at once
    for name in ("d", "value", "flip", "margin"):
        assert torch.equal(getattr(parted, name), getattr(whole, name))


def test_the_curve_attack_keeps_only_the_atoms_an_allocation_can_choose(target):
    deltas = [0.1, 0.4]
    whole = CurveAttack(target, steps=3, topk=2, box=(0.0, 1.0))
    parted = CurveAttack(_starved(target, 7, ASCEND_COPIES * 3), steps=3, topk=2, box=(0.0, 1.0))
    store, chunked = whole._points(deltas), parted._points(deltas)
    assert torch.equal(store.distance, chunked.distance) and torch.equal(store.gain, chunked.gain)
    assert store.atoms.keys() == chunked.atoms.keys()
    assert all(torch.equal(store.atoms[key], chunked.atoms[key]) for key in store.atoms)
    count, width = store.gain.shape
    assert width > 10  # the grid, W-PGD's radii and its atoms
    for i in range(count):  # per sample: its hull vertices, nothing else (no dense N x K x D tensor)
        costs = [0.0] + (store.distance[i] ** 2).tolist()
        hull = {v - 1 for v in upper_hull(costs, [0.0] + store.gain[i].tolist()) if v > 0}
        assert {k for (j, k) in store.atoms if j == i} == hull
    assert 0 < len(store.atoms) < count * width
    for a, b in zip(whole.run(deltas), parted.run(deltas)):
        assert torch.equal(a.atoms, b.atoms) and torch.equal(a.weights, b.weights) and torch.equal(a.source, b.source)


@pytest.mark.parametrize("method", [WDA, WDAPlusPlus])
def test_wda_and_wdapp_chunk_their_samples_without_changing_a_result(target, method):
    whole = method(target, steps=4, topk=3).run([0.3])[0]
    parted = method(_starved(target, 2, ASCEND_COPIES * 3), steps=4, topk=3).run([0.3])[0]
    assert torch.equal(whole.atoms, parted.atoms) and torch.equal(whole.weights, parted.weights)
    assert torch.equal(whole.source, parted.source)
