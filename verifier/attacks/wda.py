"""WDA: the targeted Wasserstein distributional attack of arXiv 2510.10000 (method §5).

Per sample, probe the top-k wrong classes (`topk` default 9; 10 probe steps each, k rows per
sample in one batch), fix the target j* whose probe reached the highest targeted margin
`z_j - z_y` (the paper scores by the raw logit z_j; the margin also accounts for z_y moving),
then run `steps` (default 50) of targeted margin ascent on `z_j* - z_y`, continuing from the
probe (samples in chunks whose k rows each fit the working memory, `Target.rows_at_once`; rows
are independent, so the chunks change no row); every run uses the base's APGD step-size control
(`Attack.ascend`). Every atom is the best of x_i, the probe iterates of all targets and the main iterates by the reported loss (the
risk); the accuracy is measured on the most misclassified of them (`Best`). Distributional form with `kappa >= 1`: mass `1 - 1/kappa` stays at x_i and
`1/kappa` moves within radius `kappa^(1/p) delta` (cost exactly delta^p; kappa = 1 is point-wise,
p = inf keeps the radius delta). Shapes: Q has N atoms (kappa = 1) or 2N.
Example: `WDA(target, topk=9, kappa=1.0).run([0.05])`.
"""

from __future__ import annotations

import math

import torch

from verifier.attacks.base import ASCEND_COPIES, Attack, Best, top_wrong_classes
from verifier.attacks.result import Distribution

PROBE_STEPS = 10

def probe_and_ascend(attack: Attack, rows: torch.Tensor, radius: torch.Tensor, classes: torch.Tensor,
                     steps: int) -> Best:
    """WDA's targeted search on rows of samples `rows` with radii `radius` and candidate classes
    `classes` (rows, k): probe every candidate, keep the best target, ascend on it."""
    t = attack.target
    k = classes.shape[1]
    wide, flat_classes = rows.repeat_interleave(k), classes.flatten()
    probe, last = attack.ascend(wide, radius.repeat_interleave(k), t.targeted_objective(wide, flat_classes),
                                PROBE_STEPS)
    if attack.out_of_time():
        return probe.grouped(k)
    reached = t.logits(t.atoms(last, wide))
    labels = t.y[wide].unsqueeze(-1)
    score = (reached.gather(-1, flat_classes.unsqueeze(-1)) - reached.gather(-1, labels)).squeeze(-1)
    picked = torch.arange(len(rows), device=rows.device) * k + score.view(-1, k).argmax(-1)
    best, _ = attack.ascend(rows, radius, t.targeted_objective(rows, flat_classes[picked]), steps,
                            start=last[picked], best=probe.grouped(k))
    return best


class WDA(Attack):
    """Probe several targets, then targeted margin ascent on the best one."""

    name = "wda"
    default_steps = 50

    def attack(self, delta: float) -> Distribution:
        """Point-wise (kappa = 1) or kappa-mixture distribution at budget delta."""
        t = self.target
        kappa = float(self.options.get("kappa", 1.0))
        reach = delta if math.isinf(t.p) else delta * kappa ** (1.0 / t.p)
        classes = top_wrong_classes(t.clean_logits, t.y, int(self.options.get("topk", 9)))
        own = self.rows()
        radius = torch.full((t.count,), reach, dtype=torch.float64, device=t.flat.device)
        size = t.rows_at_once(ASCEND_COPIES * classes.shape[1])  # samples whose k probes fit the working memory
        best = Best.joined([probe_and_ascend(self, own[s:s + size], radius[s:s + size], classes[s:s + size], self.steps)
                            for s in range(0, t.count, size)])
        steps = PROBE_STEPS * classes.shape[1] + self.steps
        accuracy = best.accuracy_d()
        if kappa == 1.0:
            return self.pointwise(best.d, steps, accuracy)
        clean = t.atoms(torch.zeros_like(best.d), own)
        differs = bool((accuracy != best.d).any())
        weights = torch.cat([torch.full((t.count,), (1 - 1 / kappa) / t.total, dtype=torch.float64),
                             torch.full((t.count,), (1 / kappa) / t.total, dtype=torch.float64)])
        return Distribution(torch.cat([clean, t.atoms(best.d, own)]), weights, torch.cat([own, own]).cpu(), steps,
                            self.flags(),
                            accuracy_atoms=torch.cat([clean, t.atoms(accuracy, own)]) if differs else None)
