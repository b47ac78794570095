"""On every shipped model: clean risk <= best attack <= certificate <= global bound, and certified
accuracy <= attacked accuracy (method §6), with every attack method (`attack --method all`)."""

from __future__ import annotations

import math

import pytest
from conftest import SHIPPED, shipped_data, shipped_model

from verifier.attacks import attack
from verifier.certify.certificate import certify
from verifier.convert import convert_model
from verifier.data import load_samples
from verifier.onnx_io import load_model


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_attacks_bracketed_by_the_certificate(name):
    loaded = load_model(shipped_model(name))
    converted = convert_model(loaded)
    samples = load_samples(shipped_data(name), loaded.info.data_input, limit=8)
    deltas = [2 / 255, 8 / 255]
    certified = certify(converted, samples.x, samples.y, deltas, p=2.0, norm="inf", loss="ce", box=(0.0, 1.0),
                        grid_points=8)
    attacked = attack(converted, loaded, samples.x, samples.y, ["all"], deltas, p=2.0, norm="inf", loss="ce",
                      box=(0.0, 1.0), steps=8, seed=0, device="cpu")
    assert {r.method for r in attacked.results} == {"wdapp", "wda", "pgd", "wpgd", "wda-curve"}
    for index, row in enumerate(certified.results):
        at_delta = [r for r in attacked.results if r.delta == row.delta]
        assert all(r.replayed_in_onnxruntime and r.transport_cost <= row.delta * (1 + 1e-6) for r in at_delta)
        best = max(max(r.risk for r in at_delta), row.realised_risk)
        assert row.clean_risk <= best + 1e-9
        assert best <= row.certificate + 1e-6
        if row.global_bound is not None:
            assert row.certificate <= row.global_bound + 1e-9
        else:
            assert name == "transformer"  # attention has no global Lipschitz constant
        assert row.certified_accuracy <= min(r.robust_accuracy for r in at_delta) + 1e-9
        assert math.isfinite(row.certificate)
