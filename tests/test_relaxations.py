"""Soundness of the activation primitives: intervals, derivative ranges and linear relaxations
never leave what dense sampling of the function shows, in float64 (exactly) and float32."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from verifier.bounds import relaxations as R
from verifier.bounds.smooth import smooth

N_INTERVALS, N_POINTS = 1000, 2000
SLOPES = torch.tensor(np.random.default_rng(7).uniform(-2.0, 3.0, N_INTERVALS))

# (id, kind, params, slope for the whole batch, kinks) -- every kind, several parameter regimes.
CONFIGS = [
    ("relu", "relu", None, None, (0.0,)),
    ("leaky0.01", "leaky_relu", {"alpha": float(np.float32(0.01))}, None, (0.0,)),  # as graph.py reads it
    ("leaky-0.5", "leaky_relu", {"alpha": -0.5}, None, (0.0,)),
    ("leaky2", "leaky_relu", {"alpha": 2.0}, None, (0.0,)),
    ("prelu", "prelu", None, SLOPES, (0.0,)),
    ("abs", "abs", None, None, (0.0,)),
    ("relu6", "clip", {"min": 0.0, "max": 6.0}, None, (0.0, 6.0)),
    ("clip-min", "clip", {"min": -1.0}, None, (-1.0,)),
    ("clip-max", "clip", {"max": 1.0}, None, (1.0,)),
    ("clip-none", "clip", {}, None, ()),
    ("gelu", "gelu", {"approximate": "none"}, None, ()),
    ("gelu-tanh", "gelu", {"approximate": "tanh"}, None, ()),
    ("silu", "silu", None, None, ()),
    ("sigmoid", "sigmoid", None, None, ()),
    ("tanh", "tanh", None, None, ()),
    ("softplus", "softplus", None, None, ()),
    ("hard_swish", "hard_swish", None, None, (-3.0, 3.0)),
]
SPECIAL = [0.0, -3.0, 3.0, 6.0, -1.0, 1.0, -1.5, -0.75179, -0.75246, -1.27846, 1.41421356, -1.41421356,
           1.4185, -1.4185, 2.39936, -2.39936]


def _slope_for(slope: torch.Tensor | None, index: torch.Tensor | None = None):
    if slope is None:
        return None
    return slope if index is None else slope[index]


def random_intervals(seed: int, n: int = N_INTERVALS) -> tuple[torch.Tensor, torch.Tensor]:
    """A mix of tiny, wide, one-sided, kink/minimiser-straddling and degenerate float64 intervals."""
    rng = np.random.default_rng(seed)
    group = rng.integers(0, 6, n)
    centre = np.where(rng.random(n) < 0.5, rng.choice(SPECIAL, n), rng.normal(0.0, 4.0, n))
    width = np.select(
        [group == 0, group == 1, group == 2, group == 3, group == 4],
        [10.0 ** rng.uniform(-12, -4, n), rng.uniform(0, 40, n), 10.0 ** rng.uniform(1, 2.5, n),
         rng.uniform(0, 3, n), np.zeros(n)],
        rng.uniform(0, 8, n),
    )
    lower = centre - width * rng.random(n)
    lower = np.where(group == 5, np.where(rng.random(n) < 0.5, -width, 0.0), lower)  # one-sided
    lower = np.where((group == 4) & (rng.random(n) < 0.5), rng.choice(SPECIAL, n), lower)  # on the point
    upper = lower + width
    return torch.tensor(lower), torch.tensor(upper)


def sample(lower: torch.Tensor, upper: torch.Tensor, kinks=(), m: int = N_POINTS) -> torch.Tensor:
    """m points per interval: both ends exactly, an even grid, and every special point inside."""
    t = torch.linspace(0.0, 1.0, m - len(SPECIAL) - 2, dtype=torch.float64)
    grid = lower[:, None] + (upper - lower)[:, None] * t
    specials = torch.tensor(SPECIAL + list(kinks), dtype=torch.float64)
    extra = torch.minimum(torch.maximum(specials[None, :], lower[:, None]), upper[:, None])
    h = torch.cat([lower[:, None], upper[:, None], grid, extra], dim=1)
    return torch.minimum(torch.maximum(h, lower[:, None]), upper[:, None])


def check_sound(kind, params, slope, lower, upper, kinks=(), m=N_POINTS, fd=True) -> None:
    """Sampling never leaves interval, relaxation lines (float64, tolerance 0) or derivative range."""
    h = sample(lower, upper, kinks, m)
    sl = None if slope is None else slope[:, None]
    y = R.activation(kind, h, params, sl)
    lo, hi = R.interval(kind, lower, upper, params, slope)
    assert not (torch.isnan(lo).any() or torch.isnan(hi).any())
    assert (y >= lo[:, None]).all() and (y <= hi[:, None]).all(), "interval"
    rel = R.linear_relaxation(kind, lower, upper, params, slope)
    below = rel.lower_slope[:, None] * h + rel.lower_offset[:, None]
    above = rel.upper_slope[:, None] * h + rel.upper_offset[:, None]
    bad = (below > y) | (above < y)
    assert not bad.any(), f"relaxation violated at {h[bad][:3]}, l={lower[bad.any(1)][:3]}"
    if not fd:
        return
    dlo, dhi = R.derivative_range(kind, lower, upper, params, slope)
    assert (dlo <= dhi).all()
    step = 1e-6
    inner = h[:, 2:120]
    plus, minus = R.activation(kind, inner + step, params, sl), R.activation(kind, inner - step, params, sl)
    fd_slope = (plus - minus) / (2 * step)
    ok = (inner - 2 * step >= lower[:, None]) & (inner + 2 * step <= upper[:, None])
    for k in kinks:
        ok &= (inner - k).abs() > 2 * step
    if kind in ("relu", "leaky_relu", "prelu", "abs"):
        ok &= inner.abs() > 2 * step
    tol = 1e-7 * (1 + y[:, 2:120].abs())
    assert ((fd_slope >= dlo[:, None] - tol) | ~ok).all(), "derivative below range"
    assert ((fd_slope <= dhi[:, None] + tol) | ~ok).all(), "derivative above range"


@pytest.mark.parametrize("name,kind,params,slope,kinks", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_sampling_never_leaves_bounds_float64(name, kind, params, slope, kinks):
    lower, upper = random_intervals(seed=len(name))
    check_sound(kind, params, slope, lower, upper, kinks)


@pytest.mark.parametrize("name,kind,params,slope,kinks", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_float32_inputs_are_sound_in_float32(name, kind, params, slope, kinks):
    lower, upper = random_intervals(seed=100 + len(name), n=300)
    l32, u32 = lower.float(), torch.maximum(upper.float(), lower.float())
    s32 = None if slope is None else slope[:300].float()
    lo, hi = R.interval(kind, l32, u32, params, s32)
    rel = R.linear_relaxation(kind, l32, u32, params, s32)
    assert lo.dtype == torch.float32 and rel.upper_offset.dtype == torch.float32
    h = sample(l32.double(), u32.double(), kinks, 500).float()
    sl = None if s32 is None else s32[:, None]
    y = R.activation(kind, h, params, sl)  # what a float32 network computes
    assert (y >= lo[:, None]).all() and (y <= hi[:, None]).all()
    below = rel.lower_slope[:, None] * h + rel.lower_offset[:, None]  # float32 arithmetic
    above = rel.upper_slope[:, None] * h + rel.upper_offset[:, None]
    assert (below <= y).all() and (above >= y).all()
    y64 = R.activation(kind, h.double(), params, None if sl is None else sl.double())  # exact check
    assert (rel.lower_slope.double()[:, None] * h.double() + rel.lower_offset.double()[:, None] <= y64).all()
    assert (rel.upper_slope.double()[:, None] * h.double() + rel.upper_offset.double()[:, None] >= y64).all()


KIND_PARAMS = st.sampled_from([c[1:4] for c in CONFIGS if c[1] != "prelu"]
                              + [("prelu", None, s) for s in (-1.5, -0.2, 0.0, 0.3, 1.0, 2.5)])


@settings(max_examples=200, deadline=None)
@given(KIND_PARAMS, st.floats(-60, 60), st.floats(0, 60) | st.floats(0, 1e-6) | st.just(0.0))
def test_hypothesis_random_interval(kind_params, lower, width):
    kind, params, slope = kind_params
    l = torch.tensor([lower], dtype=torch.float64)
    u = l + width
    s = None if slope is None else torch.tensor([slope], dtype=torch.float64)
    check_sound(kind, params, s, l, u, kinks=(0.0, 1.0, -1.0, 6.0, -3.0, 3.0), m=400)


@pytest.mark.parametrize("name,kind,params,slope,kinks", CONFIGS, ids=[c[0] for c in CONFIGS])
def test_infinite_ends_give_no_nan_and_stay_sound(name, kind, params, slope, kinks):
    inf = math.inf
    lower = torch.tensor([-inf, -inf, -inf, -2.0, 0.0, 4.0, -inf, 7.0], dtype=torch.float64)
    upper = torch.tensor([inf, -1.0, 2.0, inf, inf, inf, 0.0, 7.0], dtype=torch.float64)
    s = None if slope is None else slope[: len(lower)]
    lo, hi = R.interval(kind, lower, upper, params, s)
    dlo, dhi = R.derivative_range(kind, lower, upper, params, s)
    rel = R.linear_relaxation(kind, lower, upper, params, s)
    for t in (lo, hi, dlo, dhi, *vars(rel).values()):
        assert not torch.isnan(t).any()
    assert torch.isfinite(dlo).all() and torch.isfinite(dhi).all()
    h = sample(lower.clamp(-1e3, 1e3), upper.clamp(-1e3, 1e3), kinks, 300)
    y = R.activation(kind, h, params, None if s is None else s[:, None])
    assert (y >= lo[:, None]).all() and (y <= hi[:, None]).all()
    below = torch.where(rel.lower_slope[:, None] == 0, rel.lower_offset[:, None],
                        rel.lower_slope[:, None] * h + rel.lower_offset[:, None])
    above = torch.where(rel.upper_slope[:, None] == 0, rel.upper_offset[:, None],
                        rel.upper_slope[:, None] * h + rel.upper_offset[:, None])
    assert (below <= y).all() and (above >= y).all()
    x = torch.tensor([-inf, inf], dtype=torch.float64)
    assert not torch.isnan(R.activation(kind, x, params, None if s is None else s[:2])).any()


def test_minimum_constants_match_a_float64_search():
    grid = torch.linspace(-2.0, 0.0, 400_001, dtype=torch.float64)
    for kind, params, value, where in [("gelu", {"approximate": "none"}, -0.169972, -0.75179),
                                       ("gelu", {"approximate": "tanh"}, -0.170041, -0.75246),
                                       ("silu", None, -0.278465, -1.27846),
                                       ("hard_swish", None, -0.375, -1.5)]:
        y = R.activation(kind, grid, params)
        searched = float(y.min())
        lo, _ = R.interval(kind, torch.tensor([-2.0]).double(), torch.tensor([0.0]).double(), params)
        assert float(lo) <= searched and abs(float(lo) - searched) < 1e-6
        assert value - 1e-12 <= float(lo) < value + 1e-6
        assert abs(float(grid[y.argmin()]) - where) < 1e-5


def test_derivative_constants_and_lipschitz():
    grid = torch.linspace(-8.0, 8.0, 800_001, dtype=torch.float64)
    for kind, params, d_min, d_max, lip in [
        ("gelu", {"approximate": "none"}, -0.128905, 1.128905, 1.12891),
        ("gelu", {"approximate": "tanh"}, -0.128994, 1.128994, 1.12900),
        ("silu", None, -0.099840, 1.099840, 1.09984),
        ("sigmoid", None, 0.0, 0.25, 0.25),
        ("tanh", None, 0.0, 1.0, 1.0),
    ]:
        lo, hi = R.derivative_range(kind, torch.tensor([-8.0]).double(), torch.tensor([8.0]).double(), params)
        d = smooth(R._key(kind, params), grid, 1)
        assert float(lo) <= float(d.min()) and float(hi) >= float(d.max())
        assert abs(float(lo) - float(d.min())) < 1e-9 and abs(float(hi) - float(d.max())) < 1e-9
        assert abs(float(lo) - d_min) < 1e-6 or kind in ("sigmoid", "tanh")
        assert abs(float(hi) - d_max) < 1e-6
        assert R.lipschitz_constant(kind, params) == lip and lip >= float(d.abs().max())
    assert R.lipschitz_constant("leaky_relu", {"alpha": -3.0}) == 3.0
    assert R.lipschitz_constant("prelu", slope=torch.tensor([0.1, 2.5])) == 2.5
    assert R.lipschitz_constant("hard_swish") == 1.5 and R.lipschitz_constant("relu") == 1.0


def test_derivative_formulas_match_finite_differences():
    x = torch.linspace(-30.0, 30.0, 120_001, dtype=torch.float64)
    for key in ("gelu", "gelu_tanh", "silu", "sigmoid", "tanh", "softplus"):
        d2 = smooth(key, x, 2)
        fd = (smooth(key, x + 1e-5, 1) - smooth(key, x - 1e-5, 1)) / 2e-5
        assert torch.allclose(fd, d2, atol=1e-8), key
        fd1 = (smooth(key, x + 1e-5, 0) - smooth(key, x - 1e-5, 0)) / 2e-5
        assert torch.allclose(fd1, smooth(key, x, 1), atol=1e-8), key


def test_activation_matches_torch():
    x = torch.linspace(-15.0, 15.0, 30_001, dtype=torch.float64)
    pairs = [
        ("gelu", {"approximate": "none"}, F.gelu(x)),
        ("gelu", {"approximate": "tanh"}, F.gelu(x, approximate="tanh")),
        ("silu", None, F.silu(x)),
        ("hard_swish", None, F.hardswish(x)),
        ("softplus", None, F.softplus(x)),
        ("leaky_relu", {"alpha": 0.1}, F.leaky_relu(x, 0.1)),
        ("clip", {"min": -1.0, "max": 2.0}, x.clamp(-1, 2)),
    ]
    for kind, params, expected in pairs:
        assert torch.allclose(R.activation(kind, x, params), expected, atol=1e-12, rtol=1e-12), kind


def test_relu_relaxation_closed_form():
    rel = R.linear_relaxation("relu", torch.tensor([-1.0, 0.5, -4.0, -2.0]).double(),
                              torch.tensor([3.0, 2.0, -1.0, 1.0]).double())
    assert torch.allclose(rel.upper_slope[0], torch.tensor(0.75).double(), atol=1e-15)
    assert torch.allclose(rel.upper_offset[0], torch.tensor(0.75).double(), atol=1e-12)
    assert float(rel.upper_offset[0]) >= 0.75
    assert rel.lower_slope[0] == 1.0 and rel.lower_offset[0] == 0.0
    assert rel.lower_slope[3] == 0.0 and rel.lower_offset[3] == 0.0  # u < -l: alpha = 0
    assert rel.lower_slope[1] == rel.upper_slope[1] == 1.0 and rel.upper_offset[1] == 0.0  # stable: exact
    assert rel.lower_slope[2] == rel.upper_slope[2] == 0.0 and rel.upper_offset[2] == 0.0
    dlo, dhi = R.derivative_range("relu", torch.tensor([-1.0, 0.0, -2.0]).double(),
                                  torch.tensor([3.0, 1.0, 0.0]).double())
    assert dlo.tolist() == [0.0, 1.0, 0.0] and dhi.tolist() == [1.0, 1.0, 0.0]


def test_relaxations_are_tight():
    tiny = R.linear_relaxation("sigmoid", torch.tensor([-0.01]).double(), torch.tensor([0.01]).double())
    assert float(tiny.upper_offset - tiny.lower_offset) < 1e-5
    assert torch.equal(tiny.lower_slope, tiny.upper_slope)
    point = R.linear_relaxation("gelu", torch.tensor([0.3]).double(), torch.tensor([0.3]).double())
    assert float(point.upper_offset - point.lower_offset) < 1e-12
    lo, hi = R.interval("tanh", torch.tensor([-1.0]).double(), torch.tensor([2.0]).double())
    assert abs(float(lo) - math.tanh(-1.0)) < 1e-15 and abs(float(hi) - math.tanh(2.0)) < 1e-15


def test_unknown_kind_and_bad_params_are_refused():
    x = torch.zeros(3)
    with pytest.raises(ValueError, match="supported"):
        R.interval("max_pool", x, x)
    with pytest.raises(ValueError, match="approximate"):
        R.activation("gelu", x, {"approximate": "fast"})
    with pytest.raises(ValueError, match="slope"):
        R.linear_relaxation("prelu", x, x)
