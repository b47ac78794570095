"""Fractional knapsacks: how an adversary spends a `W_p` budget `delta^p` (method §4, §5).

`fractional_knapsack` maximises `sum_i f_i v_i` subject to `sum_i f_i c_i <= capacity`,
`0 <= f_i <= 1`: take items by decreasing value per cost, the last one fractionally (optimal for
the LP relaxation, which is the problem itself). `flip_allocation` is the §4 special case: flip
correctly classified samples cheapest first, with cost `d_i^p` per whole sample (mass 1/N),
capacity `N delta^p`; for p = inf exactly the samples with `d_i <= delta` flip.
`verifier.certify.accuracy.flippable_mass` is `flip_allocation(...).sum() / N` with certified radii.
"""

from __future__ import annotations

import math

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
