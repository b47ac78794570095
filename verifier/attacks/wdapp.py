"""WDA++: minimal flip points per sample, then the cheapest flips under the W_p budget (method §4, §5).

For every correctly classified sample: a multi-target greedy walk (each step tries the steepest
ascent direction of `z_j - z_y` for each of the top-k wrong classes, `topk` default 9, and keeps
the trial with the highest margin `max_j z_j - z_y`) with geometrically growing steps (`steps`
default 100; the first is `min(delta, reach)/20`, the growth makes the steps add up to twice
the reach, the farthest an atom may travel: `delta N^(1/p)` capped at the box's extent,
`delta` for p = inf; each step's trials in chunks of samples that fit the working memory,
`Target.rows_at_once`) until the first flip; then 10 bisection
steps between the last correct and the first wrong iterate. When the flips found leave budget
unspent (p < inf: the last, fractional flip may lie beyond the reach, since a fraction alpha of a
sample may travel delta (N / alpha)^(1/p)), the correct samples still unflipped walk again with
steps adding up to twice the box's extent (no second walk without a box). Then `REFINE_ROUNDS` (2) rounds of
the base's point-wise engine (`Attack.search`, `REFINE_STEPS` = 20 per run) at radius `d_i`:
its misclassified point is pulled back along its ray towards x_i by 10 bisection steps and kept
when closer. Every flip point is **verified misclassified** by a forward pass with margin >= 1e-4 (a small slack so that a point
on the decision boundary is not counted as an error by one runtime and not the other), and
`d_i = ||x_adv_i - x_i||_r` is measured on the returned atom. The walk runs once per delta and
depends on that delta only (a row does not change when another delta is requested); then
`flip_allocation` (fractional knapsack on `d_i^p / N`, capacity
delta^p; p = inf: flip the samples with `d_i <= delta`) gives
`Q = (1/N) sum_i [(1 - alpha_i) delta(x_i) + alpha_i delta(x_adv_i)]` (at most two atoms per sample).
Example: `WDAPlusPlus(target, topk=9).run([0.1, 0.2])`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch

from verifier.attacks.base import ASCEND_COPIES, SHRINK, Attack, top_wrong_classes
from verifier.attacks.steps import steepest_ascent
from verifier.certify.allocation import flip_allocation
from verifier.attacks.result import Distribution
from verifier.geometry import vector_norm
from verifier.losses import loss_values

FLIP_MARGIN = 1e-4
BISECTION_STEPS = 10
REFINE_ROUNDS = 2
REFINE_STEPS = 20


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
        size = t.rows_at_once(ASCEND_COPIES * k)  # samples whose k trials fit the working memory at once
        for step in range(self.steps):
            index = active.nonzero().squeeze(-1)
            if len(index) == 0 or self.out_of_time(rows=len(index) * k):
                break
            taken += 1
            for chunk in index.split(size):  # samples walk independently: chunks change no row
                rows = chunk.repeat_interleave(k)
                start = current[chunk].repeat_interleave(k, 0)
                _, grad, _ = t.gradient(t.atoms(start, rows), t.targeted_objective(rows, classes[chunk].flatten()))
                if step == 0:
                    self.note_zero_gradient(rows, grad)
                direction = steepest_ascent(grad, start, t.lower[rows], t.upper[rows], t.norm)
                trial = self.clip(start + step_size * direction, rows)
                del start, grad, direction
                score = self._margin(trial, rows).view(-1, k)
                chosen = trial.view(-1, k, trial.shape[-1])[torch.arange(len(chunk)), score.argmax(-1)]
                flipped = score.max(-1).values >= FLIP_MARGIN
                stuck = (chosen == current[chunk]).all(-1) & ~flipped
                last_ok[chunk[flipped]] = current[chunk[flipped]]
                first_bad[chunk[flipped]] = chosen[flipped]
                found[chunk[flipped]] = True
                current[chunk] = chosen
                active[chunk[flipped | stuck]] = False
            step_size *= growth
        return last_ok, first_bad, found, taken

    def _bisect(self, low: torch.Tensor, high: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Shrink [correct, wrong] brackets on their segments; returns the wrong ends."""
        for _ in range(BISECTION_STEPS):
            if self.out_of_time():  # `high` is wrong at every step: a valid (farther) end
                break
            middle = (low + high) / 2
            wrong = (self._margin(middle, rows) >= FLIP_MARGIN).unsqueeze(-1)
            high = torch.where(wrong, middle, high)
            low = torch.where(wrong, low, middle)
        return high

    def _extent(self) -> float:
        """The box's extent: the farthest any atom can be from its sample (inf without a box)."""
        t = self.target
        return float(t.gather(vector_norm(torch.maximum(-t.lower, t.upper), t.norm).cpu())[0].max())

    def _reach(self, delta: float) -> float:
        """How far a full flip may travel: N^(1/p) delta, capped at the box's extent."""
        t = self.target
        reach = delta if math.isinf(t.p) else delta * t.total ** (1.0 / t.p)
        return min(reach, self._extent())

    def _measured(self, d: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Distances of the returned atoms x_i + d (model dtype) from their samples (float64)."""
        t = self.target
        return vector_norm(t.atoms(d, rows).flatten(1).to(torch.float64) - t.flat[rows], t.norm)

    def _closer(self, adversarial: torch.Tensor, distance: torch.Tensor, only: torch.Tensor | None = None) -> None:
        """Rounds of the point-wise engine at radius d_i (on the samples `only`, default all); a verified
        flip pulled back along its ray towards x_i replaces the walk's when it is closer (in place)."""
        for _ in range(REFINE_ROUNDS):
            chosen = torch.isfinite(distance) & (distance > 0)
            index = (chosen if only is None else chosen & only).nonzero().squeeze(-1)
            if len(index) == 0 or self.out_of_time():
                return
            rows = self.rows()[index]
            best = self.search(rows, distance[index], REFINE_STEPS)
            wrong = self._margin(best.flip, rows) >= FLIP_MARGIN
            index, rows, flip = index[wrong], rows[wrong], best.flip[wrong]
            if len(index) == 0:  # no round found a flip within d_i: the walk's flips stay
                return
            ends = self._bisect(torch.zeros_like(flip), flip, rows)
            verified = self._margin(ends, rows) >= FLIP_MARGIN
            measured = self._measured(ends, rows)
            closer = verified & (measured < distance[index])
            adversarial[index[closer]] = ends[closer]
            distance[index[closer]] = measured[closer]

    def flip_points(self, delta: float):
        """Displacements to verified flip points for budget `delta`, their measured distances
        (inf: none found) and which samples were correctly classified."""
        t = self.target
        logits = t.clean_logits
        correct = loss_values(logits, t.y, "margin") < 0
        classes = top_wrong_classes(logits, t.y, int(self.options.get("topk", 9)))
        adversarial = torch.zeros_like(t.flat)
        distance = torch.full((t.count,), math.inf, dtype=torch.float64, device=t.flat.device)
        distance[~correct] = 0.0
        self.taken = 0
        if delta <= 0 or not bool(t.gather(correct.cpu())[0].any()):
            return adversarial, distance, correct
        reach = self._reach(delta)
        first = min(delta, reach) / 20
        self.taken = self._flips(first, reach, classes, correct, adversarial, distance)
        self._closer(adversarial, distance)
        far = correct & ~torch.isfinite(distance)
        extent = self._extent()
        if reach < extent < math.inf and self._budget_left(distance, correct, delta, far):
            # the last, fractional flip may lie beyond the reach (a fraction alpha of a sample may
            # travel delta (N / alpha)^(1/p)): the samples still unflipped walk again to the box's extent
            self.taken += self._flips(first, extent, classes, far, adversarial, distance)
            self._closer(adversarial, distance, far)
        return adversarial, distance, correct

    def _flips(self, first: float, reach: float, classes: torch.Tensor, active: torch.Tensor,
               adversarial: torch.Tensor, distance: torch.Tensor) -> int:
        """The walk from the samples `active` (steps growing from `first` to add up to 2 reach), its
        bisection and verification, written into `adversarial`/`distance`; the walk steps taken."""
        t = self.target
        rows = self.rows()
        low, high, found, taken = self._walk(first, growth_factor(first, 2 * reach, self.steps), classes, active)
        index = found.nonzero().squeeze(-1)
        if len(index):
            ends = self._bisect(low[index], high[index], rows[index])
            verified = self._margin(ends, rows[index]) >= FLIP_MARGIN
            index, ends = index[verified], ends[verified]
            adversarial[index] = ends
            distance[index] = self._measured(ends, rows[index])
        return int(t.gather(torch.tensor([taken]))[0].max())  # the walk ends when every rank's does

    def _budget_left(self, distance: torch.Tensor, correct: torch.Tensor, delta: float, far: torch.Tensor) -> bool:
        """p < inf: whether the flips found leave budget unspent while some correct sample (`far`) has none."""
        t = self.target
        if math.isinf(t.p):
            return False
        distance, correct, far = t.gather(distance.cpu(), correct.cpu(), far.cpu())
        limit = float(delta) * (1 - SHRINK)
        alpha = flip_allocation(distance, correct, limit, t.p)
        finite = torch.isfinite(distance)
        spent = float((alpha[finite] * distance[finite] ** t.p).sum()) / len(distance)
        return bool(far.any()) and spent < limit**t.p * (1 - 1e-9)

    def run(self, deltas: Sequence[float]) -> list[Distribution]:
        """One walk per delta (each row depends on its own delta only), then its knapsack allocation."""
        t = self.target
        rows = self.rows()
        out = []
        for index, delta in enumerate(deltas):
            start = time.perf_counter()
            self.begin(len(deltas) - index)
            self.draws = 0  # every delta's random starts are those of a run on it alone
            adversarial, distance, correct = self.flip_points(float(delta))
            clean_atoms, flip_atoms = t.x, t.atoms(adversarial, rows)
            alpha = t.local(flip_allocation(*t.gather(distance.cpu(), correct.cpu()), float(delta) * (1 - SHRINK), t.p))
            stay, move = (1 - alpha) / t.total, alpha / t.total
            keep_stay, keep_move = stay > 0, move > 0
            atoms = torch.cat([clean_atoms[keep_stay.to(t.x.device)], flip_atoms[keep_move.to(t.x.device)]])
            weights = torch.cat([stay[keep_stay], move[keep_move]])
            source = torch.cat([rows.cpu()[keep_stay], rows.cpu()[keep_move]])
            steps = self.taken + BISECTION_STEPS + REFINE_ROUNDS * (REFINE_STEPS * self.runs + BISECTION_STEPS)
            out.append(Distribution(atoms, weights, source, steps, self.flags(), time.perf_counter() - start))
        return out
