"""Certified distributional robust accuracy (method §4): a fractional knapsack under `delta^p`.

Each correctly classified sample i has a certified radius `c_i` (a lower bound on its minimal
flip distance). Flipping a fraction `alpha_i` of its mass `1/N` costs at least
`alpha_i c_i^p / N` of the budget `delta^p`, so the adversary's best is to flip the cheapest
samples first; what it cannot afford stays correct. With lower-bound costs this gives a lower
bound on the accuracy of every distribution within `W_p` distance `delta`. For `p = inf` the
flipped samples are exactly those with `c_i <= delta` (ties flip: a zero margin is an error).
"""

from __future__ import annotations

import torch

from verifier.certify.allocation import flip_allocation


def flippable_mass(radii: torch.Tensor, correct: torch.Tensor, delta: float, p: float) -> float:
    """Largest probability mass of correct samples an adversary can flip within the budget."""
    return float(flip_allocation(radii, correct, delta, p).sum()) / len(radii)


def certified_accuracy(radii: torch.Tensor, correct: torch.Tensor, delta: float, p: float) -> float:
    """Lower bound on accuracy under every distribution within `W_p` distance `delta` of the sample."""
    if delta < 0:
        raise ValueError("delta must be >= 0")
    return float(correct.double().mean()) - flippable_mass(radii, correct, delta, p)
