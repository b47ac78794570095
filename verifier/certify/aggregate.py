"""From per-sample upper growth functions to an upper bound on the robust risk (method §2).

Each sample i has upper values `gbar[i, k] >= g_i(s_k)` on a shared radius grid
`0 = s_0 < s_1 < … < s_K`, slope bounds `slope[i, k] >= sup ||grad loss||_*` on `B(x_i, s_k) ∩ X`,
a reach `D_i` (the box's farthest point, inf without a box) and, past the grid, a bound
`tail[i] >= sup_X loss - loss(x_i)` and a slope `tail_slope[i]` valid on all of X (the global
Lipschitz constant), both possibly inf. Then
- `p = inf`: `Phi(delta) <= mean_i gbar_i(s_k)` with `s_k` the first grid radius `>= delta`;
- `p < inf`: `Phi(delta) <= lambda delta^p + mean_i sup_{rho <= D_i} (ubar_i(rho) - lambda rho^p)` for
  any `lambda >= 0`, where on `[s_{k-1}, s_k]`
  `ubar_i(rho) = min(gbar_i(s_k), gbar_i(s_{k-1}) + slope_i(s_k) (rho - s_{k-1}))`; every piece minus
  `lambda rho^p` is concave, so its maximum is found exactly among a few candidates. Weak duality
  makes every `lambda` sound; a golden-section search in `log lambda` picks a good one.
With `groups = J > 1` each sample has J rows (e.g. one per wrong class of the margin loss) and
its growth is the maximum over its rows: the sup of a maximum is the maximum of the sups, so
each row's pieces stay concave and the inner sup stays exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


@dataclass(frozen=True)
class GrowthCurves:
    """Upper growth values and slopes of N samples (N * groups rows) on one radius grid (float64)."""

    radii: torch.Tensor  # (K+1,), radii[0] == 0
    values: torch.Tensor  # (R, K+1), R = N * groups; a sample's maximum row is 0 at radius 0; non-decreasing
    slopes: torch.Tensor  # (R, K+1), slope bound on the ball of each radius (may be inf)
    reach: torch.Tensor  # (R,), D_i
    tail: torch.Tensor  # (R,), bound on the growth anywhere (may be inf)
    tail_slope: torch.Tensor  # (R,), slope bound valid on all of X (may be inf)
    groups: int = 1  # rows per sample, consecutive

    def per_sample(self, rows: torch.Tensor) -> torch.Tensor:
        """The maximum over each sample's rows (N,)."""
        return rows.reshape(-1, self.groups).max(1).values

    def __post_init__(self) -> None:
        if float(self.radii[0]) != 0.0 or bool((self.radii[1:] <= self.radii[:-1]).any()):
            raise ValueError("the radius grid must start at 0 and increase")

    def at(self, radius: float) -> torch.Tensor:
        """Sound `gbar_i(radius)`: the value at the first grid radius >= radius (N,)."""
        index = int(torch.searchsorted(self.radii, torch.tensor(radius, dtype=self.radii.dtype)))
        if index < len(self.radii):
            return self.per_sample(self.values[:, index])
        last = self.values[:, -1]
        extended = torch.minimum(self.tail, last + _times(self.tail_slope, radius - float(self.radii[-1])))
        return self.per_sample(torch.where(self.reach <= self.radii[-1], last, torch.maximum(extended, last)))


def _times(slope: torch.Tensor, length: float | torch.Tensor) -> torch.Tensor:
    """slope * length with 0 * inf = 0."""
    product = slope * length
    return torch.where(torch.as_tensor(length) == 0, torch.zeros_like(product), product)


def grid(delta_max: float, count: int = 48, first: float | None = None) -> torch.Tensor:
    """A geometric radius grid from `first` (default delta_max/100) to `delta_max`, with 0 prepended."""
    first = first if first is not None else delta_max / 100.0
    return torch.cat([torch.zeros(1, dtype=torch.float64),
                      torch.logspace(math.log10(first), math.log10(delta_max), count, dtype=torch.float64)])


def _segments(curves: GrowthCurves):
    """(start, end, left, right, slope) of every piece, the tail piece [s_K, D_i] last (N, K+1)."""
    n = curves.values.shape[0]
    start = torch.cat([curves.radii[:-1], curves.radii[-1:]]).expand(n, -1)
    end = torch.cat([curves.radii[1:].expand(n, -1), curves.reach.unsqueeze(1)], 1)
    end = torch.minimum(end, curves.reach.unsqueeze(1))
    left = torch.cat([curves.values[:, :-1], curves.values[:, -1:]], 1)
    right = torch.cat([curves.values[:, 1:], torch.maximum(curves.tail, curves.values[:, -1]).unsqueeze(1)], 1)
    slope = torch.cat([curves.slopes[:, 1:], curves.tail_slope.unsqueeze(1)], 1)
    return start, end, left, right, slope


def inner_sup(curves: GrowthCurves, lam: float, p: float) -> torch.Tensor:
    """`sup_{0 <= rho <= D_i} (ubar_i(rho) - lam rho^p)` for every sample (N,), exactly (may be inf)."""
    return curves.per_sample(_piece_sups(curves, lam, p).max(1).values).clamp_min(0.0)  # rho = 0 gives 0


def used_points(curves: GrowthCurves, delta: float, p: float, lam: float) -> torch.Tensor:
    """Grid points (N, K+1) whose values decide each sample's term of the bound at this `lam`.

    `p = inf`: the first grid radius `>= delta`. Otherwise the piece that attains the sample's
    inner sup (its row with the largest sup): both ends of it, or the last point for the tail
    piece; nothing where the sup is 0 (no move pays).
    """
    count, points = curves.values.shape[0] // curves.groups, len(curves.radii)
    used = torch.zeros(count, points, dtype=torch.bool)
    if math.isinf(p):
        index = min(int(torch.searchsorted(curves.radii, torch.tensor(delta, dtype=curves.radii.dtype))), points - 1)
        used[:, index] = True
        return used
    piece = decisive_piece(curves, lam, p)
    pays = piece >= 0
    samples = torch.arange(count)
    used[samples[pays], piece[pays].clamp_max(points - 1)] = True
    right = pays & (piece < points - 1)
    used[samples[right], piece[right] + 1] = True
    return used


def decisive_piece(curves: GrowthCurves, lam: float, p: float) -> torch.Tensor:
    """The piece (N,) on which each sample's inner sup is attained at `lam` (its row with the
    largest sup; the tail piece is index K), -1 where the sup is 0 (no move pays)."""
    count = curves.values.shape[0] // curves.groups
    best, piece = _piece_sups(curves, lam, p).max(1)
    row = best.reshape(count, curves.groups).argmax(1)
    value = best.reshape(count, curves.groups).gather(1, row[:, None]).squeeze(1)
    piece = piece.reshape(count, curves.groups).gather(1, row[:, None]).squeeze(1)
    return torch.where(value > 0, piece, torch.full_like(piece, -1))


def row_sups(curves: GrowthCurves, lam: float, p: float, first: torch.Tensor, stop: torch.Tensor) -> torch.Tensor:
    """`sup (ubar(rho) - lam rho^p)` of every row (R,) over the pieces `first[i] <= m < stop[i]` of its
    sample (pieces m < K cover [s_m, s_(m+1)], piece K the tail); -inf where there are none."""
    sups = _piece_sups(curves, lam, p)
    index = torch.arange(sups.shape[1])[None, :]
    keep = (index >= first.repeat_interleave(curves.groups)[:, None]) & \
        (index < stop.repeat_interleave(curves.groups)[:, None])
    return sups.masked_fill(~keep, -math.inf).max(1).values


@dataclass(frozen=True)
class PenalisedBound:
    """`sup_{rho <= radii[first_i]} (g_i(rho) - lam rho^p) <= value_i` per sample (method §8; from a
    penalised MILP); `first_i = 0` (value -inf) where no such bound was computed, `first_i = K+1`
    where it covers every radius (the whole box)."""

    lam: float
    first: torch.Tensor  # (N,) long: a grid index, or K+1
    value: torch.Tensor  # (N,)


def sample_piece_sups(curves: GrowthCurves, lam: float, p: float) -> torch.Tensor:
    """`sup (ubar_i(rho) - lam rho^p)` of every sample on every piece (N, K+1; the max over its rows)."""
    sups = _piece_sups(curves, lam, p)
    return sups.reshape(-1, curves.groups, sups.shape[1]).max(1).values


def beyond_penalised(bound: PenalisedBound, families: list[GrowthCurves], p: float) -> torch.Tensor:
    """Each sample's inner sup at `bound.lam` over the pieces from `radii[first_i]` on (N,): the least
    over the `families` (all valid upper curves); -inf where `first_i` is past the tail piece."""
    sups = [sample_piece_sups(f, bound.lam, p) for f in families]
    early = torch.arange(sups[0].shape[1])[None, :] < bound.first[:, None]
    return torch.stack([s.masked_fill(early, -math.inf).max(1).values for s in sups]).min(0).values


def penalised_excess(bound: PenalisedBound, families: list[GrowthCurves], delta: float, p: float) -> float:
    """Weak duality at `bound.lam`, each inner sup split at `radii[first_i]`: below it the penalised
    bound, beyond it the curves' pieces."""
    beyond = beyond_penalised(bound, families, p)
    return bound.lam * delta**p + float(torch.maximum(bound.value, beyond).clamp_min(0.0).mean())


def _piece_sups(curves: GrowthCurves, lam: float, p: float) -> torch.Tensor:
    """`sup (ubar(rho) - lam rho^p)` on every piece of every row (R, K+1; -inf on empty pieces).

    On a piece, `ubar(rho) = min(right, left + slope (rho - start))`; minus `lam rho^p` it is
    concave, so the maximum is at the start, the end, the kink, or the stationary point.
    """
    start, end, left, right, slope = _segments(curves)
    usable = start < end
    finite_slope = torch.isfinite(slope)
    kink = torch.where(finite_slope & (slope > 0), start + (right - left) / slope.clamp_min(1e-300),
                       torch.where(finite_slope, torch.full_like(left, math.inf), start))
    candidates = [start, torch.minimum(torch.maximum(kink, start), end)]
    if lam > 0 and p > 1:
        stationary = (torch.where(finite_slope, slope, torch.zeros_like(slope)) / (lam * p)).clamp_min(0)
        stationary = stationary ** (1.0 / (p - 1.0))
        candidates.append(torch.minimum(torch.maximum(stationary, start), torch.minimum(kink, end)))
    candidates.append(end)
    best = torch.full_like(left, -math.inf)
    for rho in candidates:
        finite = torch.isfinite(rho)
        safe = torch.where(finite, rho, start)
        rise = torch.where(finite_slope, left + _times(slope, safe - start), torch.full_like(left, math.inf))
        rise = torch.where(safe == start, torch.where(finite_slope, left, right), rise)
        value = torch.minimum(right, rise) - lam * safe**p
        best = torch.maximum(best, torch.where(finite, value, best))
    # Unbounded pieces: an infinite end with growth that outruns lam rho^p.
    outruns = (right == math.inf) & (slope > (lam if p == 1 else 0.0)) & ((lam == 0) | (p == 1))
    best = torch.where(usable & torch.isinf(end) & outruns, torch.full_like(best, math.inf), best)
    return torch.where(usable, best, torch.full_like(best, -math.inf))


def dual_value(curves: GrowthCurves, delta: float, p: float, lam: float) -> float:
    """`lam delta^p + mean_i inner_sup_i(lam)`: an upper bound on Phi(delta) for any lam >= 0."""
    return lam * delta**p + float(inner_sup(curves, lam, p).mean())


def excess_bound(curves: GrowthCurves, delta: float, p: float, iterations: int = 80) -> tuple[float, float]:
    """Upper bound on Phi(delta) (the excess over the clean risk) and the lambda that gave it."""
    if delta < 0:
        raise ValueError("delta must be >= 0")
    if delta == 0:
        return 0.0, math.inf
    if math.isinf(p):
        return float(curves.at(delta).mean()), math.inf
    best_value, best_lam = dual_value(curves, delta, p, 0.0), 0.0
    value, lam = golden_minimum(lambda lam: dual_value(curves, delta, p, lam), math.log(1e-12), math.log(1e12),
                                iterations)
    return (value, lam) if value < best_value else (best_value, best_lam)


def golden_minimum(value: Callable[[float], float], low: float, high: float, iterations: int) -> tuple[float, float]:
    """Golden-section search of `value(lam)` over `log lam` in `[low, high]`: the least value seen and its lam."""
    a, b = high - _GOLDEN * (high - low), low + _GOLDEN * (high - low)
    value_a, value_b = value(math.exp(a)), value(math.exp(b))
    best_value, best_lam = min((value_a, math.exp(a)), (value_b, math.exp(b)))
    for _ in range(iterations):
        if value_a < value_b:
            high, b, value_b = b, a, value_a
            a = high - _GOLDEN * (high - low)
            value_a = value(math.exp(a))
            point, seen = a, value_a
        else:
            low, a, value_a = a, b, value_b
            b = low + _GOLDEN * (high - low)
            value_b = value(math.exp(b))
            point, seen = b, value_b
        if seen < best_value:
            best_value, best_lam = seen, math.exp(point)
    return best_value, best_lam


def linear_closed_form(slopes: torch.Tensor, delta: float, p: float) -> float:
    """`delta * ||L||` for a linear upper growth `L_i rho` valid up to each sample's reach (§2)."""
    if math.isinf(p):
        return delta * float(slopes.mean())
    if p == 1:
        return delta * float(slopes.max())
    q = p / (p - 1.0)
    return delta * float((slopes**q).mean() ** (1.0 / q))
