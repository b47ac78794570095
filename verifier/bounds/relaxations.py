"""Per-activation numeric primitives for sound bound propagation (method.md §3.1, §3.3, §3.4, §3.7).

This module owns, for every elementwise activation kind that `verifier.graph` reports (max_pool
and softmax are not elementwise and live elsewhere), and by dispatch to `elementary.py` for the
convex/concave kinds Softmax and LayerNorm are decomposed into: the function itself (`activation`), a sound
image of an interval (`interval`), a sound range of the derivative (`derivative_range`), sound
linear relaxations (`linear_relaxation`, bounds-design.md §5) and global Lipschitz constants
(`lipschitz_constant`). All are pure, batched, broadcasting functions on torch tensors. The smooth
kinds' formulas and derived constants (critical points, minima, Lipschitz) are in `smooth.py`.

Numerics: bounds are computed in float64 and rounded OUTWARD to the input dtype (float32 or
float64); every float64 evaluation error is covered by an explicit widening, and float32 results
also carry a few float32 ulps so that evaluating them in float32 stays sound. The reference
`activation` is the float64 formula rounded to the input dtype; slopes and alphas are taken at the
input dtype's precision (as an ONNX model with float32 attributes computes them).

Infinite ends (lower = -inf or upper = +inf): `interval` and `derivative_range` use the limits.
`linear_relaxation` keeps exact lines on stable pieces (e.g. ReLU on [0, inf] is the identity);
otherwise it returns slope 0 with the interval ends as offsets, which may be +-inf: callers must
not multiply such an offset by a zero coefficient (0 * inf = nan).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from verifier.bounds import elementary
from verifier.bounds.smooth import CRITICAL_POINT, CRITICAL_VALUES, LIPSCHITZ, MINIMUM, fix_inf, smooth

Params = Mapping[str, float | str] | None

KINDS = ("relu", "leaky_relu", "prelu", "abs", "clip", "gelu", "silu", "sigmoid", "tanh", "softplus",
         "hard_swish")
_RELU_FAMILY = frozenset({"relu", "leaky_relu", "prelu", "abs"})  # sigma(h) = h (h >= 0), a*h (h < 0)
_QUASI_CONVEX = frozenset({"gelu", "silu", "hard_swish"})
_EXACT_INTERVAL = frozenset({"relu", "abs", "clip"})  # end values are exact float operations
_EPS64 = torch.finfo(torch.float64).eps
_BISECT_STEPS, _NEWTON_STEPS = 8, 5  # root search for the smooth relaxations (tightness only)
_TINY_WIDTH = 1e-6  # below this width the smooth relaxation slope is the tangent at the midpoint


@dataclass(frozen=True)
class Relaxation:
    """Lines with lower_slope*h + lower_offset <= sigma(h) <= upper_slope*h + upper_offset on [l, u]."""

    lower_slope: Tensor
    lower_offset: Tensor
    upper_slope: Tensor
    upper_offset: Tensor


# ---------------------------------------------------------------- helpers
def _key(kind: str, params: Params) -> str:
    """Name of the formula: the kind, with gelu split by its `approximate` attribute."""
    if kind not in KINDS:
        raise ValueError(f"no relaxation rule for activation {kind!r}; supported: {', '.join(KINDS)}")
    if kind != "gelu":
        return kind
    approximate = (params or {}).get("approximate", "none")
    if approximate not in ("none", "tanh"):
        raise ValueError(f"gelu approximate={approximate!r}: expected 'none' or 'tanh'")
    return "gelu_tanh" if approximate == "tanh" else "gelu"


def _negative_slope(kind: str, params: Params, slope: Tensor | float | None) -> Tensor | float:
    """Slope a of the h < 0 piece for the ReLU family (relu 0, abs -1, leaky alpha, prelu slope)."""
    if kind == "prelu":
        if slope is None:
            raise ValueError("prelu needs its slope tensor")
        return slope
    return {"relu": 0.0, "abs": -1.0}.get(kind, float((params or {}).get("alpha", 0.01)))


def _clip_ends(params: Params) -> tuple[float, float]:
    p = params or {}
    return float(p.get("min", -math.inf)), float(p.get("max", math.inf))


def _prepare(kind: str, lower: Tensor, upper: Tensor, params: Params,
             slope: Tensor | float | None) -> tuple[Tensor, Tensor, Tensor, torch.dtype]:
    """Float64 broadcast copies of l, u and the ReLU-family slope (zeros otherwise), and the out dtype."""
    _key(kind, params)
    lower, upper = torch.as_tensor(lower), torch.as_tensor(upper)
    dtype = torch.promote_types(lower.dtype, upper.dtype)
    dtype = dtype if dtype.is_floating_point else torch.float64
    a = _negative_slope(kind, params, slope) if kind in _RELU_FAMILY else 0.0
    a = a if isinstance(a, Tensor) else torch.tensor(a, dtype=torch.float64)
    a = a.to(device=lower.device, dtype=dtype).to(torch.float64)  # the slope `dtype` computes with
    l, u, a = torch.broadcast_tensors(lower.to(torch.float64), upper.to(torch.float64), a)
    return l, u, a, dtype


def _outward(bounds: tuple[Tensor, Tensor], lower: Tensor, upper: Tensor) -> tuple[Tensor, Tensor]:
    """Float64 bounds rounded outward to the inputs' dtype."""
    dtype = torch.promote_types(lower.dtype, upper.dtype)
    return _round(bounds[0], dtype, up=False), _round(bounds[1], dtype, up=True)


def _round(v: Tensor, dtype: torch.dtype, up: bool) -> Tensor:
    """Cast float64 `v` to `dtype`, rounding toward +inf (up) or -inf, so the result bounds v."""
    out = v.to(dtype)
    if dtype == torch.float64:
        return out
    inward = out.to(torch.float64) < v if up else out.to(torch.float64) > v
    return torch.where(inward, torch.nextafter(out, torch.full_like(out, math.inf if up else -math.inf)), out)


def _as(v: Tensor, dtype: torch.dtype) -> Tensor:
    """`v` rounded to `dtype` and back to float64: a slope both dtypes represent exactly."""
    return v.to(dtype).to(torch.float64)


def _eval64(kind: str, x: Tensor, params: Params, a: Tensor) -> Tensor:
    """sigma in float64, with the broadcast ReLU-family slope `a` (already at the input's precision)."""
    return torch.where(x >= 0, x, fix_inf(x, a * x)) if kind in _RELU_FAMILY else activation(kind, x, params)


# ---------------------------------------------------------------- public API
def activation(kind: str, x: Tensor, params: Params = None, slope: Tensor | float | None = None) -> Tensor:
    """The activation itself: reference values (float64 formulas, rounded to x's dtype; limits at +-inf)."""
    if kind in elementary.KINDS:
        return elementary.function(kind, x, params)
    key = _key(kind, params)
    if kind in _RELU_FAMILY:  # one rounding in any dtype, with the slope at x's precision
        a = torch.as_tensor(_negative_slope(kind, params, slope), dtype=x.dtype, device=x.device)
        return torch.where(x >= 0, x, fix_inf(x, a * x))
    if x.dtype != torch.float64:  # float32 formulas lose up to ~1e-6 absolute (erf, x/6 + 1/2 cancellation)
        return activation(kind, x.to(torch.float64), params).to(x.dtype)
    if kind == "clip":
        lo, hi = _clip_ends(params)
        return x.clamp(min=lo, max=hi)
    if kind == "hard_swish":
        return fix_inf(x, x * (x / 6.0 + 0.5).clamp(0.0, 1.0))
    return smooth(key, x, 0)


def interval(kind: str, lower: Tensor, upper: Tensor, params: Params = None,
             slope: Tensor | float | None = None) -> tuple[Tensor, Tensor]:
    """Sound [min, max] of the activation over [lower, upper], elementwise (lower <= upper)."""
    if kind in elementary.KINDS:
        return _outward(elementary.interval(kind, lower, upper, params), lower, upper)
    key = _key(kind, params)
    l, u, a, dtype = _prepare(kind, lower, upper, params, slope)
    fl, fu = _eval64(kind, l, params, a), _eval64(kind, u, params, a)
    lo, hi = torch.minimum(fl, fu), torch.maximum(fl, fu)
    if kind in _RELU_FAMILY:  # monotone on each side of the kink at 0: include sigma(0) = 0
        inside = (l < 0) & (u > 0)
        lo, hi = torch.where(inside, lo.clamp(max=0.0), lo), torch.where(inside, hi.clamp(min=0.0), hi)
    elif kind in _QUASI_CONVEX:  # one minimum (method.md §3.7, bounds-design §2)
        m, value = MINIMUM[key]
        lo = torch.where((l <= m) & (m <= u), lo.clamp(max=value), lo)
    if kind not in _EXACT_INTERVAL:  # formula / product rounding, in float64 and in the out dtype
        eps, tiny = 4.0 * torch.finfo(dtype).eps, torch.finfo(dtype).tiny
        lo, hi = lo - eps * lo.abs() - tiny, hi + eps * hi.abs() + tiny
    return _round(lo, dtype, up=False), _round(hi, dtype, up=True)


def derivative_range(kind: str, lower: Tensor, upper: Tensor, params: Params = None,
                     slope: Tensor | float | None = None) -> tuple[Tensor, Tensor]:
    """Sound range of sigma' over [lower, upper] (Clarke subgradients at kinks), elementwise."""
    if kind in elementary.KINDS:
        return _outward(elementary.derivative_range(kind, lower, upper, params), lower, upper)
    key = _key(kind, params)
    l, u, a, dtype = _prepare(kind, lower, upper, params, slope)
    if kind in _RELU_FAMILY or kind in ("clip", "hard_swish"):
        # Piecewise: (start, end, sigma' range on the piece's overlap with [l, u]); a piece counts
        # when it overlaps [l, u] with positive length, or [l, u] is a point of its closure.
        one, zero = torch.ones_like(l), torch.zeros_like(l)
        if kind in _RELU_FAMILY:
            pieces = [(-math.inf, 0.0, a, a), (0.0, math.inf, one, one)]
        elif kind == "clip":
            cmin, cmax = _clip_ends(params)
            pieces = [(-math.inf, cmin, zero, zero), (cmin, cmax, one, one), (cmax, math.inf, zero, zero)]
        else:  # hard_swish: 0 | x/3 + 1/2 (rising) | 1
            middle = (l.clamp(-3.0, 3.0) / 3.0 + 0.5, u.clamp(-3.0, 3.0) / 3.0 + 0.5)
            pieces = [(-math.inf, -3.0, zero, zero), (-3.0, 3.0, *middle), (3.0, math.inf, one, one)]
        lo, hi = torch.full_like(l, math.inf), torch.full_like(l, -math.inf)
        for start, end, d_lo, d_hi in pieces:
            touched = (l.clamp(min=start) < u.clamp(max=end)) | ((l == u) & (start <= l) & (l <= end))
            lo = torch.where(touched, torch.minimum(lo, d_lo), lo)
            hi = torch.where(touched, torch.maximum(hi, d_hi), hi)
        if kind == "hard_swish":
            lo, hi = lo - 4 * _EPS64, hi + 4 * _EPS64
        return _round(lo, dtype, up=False), _round(hi, dtype, up=True)
    # Smooth: the range is reached at the ends (clamped to +-_BIG, where sigma' is its limit) or at
    # an interior critical point of sigma' (method.md §3.4).
    dl, du = smooth(key, l, 1), smooth(key, u, 1)
    lo, hi = torch.minimum(dl, du), torch.maximum(dl, du)
    lo, hi = lo - 8 * _EPS64 * (1 + lo.abs()), hi + 8 * _EPS64 * (1 + hi.abs())
    c = CRITICAL_POINT[key]
    if c is not None:
        d_min, d_max = CRITICAL_VALUES[key]
        if c > 0:
            lo = torch.where((l < -c) & (-c < u), lo.clamp(max=d_min), lo)
        hi = torch.where((l < c) & (c < u), hi.clamp(min=d_max), hi)
    return _round(lo, dtype, up=False), _round(hi, dtype, up=True)


def lipschitz_constant(kind: str, params: Params = None, slope: Tensor | float | None = None) -> float:
    """Global Lipschitz constant of the activation (method.md §3.1), rounded up."""
    key = _key(kind, params)
    if kind in ("leaky_relu", "prelu"):
        a = torch.as_tensor(_negative_slope(kind, params, slope), dtype=torch.float64)
        return max(1.0, float(a.abs().max()))
    return LIPSCHITZ[key]


def linear_relaxation(kind: str, lower: Tensor, upper: Tensor, params: Params = None,
                      slope: Tensor | float | None = None, position: Tensor | None = None) -> Relaxation:
    """Sound lower and upper lines of the activation on [lower, upper] (bounds-design.md §5).

    `position`: for the elementary kinds only, where in [l, u] (0..1) the tangent line touches
    (`elementary.linear_relaxation`, an optimised parameter); None: the default lines."""
    if kind in elementary.KINDS:
        lines = elementary.linear_relaxation(kind, lower, upper, params, position)
        dtype = torch.promote_types(lower.dtype, upper.dtype)
        if dtype == torch.float64:
            return Relaxation(*lines)
        ends = [torch.nan_to_num(e.to(torch.float64), posinf=0.0, neginf=0.0) for e in (lower, upper)]
        ends = torch.broadcast_tensors(*ends, lines[0])[:2]
        return Relaxation(*_finish(lines, *ends, dtype))
    key = _key(kind, params)
    l_raw, u_raw, a, dtype = _prepare(kind, lower, upper, params, slope)
    finite = torch.isfinite(l_raw) & torch.isfinite(u_raw)
    l, u = torch.where(finite, l_raw, 0.0), torch.where(finite, u_raw, 0.0)
    f = lambda x: _eval64(kind, x, params, a)  # noqa: E731
    width = u - l
    safe_width = torch.where(width > 0, width, 1.0)
    lows, highs = [], []
    if kind in _RELU_FAMILY:
        # max(h, a h) is convex for a <= 1 (upper: chord, lower: alpha h, alpha in [a, 1]); for a > 1
        # it is min(h, a h), concave (roles swapped). alpha = 1 if u >= -l else a minimises the area.
        s = _as((f(u) - f(l)) / safe_width, dtype)
        b_lo, b_hi = _offsets(s, [l, u], [f(l), f(u)])
        s, b_lo, _, b_hi = _finish((s, b_lo, s, b_hi), l, u, dtype)
        alpha = torch.where(u >= -l, 1.0, a).to(dtype)  # exact: sigma(h) >= alpha*h even in floats
        zero_out, convex = torch.zeros_like(s), a <= 1
        lines = (torch.where(convex, alpha, s), torch.where(convex, zero_out, b_lo),
                 torch.where(convex, s, alpha), torch.where(convex, b_hi, zero_out))
    else:
        if kind in ("clip", "hard_swish"):
            # Chord-parallel lines; sigma(x) - s x is piecewise linear (clip) or linear / convex
            # quadratic with its vertex at 3s - 3/2 (hard_swish), so its extremes are at the points below.
            s = _as(torch.where(width > 0, (f(u) - f(l)) / safe_width, 0.0), dtype)
            kinks = _clip_ends(params) if kind == "clip" else (-3.0, 3.0)
            xs = [l, u, *(torch.full_like(l, k).clamp(l, u) for k in kinks)]
            if kind == "hard_swish":
                xs.append((3.0 * s - 1.5).clamp(l, u))
        else:
            s, xs, lows, highs = _smooth_candidates(key, l, u, width, dtype)
        b_lo, b_hi = _offsets(s, xs, [f(x) for x in xs], lows, highs)
        lines = _finish((s, b_lo, s, b_hi), l, u, dtype)
    # Infinite ends: slope 0 and the interval as offsets (possibly +-inf), then exact stable pieces.
    lo_val, hi_val = interval(kind, lower, upper, params, slope)
    lo_val, hi_val = torch.broadcast_to(lo_val, l.shape), torch.broadcast_to(hi_val, l.shape)
    zero_out = torch.zeros_like(lo_val)
    lines = tuple(torch.where(finite, line, fallback)
                  for line, fallback in zip(lines, (zero_out, lo_val, zero_out, hi_val)))
    for mask, slope_value, offset_value in _stable_pieces(kind, l_raw, u_raw, a, params):
        sv = torch.broadcast_to(torch.as_tensor(slope_value, dtype=torch.float64), l.shape).to(dtype)
        ov = torch.full_like(lines[0], offset_value)
        lines = (torch.where(mask, sv, lines[0]), torch.where(mask, ov, lines[1]),
                 torch.where(mask, sv, lines[2]), torch.where(mask, ov, lines[3]))
    return Relaxation(*lines)


def settled(kind: str, lower: Tensor, upper: Tensor, params: Params = None) -> Tensor:
    """Mask of units whose [lower, upper] lies in one linear piece: their relaxation is exact there and
    on every sub-interval (always False for the smooth kinds)."""
    if kind in elementary.KINDS:
        return torch.zeros_like(lower, dtype=torch.bool)
    _key(kind, params)
    mask = torch.zeros_like(lower, dtype=torch.bool)
    for piece, _, _ in _stable_pieces(kind, lower, upper, torch.zeros(()), params):
        mask = mask | piece
    return mask


# ---------------------------------------------------------------- relaxation internals
def _offsets(s: Tensor, xs: list[Tensor], values: list[Tensor], lows: Sequence[Tensor] = (),
             highs: Sequence[Tensor] = ()) -> tuple[Tensor, Tensor]:
    """min and max of sigma(x) - s x over candidate points (and extra bounds), widened by rounding."""
    g = [v - s * x for x, v in zip(xs, values)]
    scale = torch.stack([v.abs() + (s * x).abs() for x, v in zip(xs, values)]).amax(0)
    widen = 4 * _EPS64 * (1.0 + scale)
    return torch.stack(g + list(lows)).amin(0) - widen, torch.stack(g + list(highs)).amax(0) + widen


def _smooth_candidates(key: str, l: Tensor, u: Tensor, width: Tensor,
                       dtype: torch.dtype) -> tuple[Tensor, list[Tensor], list[Tensor], list[Tensor]]:
    """Slope, candidate points and rigorous interior bounds for the parallel lines of a smooth kind."""
    tangent = width < _TINY_WIDTH
    chord = (smooth(key, u, 0) - smooth(key, l, 0)) / torch.where(tangent, 1.0, width)
    s = _as(torch.where(tangent, smooth(key, l + 0.5 * width, 1), chord), dtype)
    c = CRITICAL_POINT[key]
    if c is None:  # softplus: sigma' = sigmoid rises everywhere
        pieces = [(-math.inf, math.inf, True)]
    elif c == 0.0:  # sigmoid, tanh: sigma' rises then falls
        pieces = [(-math.inf, 0.0, True), (0.0, math.inf, False)]
    else:  # gelu, silu: falls, rises on (-c, c), falls
        pieces = [(-math.inf, -c, False), (-c, c, True), (c, math.inf, False)]
    xs, lows, highs = [l, u], [], []
    for start, end, rising in pieces:
        # On a piece sigma' is monotone, so g(x) = sigma(x) - s x is convex (rising) or concave, and
        # its interior extreme is where sigma' = s. Any x_hat in [p, q] gives, by the tangent line
        # of g at x_hat, min g >= g(x_hat) + min(f (p - x_hat), f (q - x_hat)) (convex; max: mirror)
        # with f = sigma'(x_hat) - s; `err` covers the error of the computed f and products.
        p, q = l.clamp(min=start).clamp(max=u), u.clamp(max=end).clamp(min=l)
        fp, fq = smooth(key, p, 1) - s, smooth(key, q, 1) - s
        x = torch.where((fp >= 0) == rising, p, q)  # no root: the extreme is at this end
        change = ((fp < 0) == rising) & ((fq > 0) == rising)
        if change.any():
            x[change] = _root(key, s[change], p[change], q[change], rising)
        f = smooth(key, x, 1) - s
        reach = torch.stack([f * (p - x), f * (q - x)])
        err = 8 * _EPS64 * ((1.0 + s.abs()) * (q - p) + reach.abs().amax(0))
        g = smooth(key, x, 0) - s * x
        xs += [p, q, x]
        if rising:
            lows.append(g + reach.amin(0) - err)
        else:
            highs.append(g + reach.amax(0) + err)
    return s, xs, lows, highs


def _root(key: str, s: Tensor, lo: Tensor, hi: Tensor, rising: bool) -> Tensor:
    """Approximate root of sigma'(x) = s on [lo, hi] where sigma' is monotone: bisection, then Newton.

    Only tightness depends on its accuracy; soundness comes from the tangent bound of the caller."""
    for _ in range(_BISECT_STEPS):
        mid = lo + 0.5 * (hi - lo)
        right = (smooth(key, mid, 1) < s) == rising
        lo, hi = torch.where(right, mid, lo), torch.where(right, hi, mid)
    x = lo + 0.5 * (hi - lo)
    for _ in range(_NEWTON_STEPS):  # safeguarded: a step leaving the bracket falls back to the middle
        f = smooth(key, x, 1) - s
        right = (f < 0) == rising
        lo, hi = torch.where(right, x, lo), torch.where(right, hi, x)
        step = x - f / smooth(key, x, 2)
        x = torch.where((step >= lo) & (step <= hi), step, lo + 0.5 * (hi - lo))
    return x


def _finish(lines: tuple[Tensor, Tensor, Tensor, Tensor], l: Tensor, u: Tensor,
            dtype: torch.dtype) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Cast lines to `dtype`: offsets outward, plus slack for evaluating s*h + b in `dtype`."""
    ls, lb, us, ub = lines
    reach, eps = torch.maximum(l.abs(), u.abs()), torch.finfo(dtype).eps
    lb = lb - 2 * eps * (lb.abs() + ls.abs() * reach)
    ub = ub + 2 * eps * (ub.abs() + us.abs() * reach)
    return ls.to(dtype), _round(lb, dtype, up=False), us.to(dtype), _round(ub, dtype, up=True)


def _stable_pieces(kind: str, l: Tensor, u: Tensor, a: Tensor,
                   params: Params) -> list[tuple[Tensor, Tensor | float, float]]:
    """(mask, slope, offset) where [l, u] lies in one linear piece: exact lines, infinities allowed."""
    if kind in _RELU_FAMILY:
        return [(u <= 0, a, 0.0), (l >= 0, 1.0, 0.0)]
    if kind == "clip":
        cmin, cmax = _clip_ends(params)
        return [((cmin <= l) & (u <= cmax), 1.0, 0.0), (u <= cmin, 0.0, cmin), (l >= cmax, 0.0, cmax)]
    if kind == "hard_swish":
        return [(u <= -3.0, 0.0, 0.0), (l >= 3.0, 1.0, 0.0)]
    return []
