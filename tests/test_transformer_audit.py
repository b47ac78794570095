"""The shipped Transformer at the audit budgets (W_2, ℓ∞ cost, CE, deltas 1/255 … 8/255, box [0, 1]):
clean <= best attack <= certificate at every budget, and the certificate is below the whole-box
bound (not vacuous) at 1/255, 2/255 and 4/255 (the default 24-point grid: a 2-point one reaches the
whole-box bound at 4/255). At 8/255 moving every sample by δ is within the budget, and at that radius
the margin bound is the whole-box one (docs/benchmarks.md, "Transformer relaxations at the large
budgets (issue 12, part 3)")."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import shipped_data, shipped_model

from verifier.attacks import attack
from verifier.bounds.margins import margin_bounds
from verifier.certify.certificate import certify
from verifier.convert import convert_model
from verifier.data import load_samples
from verifier.onnx_io import load_model

pytestmark = pytest.mark.usefixtures("one_thread")
AUDIT_DELTAS = (1 / 255, 2 / 255, 4 / 255, 8 / 255)
NOT_VACUOUS = (1 / 255, 2 / 255, 4 / 255)


def test_shipped_transformer_certificate_brackets_attacks_and_is_not_vacuous():
    loaded = load_model(shipped_model("transformer"))
    converted = convert_model(loaded)
    samples = load_samples(shipped_data("transformer"), loaded.info.data_input, limit=3)
    certified = certify(converted, samples.x, samples.y, AUDIT_DELTAS, p=2.0, norm="inf", loss="ce", box=(0.0, 1.0),
                        grid_points=24, exact="off", refine_share=0.0)
    attacked = attack(converted, loaded, samples.x, samples.y, ["pgd", "wpgd"], AUDIT_DELTAS, p=2.0, norm="inf",
                      loss="ce", box=(0.0, 1.0), steps=10, seed=0, device="cpu")
    # the whole-box bound: every sample anywhere in [0, 1]^d, CE <= log Σ_j exp(UB(z_j - z_y))
    whole = margin_bounds(converted, samples.x, samples.y, math.inf, "inf", box=(0.0, 1.0), device="cpu").upper
    whole_box = float(torch.logsumexp(whole, 1).mean())
    assert [row.delta for row in certified.results] == list(AUDIT_DELTAS)
    for row in certified.results:
        at_delta = [r for r in attacked.results if r.delta == row.delta]
        assert len(at_delta) == 2 and all(r.transport_cost <= row.delta * (1 + 1e-6) for r in at_delta)
        best = max(max(r.risk for r in at_delta), row.realised_risk)
        assert row.clean_risk <= best + 1e-9 and best <= row.certificate + 1e-6
        assert math.isfinite(row.certificate) and row.certificate <= whole_box * (1 + 1e-6)
        if row.delta in NOT_VACUOUS:
            assert row.certificate < whole_box  # measured 0.806, 2.97 and 10.89 against 12.73 on these 3 samples
