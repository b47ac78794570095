"""The base every attack builds on: the one ascent loop, the point-wise engine, the time budget.

`Attack` holds the target (`verifier.attacks.target`), the step count and the seed of the
per-sample random draws, and gives every attack its shared pieces: steepest-ascent directions and
projections for r in {inf, 2, 1} (method §5), the one ascent loop `ascend` (APGD's step-size
control: checkpoints, momentum, step halving with a restart from the best point; Croce & Hein,
ICML 2020), the point-wise engine `search` (AutoAttack's schedule: APGD on the loss from random
starts, then APGD on the targeted DLR loss for each of the top-k wrong classes on the rows still
correct) and the point-wise distribution. An attack only writes its own loop in `attack(delta)`
(or `run(deltas)` when one pass serves every delta). Random draws are per sample (numbered draws,
not a shared stream), so results do not depend on the sharding.

`budget` makes an attack anytime: past it every loop stops at its next step and the attack returns
the best points found so far (still within the budget of perturbation, so still a lower bound),
flagged "time-limited"; the hard `Target.deadline` still raises `Stopped`. Under a finite hard
deadline an attack's first step may run past its share when it, the pass that evaluates its
point and the replays end before the hard deadline (a large model's step can be longer than a
share); a part that took no gradient step at all is flagged `NO_STEP`: its numbers are the
samples' own, not an attack result.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import replace
from typing import ClassVar

import torch

from verifier.attacks.draws import ball_displacements, occurrences, seeded_generators
from verifier.attacks.result import Distribution
from verifier.attacks.steps import checkpoints, project_ball, schedule, steepest_ascent
from verifier.attacks.target import RECENT_PASSES, Best, Objective, Target, top_wrong_classes
from verifier.deadline import NEVER, NO_STEP, Deadline

SHRINK = 1e-6  # radii are shrunk by this factor so that float64 costs stay within the budget
MOMENTUM = 0.75  # APGD's momentum alpha
OSCILLATION = 0.75  # APGD's rho: halve the step when fewer than rho of the steps since the last checkpoint rose
ASCEND_COPIES = 16  # float64 (rows, D) tensors `ascend` holds per row: iterates, gradients, best points, temporaries
TIME_LIMITED = "time-limited (stopped early: a weaker lower bound)"
FIRST_STEP_MARGIN = 1.25  # the first step of a run past its share: its predicted end (with the pass that
# evaluates its point and the replays) times this must fit before the hard deadline (load varies; the
# attacks after it still need a moment to return their results)
SLOWDOWN = 3.0  # how much slower than the slowest recent ones the next step may turn out (a loaded machine)
# and still leave the replays after it their time before the hard deadline: a loop stops before it would risk it


class Attack:
    """Base of every attack: owns the target, the step count and the seed of the per-sample random draws."""

    name: ClassVar[str] = ""
    default_steps: ClassVar[int] = 50

    def __init__(self, target: Target, steps: int | None = None, seed: int = 0, budget: Deadline = NEVER,
                 reserve: float = 0.0, **options) -> None:
        self.target = target
        self.steps = int(steps) if steps is not None else self.default_steps
        self.seed = int(seed)
        self.draws = 0  # random draws so far: each gets fresh per-sample streams
        self.options = options
        self.zero_gradient = torch.zeros(target.count, dtype=torch.bool, device=target.y.device)
        self.runs = 0
        self.budget = budget  # soft: when the whole run should end (`begin` shares it out per delta)
        self.until = budget  # soft: when the current delta's loops should end
        self.cut = False  # whether a loop of the current delta stopped early at `until`
        self.reserve = float(reserve)  # seconds of one delta's replay after the loops, which the hard deadline must fit
        self.deltas_per_part = 1  # deltas whose atoms one part's steps move (one pass for every delta: all of them)
        self._replays_due = 0  # deltas of the parts before this one whose atoms moved (their replays cost passes)
        self.first_step_open = True  # no step on rows granted yet in this run: the first may run past the share
        self._from: int | None = None  # the target's gradient passes when the current part began
        self._polled = None  # the last poll of `until`
        self._steps: deque[float] = deque(maxlen=RECENT_PASSES)  # the times between the last polls

    def run(self, deltas: Sequence[float]) -> list[Distribution]:
        """One distribution per delta (default: `attack(delta)` for each, timed)."""
        out = []
        for index, delta in enumerate(deltas):
            start = time.perf_counter()
            self.begin(len(deltas) - index)
            dist = self.attack(float(delta))
            out.append(replace(dist, seconds=time.perf_counter() - start))
        return out

    def begin(self, parts_left: int) -> None:
        """Start a part of the run (a delta, or every delta at once): it gets an equal share of the
        budget left with the `parts_left - 1` parts after it."""
        if self.stepped():
            self._replays_due += self.deltas_per_part
        self._from = self.target.passes.get("gradient", 0)
        self.until = self.budget.sooner(1.0 / max(1, parts_left))
        self.cut = False
        self._polled = None  # the step estimate carries over: it is the model's, not the part's

    def out_of_time(self, agreed: bool = False, rows: int = 0) -> bool:
        """Whether the current part's loops should stop now (then the part is flagged time-limited).
        `agreed`: every rank of a sharded run gives the same answer (one exchange; for loops that
        exchange per step), otherwise each rank decides for its own rows. A loop also stops when the
        next step would end past the share: a step is taken to last as long as the slowest of the
        last `RECENT_PASSES` times between two polls of a part (one pass of a large model can take
        longer than a share's last seconds; the estimate carries over to the next part), and at
        least as long as a gradient pass on the next step's `rows` rows takes by the target's timing
        of its slowest recent passes. And it stops when that step, `SLOWDOWN` times slower, and then
        the `reserve` after the loops (the replays, timed on the slowest passes so far) could end past
        the hard deadline (`Target.deadline`, which raises `Stopped`): a sudden slow pass ends the
        attack with its time-limited result. Until the run's first step on rows is granted (with a
        finite hard deadline), the share does not count: the step is granted when it, the forward
        pass that evaluates its point and the replays end before the hard deadline as predicted (a
        share shorter than one step of a large model would otherwise leave the attack stepless), with
        `FIRST_STEP_MARGIN` on that prediction."""
        until = self.until
        late = self.cut or (until.stop_when is not None and until.stop_when())  # once a loop stopped, none restarts
        if not late and not math.isinf(until.at):
            now = until.clock()  # read once: the expiry and the step estimate
            if self._polled is not None:
                self._steps.append(now - self._polled)
            self._polled = now
            step = max(max(self._steps, default=0.0), self.target.step_seconds(rows))
            hard = self.target.deadline
            if self.first_step_open and not math.isinf(hard.at):
                predicted = step + self.target.forward_seconds(rows) + self.replays_due()
                late = hard.clock() + FIRST_STEP_MARGIN * predicted > hard.at
            else:
                late = (now >= until.at or now + step > until.at
                        or (not math.isinf(hard.at) and hard.clock() + SLOWDOWN * step + self.replays_due() > hard.at))
        if agreed and self.target.shard is not None:
            late = bool(self.target.gather(torch.tensor([late]))[0].any())
        if not math.isinf(until.at):  # granted only by the answer every rank acts on
            self.first_step_open = self.first_step_open and (late or rows == 0)
        self.cut = self.cut or late
        return late

    def replays_due(self) -> float:
        """Seconds of the replays the hard deadline must still fit if a step is taken now: the deltas of
        the earlier parts that moved atoms and those of the current part (unmoved atoms cost no pass)."""
        return self.reserve * (self._replays_due + self.deltas_per_part)

    def stepped(self) -> bool:
        """Whether the current part has taken a gradient pass (every attack's steps are gradient passes)."""
        return self._from is not None and self.target.passes.get("gradient", 0) > self._from

    def evaluation_fits(self, rows: int, agreed: bool = False) -> bool:
        """Whether a forward pass of `rows` rows (a cut loop's last point) and then the replays still
        end before the hard deadline as predicted, with `FIRST_STEP_MARGIN` (`agreed`: one answer for
        every rank)."""
        hard = self.target.deadline
        predicted = self.target.forward_seconds(rows) + self.replays_due()
        fits = math.isinf(hard.at) or hard.clock() + FIRST_STEP_MARGIN * predicted <= hard.at
        if agreed and self.target.shard is not None:
            fits = bool(self.target.gather(torch.tensor([fits]))[0].all())
        return fits

    def attack(self, delta: float) -> Distribution:
        """The distribution for one budget."""
        raise NotImplementedError

    # -- shared pieces ---------------------------------------------------------------------
    def rows(self, repeat: int = 1) -> torch.Tensor:
        """Sample index of each row when every sample is replicated `repeat` times (sample-major)."""
        return torch.arange(self.target.count, device=self.target.y.device).repeat_interleave(repeat)

    def project(self, d: torch.Tensor, radius: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Onto the (slightly shrunk) r-ball of each row's radius, then into the box."""
        t = self.target
        inside = project_ball(d, radius * (1 - SHRINK), t.norm)
        return torch.minimum(torch.maximum(inside, t.lower[rows]), t.upper[rows])

    def clip(self, d: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Into the box only."""
        return torch.minimum(torch.maximum(d, self.target.lower[rows]), self.target.upper[rows])

    def random_start(self, radius: torch.Tensor, rows: torch.Tensor, draw: int | None = None,
                     occurrence: torch.Tensor | None = None) -> torch.Tensor:
        """A random displacement inside each row's ball, from per-row CPU generators (`draws.py`:
        device- and shard-independent). `draw` (default: the next one) and `occurrence` (default:
        counted in `rows`) are given when one draw is split into chunks."""
        if draw is None:
            self.draws += 1
            draw = self.draws
        occurrence = occurrences(rows) if occurrence is None else occurrence
        t = self.target
        generators = seeded_generators(self.seed, t.sample_ids()[rows.cpu()], draw, occurrence)
        d = ball_displacements(generators, t.flat.shape[1], radius, t.norm)
        return self.project(d.to(t.flat.device), radius, rows)

    def start_best(self, rows: torch.Tensor) -> Best:
        """Both optima at the samples themselves."""
        t = self.target
        zero = torch.zeros(len(rows), t.flat.shape[1], dtype=torch.float64, device=t.flat.device)
        return Best.at(zero, *t.scores(t.clean_logits[rows], rows))  # atoms(0) = x exactly

    def ascend(self, rows: torch.Tensor, radius: torch.Tensor, objective: Objective, steps: int,
               start: torch.Tensor | None = None, best: Best | None = None,
               adaptive: bool = True) -> tuple[Best, torch.Tensor]:
        """Projected steepest ascent of `objective` within each row's radius: the one loop of every attack.

        `adaptive` (default): APGD's step-size control per row (first step 2 radius, momentum 0.75,
        at each checkpoint the step is halved and the row restarts from its highest-objective
        point when fewer than 75 % of the steps since the last checkpoint rose, or when the
        previous checkpoint did not halve and the best objective did not improve). Otherwise plain
        PGD with the cosine `schedule`. Returns the best iterates (`Best`, the sample itself
        included) and the last iterate.
        """
        t = self.target
        best = self.start_best(rows) if best is None else best
        d = best.d.new_zeros(best.d.shape) if start is None else start
        halvings = checkpoints(steps)
        eta = 2 * radius if adaptive else radius
        previous, previous_value = d, None
        top_d, top_grad, top_value = d, None, torch.full_like(radius, -math.inf)
        rose, checked_value = torch.zeros_like(radius), top_value
        halved, since = torch.zeros_like(radius, dtype=torch.bool), 0
        fractions = schedule(steps)
        cut = False
        for step in range(steps):
            if self.out_of_time(rows=len(rows)):
                cut = True
                break
            value, grad, logits = t.gradient(t.atoms(d, rows), objective)
            best.update(d, *t.scores(logits, rows))
            if step == 0:
                self.note_zero_gradient(rows, grad)
            if not adaptive:
                direction = steepest_ascent(grad, d, t.lower[rows], t.upper[rows], t.norm)
                d = self.project(d + fractions[step] * eta.unsqueeze(-1) * direction, radius, rows)
                continue
            if previous_value is not None:
                rose += (value > previous_value).to(rose.dtype)
            previous_value, since = value, since + 1
            higher = value > top_value
            top_d = torch.where(higher.unsqueeze(-1), d, top_d)
            top_grad = grad if top_grad is None else torch.where(higher.unsqueeze(-1), grad, top_grad)
            top_value = torch.where(higher, value, top_value)
            if step in halvings:
                halve = (rose <= OSCILLATION * since) | (~halved & (top_value <= checked_value))
                eta = torch.where(halve, eta / 2, eta)
                d = torch.where(halve.unsqueeze(-1), top_d, d)
                grad = torch.where(halve.unsqueeze(-1), top_grad, grad)
                halved, checked_value, rose, since = halve, top_value, torch.zeros_like(rose), 0
            direction = steepest_ascent(grad, d, t.lower[rows], t.upper[rows], t.norm)
            z = self.project(d + eta.unsqueeze(-1) * direction, radius, rows)
            alpha = MOMENTUM if step > 0 else 1.0
            previous, d = d, self.project(d + alpha * (z - d) + (1 - alpha) * (d - previous), radius, rows)
        if not cut or (step > 0 and self.evaluation_fits(len(rows))):  # else the best so far stands
            best.update(d, *t.scores(t.logits(t.atoms(d, rows)), rows))
        return best, d

    def search(self, rows: torch.Tensor, radius: torch.Tensor, steps: int, best: Best | None = None,
               restarts: int | None = None, topk: int | None = None, every_row: bool = False,
               occurrence: torch.Tensor | None = None) -> Best:
        """The point-wise engine (AutoAttack's APGD-CE + APGD-T schedule) on rows of samples `rows`.

        `restarts` (option, default 1) runs of APGD on the loss from random starts (option `plain`:
        plain PGD instead, the loop before APGD, kept for comparisons), then for each
        of the `topk` (option, default 9) highest wrong classes of the clean sample one run of
        APGD on the targeted DLR loss from a random start (all targets in one batch), on the rows
        not yet misclassified (`every_row`: on every row and on the targeted margin `z_j - z_y`, for
        attacks after the risk: the highest loss may lie towards another class than the first
        error, and the DLR's denominator moves its maximiser off the margin's). `steps` per run.
        Both optima of `Best` are kept across every run; `self.runs` counts the runs a row still
        correct gets. Rows go in chunks that fit the target's working memory (`Target.rows_at_once`
        with `ASCEND_COPIES` tensors per row and target), each chunk's `Best` started there.
        The random starts are per sample: draw numbers fixed per search and
        `occurrence` (default: counted in `rows`) telling a sample's rows apart.
        """
        t = self.target
        restarts = int(self.options.get("restarts", 1)) if restarts is None else restarts
        topk = int(self.options.get("topk", 9)) if topk is None else topk
        first = self.draws  # this search's draws are numbered first + 1 ... first + restarts + 1, however
        self.draws += restarts + 1  # its rows are chunked or sharded and whether the targeted runs happen
        occurrence = occurrences(rows) if occurrence is None else occurrence
        k = max(1, min(topk, t.clean_logits.shape[-1] - 1))
        self.runs = restarts + (k if topk > 0 else 0)  # the runs a row still correct gets (shard-independent)
        size = self.target.rows_at_once(ASCEND_COPIES * (max(topk, 0) + 1))
        if len(rows) <= size:
            return self._search(rows, radius, steps, best, restarts, topk, every_row, first, occurrence)
        parts = [self._search(rows[s:s + size], radius[s:s + size], steps,
                              None if best is None else best.take(torch.arange(s, min(s + size, len(rows)),
                                                                               device=rows.device)),
                              restarts, topk, every_row, first, occurrence[s:s + size])
                 for s in range(0, len(rows), size)]
        return Best.joined(parts)

    def _search(self, rows: torch.Tensor, radius: torch.Tensor, steps: int, best: Best | None, restarts: int,
                topk: int, every_row: bool, first: int, occurrence: torch.Tensor) -> Best:
        t = self.target
        best = self.start_best(rows) if best is None else best
        for run in range(restarts):
            if self.out_of_time():
                return best
            start = self.random_start(radius, rows, first + 1 + run, occurrence)
            best, _ = self.ascend(rows, radius, t.loss_objective(rows), steps, start, best,
                                  adaptive=not self.options.get("plain", False))
        if topk <= 0 or self.out_of_time():
            return best
        classes = top_wrong_classes(t.clean_logits, t.y, topk)[rows]
        left = torch.arange(len(rows), device=rows.device) if every_row else (~best.misclassified).nonzero().squeeze(-1)
        if len(left) == 0:
            return best
        k = classes.shape[1]  # every target of every row left in one batch of len(left) * k rows
        wide, index = rows[left].repeat_interleave(k), left.repeat_interleave(k)
        wide_occurrence = occurrence[left.cpu()].repeat_interleave(k) * k + torch.arange(k).repeat(len(left))
        targeted = t.targeted_objective if every_row else t.targeted_dlr
        start = self.random_start(radius[index], wide, first + restarts + 1, wide_occurrence)
        part, _ = self.ascend(wide, radius[index], targeted(wide, classes[left].flatten()), steps, start,
                              best.take(index))
        best.put(left, part.grouped(k))
        return best

    def note_zero_gradient(self, rows: torch.Tensor, grad: torch.Tensor) -> None:
        """Mark the samples whose every row has an identically zero gradient."""
        count = self.target.count
        total = torch.bincount(rows, minlength=count)
        zero = torch.bincount(rows[(grad == 0).all(-1)], minlength=count)
        self.zero_gradient |= (total > 0) & (zero == total)

    def flags(self, moved: bool = True) -> tuple[str, ...]:
        """Warnings gathered while attacking (e.g. samples whose gradient vanished), over every rank.
        `moved`: whether this rank's distribution moved any atom off its sample (a part whose gradient
        passes moved nothing, e.g. W-PGD's pass at the samples with no step after it, took no step)."""
        count = int(self.target.gather(self.zero_gradient.cpu())[0].sum())
        cut, stepped = (bool(v.any()) for v in self.target.gather(torch.tensor([self.cut]),
                                                                  torch.tensor([self.stepped() and moved])))
        return (((f"zero-gradient ({count} of {self.target.total} samples)",) if count else ())
                + ((TIME_LIMITED,) if cut else ()) + ((NO_STEP,) if cut and not stepped else ()))

    def pointwise(self, d: torch.Tensor, steps: int, accuracy_d: torch.Tensor | None = None) -> Distribution:
        """Q = (1/N) sum_i delta(x_i + d_i): one atom per sample (the risk); the accuracy is measured
        on the atoms of `accuracy_d` when given and different (e.g. `Best.accuracy_d()`)."""
        t = self.target
        rows = self.rows()
        weights = torch.full((t.count,), 1.0 / t.total, dtype=torch.float64)
        differs = accuracy_d is not None and bool((accuracy_d != d).any())
        moved = bool((d != 0).any()) or (differs and bool((accuracy_d != 0).any()))
        return Distribution(t.atoms(d, rows), weights, rows.cpu(), steps, self.flags(moved),
                            accuracy_atoms=t.atoms(accuracy_d, rows) if differs else None)
