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
# real exponents (x > 0; NaN below 0 for a non-integer one) and negative integers (both sides of 0)
REAL_POWERS = [("power", {"exponent": a}) for a in (1.5, 0.3, 2.5, -0.7, -2.0, -3.0)]
POSITIVE = {"log", "sqrt", "rsqrt"}
BATCH = 8  # intervals per example: 200 examples give 1,600 intervals per kind
WIDTHS = st.one_of(st.just(0.0), st.floats(0.0, 1e-9), st.floats(0.0, 1.0), st.floats(0.0, 25.0))
INTERVALS = st.lists(st.tuples(st.floats(-12.0, 12.0), WIDTHS), min_size=BATCH, max_size=BATCH)


def _intervals(kind: str, pairs: list[tuple[float, float]], real: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    lower = torch.tensor([a for a, _ in pairs], dtype=torch.float64)
    width = torch.tensor([w for _, w in pairs], dtype=torch.float64)
    if kind in POSITIVE:
        lower = lower.abs() + 1e-6
    elif kind == "power" and real:  # half of them inside x > 0, where the lines are not flat
        lower[::2] = lower[::2].abs() + 1e-6
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


@pytest.mark.parametrize("kind, params", KINDS + REAL_POWERS,
                         ids=[f"{k}{p.get('exponent', '')}" for k, p in KINDS + REAL_POWERS])
@settings(max_examples=200, deadline=None)
@given(pairs=INTERVALS)
def test_lines_and_interval_contain_the_function(kind, params, pairs):
    lower, upper = _intervals(kind, pairs, real=(kind, params) in REAL_POWERS)
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


@pytest.mark.parametrize("exponent, convex", [(1.5, True), (0.3, False), (-0.7, True), (-2.0, True)])
def test_real_powers_get_the_chord_and_a_touching_tangent_on_positive_intervals(exponent, convex):
    params = {"exponent": exponent}
    lower = torch.tensor([0.25, 1.0, 3.0], dtype=torch.float64)
    upper = torch.tensor([0.75, 5.0, 3.5], dtype=torch.float64)
    relax = relaxations.linear_relaxation("power", lower, upper, params)
    x = _points(lower, upper, 20001)
    value = x ** exponent
    above = relax.upper_slope[:, None] * x + relax.upper_offset[:, None]
    below = relax.lower_slope[:, None] * x + relax.lower_offset[:, None]
    assert torch.all(below <= value) and torch.all(value <= above)
    chord, touch = (above, below) if convex else (below, above)
    assert torch.all((chord - value)[:, [0, -1]].abs() < 1e-12 * (1 + value.abs().amax(1, keepdim=True)))
    assert torch.all((touch - value).abs().amin(1) < 1e-6 * (1 + value.abs().amax(1)))
    low, high = relaxations.interval("power", lower, upper, params)
    ends = torch.stack([lower ** exponent, upper ** exponent])
    torch.testing.assert_close(low, ends.amin(0), rtol=1e-14, atol=0)
    torch.testing.assert_close(high, ends.amax(0), rtol=1e-14, atol=0)


def test_a_negative_integer_power_is_unbounded_across_and_below_zero_and_a_fraction_ends_at_zero():
    low, high = relaxations.interval("power", torch.tensor([-1.0, -3.0, 2.0], dtype=torch.float64),
                                     torch.tensor([2.0, -2.0, 4.0], dtype=torch.float64), {"exponent": -2.0})
    assert low.tolist()[:2] == [-math.inf] * 2 and high.tolist()[:2] == [math.inf] * 2
    assert low[2].item() == pytest.approx(1 / 16) and high[2].item() == pytest.approx(1 / 4)
    low, high = relaxations.interval("power", torch.tensor([-1.0], dtype=torch.float64),
                                     torch.tensor([4.0], dtype=torch.float64), {"exponent": 1.5})
    assert low.item() == 0.0 and high.item() == pytest.approx(8.0)  # x < 0 is NaN: the domain starts at 0
