"""max_linear / radius_to_reach against independent solvers (LP, bisection) on random instances."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import linprog

from verifier import errors
from verifier.geometry import dual_norm, max_linear, parse_norm, radius_to_reach


def _lp_reference(g, lo, hi, s, norm) -> float:
    """max g·d over the box and the r-ball, as an LP in d = p - n (r = 1 or inf)."""
    d = len(g)
    bounds = [(0, max(h, 0.0)) for h in hi] + [(0, max(-l, 0.0)) for l in lo]
    if norm == "1":
        result = linprog(-np.concatenate([g, -g]), A_ub=[np.ones(2 * d)], b_ub=[s], bounds=bounds)
    else:
        bounds = [(0, min(b[1], s)) for b in bounds]
        result = linprog(-np.concatenate([g, -g]), bounds=bounds)
    return -result.fun


def _bisection_reference(g, lo, hi, s) -> float:
    """r = 2 by KKT: d(t) = clip(t g, lo, hi), bisection on t for ||d(t)|| = s."""
    corner = np.clip(np.where(g > 0, hi, lo), lo, hi) * (g != 0)
    if np.linalg.norm(corner) <= s:
        return float(g @ corner)
    low, high = 0.0, 1.0
    while np.linalg.norm(np.clip(high * g, lo, hi)) < s:
        high *= 2
    for _ in range(200):
        mid = (low + high) / 2
        low, high = (mid, high) if np.linalg.norm(np.clip(mid * g, lo, hi)) < s else (low, mid)
    return float(g @ np.clip(high * g, lo, hi))


instances = st.integers(min_value=1, max_value=8).flatmap(lambda d: st.tuples(
    st.lists(st.floats(-3, 3).map(lambda v: 0.0 if abs(v) < 0.3 else v), min_size=d, max_size=d),
    st.lists(st.floats(0, 2), min_size=d, max_size=d),
    st.lists(st.floats(0, 2), min_size=d, max_size=d),
    st.floats(0, 3),
))


@settings(max_examples=150, deadline=None)
@given(instances, st.sampled_from(["inf", "2", "1"]))
def test_max_linear_is_exact(instance, norm):
    g, lo, hi = (np.array(v, dtype=np.float64) for v in instance[:3])
    lo, s = -lo, instance[3]
    value = float(max_linear(torch.tensor(g), torch.tensor(lo), torch.tensor(hi), s, norm))
    reference = _bisection_reference(g, lo, hi, s) if norm == "2" else _lp_reference(g, lo, hi, s, norm)
    assert value == pytest.approx(reference, rel=1e-7, abs=1e-9)


@settings(max_examples=150, deadline=None)
@given(instances, st.sampled_from(["inf", "2", "1"]), st.floats(0.0, 1.0))
def test_radius_to_reach_inverts_max_linear(instance, norm, fraction):
    g, lo, hi = (torch.tensor(np.array(v, dtype=np.float64)) for v in instance[:3])
    lo = -lo
    full = float(max_linear(g, lo, hi, math.inf, norm))
    target = fraction * full
    radius = float(radius_to_reach(g, lo, hi, target, norm))
    if target <= 0:
        assert radius == 0.0
        return
    assert float(max_linear(g, lo, hi, radius * (1 - 1e-9), norm)) <= target * (1 + 1e-9)  # never overshoots
    assert float(max_linear(g, lo, hi, radius * (1 + 1e-9) + 1e-12, norm)) >= target * (1 - 1e-9)
    assert math.isinf(float(radius_to_reach(g, lo, hi, full * 1.01 + 1e-6, norm)))


def test_no_box_closed_form():
    g = torch.tensor([[3.0, -4.0, 0.0]], dtype=torch.float64)
    inf = torch.full_like(g, math.inf)
    for norm, dual in (("inf", 7.0), ("2", 5.0), ("1", 4.0)):
        assert float(max_linear(g, -inf, inf, 0.5, norm)) == pytest.approx(0.5 * dual)
        assert float(dual_norm(g, norm)) == pytest.approx(dual)
        assert float(radius_to_reach(g, -inf, inf, 1.0, norm)) == pytest.approx(1.0 / dual)


def test_batched_shapes_and_broadcast_radius():
    g = torch.randn(4, 3, 10, dtype=torch.float64)
    lo, hi = -torch.rand(4, 1, 10, dtype=torch.float64), torch.rand(4, 1, 10, dtype=torch.float64)
    radii = torch.rand(4, 3, dtype=torch.float64)
    values = max_linear(g, lo, hi, radii, "2")
    assert values.shape == (4, 3)
    one = max_linear(g[2, 1], lo[2, 0], hi[2, 0], radii[2, 1], "2")
    assert float(values[2, 1]) == pytest.approx(float(one))


def test_parse_norm():
    assert [parse_norm(v) for v in ("inf", "Linf", 2, "1", float("inf"))] == ["inf", "inf", "2", "1", "inf"]
    with pytest.raises(errors.UsageError, match="unknown norm"):
        parse_norm("3")
