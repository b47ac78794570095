"""Certified distributional robust accuracy (method §4): a fractional knapsack under `delta^p`.

Each correctly classified sample i has a certified radius `c_i` (a lower bound on its minimal
flip distance). Flipping a fraction `alpha_i` of its mass `1/N` costs at least
`alpha_i c_i^p / N` of the budget `delta^p`, so the adversary's best is to flip the cheapest
samples first; what it cannot afford stays correct. With lower-bound costs this gives a lower
bound on the accuracy of every distribution within `W_p` distance `delta`. For `p = inf` the
flipped samples are exactly those with `c_i <= delta` (ties flip: a zero margin is an error).
"""

from __future__ import annotations

import math

import torch


def flippable_mass(radii: torch.Tensor, correct: torch.Tensor, delta: float, p: float) -> float:
    """Largest probability mass of correct samples an adversary can flip within the budget."""
    count = len(radii)
    costs = radii[correct].to(torch.float64)
    if math.isinf(p):
        return float((costs <= delta).sum()) / count
    unit = costs**p / count  # cost of flipping one whole sample
    budget = delta**p
    ordered = torch.sort(unit).values
    spent_before = torch.cumsum(ordered, 0) - ordered
    affordable = ((budget - spent_before) / ordered.clamp_min(1e-300)).clamp(0.0, 1.0)
    affordable = torch.where(ordered == 0, torch.ones_like(affordable), affordable)
    return float(affordable.sum()) / count


def certified_accuracy(radii: torch.Tensor, correct: torch.Tensor, delta: float, p: float) -> float:
    """Lower bound on accuracy under every distribution within `W_p` distance `delta` of the sample."""
    if delta < 0:
        raise ValueError("delta must be >= 0")
    return float(correct.double().mean()) - flippable_mass(radii, correct, delta, p)
