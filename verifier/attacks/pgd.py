"""PGD: the point-wise attack, feasible for every p (each point moves within delta).

Papers: Madry et al., ICLR 2018 (PGD); Croce & Hein, ICML 2020 (APGD and AutoAttack's APGD-CE +
APGD-T schedule); method §5. Norm: r in {inf, 2, 1}. Arguments: `steps` (default 100 per run),
`restarts` (default 1 run of APGD on the loss from a random start), `topk` (default 9: one run
of APGD on the targeted DLR loss per wrong class, on the points still correct), losses ce /
margin / dlr (zero_one ascends the margin). Shapes: x (N, *input), Q has N atoms of weight 1/N.
Each atom is the highest-loss point of x_i and every iterate (the risk); the accuracy is
measured on the misclassified iterate where one exists (`Best`, two optima).
Example: `PGD(target, steps=20, topk=3).run([0.05])`.
"""

from __future__ import annotations

import torch

from verifier.attacks.base import Attack
from verifier.attacks.result import Distribution


class PGD(Attack):
    """AutoAttack-style APGD-CE then APGD-T runs from random starts, both optima per point."""

    name = "pgd"
    default_steps = 100

    def attack(self, delta: float) -> Distribution:
        """Q = (1/N) sum_i delta(x_i + d_i) with ||d_i||_r <= delta."""
        t = self.target
        rows = self.rows()
        radius = torch.full((t.count,), delta, dtype=torch.float64, device=t.flat.device)
        best = self.search(rows, radius, self.steps)
        return self.pointwise(best.d, self.steps * self.runs, best.accuracy_d())
