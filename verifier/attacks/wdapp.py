"""WDA++: minimal flip points per sample, then the cheapest flips under the W_p budget (method §4, §5).

For every correctly classified sample: a multi-target greedy walk (each step tries the steepest
ascent direction of `z_j - z_y` for each of the top-k wrong classes, `topk` default 9, and keeps
the trial with the highest margin `max_j z_j - z_y`) with geometrically growing steps (`steps`
default 100; the first is `min(max delta, reach)/20`, the growth makes the steps add up to twice
the reach, the farthest an atom may travel: `max(delta) N^(1/p)` capped at the box's extent,
`max(delta)` for p = inf) until the first flip; then 10 bisection
steps between the last correct and the first wrong iterate. The flip point is the bracket end
**verified misclassified** by a forward pass with margin >= 1e-4 (a small slack so that a point
on the decision boundary is not counted as an error by one runtime and not the other), and
`d_i = ||x_adv_i - x_i||_r` is measured on the returned atom. The walk does not depend on delta
and runs once; then, per delta, `flip_allocation` (fractional knapsack on `d_i^p / N`, capacity
delta^p; p = inf: flip the samples with `d_i <= delta`) gives
`Q = (1/N) sum_i [(1 - alpha_i) delta(x_i) + alpha_i delta(x_adv_i)]` (at most two atoms per sample).
Example: `WDAPlusPlus(target, topk=9).run([0.1, 0.2])`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch

from verifier.attacks.base import SHRINK, Attack, steepest_ascent
from verifier.certify.allocation import flip_allocation
from verifier.attacks.result import Distribution
from verifier.attacks.wda import top_wrong_classes
from verifier.geometry import vector_norm
from verifier.losses import loss_values

FLIP_MARGIN = 1e-4
BISECTION_STEPS = 10


def growth_factor(first: float, total: float, steps: int) -> float:
    """g >= 1 with first * (1 + g + ... + g^(steps-1)) = total (bisection on g)."""
    if steps <= 1 or first * steps >= total:
        return 1.0
    low, high = 1.0, 2.0
    while first * (high**steps - 1) / (high - 1) < total:
        high *= 2
    for _ in range(100):
        middle = (low + high) / 2
        if first * (middle**steps - 1) / (middle - 1) < total:
            low = middle
        else:
            high = middle
    return high


class WDAPlusPlus(Attack):
    """Greedy multi-target walk to the first flip, bisection, knapsack allocation."""

    name = "wdapp"
    default_steps = 100

    def _margin(self, d: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        t = self.target
        return loss_values(t.logits(t.atoms(d, rows)), t.y[rows], "margin")

    def _walk(self, first_step: float, growth: float, classes: torch.Tensor, correct: torch.Tensor):
        """Per sample: (last correct point, first wrong point, found) of the greedy walk."""
        t = self.target
        k = classes.shape[1]
        current = torch.zeros_like(t.flat)
        last_ok, first_bad = torch.zeros_like(t.flat), torch.zeros_like(t.flat)
        found = torch.zeros(t.count, dtype=torch.bool, device=t.flat.device)
        active = correct.clone()
        step_size, taken = first_step, 0
        for step in range(self.steps):
            index = active.nonzero().squeeze(-1)
            if len(index) == 0:
                break
            taken += 1
            rows = index.repeat_interleave(k)
            start = current[index].repeat_interleave(k, 0)
            _, grad, _ = t.gradient(t.atoms(start, rows), t.targeted_objective(rows, classes[index].flatten()))
            if step == 0:
                self.note_zero_gradient(rows, grad)
            direction = steepest_ascent(grad, start, t.lower[rows], t.upper[rows], t.norm)
            trial = self.clip(start + step_size * direction, rows)
            score = self._margin(trial, rows).view(-1, k)
            pick = score.argmax(-1)
            chosen = trial.view(-1, k, trial.shape[-1])[torch.arange(len(index)), pick]
            flipped = score.max(-1).values >= FLIP_MARGIN
            stuck = (chosen == current[index]).all(-1) & ~flipped
            last_ok[index[flipped]] = current[index[flipped]]
            first_bad[index[flipped]] = chosen[flipped]
            found[index[flipped]] = True
            current[index] = chosen
            active[index[flipped | stuck]] = False
            step_size *= growth
        return last_ok, first_bad, found, taken

    def _bisect(self, low: torch.Tensor, high: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Shrink [correct, wrong] brackets on their segments; returns the wrong ends."""
        for _ in range(BISECTION_STEPS):
            middle = (low + high) / 2
            wrong = (self._margin(middle, rows) >= FLIP_MARGIN).unsqueeze(-1)
            high = torch.where(wrong, middle, high)
            low = torch.where(wrong, low, middle)
        return high

    def _reach(self, largest_delta: float) -> float:
        """How far any atom may travel: N^(1/p) max(delta), capped at the box's extent."""
        t = self.target
        reach = largest_delta if math.isinf(t.p) else largest_delta * t.total ** (1.0 / t.p)
        extent = float(t.gather(vector_norm(torch.maximum(-t.lower, t.upper), t.norm).cpu())[0].max())
        return min(reach, extent)

    def flip_points(self, largest_delta: float):
        """Displacements to verified flip points, their measured distances (inf: none found) and
        which samples were correctly classified."""
        t = self.target
        rows = self.rows()
        logits = t.logits(t.x)
        correct = loss_values(logits, t.y, "margin") < 0
        classes = top_wrong_classes(logits, t.y, int(self.options.get("topk", 9)))
        adversarial = torch.zeros_like(t.flat)
        distance = torch.full((t.count,), math.inf, dtype=torch.float64, device=t.flat.device)
        distance[~correct] = 0.0
        self.taken = 0
        if largest_delta <= 0 or not bool(t.gather(correct.cpu())[0].any()):
            return adversarial, distance, correct
        reach = self._reach(largest_delta)
        first = min(largest_delta, reach) / 20
        growth = growth_factor(first, 2 * reach, self.steps)
        low, high, found, taken = self._walk(first, growth, classes, correct)
        self.taken = int(t.gather(torch.tensor([taken]))[0].max())  # the walk ends when every rank's does
        index = found.nonzero().squeeze(-1)
        if len(index):
            ends = self._bisect(low[index], high[index], rows[index])
            verified = self._margin(ends, rows[index]) >= FLIP_MARGIN
            index, ends = index[verified], ends[verified]
            adversarial[index] = ends
            moved = t.atoms(ends, rows[index]).flatten(1).to(torch.float64) - t.flat[index]
            distance[index] = vector_norm(moved, t.norm)
        return adversarial, distance, correct

    def run(self, deltas: Sequence[float]) -> list[Distribution]:
        """One walk for every delta, then one knapsack allocation per delta."""
        t = self.target
        start = time.perf_counter()
        adversarial, distance, correct = self.flip_points(max(float(d) for d in deltas))
        shared = time.perf_counter() - start
        rows = self.rows()
        clean_atoms, flip_atoms = t.x, t.atoms(adversarial, rows)
        out = []
        for delta in deltas:
            start = time.perf_counter()
            alpha = t.local(flip_allocation(*t.gather(distance.cpu(), correct.cpu()), float(delta) * (1 - SHRINK), t.p))
            stay, move = (1 - alpha) / t.total, alpha / t.total
            keep_stay, keep_move = stay > 0, move > 0
            atoms = torch.cat([clean_atoms[keep_stay.to(t.x.device)], flip_atoms[keep_move.to(t.x.device)]])
            weights = torch.cat([stay[keep_stay], move[keep_move]])
            source = torch.cat([rows.cpu()[keep_stay], rows.cpu()[keep_move]])
            out.append(Distribution(atoms, weights, source, self.taken + BISECTION_STEPS, self.flags(),
                                    shared + time.perf_counter() - start))
        return out
