"""Optimised relaxation slopes (verifier/bounds/optimise.py): sound, never looser than the default
relaxation, strictly tighter where the default lower slope is the wrong one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import const, float_io, make_model
from onnx import helper
from test_bounds import _attack, _random_net
from test_pool import _conv_pool_net

from verifier.bounds import optimise
from verifier.bounds.margins import margin_bounds
from verifier.bounds.network import BoundNetwork
from verifier.bounds.optimise import SlopeSearch, optimised_upper_bound
from verifier.bounds.propagate import InputSet, propagate
from verifier.convert import convert_model
from verifier.onnx_io import load_model

N = helper.make_node


def _bounds(path, x, y, radius, norm, box, search):
    converted = convert_model(load_model(path))
    network = BoundNetwork.from_model(converted)
    plain = margin_bounds(network, x, y, radius, norm, box=box, device="cpu").upper
    optimised = margin_bounds(network, x, y, radius, norm, box=box, device="cpu", optimise=search).upper
    found = _attack(converted.logits_module.double(), x, y, radius, norm, box, steps=40)
    return plain, optimised, found


@pytest.mark.parametrize("activation", ["relu", "leaky", "prelu", "abs"])
@pytest.mark.parametrize("norm", ["inf", "2"])
@pytest.mark.parametrize("intermediate", [False, "shared", True])
def test_optimised_bounds_are_sound_and_never_looser(tmp_path, monkeypatch, activation, norm, intermediate):
    if intermediate == "shared":  # per-objective intermediate parameters over budget: one set per node
        monkeypatch.setattr(optimise, "INTERMEDIATE_BUDGET", 0)
    path = tmp_path / "net.onnx"
    path.write_bytes(_random_net(activation, seed=11).SerializeToString())
    rng = np.random.default_rng(5)
    x = torch.from_numpy(rng.uniform(-1, 1, size=(12, 6)))
    y = torch.from_numpy(rng.integers(0, 4, size=12))
    radius = torch.from_numpy(rng.uniform(0.05, 0.6, size=12))
    search = SlopeSearch(steps=15, intermediate=bool(intermediate))
    plain, optimised, found = _bounds(path, x, y, radius, norm, (-1.0, 1.0), search)
    worst = optimised.max(1).values
    assert torch.all(found <= worst + 1e-9)
    assert torch.all(optimised <= plain)
    assert float((plain - optimised).sum()) > 1e-3  # the search moved something on these nets


@pytest.mark.parametrize("pad,intermediate", [(0, False), (1, False), (1, True)])
def test_optimised_pool_weights_are_sound_and_never_looser(tmp_path, pad, intermediate):
    path = tmp_path / "cnn.onnx"
    path.write_bytes(_conv_pool_net(4, pad).SerializeToString())
    rng = np.random.default_rng(4)
    x = torch.from_numpy(rng.uniform(0, 1, size=(6, 1, 6, 6)))
    y = torch.from_numpy(rng.integers(0, 3, size=6))
    radius = torch.full((6,), 0.08, dtype=torch.float64)
    search = SlopeSearch(steps=15, intermediate=intermediate)
    plain, optimised, found = _bounds(path, x, y, radius, "inf", (0.0, 1.0), search)
    assert torch.all(found <= optimised.max(1).values + 1e-9)
    assert torch.all(optimised <= plain)
    assert float((plain - optimised).sum()) > 1e-3


def _kink_net():
    """logits (0, x/2 - relu(x)) of a scalar x: the margin's max over [-1, 1] is 0, at x = 0."""
    nodes = [N("Relu", ["x"], ["r"]), N("Concat", ["x", "r"], ["c"], axis=1),
             N("Gemm", ["c", "w", "b"], ["y"], transB=1)]
    inits = [const("w", np.array([[0.0, 0.0], [0.5, -1.0]])), const("b", np.zeros(2))]
    return make_model(nodes, [float_io("x", ["n", 1])], [float_io("y", ["n", 2])], inits)


def test_the_search_finds_the_tight_slope(tmp_path):
    """CROWN's default lower slope of relu on [-1, 1] is 1, giving x/2 - x <= 1/2; slope 1/2 gives 0."""
    path = tmp_path / "kink.onnx"
    path.write_bytes(_kink_net().SerializeToString())
    network = BoundNetwork.from_model(convert_model(load_model(path)))
    center = torch.zeros(1, 1, dtype=torch.float64)
    region = InputSet(center=center, radius=torch.ones(1, dtype=torch.float64), norm="inf",
                      lower=torch.full((1, 1), -torch.inf, dtype=torch.float64),
                      upper=torch.full((1, 1), torch.inf, dtype=torch.float64))
    state = propagate(network, region)
    rows = torch.tensor([[[-1.0, 1.0]]], dtype=torch.float64)  # z_1 - z_0
    plain = optimised_upper_bound(network, state, region, network.output, rows, SlopeSearch(steps=0))
    best = optimised_upper_bound(network, state, region, network.output, rows, SlopeSearch(steps=40))
    assert float(plain) == pytest.approx(0.5, abs=1e-9)
    assert -1e-9 <= float(best) <= 0.02
