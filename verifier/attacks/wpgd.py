"""W-PGD: the Wasserstein PGD of Bai, He, Jiang, Obloj (NeurIPS 2023, arXiv 2306.09844).

Method §5. Defined for p in (1, inf]; r in {2, inf} as in the paper, r = 1 by the analogous
direction. Each step moves every point along `sign(g)|g|^(s-1) ||g||_s^(q-s)` (s, q the dual
exponents of r and p; r=1: `sign(g_k) e_k ||g||_inf^(q-1)`), normalised over the batch by
`(mean ||d_i||_r^p)^(1/p)`, with step `1.875 delta / steps` (`steps` default 50), then clips to
the box and, when the batch's cost W exceeds delta, brings it back with the factor
`c = min(1, delta / W)` as Bai et al. do: r = inf clamps every image's coordinates to
`+-c ||d_i||_inf` (each image's cost shrinks by c while its saturated coordinates keep their
size), r in {2, 1} contracts the displacements by c (p = inf: each point is projected on its own
ball). The budget couples the points, so the best iterates are kept for the whole batch: the one
with the highest mean loss (the risk) and, as Bai et al., the one with the lowest accuracy (where
the accuracy is measured), the clean sample included. Shapes: Q has N atoms of weight 1/N.
Example: `WPGD(target).run([0.1])`.
"""

from __future__ import annotations

import math

import torch

from verifier.attacks.base import SHRINK, Attack
from verifier.attacks.steps import dual_exponent, steepest_ascent
from verifier.attacks.result import Distribution
from verifier.geometry import dual_norm, vector_norm


def wpgd_direction(g: torch.Tensor, d: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
                   norm: str, p: float, top: torch.Tensor | None = None) -> torch.Tensor:
    """Bai et al.'s per-point direction (up to one positive factor common to the batch); `top` is the
    largest `||g_i||_*` of the whole batch (default: of these rows)."""
    q = dual_exponent(p)
    size = dual_norm(g, norm)
    top = size.max() if top is None else top
    if not bool(top > 0):
        return torch.zeros_like(g)
    g = g / top  # the direction is homogeneous in g: rescaling avoids overflow of the powers
    size = (size / top).unsqueeze(-1)
    unit = steepest_ascent(g, d, lower, upper, norm)  # inf: sign(g); 2: g/||g||_2; 1: signed e_k
    factor = torch.where(size > 0, size.clamp_min(1e-300) ** (q - 1.0), torch.zeros_like(size))
    return unit * factor


class WPGD(Attack):
    """Batch-normalised ascent with whole-batch contraction onto the W_p ball."""

    name = "wpgd"
    default_steps = 50

    def _cost(self, d: torch.Tensor) -> torch.Tensor:
        """`(mean ||d_i||_r^p)^(1/p)` over the whole sample (every rank's rows)."""
        (sizes,) = self.target.gather(vector_norm(d, self.target.norm))
        p = self.target.p
        return sizes.max() if math.isinf(p) else (sizes**p).mean() ** (1.0 / p)

    def attack(self, delta: float) -> Distribution:
        """Q = (1/N) sum_i delta(x_i + d_i) with (mean ||d_i||_r^p)^(1/p) <= delta."""
        t = self.target
        rows = self.rows()
        objective = t.loss_objective(rows)
        radius = torch.full((t.count,), delta, dtype=torch.float64, device=t.flat.device)
        d = torch.zeros_like(t.flat)
        best_d, best_value, flip_d, best_errors = d, -math.inf, d, -1
        alpha = 1.875 * delta / self.steps
        taken = 0

        def keep(point: torch.Tensor, value: float, errors: int) -> None:  # the batch's two best iterates
            nonlocal best_d, best_value, flip_d, best_errors
            if value > best_value:
                best_d, best_value = point, value
            if errors > best_errors:
                flip_d, best_errors = point, errors
        for step in range(self.steps + 1):
            if step == 0 and self.out_of_time(agreed=True, rows=t.count):
                break  # no time for one pass: the samples themselves
            _, grad, logits = t.gradient(t.atoms(d, rows), objective)
            value, errors, sizes = self._scored(logits, rows, dual_norm(grad, t.norm))  # one exchange per step
            keep(d, value, errors)
            if step == self.steps:
                break
            late = self.out_of_time(agreed=True)
            if late and (taken > 0 or not self.evaluation_fits(t.count, agreed=True)):
                break  # (the first step's point is still taken and evaluated when a forward pass fits)
            if step == 0:
                self.note_zero_gradient(rows, grad)
            direction = wpgd_direction(grad, d, t.lower, t.upper, t.norm, t.p, sizes.max().to(grad.device))
            scale = self._cost(direction)
            if not bool(scale > 0):
                break
            taken += 1
            d = self.clip(d + alpha * direction / scale, rows)
            if math.isinf(t.p):
                d = self.project(d, radius, rows)
            else:
                d = self._contract(d, delta * (1 - SHRINK))
            if late:  # out of time after the first step: its point, by one forward pass
                keep(d, *self._scored(t.logits(t.atoms(d, rows)), rows))
                break
        return self.pointwise(best_d, taken, accuracy_d=flip_d)

    def _scored(self, logits: torch.Tensor, rows: torch.Tensor, *more: torch.Tensor) -> tuple:
        """(mean loss, number misclassified) of the whole batch at one iterate, then `more` per-row
        tensors gathered in the same exchange (every rank's rows)."""
        loss, margin = self.target.scores(logits, rows)
        losses, margins, *gathered = self.target.gather(loss, margin, *more)
        return (float(losses.mean()), int((margins >= 0).sum()), *gathered)

    def _contract(self, d: torch.Tensor, limit: float) -> torch.Tensor:
        """Back onto the W_p ball with c = min(1, limit / W): r = inf clamps each image to
        +-c ||d_i||_inf (Bai et al.), other norms contract the displacements by c."""
        cost = self._cost(d)
        if not bool(cost > limit):
            return d
        factor = limit / cost
        if self.target.norm != "inf":
            return d * factor
        size = vector_norm(d, "inf").unsqueeze(-1) * factor
        return torch.maximum(torch.minimum(d, size), -size)
