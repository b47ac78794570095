"""Threat norms and linear objectives over the input set `B_r(x0, s) ∩ box` (method §3.2).

Two exact, batched primitives every later stage uses:
- `max_linear(g, lo, hi, s, norm)` = `max { g·d : lo <= d <= hi, ||d||_r <= s }`;
- `radius_to_reach(g, lo, hi, t, norm)` = the smallest `s` with `max_linear(g, lo, hi, s) >= t`.
`d` is the displacement from the sample (`lo <= 0 <= hi` is the box shifted by `-x0`; use ±inf
without a box). Closed form for r=inf, greedy for r=1, water-filling for r=2 — each solved
exactly by sorting the coordinates' breakpoints, so no bisection error enters a bound.
All tensors broadcast over leading axes; the last axis is the flattened input.
"""

from __future__ import annotations

import math

import torch

from verifier.errors import UsageError

NORMS = ("inf", "2", "1")
_ALIASES = {"inf": "inf", "linf": "inf", "l_inf": "inf", "2": "2", "l2": "2", "1": "1", "l1": "1",
            "2.0": "2", "1.0": "1", str(math.inf): "inf"}


def parse_norm(value: str | float | int) -> str:
    """Normalise a user's threat-norm spelling to one of `NORMS`."""
    key = str(value).strip().lower()
    if key not in _ALIASES:
        raise UsageError(f"unknown norm {value!r}; choose one of inf, 2, 1")
    return _ALIASES[key]


def vector_norm(v: torch.Tensor, norm: str) -> torch.Tensor:
    """`||v||_r` over the last axis."""
    order = {"inf": math.inf, "2": 2.0, "1": 1.0}[norm]
    return torch.linalg.vector_norm(v, ord=order, dim=-1)


def dual_norm(v: torch.Tensor, norm: str) -> torch.Tensor:
    """`||v||_*`, the dual of the threat norm r, over the last axis."""
    return vector_norm(v, {"inf": "1", "2": "2", "1": "inf"}[norm])


def _broadcast(g: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, per_row: torch.Tensor):
    """Broadcast coefficient rows, box ends and one value per row to a common batch shape."""
    lo, hi = torch.as_tensor(lo, dtype=g.dtype), torch.as_tensor(hi, dtype=g.dtype)
    shape = torch.broadcast_shapes(g.shape[:-1], lo.shape[:-1], hi.shape[:-1], per_row.shape)
    size = g.shape[-1]
    return (g.expand(*shape, size), lo.expand(*shape, size), hi.expand(*shape, size),
            per_row.expand(shape))


def _room(g: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
    """How far each coordinate can move in the direction that increases g·d (0 where g = 0)."""
    lo, hi = torch.broadcast_to(lo, g.shape), torch.broadcast_to(hi, g.shape)
    room = torch.where(g > 0, hi, -lo).clamp_min(0.0)
    return torch.where(g != 0, room, torch.zeros_like(room))


def _before(values: torch.Tensor) -> torch.Tensor:
    """Exclusive prefix sums along the last axis (no inf - inf)."""
    return torch.cat([torch.zeros_like(values[..., :1]), torch.cumsum(values, -1)[..., :-1]], -1)


def _from(values: torch.Tensor) -> torch.Tensor:
    """Inclusive suffix sums along the last axis."""
    return torch.flip(torch.cumsum(torch.flip(values, [-1]), -1), [-1])


def _gather(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    return values.gather(-1, index.unsqueeze(-1)).squeeze(-1)


def _segments(g: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, norm: str):
    """Sort coordinates into the order in which they saturate as the radius grows.

    Returns per segment m (radius between event m-1 and event m): the gain and the squared/linear
    radius already spent by saturated coordinates, the rate of the free ones, and the radius and
    value reached at event m. Segment formulas (method §3.2):
    inf: V = gain + s * rate;  1: V = gain + (s - spent) * rate;  2: V = gain + t * rate with
    s² = spent + t² * rate.
    """
    size, room = g.abs(), _room(g, lo, hi)
    if norm == "inf":
        key = room
    elif norm == "1":
        key = -size
    else:
        key = torch.where(size > 0, room / size, torch.full_like(size, math.inf))
    order = torch.argsort(key, dim=-1, stable=True)
    size, room, key = size.gather(-1, order), room.gather(-1, order), key.gather(-1, order)
    gain_item = torch.where(size > 0, size * room, torch.zeros_like(size))
    gain = _before(gain_item)
    if norm == "inf":
        rate = _from(size)
        spent = torch.zeros_like(size)
        event_radius = room
        event_value = torch.where(torch.isinf(room), torch.full_like(room, math.inf),
                                  gain + gain_item + room * (rate - size))
    elif norm == "1":
        rate = size
        spent = _before(room)
        event_radius = spent + room
        event_value = gain + gain_item
    else:
        rate = _from(size**2)
        spent = _before(torch.where(size > 0, room**2, torch.zeros_like(room)))
        rest = rate - size**2
        finite = torch.where(torch.isfinite(key), key, torch.zeros_like(key))
        event_radius = torch.where(torch.isfinite(key), torch.sqrt(spent + room**2 + finite**2 * rest),
                                   torch.full_like(key, math.inf))
        event_value = torch.where(torch.isfinite(key), gain + gain_item + finite * rest,
                                  torch.full_like(key, math.inf))
        # Coordinates with g_k = 0 never move (sorted last): their events are never "reached".
        inactive = size == 0
        event_radius = torch.where(inactive, torch.full_like(event_radius, -math.inf), event_radius)
        event_value = torch.where(inactive, torch.full_like(event_value, -math.inf), event_value)
    total = gain_item.sum(-1)
    return gain, spent, rate, event_radius, event_value, total


def _locate(g: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, per_row: torch.Tensor | float, norm: str,
            by_value: bool):
    """The segment where a radius (or, with `by_value`, a target value) falls, per row.

    Returns the broadcast per-row input, whether any event reaches it, the segment's gain,
    spent radius and rate, and the total gain of the whole box.
    """
    per_row = torch.as_tensor(per_row, dtype=g.dtype, device=g.device)
    # The segments do not depend on the radius or target: sorted once for the rows of g, lo and hi,
    # then looked up for every value of `per_row` broadcast against them (e.g. a grid of radii).
    lo, hi = torch.as_tensor(lo, dtype=g.dtype), torch.as_tensor(hi, dtype=g.dtype)
    rows = torch.broadcast_shapes(g.shape[:-1], lo.shape[:-1], hi.shape[:-1])
    size = g.shape[-1]
    segments = _segments(g.expand(*rows, size), lo.expand(*rows, size), hi.expand(*rows, size), norm)
    shape = torch.broadcast_shapes(rows, per_row.shape)
    gain, spent, rate, event_radius, event_value = (part.expand(*shape, size) for part in segments[:5])
    total = segments[5].expand(shape)
    per_row = per_row.expand(shape)
    reached = (event_value if by_value else event_radius) >= per_row.unsqueeze(-1)
    m = reached.to(torch.int8).argmax(-1)
    return per_row, reached.any(-1), _gather(gain, m), _gather(spent, m), _gather(rate, m), total


def _max_linear_inf(g: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, radius: torch.Tensor | float) -> torch.Tensor:
    """r = inf: `sum_k g_k+ min(hi_k, s) + g_k- min(-lo_k, s)`; one matrix product per side when the box
    and radius are shared by the rows of g (the bound propagation's case), else elementwise."""
    radius = torch.as_tensor(radius, dtype=g.dtype, device=g.device)
    lo, hi = torch.as_tensor(lo, dtype=g.dtype), torch.as_tensor(hi, dtype=g.dtype)
    up = torch.minimum(hi, radius.unsqueeze(-1)).clamp_min(0.0)  # how far each coordinate can rise
    down = torch.minimum(-lo, radius.unsqueeze(-1)).clamp_min(0.0)
    shared = g.dim() >= 2 and up.dim() == g.dim() and down.dim() == g.dim() and up.shape[-2] == 1 == down.shape[-2]
    if shared and bool(torch.isfinite(up).all() and torch.isfinite(down).all()):
        rise = torch.matmul(g.clamp_min(0.0), up.transpose(-1, -2)) + torch.matmul((-g).clamp_min(0.0),
                                                                                   down.transpose(-1, -2))
        return rise.squeeze(-1)
    g, lo, hi, radius = _broadcast(g, lo, hi, radius)
    reach = torch.minimum(_room(g, lo, hi), radius.unsqueeze(-1))
    return torch.where(g != 0, g.abs() * reach, torch.zeros_like(g)).sum(-1)


def max_linear(g: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, radius: torch.Tensor | float,
               norm: str) -> torch.Tensor:
    """Exact `max g·d` over `lo <= d <= hi`, `||d||_r <= radius` (radius broadcast over g[..., 0])."""
    if norm == "inf":  # the coordinates are independent: no sort needed
        return _max_linear_inf(g, lo, hi, radius)
    radius, found, gain_m, spent_m, rate_m, total = _locate(g, lo, hi, radius, norm, by_value=False)
    if norm == "1":
        value = gain_m + (radius - spent_m) * rate_m
    else:
        safe_rate = rate_m.clamp_min(torch.finfo(g.dtype).tiny)
        value = gain_m + torch.sqrt((radius**2 - spent_m).clamp_min(0.0) / safe_rate) * rate_m
    return torch.where(found, value, total)


def radius_to_reach(g: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, target: torch.Tensor | float,
                    norm: str) -> torch.Tensor:
    """Smallest `s` with `max_linear(g, lo, hi, s) >= target`: 0 if target <= 0, inf if unreachable.

    Rounded towards zero, so the result is a sound lower bound on a distance.
    """
    target, found, gain_m, spent_m, rate_m, _ = _locate(g, lo, hi, target, norm, by_value=True)
    safe_rate = rate_m.clamp_min(torch.finfo(g.dtype).tiny)
    needed = (target - gain_m).clamp_min(0.0)
    if norm == "inf":
        radius = needed / safe_rate
    elif norm == "1":
        radius = spent_m + needed / safe_rate
    else:
        t = needed / safe_rate
        radius = torch.sqrt(spent_m + t**2 * rate_m)
    radius = torch.where(found, radius, torch.full_like(radius, math.inf))
    radius = torch.where(target <= 0, torch.zeros_like(radius), radius)
    return radius * (1.0 - 1e-12)


def argmax_linear(g: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, radius: torch.Tensor | float,
                  norm: str) -> torch.Tensor:
    """A maximiser `d` of `max_linear` (same shape as the broadcast g): the point that realises it."""
    radius, found, _, spent_m, rate_m, _ = _locate(g, lo, hi, radius, norm, by_value=False)
    g, lo, hi, _ = _broadcast(g, lo, hi, radius)
    direction, room = torch.sign(g), _room(g, lo, hi)
    reach = radius.unsqueeze(-1)
    if norm == "inf":
        amount = torch.minimum(room, reach)
    elif norm == "1":
        # Greedy: the largest |g_k| first, each coordinate up to its room, until the radius is spent.
        order = torch.argsort(-g.abs(), dim=-1, stable=True)
        room_sorted = room.gather(-1, order)
        before = _before(room_sorted)
        sorted_amount = torch.minimum(room_sorted, (reach - before).clamp_min(0.0))
        amount = torch.zeros_like(g).scatter(-1, order, sorted_amount)
    else:
        # Water-filling: free coordinates move t * |g_k|, saturated ones sit at their room.
        safe_rate = rate_m.clamp_min(torch.finfo(g.dtype).tiny)
        t = torch.sqrt((radius**2 - spent_m).clamp_min(0.0) / safe_rate)
        t = torch.where(found, t, torch.full_like(t, math.inf))
        amount = torch.minimum(room, t.unsqueeze(-1) * g.abs())
    amount = torch.where(g != 0, amount, torch.zeros_like(amount))
    return direction * amount


def max_linear_rate(g: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, radius: torch.Tensor | float,
                    norm: str) -> torch.Tensor:
    """A supergradient of the concave `s -> max_linear(g, lo, hi, s)` at `radius` (its left derivative).

    Concavity makes `max_linear(s') <= max_linear(s) + rate * (s' - s)` for every `s' >= s`.
    """
    radius, found, _, spent_m, rate_m, _ = _locate(g, lo, hi, radius, norm, by_value=False)
    if norm == "2":
        # d/ds of gain + sqrt((s^2 - spent) / rate) * rate = s * sqrt(rate / (s^2 - spent)).
        free = (radius**2 - spent_m).clamp_min(0.0)
        rate_m = torch.where(free > 0, radius * torch.sqrt(rate_m / free.clamp_min(torch.finfo(g.dtype).tiny)),
                             torch.full_like(free, math.inf))
    return torch.where(found, rate_m, torch.zeros_like(rate_m))
