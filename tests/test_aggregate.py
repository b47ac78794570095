"""The §2 aggregation: closed forms for linear growth, an independent dual, weak duality."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy.optimize import minimize_scalar

from verifier.certify.aggregate import GrowthCurves, dual_value, excess_bound, grid, inner_sup, linear_closed_form

RNG = np.random.default_rng(0)


def _linear_model_growth(count: int = 7, classes: int = 4):
    """Margins m_ij <= 0 and slopes c_ij = ||a_j - a_y||_*: g_i(rho) = max_j(m_ij + rho c_ij) - max_j m_ij."""
    margins = -RNG.uniform(0.1, 2.0, size=(count, classes))
    slopes = RNG.uniform(0.5, 3.0, size=(count, classes))
    return margins, slopes


def _growth(margins: np.ndarray, slopes: np.ndarray, rho: np.ndarray) -> np.ndarray:
    return (margins[:, None, :] + rho[None, :, None] * slopes[:, None, :]).max(-1) - margins.max(-1)[:, None]


def _curves(margins, slopes, radii: torch.Tensor, reach=math.inf) -> GrowthCurves:
    values = torch.from_numpy(_growth(margins, slopes, radii.numpy()))
    top = torch.from_numpy(slopes.max(1))
    count = len(margins)
    return GrowthCurves(radii=radii, values=values, slopes=top[:, None].expand(-1, len(radii)).clone(),
                        reach=torch.full((count,), reach, dtype=torch.float64),
                        tail=torch.full((count,), math.inf, dtype=torch.float64), tail_slope=top)


def test_p_inf_is_the_mean_growth_at_delta():
    margins, slopes = _linear_model_growth()
    radii = grid(0.5)
    curves = _curves(margins, slopes, radii)
    delta = float(radii[20])
    value, _ = excess_bound(curves, delta, math.inf)
    assert value == pytest.approx(float(_growth(margins, slopes, np.array([delta])).mean()), rel=1e-12)
    between = (float(radii[20]) + float(radii[21])) / 2
    assert excess_bound(curves, between, math.inf)[0] >= float(_growth(margins, slopes, np.array([between])).mean())


def test_p_one_is_delta_times_the_steepest_slope():
    margins, slopes = _linear_model_growth()
    curves = _curves(margins, slopes, grid(0.5))
    value, lam = excess_bound(curves, 0.1, 1.0)
    assert value == pytest.approx(0.1 * slopes.max(), rel=1e-6)
    assert lam == pytest.approx(slopes.max(), rel=1e-5)
    assert linear_closed_form(torch.from_numpy(slopes.max(1)), 0.1, 1.0) == pytest.approx(0.1 * slopes.max())


def _independent_dual(margins, slopes, delta: float, p: float, reach: float = math.inf) -> float:
    """inf over lambda of the dual, with the inner sup on a dense radius grid (an under-estimate)."""
    top = min(reach, 50.0 * delta)
    rho = np.linspace(0.0, top, 200_001)
    growth = _growth(margins, slopes, rho)

    def objective(log_lam: float) -> float:
        lam = math.exp(log_lam)
        return lam * delta**p + float((growth - lam * rho[None, :] ** p).max(1).mean())

    result = minimize_scalar(objective, bounds=(-20, 20), method="bounded", options={"xatol": 1e-10})
    return float(result.fun)


@pytest.mark.parametrize("p", [1.5, 2.0, 3.0])
def test_one_to_inf_matches_an_independent_dual(p):
    margins, slopes = _linear_model_growth()
    curves = _curves(margins, slopes, grid(2.0, count=2000, first=1e-4))  # step ratio 1.005
    for delta in (0.05, 0.2):
        truth = _independent_dual(margins, slopes, delta, p)
        value, _ = excess_bound(curves, delta, p)
        assert value >= truth - 1e-9
        assert value <= truth * (1 + 3e-3)  # the only gap: the upper function between grid points
        q = p / (p - 1)
        closed = linear_closed_form(torch.from_numpy(slopes.max(1)), delta, p)
        assert closed == pytest.approx(delta * float(np.mean(slopes.max(1) ** q) ** (1 / q)))
        assert value <= closed * (1 + 1e-9)


def test_a_box_limits_the_reach():
    margins, slopes = _linear_model_growth()
    radii = grid(0.3, count=100, first=1e-4)
    curves = _curves(margins, slopes, radii, reach=0.3)
    value, _ = excess_bound(curves, 0.2, 1.0)
    truth = _independent_dual(margins, slopes, 0.2, 1.0, reach=0.3)
    assert truth - 1e-9 <= value <= truth * (1 + 2e-3)
    assert value < 0.2 * slopes.max()  # the box binds: less than the unbounded closed form


def test_every_lambda_is_an_upper_bound():
    margins, slopes = _linear_model_growth()
    curves = _curves(margins, slopes, grid(1.0, count=64))
    best, _ = excess_bound(curves, 0.1, 2.0)
    for lam in np.geomspace(1e-3, 1e3, 25):
        assert dual_value(curves, 0.1, 2.0, float(lam)) >= best - 1e-12


def test_infinite_slopes_and_zero_lambda():
    radii = grid(1.0, count=8)
    values = torch.linspace(0, 1, len(radii), dtype=torch.float64).expand(2, -1).clone()
    curves = GrowthCurves(radii=radii, values=values, slopes=torch.full_like(values, math.inf),
                          reach=torch.full((2,), 1.0, dtype=torch.float64),
                          tail=torch.ones(2, dtype=torch.float64), tail_slope=torch.full((2,), math.inf))
    assert torch.all(inner_sup(curves, 0.0, 2.0) == 1.0)  # the largest value, nothing unbounded
    assert torch.all(torch.isfinite(inner_sup(curves, 0.5, 1.0)))
    unbounded = GrowthCurves(radii=radii, values=values, slopes=torch.ones_like(values),
                             reach=torch.full((2,), math.inf, dtype=torch.float64),
                             tail=torch.full((2,), math.inf, dtype=torch.float64), tail_slope=torch.ones(2))
    assert torch.all(torch.isinf(inner_sup(unbounded, 0.5, 1.0)))
    assert torch.all(torch.isfinite(inner_sup(unbounded, 2.0, 1.0)))


def test_grid_must_start_at_zero():
    with pytest.raises(ValueError):
        GrowthCurves(radii=torch.tensor([0.1, 0.2], dtype=torch.float64), values=torch.zeros(1, 2),
                     slopes=torch.zeros(1, 2), reach=torch.ones(1), tail=torch.ones(1), tail_slope=torch.ones(1))
