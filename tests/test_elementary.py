"""The elementary convex/concave kinds: lines and intervals contain the function on random intervals."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from verifier.bounds import elementary, relaxations

KINDS = [("exp", {}), ("log", {}), ("sqrt", {}), ("rsqrt", {}), ("reciprocal", {}), ("square", {}),
         ("power", {"exponent": 3}), ("power", {"exponent": 4})]
POSITIVE = {"log", "sqrt", "rsqrt"}
BATCH = 8  # intervals per example: 200 examples give 1,600 intervals per kind
WIDTHS = st.one_of(st.just(0.0), st.floats(0.0, 1e-9), st.floats(0.0, 1.0), st.floats(0.0, 25.0))
INTERVALS = st.lists(st.tuples(st.floats(-12.0, 12.0), WIDTHS), min_size=BATCH, max_size=BATCH)


def _intervals(kind: str, pairs: list[tuple[float, float]]) -> tuple[torch.Tensor, torch.Tensor]:
    lower = torch.tensor([a for a, _ in pairs], dtype=torch.float64)
    width = torch.tensor([w for _, w in pairs], dtype=torch.float64)
    if kind in POSITIVE:
        lower = lower.abs() + 1e-6
    return lower, lower + width


def _assert_lines_contain(relax, kind: str, params: dict, lower: torch.Tensor, upper: torch.Tensor):
    """Both lines of `relax` bound the function at points spread over each interval (where it is
    defined); returns the points, the values and where they are defined."""
    x = _points(lower, upper)
    value = elementary.function(kind, x, params)
    defined = torch.isfinite(value)
    below = relax.lower_slope[:, None] * x + relax.lower_offset[:, None]
    above = relax.upper_slope[:, None] * x + relax.upper_offset[:, None]
    assert torch.all((below <= value) | ~defined)
    assert torch.all((value <= above) | ~defined)
    return x, value, defined


def _points(lower: torch.Tensor, upper: torch.Tensor, count: int = 65) -> torch.Tensor:
    """Both ends and `count - 2` interior points of every interval (BATCH, count)."""
    steps = torch.linspace(0.0, 1.0, count, dtype=torch.float64)
    return lower[:, None] + (upper - lower)[:, None] * steps


@pytest.mark.parametrize("kind, params", KINDS, ids=[f"{k}{p.get('exponent', '')}" for k, p in KINDS])
@settings(max_examples=200, deadline=None)
@given(pairs=INTERVALS)
def test_lines_and_interval_contain_the_function(kind, params, pairs):
    lower, upper = _intervals(kind, pairs)
    relax = relaxations.linear_relaxation(kind, lower, upper, params)
    low, high = relaxations.interval(kind, lower, upper, params)
    x, value, defined = _assert_lines_contain(relax, kind, params, lower, upper)
    assert torch.all(((low[:, None] <= value) & (value <= high[:, None])) | ~defined)
    d_low, d_high = relaxations.derivative_range(kind, lower, upper, params)
    x.requires_grad_(True)
    (slope,) = torch.autograd.grad(elementary.function(kind, x, params).sum(), x)
    assert torch.all(((d_low[:, None] <= slope) & (slope <= d_high[:, None])) | ~torch.isfinite(slope))


@pytest.mark.parametrize("kind", ["exp", "square", "rsqrt", "reciprocal", "log"])
def test_the_lines_are_chord_and_parallel_tangent(kind):
    """Convex: the upper line is the chord, the lower one touches the curve (gap ~ 0 somewhere)."""
    lower, upper = torch.tensor([0.5, 1.0, 2.0], dtype=torch.float64), torch.tensor([1.5, 4.0, 9.0],
                                                                                     dtype=torch.float64)
    relax = relaxations.linear_relaxation(kind, lower, upper)
    x = _points(lower, upper, 20001)
    value = elementary.function(kind, x)
    above = relax.upper_slope[:, None] * x + relax.upper_offset[:, None]
    below = relax.lower_slope[:, None] * x + relax.lower_offset[:, None]
    convex = kind != "log"
    chord, touch = (above, below) if convex else (below, above)
    ends = (chord - value)[:, [0, -1]].abs()
    assert torch.all(ends < 1e-12 * (1 + value.abs().amax(1, keepdim=True)))
    assert torch.all((touch - value).abs().amin(1) < 1e-6 * (1 + value.abs().amax(1)))


def test_reciprocal_across_zero_and_outside_domain_are_unbounded_flat_lines():
    relax = relaxations.linear_relaxation("reciprocal", torch.tensor([-1.0]), torch.tensor([2.0]))
    assert relax.lower_slope.item() == 0 and relax.lower_offset.item() == -math.inf
    assert relax.upper_slope.item() == 0 and relax.upper_offset.item() == math.inf
    relax = relaxations.linear_relaxation("rsqrt", torch.tensor([0.0]), torch.tensor([4.0], dtype=torch.float64))
    assert relax.upper_offset.item() == math.inf and relax.lower_offset.item() == pytest.approx(0.5)


def test_float32_lines_stay_sound():
    lower = torch.linspace(-3, 3, 101, dtype=torch.float32)
    upper = lower + 0.37
    relax = relaxations.linear_relaxation("exp", lower, upper)
    assert relax.lower_slope.dtype == torch.float32
    x = _points(lower.double(), upper.double())
    value = torch.exp(x)
    assert torch.all(relax.lower_slope.double()[:, None] * x + relax.lower_offset.double()[:, None] <= value)
    assert torch.all(relax.upper_slope.double()[:, None] * x + relax.upper_offset.double()[:, None] >= value)
