"""Input-splitting branch and bound (verifier.exact.bab): above brute force, below the unsplit bound,
and at the truth (within its tolerance) when run to completion; ReLU and smooth 2-D nets."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import const, float_io, make_model
from onnx import helper
from test_exact import BOX, _grid_worst, _load

from verifier.bounds.margins import margin_bounds
from verifier.bounds.network import BoundNetwork
from verifier.exact.bab import split_margins

N = helper.make_node


def _tiny_2d(activation: str, seed: int):
    """2 inputs -> Gemm -> act -> Gemm -> act -> Gemm -> 3 logits (act: Relu or Tanh)."""
    rng = np.random.default_rng(seed)
    nodes = [N("Gemm", ["x", "w1", "b1"], ["h1"], transB=1), N(activation, ["h1"], ["a1"]),
             N("Gemm", ["a1", "w2", "b2"], ["h2"], transB=1), N(activation, ["h2"], ["a2"]),
             N("Gemm", ["a2", "w3", "b3"], ["y"], transB=1)]
    inits = [const("w1", rng.normal(size=(8, 2)) * 1.5), const("b1", rng.normal(size=8) * 0.5),
             const("w2", rng.normal(size=(6, 8))), const("b2", rng.normal(size=6) * 0.3),
             const("w3", rng.normal(size=(3, 6)) * 2), const("b3", rng.normal(size=3) * 0.3)]
    return make_model(nodes, [float_io("x", ["n", 2])], [float_io("y", ["n", 3])], inits)


@pytest.mark.parametrize("activation", ["Relu", "Tanh"])
def test_split_bound_between_truth_and_unsplit_bound(tmp_path, activation):
    converted = _load(tmp_path, _tiny_2d(activation, 4), f"{activation}.onnx")
    module = converted.logits_module.double()
    network = BoundNetwork.from_model(converted)
    x = torch.from_numpy(np.random.default_rng(1).uniform(-0.5, 0.5, size=(3, 2)))
    with torch.no_grad():
        y = module(x).argmax(1)
    radius = 0.6
    unsplit = margin_bounds(network, x, y, radius, "inf", BOX).worst_margin
    for i in range(len(x)):
        low = torch.clamp(x[i] - radius, min=BOX[0])
        high = torch.clamp(x[i] + radius, max=BOX[1])
        truth, spacing = _grid_worst(module, x[i].numpy(), int(y[i]), radius, "inf")
        coarse = split_margins(network, x[i], int(y[i]), low, high, max_leaves=16, batch=4)
        full = split_margins(network, x[i], int(y[i]), low, high, tolerance=1e-4, max_leaves=20000, batch=256)
        for solution in (coarse, full):
            bound = float(solution.upper.max())
            assert truth <= bound + 1e-9  # every leaf is sound: the maximum over leaves is an upper bound
            assert bound <= float(unsplit[i]) + 1e-9  # splitting never loosens
            assert solution.best <= truth + 1e-9  # the best leaf centre is a real point
        assert float(coarse.upper.max()) < float(unsplit[i]) or coarse.complete
        assert full.complete and float(full.upper.max()) - truth <= 2e-4 * max(1.0, abs(truth))
