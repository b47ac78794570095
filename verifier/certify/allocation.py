"""Spending a transport budget across samples: fractional knapsacks (method §4, §5).

`fractional_knapsack` maximises `sum_i f_i v_i` subject to `sum_i f_i c_i <= capacity`,
`0 <= f_i <= 1`: take items by decreasing value per cost, the last one fractionally (optimal for
the LP relaxation, which is the problem itself). `flip_allocation` is the §4 special case: flip
correctly classified samples cheapest first, with cost `d_i^p` per whole sample (mass 1/N),
capacity `N delta^p`; for p = inf exactly the samples with `d_i <= delta` flip.
`verifier.certify.accuracy.flippable_mass` is `flip_allocation(...).sum() / N` with certified radii.

`allocate` is the multiple-choice knapsack. Each sample i (mass 1/N) has candidates k with a cost
`t_ik = ||x_ik - x_i||^p` and a gain `G_ik = loss(x_ik) - loss(x_i)`; candidate 0 is the sample
itself (cost 0, gain 0). Splitting a sample's mass between candidates, the best mean gain for a
mean cost `<= budget` (`delta^p`) is reached on each sample's upper concave hull in `t`, taking
hull segments in order of decreasing slope across all samples (a fractional knapsack on the
segments). The result puts every sample's mass on at most two candidates, so the distribution is
explicit and replayable.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def fractional_knapsack(costs: torch.Tensor, values: torch.Tensor, capacity: float) -> torch.Tensor:
    """Optimal fractions f (float64, same shape) of items with non-negative costs (inf allowed)."""
    costs = costs.to(torch.float64)
    values = values.to(torch.float64)
    fractions = torch.zeros_like(costs)
    useful = (values > 0) & torch.isfinite(costs)
    free = useful & (costs <= 0)
    fractions[free] = 1.0
    paid = (useful & ~free).nonzero().squeeze(-1)
    if len(paid) == 0 or capacity <= 0:
        return fractions
    ratio = values[paid] / costs[paid]
    order = paid[torch.sort(-ratio, stable=True).indices]
    ordered = costs[order]
    spent_before = torch.cumsum(ordered, 0) - ordered
    fractions[order] = ((capacity - spent_before) / ordered).clamp(0.0, 1.0)
    return fractions


def flip_allocation(distances: torch.Tensor, correct: torch.Tensor, delta: float, p: float) -> torch.Tensor:
    """Fraction alpha_i of each sample's mass moved to its flip point (0 for misclassified samples)."""
    distances = distances.to(torch.float64)
    eligible = correct & torch.isfinite(distances)
    if math.isinf(p):
        return (eligible & (distances <= delta)).to(torch.float64)
    costs = torch.where(eligible, distances.clamp_min(0.0) ** p, torch.full_like(distances, math.inf))
    return fractional_knapsack(costs, eligible.to(torch.float64), len(distances) * delta**p)


@dataclass(frozen=True)
class Allocation:
    """Per sample: mass `1 - weight` on candidate `low`, `weight` on candidate `high`."""

    low: torch.Tensor  # (N,) long
    high: torch.Tensor  # (N,) long
    weight: torch.Tensor  # (N,) float64 in [0, 1]
    gain: float  # mean gain of the allocation
    cost: float  # mean cost, <= budget


def upper_hull(costs: list[float], gains: list[float]) -> list[int]:
    """Indices of the upper concave hull from candidate 0, strictly increasing cost and slope-decreasing.

    Only the rising part is kept: a candidate that gains no more than a cheaper one is never worth it.
    A free candidate (cost 0) that gains more than candidate 0 replaces it as the first vertex.
    """
    order = sorted(range(len(costs)), key=lambda k: (costs[k], -gains[k]))
    hull = [0]
    for k in order:
        if gains[k] <= gains[hull[-1]]:
            continue
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies on or below the chord a -> k: drop it (keeps slopes strictly decreasing).
            if (gains[b] - gains[a]) * (costs[k] - costs[a]) <= (gains[k] - gains[a]) * (costs[b] - costs[a]):
                hull.pop()
            else:
                break
        if costs[k] <= costs[hull[-1]]:  # as cheap as the last vertex and higher: it replaces it
            hull.pop()
        hull.append(k)
    return hull


def allocate(costs: torch.Tensor, gains: torch.Tensor, budget: float) -> Allocation:
    """The optimal split of a mean-cost `budget` over candidates (N, K); column 0 is the sample itself."""
    count = costs.shape[0]
    cost_rows, gain_rows = costs.double().tolist(), gains.double().tolist()
    segments = []  # (slope, sample, from vertex, to vertex, cost per unit of mass)
    start = torch.zeros(count, dtype=torch.long)  # each sample's first hull vertex (free)
    for i in range(count):
        hull = upper_hull(cost_rows[i], gain_rows[i])
        start[i] = hull[0]
        previous = float("inf")
        for position, (a, b) in enumerate(zip(hull, hull[1:])):
            rise, run = gain_rows[i][b] - gain_rows[i][a], cost_rows[i][b] - cost_rows[i][a]
            # Rounding can make nearly collinear slopes rise again: keep them non-increasing so a
            # sample's segments are always taken in hull order (the greedy's prefix property).
            previous = min(previous, rise / run)
            segments.append((previous, i, a, b, run, position))
    segments.sort(key=lambda s: (-s[0], s[1], s[5]))
    low, high = start.clone(), start.clone()
    weight = torch.zeros(count, dtype=torch.float64)
    left = budget * count  # budget in units of whole-sample cost
    for _, i, a, b, run, _ in segments:
        if run > left:  # the last, partly affordable segment: the budget ends inside it
            if left > 0:
                low[i], high[i], weight[i] = a, b, left / run
            break
        low[i], high[i] = b, b
        left -= run
    rows = torch.arange(count)
    chosen_cost = (1 - weight) * costs.double()[rows, low] + weight * costs.double()[rows, high]
    chosen_gain = (1 - weight) * gains.double()[rows, low] + weight * gains.double()[rows, high]
    return Allocation(low=low, high=high, weight=weight, gain=float(chosen_gain.mean()),
                      cost=float(chosen_cost.mean()))
