"""Convex/concave elementary functions as relaxed unary nodes (method.md §3.8).

The kinds here are not activations found by `verifier.graph`: they are the pieces that
`verifier.bounds.network` decomposes Softmax, LayerNormalization, Div by a variable, Exp, Log,
Sqrt, Reciprocal and Pow into. On an interval where the function is convex the upper line is the
chord and the lower line the tangent parallel to it; a concave piece is the mirror image. Every
value is computed in float64 and widened by an explicit bound on its rounding error (as in
`relaxations.py`, which dispatches here); where an end is infinite, outside the domain, or where
the function is neither convex nor concave on the interval (odd powers across 0), the lines are
flat at the interval's ends.

Kinds: exp, log, sqrt, rsqrt (x^-1/2), reciprocal (1/x, either sign), square, power (exponent
`params["exponent"]`: an integer >= 2 on the whole line; any other real a != 0, 1 on x > 0, where x^a
is convex for a > 1 or a < 0 and concave for 0 < a < 1 — x^a of x < 0 is NaN for a non-integer a, so
such an end counts as 0 like sqrt's; a negative integer is bounded on x > 0 only, its interval across
or below 0 is unbounded).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

KINDS = frozenset({"exp", "log", "sqrt", "rsqrt", "reciprocal", "square", "power"})
_EPS64 = torch.finfo(torch.float64).eps
_TINY_WIDTH = 1e-9  # relative width below which the chord slope is replaced by the midpoint derivative
_ERROR = 16 * _EPS64  # relative error of one libm evaluation and a few products, generously

Params = Mapping[str, float | str] | None
Lines = tuple[Tensor, Tensor, Tensor, Tensor]  # lower slope, lower offset, upper slope, upper offset


def _exponent(params: Params) -> float:
    """The exponent: an int when it is an integer >= 2 (x^n on the whole line), else a float."""
    value = float((params or {}).get("exponent", 2))
    if not math.isfinite(value) or value in (0.0, 1.0):
        raise ValueError(f"power: a finite exponent other than 0 and 1 expected, got {value}")
    return int(value) if value == int(value) and value >= 2 else value


def _odd_integer(params: Params) -> bool:
    n = _exponent(params)
    return isinstance(n, int) and n % 2 == 1


def _even_integer(params: Params) -> bool:
    n = _exponent(params)
    return isinstance(n, int) and n % 2 == 0


def _real(params: Params) -> bool:
    """A power on x > 0 only: not an integer >= 2."""
    return not isinstance(_exponent(params), int)


def _negative_integer(params: Params) -> bool:
    a = _exponent(params)
    return _real(params) and a < 0 and a == int(a)


def function(kind: str, x: Tensor, params: Params = None) -> Tensor:
    """The function itself (torch formula in x's dtype)."""
    if kind == "exp":
        return torch.exp(x)
    if kind == "log":
        return torch.log(x)
    if kind == "sqrt":
        return torch.sqrt(x)
    if kind == "rsqrt":
        return torch.rsqrt(x)
    if kind == "reciprocal":
        return torch.reciprocal(x)
    if kind == "square":
        return x * x
    if kind == "power":
        return x ** _exponent(params)
    raise KeyError(kind)


def _derivative(kind: str, x: Tensor, params: Params) -> Tensor:
    if kind == "exp":
        return torch.exp(x)
    if kind == "log":
        return 1.0 / x
    if kind == "sqrt":
        return 0.5 / torch.sqrt(x)
    if kind == "rsqrt":
        return -0.5 * torch.rsqrt(x) / x
    if kind == "reciprocal":
        return -1.0 / (x * x)
    if kind == "square":
        return 2.0 * x
    n = _exponent(params)
    return n * x ** (n - 1)  # (a real n: on x > 0, the only domain its relaxation uses)


def _tangent_point(kind: str, s: Tensor, l: Tensor, u: Tensor, params: Params) -> Tensor:
    """Where f' equals the chord slope s (the tangent parallel to the chord), clamped to [l, u]."""
    with torch.no_grad():
        if kind == "exp":
            t = torch.log(s)
        elif kind == "log":
            t = 1.0 / s
        elif kind == "sqrt":
            t = 0.25 / (s * s)
        elif kind == "rsqrt":
            t = (-2.0 * s) ** (-2.0 / 3.0)
        elif kind == "reciprocal":
            t = torch.sign(l + u) * torch.sqrt(l * u)
        elif kind == "square":
            t = 0.5 * (l + u)
        elif _real(params):  # a t^(a-1) = s on t > 0
            a = _exponent(params)
            t = (s / a) ** (1.0 / (a - 1.0))
        else:
            n = _exponent(params)
            root = (s.abs() / n) ** (1.0 / (n - 1))
            t = root * (torch.sign(s) if n % 2 == 0 else torch.sign(l + u))
    t = torch.nan_to_num(t, nan=0.0)
    return torch.minimum(torch.maximum(t, l), u)


def default_position(kind: str, lower: Tensor, upper: Tensor, params: Params = None) -> Tensor:
    """Where in [l, u] (0..1) the default tangent line touches (0.5 where it is undefined or flat)."""
    l, u = lower.to(torch.float64), upper.to(torch.float64)
    valid, convex = _shape(kind, l, u, params)
    l, u = torch.where(valid, l, 1.0), torch.where(valid, u, 2.0)
    sign = torch.where(convex, 1.0, -1.0)
    width = u - l
    safe = torch.where(width > 0, width, 1.0)
    chord = sign * (function(kind, u, params) - function(kind, l, params)) / safe
    t = _tangent_point(kind, sign * chord, l, u, params)
    return torch.where(valid & (width > 0), (t - l) / safe, 0.5).clamp(0.0, 1.0)


def _shape(kind: str, l: Tensor, u: Tensor, params: Params) -> tuple[Tensor, Tensor]:
    """Masks (valid, convex): the interval is inside the domain with finite values; f is convex there
    (else concave where valid)."""
    finite = torch.isfinite(l) & torch.isfinite(u)
    if kind in ("log", "sqrt", "rsqrt"):
        valid = finite & (l > 0)
        convex = torch.full_like(valid, kind == "rsqrt")
    elif kind == "reciprocal":
        valid = finite & ((l > 0) | (u < 0))
        convex = l > 0
    elif kind == "power" and _real(params):
        a = _exponent(params)
        valid = finite & (l > 0)
        convex = torch.full_like(valid, a > 1 or a < 0)
    elif kind == "power" and _odd_integer(params):
        valid = finite & ((l >= 0) | (u <= 0))
        convex = l >= 0
    else:  # exp, square, even powers: convex everywhere
        valid = finite
        convex = torch.ones_like(finite)
    return valid, convex


def interval(kind: str, lower: Tensor, upper: Tensor, params: Params = None) -> tuple[Tensor, Tensor]:
    """Sound [min, max] of the function over [lower, upper] (float64, widened)."""
    l, u = lower.to(torch.float64), upper.to(torch.float64)
    if kind == "power" and _real(params):
        return _real_power_interval(l, u, params)
    if kind in ("log", "sqrt", "rsqrt"):  # the domain (0, inf) (sqrt: [0, inf)); outside it: undefined
        l = l.clamp_min(0.0)
    fl, fu = function(kind, l, params), function(kind, u, params)
    if kind in ("rsqrt", "reciprocal"):  # decreasing (reciprocal: on each side of 0)
        lo, hi = fu, fl
        if kind == "reciprocal":
            across = (l <= 0) & (u >= 0)
            lo, hi = torch.where(across, -math.inf, lo), torch.where(across, math.inf, hi)
    else:
        lo, hi = torch.minimum(fl, fu), torch.maximum(fl, fu)
        if kind == "square" or (kind == "power" and _even_integer(params)):
            lo = torch.where((l <= 0) & (u >= 0), torch.zeros_like(lo), lo)
    return _widened(lo, hi)


def _widened(lo: Tensor, hi: Tensor) -> tuple[Tensor, Tensor]:
    """[lo, hi] widened by the rounding bound; a NaN end (an undefined value) becomes unbounded."""
    # An overflowed end becomes the largest float (sound: a lower end of +inf means a value above it),
    # and the widening overflows an upper +inf (lower -inf) end back to infinity.
    lo = torch.nan_to_num(lo, nan=-math.inf)
    hi = torch.nan_to_num(hi, nan=math.inf)
    return lo - _ERROR * lo.abs(), hi + _ERROR * hi.abs()


def _real_power_interval(l: Tensor, u: Tensor, params: Params) -> tuple[Tensor, Tensor]:
    """x^a (a real, not an integer >= 2) is monotone on x > 0: increasing for a > 0, decreasing for
    a < 0. A non-integer a takes the domain [0, inf) (x < 0 gives NaN: those ends count as 0); a
    negative integer, defined on x < 0 too, is bounded only on intervals inside x > 0."""
    a = _exponent(params)
    if _negative_integer(params):
        inside = l > 0
        lo = torch.where(inside, function("power", u, params), -math.inf)
        hi = torch.where(inside, function("power", l, params), math.inf)
        return _widened(lo, hi)
    fl, fu = function("power", l.clamp_min(0.0), params), function("power", u.clamp_min(0.0), params)
    return _widened(*((fl, fu) if a > 0 else (fu, fl)))


def derivative_range(kind: str, lower: Tensor, upper: Tensor, params: Params = None) -> tuple[Tensor, Tensor]:
    """Sound range of f' over [lower, upper]: f' is monotone on every convex or concave piece."""
    l, u = lower.to(torch.float64), upper.to(torch.float64)
    if kind == "power" and _negative_integer(params):  # f'' has one sign on x > 0: f' is monotone there
        inside = l > 0
        dl, du = _derivative(kind, l, params), _derivative(kind, u, params)
        return _widened(torch.where(inside, torch.minimum(dl, du), -math.inf),
                        torch.where(inside, torch.maximum(dl, du), math.inf))
    if kind in ("log", "sqrt", "rsqrt") or (kind == "power" and _real(params)):
        l = l.clamp_min(0.0)
    dl, du = _derivative(kind, l, params), _derivative(kind, u, params)
    lo, hi = torch.minimum(dl, du), torch.maximum(dl, du)
    if kind == "reciprocal":
        across = (l <= 0) & (u >= 0)
        lo = torch.where(across, -math.inf, lo)
    if kind == "power" and _odd_integer(params):  # n x^(n-1) >= 0 with its minimum 0 at x = 0
        lo = torch.where((l < 0) & (u > 0), torch.zeros_like(lo), lo)
    return _widened(lo, hi)


def linear_relaxation(kind: str, lower: Tensor, upper: Tensor, params: Params = None,
                      position: Tensor | None = None) -> Lines:
    """Lines `a_lo x + b_lo <= f(x) <= a_hi x + b_hi` on [lower, upper] (float64), elementwise.

    `position` (broadcastable to the intervals, e.g. (N, K, *units) against (N, 1, *units)): the
    tangent line touches at `l + position (u - l)`, position clamped to [0, 1] (method eq. 3.8h);
    None: the tangent parallel to the chord. Any point of [l, u] gives a sound tangent.
    """
    l_raw, u_raw = torch.broadcast_tensors(lower.to(torch.float64), upper.to(torch.float64))
    if position is not None:
        position = position.to(torch.float64).clamp(0.0, 1.0)
        l_raw, u_raw, position = torch.broadcast_tensors(l_raw, u_raw, position)
    valid, convex = _shape(kind, l_raw, u_raw, params)
    # Work on a placeholder interval where invalid, then replace those units by flat lines.
    l, u = torch.where(valid, l_raw, 1.0), torch.where(valid, u_raw, 2.0)
    sign = torch.where(convex, 1.0, -1.0)  # h = sign * f is convex on [l, u]

    def h(x: Tensor) -> Tensor:
        return sign * function(kind, x, params)

    def dh(x: Tensor) -> Tensor:
        return sign * _derivative(kind, x, params)

    width = u - l
    tiny = width <= _TINY_WIDTH * (1.0 + torch.maximum(l.abs(), u.abs()))
    middle = l + 0.5 * width
    chord = (h(u) - h(l)) / torch.where(tiny, 1.0, width)
    s = torch.where(tiny, dh(middle), chord)
    # Upper line of convex h: slope s, offset max over the ends of h(x) - s x (h - s x is convex).
    ends = torch.stack([h(l) - s * l, h(u) - s * u])
    scale = torch.stack([h(l).abs() + (s * l).abs(), h(u).abs() + (s * u).abs()]).amax(0)
    upper_offset = ends.amax(0) + _ERROR * (1.0 + scale)
    # Lower line: the tangent at t (slope exactly s' = h'(t) as computed). By convexity
    # h(x) - s' x >= g(t) + (h'(t) - s')(x - t) for the true h'(t); its computed value differs from
    # s' by the derivative's rounding error, covered by `_ERROR * |h'(t)| * width`.
    t = _tangent_point(kind, sign * s, l, u, params) if position is None else l + position * width
    t = torch.where(tiny, middle, torch.minimum(torch.maximum(t, l), u))
    slope_t = dh(t)
    g_t = h(t) - slope_t * t
    lower_offset = g_t - _ERROR * (1.0 + h(t).abs() + (slope_t * t).abs() + slope_t.abs() * width)
    # Back to f = sign * h: a concave f swaps the roles of the two lines.
    lower = (torch.where(convex, slope_t, -s), torch.where(convex, lower_offset, -upper_offset))
    upper = (torch.where(convex, s, -slope_t), torch.where(convex, upper_offset, -lower_offset))
    lo_val, hi_val = interval(kind, l_raw, u_raw, params)
    return (*_or_flat(lower, lo_val, valid), *_or_flat(upper, hi_val, valid))


def _or_flat(line: tuple[Tensor, Tensor], value: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """The line where it is valid and finite, else slope 0 at the interval end `value`."""
    keep = valid & torch.isfinite(line[0]) & torch.isfinite(line[1])
    return torch.where(keep, line[0], 0.0), torch.where(keep, line[1], value)
