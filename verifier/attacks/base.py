"""The shared machinery of every attack: the threat model, forward/gradient passes, ascent steps.

`Target` owns what all attacks share: the module on its device in the model's float dtype, the
samples, labels, threat norm r, order p, loss, the box as displacement bounds (float64), and the
`Deadline` checked before every forward or gradient pass of a chunk of atoms — i.e. inside every
attack step, so a time limit stops an attack within one such pass.
Displacements `d` are kept in float64 and turned into model-dtype atoms by `Target.atoms`, which
rounds every coordinate towards its sample, so an atom's true distance never exceeds the one
computed from `d`. `Attack` is the base each attack file builds on: batching (padded chunks of a
fixed size), steepest-ascent directions and projections for r in {inf, 2, 1} (method §5), the
one ascent loop `ascend` (APGD's step-size control: checkpoints, momentum, step halving with a
restart from the best point; Croce & Hein, ICML 2020), the point-wise engine `search`
(AutoAttack's schedule: APGD on the loss from random starts, then APGD on the targeted DLR loss
for each of the top-k wrong classes on the rows still correct), the two-optimum best iterate
`Best` (the highest-loss point for the risk, the most misclassified point for the accuracy) and
the point-wise distribution. An attack only writes its own loop in `attack(delta)` (or
`run(deltas)` when one pass serves every delta). In a sharded run (`verifier.distributed`)
`Target.shard` says which samples these are: `Target.total` is N and `Target.gather` brings
every rank's per-sample rows to the global steps; random draws are per sample (numbered draws,
not a shared stream) and every pass has a fixed row count (`ROWS_PER_PASS`, padded), so results
do not depend on the sharding.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

import torch

from verifier.attacks.draws import ball_displacements, occurrences, seeded_generators
from verifier.attacks.result import Distribution
from verifier.attacks.steps import checkpoints, project_ball, schedule, steepest_ascent
from verifier.deadline import NEVER, Deadline
from verifier.distributed import Shard
from verifier.losses import loss_values, other_logits

SHRINK = 1e-6  # radii are shrunk by this factor so that float64 costs stay within the budget
ROWS_PER_PASS = 256  # every forward/gradient pass sees exactly this many rows (padded): per-row results then
# do not depend on which other rows share the pass, so a sharded run computes what one process computes
MOMENTUM = 0.75  # APGD's momentum alpha
OSCILLATION = 0.75  # APGD's rho: halve the step when fewer than rho of the steps since the last checkpoint rose
SEARCH_ELEMENTS = 2**23  # coordinates per iterate tensor of one search chunk (64 MiB in float64)

Objective = Callable[[torch.Tensor, slice], torch.Tensor]  # (logits of a chunk, its rows) -> value per row


def top_wrong_classes(logits: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """The k highest-scoring wrong classes per sample (N, k), best first."""
    k = max(1, min(k, logits.shape[-1] - 1))
    return other_logits(logits, labels).topk(k, dim=-1).indices


@dataclass(frozen=True, eq=False)
class Target:
    """Model, samples and threat model shared by every attack of one `attack()` call."""

    module: torch.nn.Module
    x: torch.Tensor  # (N, *input shape), model dtype, on the device
    y: torch.Tensor  # (N,) int64
    norm: str
    p: float
    loss: str
    lower: torch.Tensor  # box_lo - x, flattened, float64 (-inf without a box)
    upper: torch.Tensor  # box_hi - x
    fixed_batch: int | None = None
    deadline: Deadline = NEVER  # checked before every forward or gradient pass of a chunk (every step)
    shard: Shard | None = None  # which samples of the whole sample these are (None: all of them)

    @property
    def total(self) -> int:
        """Number of samples of the whole audit (N of the weights 1/N; `count` on one process)."""
        return self.count if self.shard is None else self.shard.total

    def sample_ids(self) -> torch.Tensor:
        """Global index of each local sample (seeds are drawn per sample from it)."""
        start = 0 if self.shard is None else self.shard.start
        return torch.arange(start, start + self.count)

    def gather(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Per-sample (or per-atom) rows of every rank in sample order; the identity on one process."""
        return tensors if self.shard is None else self.shard.gather(*tensors)

    def local(self, values: torch.Tensor) -> torch.Tensor:
        """The local rows of a gathered per-sample tensor."""
        return values if self.shard is None else self.shard.local(values)

    @property
    def count(self) -> int:
        """Number of samples N."""
        return len(self.y)

    @property
    def flat(self) -> torch.Tensor:
        """The samples flattened, float64 (N, D)."""
        return self.x.flatten(1).to(torch.float64)

    def atoms(self, d: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """`x[rows] + d` in the model dtype, each coordinate rounded towards its sample."""
        base = self.flat[rows]
        atom = (base + d).to(self.x.dtype)
        over = (atom.to(torch.float64) - base).abs() > d.abs()
        if bool(over.any()):
            atom = torch.where(over, torch.nextafter(atom, base.to(self.x.dtype)), atom)
        return atom.reshape(len(rows), *self.x.shape[1:])

    def _chunks(self, count: int) -> list[slice]:
        step = self.fixed_batch or ROWS_PER_PASS
        return [slice(s, min(s + step, count)) for s in range(0, count, step)]

    def _padded(self, atoms: torch.Tensor) -> torch.Tensor:
        missing = (self.fixed_batch or ROWS_PER_PASS) - len(atoms)
        return torch.cat([atoms, atoms[-1:].expand(missing, *atoms.shape[1:])]) if missing > 0 else atoms

    def logits(self, atoms: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) in float64 of model-dtype atoms, by forward passes without gradients."""
        parts = []
        with torch.no_grad():
            for part in self._chunks(len(atoms)):
                self.deadline.check("an attack step")
                chunk = atoms[part]
                parts.append(self.module(self._padded(chunk))[: len(chunk)].to(torch.float64))
        return torch.cat(parts)

    def gradient(self, atoms: torch.Tensor, objective: Objective):
        """Objective values (B,), input gradients flattened to float64 (B, D) and logits (B, C)."""
        values, grads, logits = [], [], []
        for part in self._chunks(len(atoms)):
            self.deadline.check("an attack step")
            chunk = self._padded(atoms[part]).detach().requires_grad_(True)
            with torch.enable_grad():
                out = self.module(chunk)[: part.stop - part.start]
                value = objective(out, part)
                (grad,) = torch.autograd.grad(value.sum(), chunk)
            values.append(value.detach().to(torch.float64))
            grads.append(grad[: part.stop - part.start].flatten(1).to(torch.float64))
            logits.append(out.detach().to(torch.float64))
        return torch.cat(values), torch.cat(grads), torch.cat(logits)

    def loss_of(self, logits: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The reported loss per row (float64)."""
        return loss_values(logits.to(torch.float64), self.y[rows], self.loss)

    def loss_objective(self, rows: torch.Tensor) -> Objective:
        """The loss to ascend on rows of samples `rows` (zero_one has no gradient: the margin stands in)."""
        name = "margin" if self.loss == "zero_one" else self.loss
        labels = self.y[rows]
        return lambda logits, part: loss_values(logits, labels[part], name)

    def targeted_objective(self, rows: torch.Tensor, classes: torch.Tensor) -> Objective:
        """`z_j - z_y` with the class `classes[k]` on row k (of sample `rows[k]`)."""
        labels = self.y[rows]

        def objective(logits: torch.Tensor, part: slice) -> torch.Tensor:
            chosen = logits.gather(-1, classes[part].unsqueeze(-1)).squeeze(-1)
            return chosen - logits.gather(-1, labels[part].unsqueeze(-1)).squeeze(-1)
        return objective

    def targeted_dlr(self, rows: torch.Tensor, classes: torch.Tensor) -> Objective:
        """AutoAttack's targeted DLR `(z_j - z_y) / (z_pi1 - (z_pi3 + z_pi4) / 2)` (pi: logits sorted
        descending) with class `classes[k]` on row k; `z_j - z_y` with fewer than 4 classes."""
        margin = self.targeted_objective(rows, classes)

        def objective(logits: torch.Tensor, part: slice) -> torch.Tensor:
            if logits.shape[-1] < 4:
                return margin(logits, part)
            ordered = torch.sort(logits, dim=-1, descending=True).values
            return margin(logits, part) / (ordered[:, 0] - (ordered[:, 2] + ordered[:, 3]) / 2 + 1e-12)
        return objective

    def scores(self, logits: torch.Tensor, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(reported loss, margin `max_{j != y} z_j - z_y`) per row, float64."""
        logits = logits.to(torch.float64)
        return self.loss_of(logits, rows), loss_values(logits, self.y[rows], "margin")


@dataclass
class Best:
    """Per-row best iterates, two optima (the sample itself is the first candidate of both):
    `d`/`value` the highest reported loss (for the risk), `flip`/`margin` the highest margin
    `max_{j != y} z_j - z_y` (for the accuracy: misclassified as soon as some iterate is)."""

    d: torch.Tensor
    value: torch.Tensor
    flip: torch.Tensor
    margin: torch.Tensor

    @classmethod
    def at(cls, d: torch.Tensor, value: torch.Tensor, margin: torch.Tensor) -> Best:
        """Both optima at the same points."""
        return cls(d, value, d, margin)

    def update(self, d: torch.Tensor, value: torch.Tensor, margin: torch.Tensor) -> None:
        """Keep `d` where its loss (its margin) is strictly higher."""
        higher, wider = value > self.value, margin > self.margin
        self.d = torch.where(higher.unsqueeze(-1), d, self.d)
        self.value = torch.where(higher, value, self.value)
        self.flip = torch.where(wider.unsqueeze(-1), d, self.flip)
        self.margin = torch.where(wider, margin, self.margin)

    def take(self, index: torch.Tensor) -> Best:
        """The rows `index` as a new `Best`."""
        return Best(self.d[index], self.value[index], self.flip[index], self.margin[index])

    def put(self, index: torch.Tensor, part: Best) -> None:
        """Write `part` (from `take(index)`) back into the rows `index`."""
        for name in ("d", "value", "flip", "margin"):
            getattr(self, name)[index] = getattr(part, name)

    def grouped(self, k: int) -> Best:
        """Per group of k consecutive rows, the best row of each optimum (one row per group)."""
        offset = torch.arange(len(self.value) // k, device=self.value.device) * k
        high = offset + self.value.view(-1, k).argmax(-1)
        wide = offset + self.margin.view(-1, k).argmax(-1)
        return Best(self.d[high], self.value[high], self.flip[wide], self.margin[wide])

    @property
    def misclassified(self) -> torch.Tensor:
        """Rows whose accuracy optimum is an error (margin >= 0)."""
        return self.margin >= 0

    def accuracy_d(self) -> torch.Tensor:
        """Per row the misclassified iterate when one was found, else the highest-loss one."""
        return torch.where(self.misclassified.unsqueeze(-1), self.flip, self.d)


class Attack:
    """Base of every attack: owns the target, the step count and the seed of the per-sample random draws."""

    name: ClassVar[str] = ""
    default_steps: ClassVar[int] = 50

    def __init__(self, target: Target, steps: int | None = None, seed: int = 0, **options) -> None:
        self.target = target
        self.steps = int(steps) if steps is not None else self.default_steps
        self.seed = int(seed)
        self.draws = 0  # random draws so far: each gets fresh per-sample streams
        self.options = options
        self.zero_gradient = torch.zeros(target.count, dtype=torch.bool, device=target.y.device)
        self.runs = 0

    def run(self, deltas: Sequence[float]) -> list[Distribution]:
        """One distribution per delta (default: `attack(delta)` for each, timed)."""
        out = []
        for delta in deltas:
            start = time.perf_counter()
            dist = self.attack(float(delta))
            out.append(replace(dist, seconds=time.perf_counter() - start))
        return out

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
        return Best.at(zero, *t.scores(t.logits(t.atoms(zero, rows)), rows))

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
        for step in range(steps):
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
        correct gets. Rows go in chunks of at most `SEARCH_ELEMENTS` coordinates per iterate tensor
        (all targets). The random starts are per sample: draw numbers fixed per search and
        `occurrence` (default: counted in `rows`) telling a sample's rows apart.
        """
        t = self.target
        restarts = int(self.options.get("restarts", 1)) if restarts is None else restarts
        topk = int(self.options.get("topk", 9)) if topk is None else topk
        first = self.draws  # this search's draws are numbered first + 1 ... first + restarts + 1, however
        self.draws += restarts + 1  # its rows are chunked or sharded and whether the targeted runs happen
        occurrence = occurrences(rows) if occurrence is None else occurrence
        k = max(1, min(topk, t.logits(t.x[:1]).shape[-1] - 1))
        self.runs = restarts + (k if topk > 0 else 0)  # the runs a row still correct gets (shard-independent)
        return self._search(rows, radius, steps, self.start_best(rows) if best is None else best, restarts, topk,
                            every_row, first, occurrence)

    def _search(self, rows: torch.Tensor, radius: torch.Tensor, steps: int, best: Best, restarts: int, topk: int,
                every_row: bool, first: int, occurrence: torch.Tensor) -> Best:
        t = self.target
        size = max(1, SEARCH_ELEMENTS // (t.flat.shape[1] * (max(topk, 0) + 1)))
        if len(rows) > size:
            parts = [self._search(rows[s:s + size], radius[s:s + size], steps,
                                  best.take(torch.arange(s, min(s + size, len(rows)), device=rows.device)),
                                  restarts, topk, every_row, first, occurrence[s:s + size])
                     for s in range(0, len(rows), size)]
            return Best(*(torch.cat([getattr(b, name) for b in parts]) for name in ("d", "value", "flip", "margin")))
        for run in range(restarts):
            start = self.random_start(radius, rows, first + 1 + run, occurrence)
            best, _ = self.ascend(rows, radius, t.loss_objective(rows), steps, start, best,
                                  adaptive=not self.options.get("plain", False))
        if topk <= 0:
            return best
        classes = top_wrong_classes(t.logits(t.x), t.y, topk)[rows]
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

    def flags(self) -> tuple[str, ...]:
        """Warnings gathered while attacking (e.g. samples whose gradient vanished), over every rank."""
        count = int(self.target.gather(self.zero_gradient.cpu())[0].sum())
        return (f"zero-gradient ({count} of {self.target.total} samples)",) if count else ()

    def pointwise(self, d: torch.Tensor, steps: int, accuracy_d: torch.Tensor | None = None) -> Distribution:
        """Q = (1/N) sum_i delta(x_i + d_i): one atom per sample (the risk); the accuracy is measured
        on the atoms of `accuracy_d` when given and different (e.g. `Best.accuracy_d()`)."""
        t = self.target
        rows = self.rows()
        weights = torch.full((t.count,), 1.0 / t.total, dtype=torch.float64)
        differs = accuracy_d is not None and bool((accuracy_d != d).any())
        return Distribution(t.atoms(d, rows), weights, rows.cpu(), steps, self.flags(),
                            accuracy_atoms=t.atoms(accuracy_d, rows) if differs else None)
