"""Certified radii (method §4): the bisection's shortcut (the cheap interval-based bound first, the
tightened one only where it fails) keeps every radius verified and no smaller than a bisection that
runs the tightened bound alone at every step."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from test_cells import _tiny_2d_net

from verifier.bounds.margins import margin_bounds
from verifier.bounds.network import BoundNetwork
from verifier.certify.aggregate import grid
from verifier.certify.growth import collect_evidence
from verifier.certify.radii import certified_radii
from verifier.convert import convert_model
from verifier.onnx_io import load_model

ORDERS = {"inf": math.inf, "2": 2.0}


def _reference_bisection(network, x, y, norm, box, low, high, active, steps=8):
    """The plain bisection: the tightened margin bound alone at every midpoint."""
    low, high = low.clone(), high.clone()
    index = (active & (high > low) & torch.isfinite(high)).nonzero().squeeze(1)
    for _ in range(steps):
        middle = (low[index] + high[index]) / 2
        proved = margin_bounds(network, x[index], y[index], middle, norm, box=box, device="cpu").certified
        low[index] = torch.where(proved, middle, low[index])
        high[index] = torch.where(proved, high[index], middle)
    return low


@pytest.mark.parametrize("norm", ["inf", "2"])
def test_bisection_shortcuts_sound_and_no_smaller(tmp_path, norm):
    path = tmp_path / "net.onnx"
    path.write_bytes(_tiny_2d_net(2).SerializeToString())
    converted = convert_model(load_model(path))
    network = BoundNetwork.from_model(converted)
    module = converted.logits_module.double()
    rng = np.random.default_rng(1)
    x = torch.from_numpy(rng.uniform(-0.7, 0.7, size=(24, 2)))
    logits = module(x).detach()
    y = logits.argmax(1)  # every sample correct: each gets a radius
    box = (-1.0, 1.0)
    radii = grid(1.0, count=6)  # a coarse grid leaves the bisection real work
    evidence = collect_evidence(network, x, y, logits, norm, radii, box)
    certified = certified_radii(evidence, network, x, norm, box)

    # The bracket the bisection starts from (as in certify.radii), for the reference.
    safe = evidence.linear.max(-1).values < 0
    last = safe.to(torch.int64).cumprod(1).sum(1) - 1
    low = torch.where(last >= 0, radii[last.clamp_min(0)], torch.zeros(len(x), dtype=radii.dtype))
    beyond = (last + 1).clamp_max(len(radii) - 1)
    high = torch.where(last + 1 < len(radii), radii[beyond], torch.minimum(evidence.reach, 2 * radii[-1]))
    whole_safe = evidence.whole_box.max(-1).values < 0
    low = torch.where(whole_safe, torch.full_like(low, math.inf), low)
    reference = _reference_bisection(network, x, y, norm, box, low, high, (last >= 0) & torch.isfinite(low))
    assert torch.all(certified >= reference)
    assert bool((certified > radii[last.clamp_min(0)]).any())  # the bisection moved some radius

    # Sound: no point of the box within c_i (brute force on a fine grid) changes the prediction.
    axis = torch.linspace(box[0], box[1], 301, dtype=torch.float64)
    plane = torch.cartesian_prod(axis, axis)
    predicted = module(plane).detach().argmax(1)
    for i in range(len(x)):
        distance = torch.linalg.vector_norm(plane - x[i], ORDERS[norm], dim=1)
        inside = distance <= certified[i]
        assert bool((predicted[inside] == y[i]).all()), i
