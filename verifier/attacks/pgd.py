"""PGD: the point-wise attack (Madry et al.), feasible for every p (each point moves within delta).

Paper: Madry et al., ICLR 2018; method §5. Norm: r in {inf, 2, 1}. Arguments: `steps` (default
50), random start inside the ball (seeded generator), cosine step schedule from 0.5 delta,
losses ce / margin / dlr (zero_one ascends the margin). Shapes: x (N, *input), Q has N atoms of
weight 1/N. Each atom is the best of x_i and its iterates by the reported loss.
Example: `PGD(target, steps=20).run([0.05])`.
"""

from __future__ import annotations

import torch

from verifier.attacks.base import Attack
from verifier.attacks.result import Distribution


class PGD(Attack):
    """Projected steepest ascent of the loss from a random start, best iterate per point."""

    name = "pgd"
    default_steps = 50

    def attack(self, delta: float) -> Distribution:
        """Q = (1/N) sum_i delta(x_i + d_i) with ||d_i||_r <= delta."""
        t = self.target
        rows = self.rows()
        radius = torch.full((t.count,), delta, dtype=torch.float64, device=t.flat.device)
        start = self.random_start(radius, rows)
        best, _ = self.ascend(rows, radius, t.loss_objective(rows), self.steps, start=start)
        return self.pointwise(best.d, self.steps)
