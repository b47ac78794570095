"""Growth curves: never below the brute-force growth of tiny 2-D nets, for every loss and route."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_cells import _tiny_2d_net

from verifier.bounds.global_lipschitz import global_lipschitz
from verifier.bounds.network import BoundNetwork
from verifier.cells import cell_analysis
from verifier.certify.aggregate import grid
from verifier.certify.growth import collect_evidence, growth_curves
from verifier.convert import convert_model
from verifier.convert.normalize import normalize_model
from verifier.losses import loss_values
from verifier.onnx_io import load_model

ORDERS = {"inf": math.inf, "2": 2.0, "1": 1.0}


@pytest.mark.parametrize("loss", ["margin", "ce", "zero_one"])
@pytest.mark.parametrize("norm", ["inf", "2"])
def test_growth_dominates_brute_force(tmp_path, loss, norm):
    path = tmp_path / "net.onnx"
    path.write_bytes(_tiny_2d_net(1).SerializeToString())
    loaded = load_model(path)
    converted = convert_model(loaded)
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.uniform(-0.7, 0.7, size=(5, 2)))
    y = torch.from_numpy(rng.integers(0, 3, size=5))
    module = converted.logits_module.double()
    logits = module(x).detach()
    box = (-1.0, 1.0)
    slope = global_lipschitz(normalize_model(loaded.proto), norm).loss_constant(loss)
    cells = cell_analysis(converted, x, y, norm, box=box, device="cpu")
    radii = grid(1.5, count=10)
    evidence = collect_evidence(BoundNetwork.from_model(converted), x, y, logits, norm, radii, box, cells)
    result = growth_curves(evidence, loss, slope)
    values = result.curves.values
    assert torch.all(values[:, 1:] >= values[:, :-1])
    axis = torch.linspace(-1, 1, 401, dtype=torch.float64)
    plane = torch.cartesian_prod(axis, axis)
    for i in range(len(x)):
        distance = torch.linalg.vector_norm(plane - x[i], ORDERS[norm], dim=1)
        losses = loss_values(module(plane), y[i].expand(len(plane)), loss).detach()
        for k, radius in enumerate(radii.tolist()):
            inside = distance <= radius
            if not inside.any():
                continue
            brute = float(losses[inside].max()) - float(result.clean_loss[i])
            assert float(values[i, k]) >= brute - 1e-9
    assert set(result.winner.unique().tolist()) <= {0, 1, 2, 3}
