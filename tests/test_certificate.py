"""certify: clean <= attack <= certificate <= global on a shipped model; certified <= attacked accuracy."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import shipped_data, shipped_model
from test_bounds import _attack, _worst_margin

from verifier import errors
from verifier.certify.certificate import certify, grid_of
from verifier.convert import convert_model
from verifier.data import load_samples
from verifier.onnx_io import load_model


@pytest.mark.parametrize("name", ["mlp_relu", "mlp_silu"])
@pytest.mark.parametrize("p", [math.inf, 2.0, 1.0])
def test_certificate_brackets_the_attack(name, p):
    loaded = load_model(shipped_model(name))
    converted = convert_model(loaded)
    samples = load_samples(shipped_data(name), loaded.info.data_input, limit=24)
    x, y = torch.from_numpy(samples.x).double(), torch.from_numpy(samples.y)
    deltas = [0.02, 0.1]
    result = certify(converted, x, y, deltas, p=p, norm="2", loss="margin", box=(0.0, 1.0), grid_points=12)
    module = converted.logits_module.double()
    for delta, row in zip(deltas, result.results):
        # every point moved within delta is a feasible distribution for every p
        found = _attack(module, x, y, torch.full((len(x),), delta, dtype=torch.float64), "2", (0.0, 1.0))
        clean = float(_worst_margin(module, x, y).mean())
        assert row.clean_risk == pytest.approx(clean)
        assert clean <= float(found.mean()) + 1e-12
        assert float(found.mean()) <= row.certificate + 1e-9
        assert row.certificate <= row.global_bound + 1e-12
        assert row.certified_accuracy <= float((found < 0).double().mean()) + 1e-12
    assert result.fallbacks == ()
    assert sum(result.routes_won.values()) > 0


def test_bad_arguments():
    loaded = load_model(shipped_model("mlp_relu"))
    converted = convert_model(loaded)
    samples = load_samples(shipped_data("mlp_relu"), loaded.info.data_input, limit=2)
    with pytest.raises(errors.UsageError, match="p must be"):
        certify(converted, samples.x, samples.y, [0.1], p=0.5)
    with pytest.raises(errors.UsageError, match="delta"):
        certify(converted, samples.x, samples.y, [-0.1])
    with pytest.raises(errors.UsageError, match="unknown loss"):
        certify(converted, samples.x, samples.y, [0.1], loss="hinge")


def test_dlr_has_no_certificate_and_zero_one_is_capped():
    loaded = load_model(shipped_model("mlp_relu"))
    converted = convert_model(loaded)
    samples = load_samples(shipped_data("mlp_relu"), loaded.info.data_input, limit=8)
    dlr = certify(converted, samples.x, samples.y, [0.1], p=2.0, loss="dlr", box=(0.0, 1.0), grid_points=6)
    assert dlr.results[0].certificate is None and dlr.results[0].global_bound is None
    error = certify(converted, samples.x, samples.y, [0.0, 0.5], p=2.0, loss="zero_one", box=(0.0, 1.0),
                    grid_points=6)
    assert error.results[0].certificate == pytest.approx(error.results[0].clean_risk, abs=2e-6)
    assert error.results[0].clean_risk <= error.results[1].certificate <= 1.0


def test_certify_leaves_the_model_in_its_own_dtype():
    loaded = load_model(shipped_model("mlp_relu"))
    converted = convert_model(loaded)
    samples = load_samples(shipped_data("mlp_relu"), loaded.info.data_input, limit=4)
    before = converted.logits(torch.from_numpy(samples.x))
    certify(converted, samples.x, samples.y, [0.01], p=2.0, norm="2", loss="ce", box=(0.0, 1.0), grid_points=4)
    after = converted.logits(torch.from_numpy(samples.x))  # float32 weights untouched by the float64 analysis
    assert after.dtype == torch.float32 and torch.equal(before, after)


@pytest.mark.parametrize(("p", "reach", "top"), [(2.0, math.inf, 1.28), (2.0, 0.5, 0.5), (2.0, 0.1, 0.1),
                                                  (2.0, 0.05, 0.05), (math.inf, math.inf, 0.02)])
def test_the_grid_doubles_past_the_full_move_up_to_the_reach(p, reach, top):
    """16 samples, deltas 0.01 and 0.02: for p = 2 a whole sample moves at most 4 * 0.02 = 0.08, and the
    grid goes on to 0.16, 0.32, 0.64, 1.28 (those below the reach, then the reach); p = inf stops at 0.02."""
    radii = grid_of(16, reach, [0.01, 0.02], p, 6)
    full = min(0.02 * (4 if p == 2.0 else 1), reach)
    beyond = [float(r) for r in radii if r > full * (1 + 1e-12)]
    assert float(radii.max()) == pytest.approx(top)
    doublings = [r for r in (0.16, 0.32, 0.64, 1.28) if r < reach] + ([reach] if full < reach < 1.28 else [])
    assert beyond == pytest.approx(doublings if p == 2.0 else [])
    assert {0.01, 0.02} <= {round(float(r), 12) for r in radii}
