"""The Cauchy–Schwarz floor of a LayerNorm variance (method eq. 3.8f): it never exceeds the variance
anywhere in the box it is computed for, and it is exact when the box is a point."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import shipped_data, shipped_model

from verifier.bounds import ops
from verifier.bounds.network import BoundNetwork
from verifier.bounds.propagate import margin_problem, propagate
from verifier.bounds.variance import MeanSquare, variance_floor
from verifier.convert import convert_model
from verifier.data import load_samples
from verifier.onnx_io import load_model

pytestmark = pytest.mark.usefixtures("one_thread")
EPS = 1e-5


def _rule(size: int) -> MeanSquare:
    def mean(q: torch.Tensor) -> torch.Tensor:
        return q.mean(-1, keepdim=True)
    return MeanSquare(mean, mean, EPS, 1)


def _boxes(generator: torch.Generator, count: int, rows: int, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random boxes for c (count, rows, size): narrow, wide (up to 100) and degenerate (l = u) ones."""
    centre = torch.randn(count, rows, size, generator=generator, dtype=torch.float64) * 3
    scale = 10.0 ** torch.empty(count, 1, 1, dtype=torch.float64).uniform_(-4, 2, generator=generator)
    half = torch.rand(count, rows, size, generator=generator, dtype=torch.float64) * scale
    half[: count // 10] = 0.0  # degenerate boxes
    return centre - half, centre + half


def _exact_box_bound(low: torch.Tensor, high: torch.Tensor):
    """`max <coefficients_k, c>` over the box exactly (what back-substitution gives on a box input)."""
    def bound(_: str, coefficients: torch.Tensor) -> torch.Tensor:
        best = torch.maximum(coefficients * low.unsqueeze(1), coefficients * high.unsqueeze(1))
        return best.flatten(2).sum(-1)
    return bound


def test_floor_never_exceeds_the_variance_on_random_boxes():
    generator = torch.Generator().manual_seed(0)
    count, rows, size = 1200, 3, 5
    low, high = _boxes(generator, count, rows, size)
    # the direction: a point of the box (the clean value) or an arbitrary vector
    inside = low + (high - low) * torch.rand(count, rows, size, generator=generator, dtype=torch.float64)
    direction = torch.where(torch.rand(count, 1, 1, generator=generator) < 0.8, inside,
                            torch.randn(count, rows, size, generator=generator, dtype=torch.float64))
    floor = variance_floor(_rule(size), "c", direction, _exact_box_bound(low, high), 2**20)
    assert floor.shape == (count, rows, 1)
    points = low + (high - low) * torch.rand(300, count, rows, size, generator=generator, dtype=torch.float64)
    corners = torch.where(torch.rand(300, count, rows, size, generator=generator) < 0.5, low, high)
    nearest = torch.maximum(torch.minimum(direction, high), low).unsqueeze(0)  # the clean value where inside
    for sample in (points, corners, nearest):
        variance = (sample * sample).mean(-1, keepdim=True) + EPS
        assert torch.all(floor <= variance.amin(0))
    # not vacuous: positive wherever the box keeps c away from 0 along the direction
    assert float((floor > 2 * EPS).double().mean()) > 0.5


def test_floor_is_exact_on_a_point_and_chunking_does_not_change_it():
    generator = torch.Generator().manual_seed(1)
    point = torch.randn(50, 4, 6, generator=generator, dtype=torch.float64)
    exact = (point * point).mean(-1, keepdim=True) + EPS
    whole = variance_floor(_rule(6), "c", point, _exact_box_bound(point, point), 2**20)
    chunked = variance_floor(_rule(6), "c", point, _exact_box_bound(point, point), 1)  # one row at a time
    assert torch.allclose(whole, exact, rtol=1e-12, atol=0) and torch.all(whole <= exact)
    assert torch.equal(whole, chunked)


def test_shipped_transformer_variances_are_raised_and_contain_sampled_values():
    loaded = load_model(shipped_model("transformer"))
    network = BoundNetwork.from_model(convert_model(loaded))
    samples = load_samples(shipped_data("transformer"), loaded.info.data_input, limit=3)
    x, y = torch.from_numpy(samples.x).double(), torch.from_numpy(samples.y).long()
    problem = margin_problem(network, x, y, 4 / 255, "inf", (0.0, 1.0), torch.device("cpu"), torch.float64)
    state = propagate(network, problem.region)
    variances = [n for n in network.nodes if isinstance(n.rule, MeanSquare)]
    assert len(variances) == 3  # the three LayerNorms
    generator = torch.Generator().manual_seed(2)
    low, high = problem.region.interval()
    corners = torch.where(torch.rand(400, *x.shape, generator=generator, dtype=torch.float64) < 0.5, low, high)
    values = network.values(corners.flatten(0, 1))
    raised = 0
    for node in variances:
        v_low, v_high = state.intervals[node.name]
        sampled = values[node.name].reshape(400, *v_low.shape)
        assert torch.all(v_low <= sampled.amin(0)) and torch.all(sampled.amax(0) <= v_high)
        (c_low, c_high), = [state.intervals[n.inputs[0]] for n in network.nodes if n.name == node.inputs[0]]
        squares = torch.where((c_low <= 0) & (c_high >= 0), 0.0, torch.minimum(c_low**2, c_high**2))
        raised += int((v_low > squares.mean(-1, keepdim=True) + EPS + 1e-9).sum())
    assert raised > 0  # the floor, not the interval of squares, sets some lower ends (measured: most)
    assert math.isfinite(float(v_high.max()))
    assert not any(type(n.rule) is ops.Interval for n in network.nodes)
