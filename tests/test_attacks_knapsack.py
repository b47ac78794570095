"""The budget allocations of WDA++ and the curve attack: optimal against an LP, hull geometry."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import linprog

from verifier.attacks.steps import project_ball, steepest_ascent
from verifier.certify.allocation import flip_allocation, fractional_knapsack, upper_hull
from verifier.certify.accuracy import flippable_mass


@pytest.mark.parametrize("seed", range(12))
def test_fractional_knapsack_is_optimal(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 9))
    costs = rng.exponential(size=n)
    values = rng.normal(size=n)
    costs[rng.random(n) < 0.15] = 0.0
    capacity = float(rng.uniform(0, costs.sum()))
    fractions = fractional_knapsack(torch.tensor(costs), torch.tensor(values), capacity).numpy()
    assert fractions.min() >= 0 and fractions.max() <= 1
    assert fractions @ costs <= capacity + 1e-12
    lp = linprog(-values, A_ub=costs[None], b_ub=[capacity], bounds=[(0, 1)] * n, method="highs")
    assert fractions @ values == pytest.approx(-lp.fun, abs=1e-9)


def test_knapsack_skips_unaffordable_and_worthless_items():
    fractions = fractional_knapsack(torch.tensor([1.0, math.inf, 2.0, 0.0]), torch.tensor([1.0, 5.0, 1.0, -1.0]), 2.0)
    assert fractions.tolist() == [1.0, 0.0, 0.5, 0.0]


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, math.inf])
def test_flip_allocation_matches_certified_flippable_mass(p):
    rng = np.random.default_rng(7)
    distances = torch.tensor(rng.exponential(0.3, size=20))
    correct = torch.tensor(rng.random(20) < 0.8)
    for delta in (0.0, 0.05, 0.2, 0.6):
        alpha = flip_allocation(distances, correct, delta, p)
        assert float(alpha.sum()) / 20 == pytest.approx(flippable_mass(distances, correct, delta, p), abs=1e-12)
        assert bool((alpha[~correct] == 0).all())
        if not math.isinf(p):
            assert float((alpha * distances**p).sum() / 20) <= delta**p + 1e-12


def test_upper_hull_keeps_the_concave_rising_part():
    costs = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 2.5]  # candidate 0: the unmoved sample
    gains = [0.0, 1.0, 1.2, 2.5, 2.6, 2.0, 0.1]
    # (0,0) -> (1,1) -> (3,2.5) -> (4,2.6); (2,1.2) lies under the chord, (5,2.0) falls
    assert upper_hull(costs, gains) == [0, 1, 3, 4]
    assert upper_hull([0.0, 1.0, 2.0], [0.0, -1.0, 0.0]) == [0]


@pytest.mark.parametrize("norm", ["inf", "2", "1"])
def test_projection_and_direction(norm):
    generator = torch.Generator().manual_seed(0)
    d = torch.randn(50, 7, generator=generator, dtype=torch.float64)
    radius = torch.rand(50, generator=generator, dtype=torch.float64)
    projected = project_ball(d, radius, norm)
    order = {"inf": math.inf, "2": 2, "1": 1}[norm]
    sizes = torch.linalg.vector_norm(projected, ord=order, dim=1)
    assert bool((sizes <= radius * (1 + 1e-12)).all())
    inside = torch.linalg.vector_norm(d, ord=order, dim=1) <= radius
    assert torch.equal(projected[inside], d[inside])
    if norm == "1":  # projection: no point of the ball is closer (checked against random ball points)
        for row in range(5):
            others = torch.randn(2000, 7, generator=generator, dtype=torch.float64)
            others = others / others.abs().sum(1, keepdim=True) * radius[row] * torch.rand(2000, 1, generator=generator)
            assert float((others - d[row]).norm(dim=1).min()) >= float((projected[row] - d[row]).norm()) - 1e-12
    g = torch.tensor([[0.0, -3.0, 2.0], [0.0, 0.0, 0.0]], dtype=torch.float64)
    lower, upper = torch.full_like(g, -1.0), torch.full_like(g, 1.0)
    lower[0, 1] = 0.0  # no room to decrease coordinate 1
    step = steepest_ascent(g, torch.zeros_like(g), lower, upper, norm)
    expected = {"inf": [0.0, -1.0, 1.0], "2": [0.0, -3 / 13**0.5, 2 / 13**0.5], "1": [0.0, 0.0, 1.0]}[norm]
    assert step[0].tolist() == pytest.approx(expected)
    assert step[1].tolist() == [0.0, 0.0, 0.0]
