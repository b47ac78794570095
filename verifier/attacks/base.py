"""The shared machinery of every attack: the threat model, forward/gradient passes, ascent steps.

`Target` owns what all attacks share: the module on its device in the model's float dtype, the
samples, labels, threat norm r, order p, loss, the box as displacement bounds (float64), and the
`Deadline` checked before every forward or gradient pass of a chunk of atoms — i.e. inside every
attack step, so a time limit stops an attack within one such pass.
Displacements `d` are kept in float64 and turned into model-dtype atoms by `Target.atoms`, which
rounds every coordinate towards its sample, so an atom's true distance never exceeds the one
computed from `d`. `Attack` is the base each attack file builds on: batching (padded chunks of a
fixed size), steepest-ascent directions and projections for r in {inf, 2, 1} (method §5), a
step schedule, the per-atom best-iterate loop `ascend`, and the point-wise distribution. An
attack only writes its own loop in `attack(delta)` (or `run(deltas)` when one pass serves every
delta). In a sharded run (`verifier.distributed`) `Target.shard` says which samples these are:
`Target.total` is N and `Target.gather` brings every rank's per-sample rows to the global steps;
random draws are per sample and every pass has a fixed row count (`ROWS_PER_PASS`, padded), so
results do not depend on the sharding.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import torch

from verifier.attacks.result import Distribution
from verifier.deadline import NEVER, Deadline
from verifier.distributed import Shard
from verifier.geometry import vector_norm
from verifier.losses import loss_values

SHRINK = 1e-6  # radii are shrunk by this factor so that float64 costs stay within the budget
ROWS_PER_PASS = 256  # every forward/gradient pass sees exactly this many rows (padded): per-row results then
# do not depend on which other rows share the pass, so a sharded run computes what one process computes

Objective = Callable[[torch.Tensor, slice], torch.Tensor]  # (logits of a chunk, its rows) -> value per row


def steepest_ascent(g: torch.Tensor, d: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
                    norm: str) -> torch.Tensor:
    """Unit steepest-ascent direction of gradients `g` (B, D): inf sign(g), 2 g/||g||, 1 the signed
    coordinate of largest |g_k| that still has room in the box; 0 where g = 0."""
    if norm == "inf":
        return torch.sign(g)
    if norm == "2":
        size = vector_norm(g, "2").unsqueeze(-1)
        return torch.where(size > 0, g / size.clamp_min(1e-300), torch.zeros_like(g))
    room = torch.where(g > 0, upper - d, d - lower)
    score = torch.where(room > 0, g.abs(), torch.zeros_like(g))
    best, k = score.max(-1, keepdim=True)
    step = torch.zeros_like(g).scatter_(-1, k, torch.sign(g.gather(-1, k)))
    return torch.where(best > 0, step, torch.zeros_like(g))


def project_ball(d: torch.Tensor, radius: torch.Tensor, norm: str) -> torch.Tensor:
    """Euclidean projection of each row of `d` (B, D) onto the r-ball of its radius (B,)."""
    r = radius.unsqueeze(-1)
    if norm == "inf":
        return torch.maximum(torch.minimum(d, r), -r)
    if norm == "2":
        size = vector_norm(d, "2").unsqueeze(-1)
        return d * torch.where(size > r, r / size.clamp_min(1e-300), torch.ones_like(size))
    size = d.abs()
    ordered = torch.sort(size, -1, descending=True).values
    partial = torch.cumsum(ordered, -1)
    count = torch.arange(1, d.shape[-1] + 1, dtype=d.dtype, device=d.device)
    active = (ordered - (partial - r) / count) > 0
    rho = (active * count).max(-1, keepdim=True).values.clamp_min(1).long()
    theta = (partial.gather(-1, rho - 1) - r) / rho
    shrunk = torch.sign(d) * (size - theta).clamp_min(0.0)
    return torch.where(size.sum(-1, keepdim=True) <= r, d, shrunk)


def schedule(steps: int) -> list[float]:
    """Step sizes as fractions of the radius: cosine decay from 0.5, never below 1/steps."""
    return [max(0.25 * (1 + math.cos(math.pi * t / steps)), 1.0 / steps) for t in range(steps)]


def dual_exponent(p: float) -> float:
    """q with 1/p + 1/q = 1."""
    return math.inf if p == 1 else (1.0 if math.isinf(p) else p / (p - 1.0))


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


@dataclass
class Best:
    """Per-row best iterate by reported loss (the sample itself is the first candidate)."""

    d: torch.Tensor
    value: torch.Tensor

    def update(self, d: torch.Tensor, value: torch.Tensor) -> None:
        """Keep `d` where its loss is strictly higher."""
        better = value > self.value
        self.d = torch.where(better.unsqueeze(-1), d, self.d)
        self.value = torch.where(better, value, self.value)


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

    def run(self, deltas: Sequence[float]) -> list[Distribution]:
        """One distribution per delta (default: `attack(delta)` for each, timed)."""
        out = []
        for delta in deltas:
            start = time.perf_counter()
            dist = self.attack(float(delta))
            out.append(Distribution(dist.atoms, dist.weights, dist.source, dist.steps, dist.flags,
                                    time.perf_counter() - start))
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

    def row_generators(self, rows: torch.Tensor) -> list[torch.Generator]:
        """One CPU generator per row, seeded from (seed, global sample index, draw number, the row's
        occurrence among its sample's rows): the numbers a sample gets do not depend on which other
        samples run in this process, so a sharded run draws what one process draws."""
        self.draws += 1
        seen: dict[int, int] = {}
        generators = []
        for sample in self.target.sample_ids()[rows.cpu()].tolist():
            occurrence = seen[sample] = seen.get(sample, -1) + 1
            state = np.random.SeedSequence([self.seed, sample, self.draws, occurrence]).generate_state(2)
            generators.append(torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1])))
        return generators

    def random_start(self, radius: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """A random displacement inside each row's ball (per-sample CPU generators: device- and
        shard-independent)."""
        t = self.target
        width = t.flat.shape[1]
        generators = self.row_generators(rows)

        def draw(sample) -> torch.Tensor:  # (rows, width) from each row's own generator
            if not generators:
                return torch.zeros(0, width, dtype=torch.float64)
            return torch.stack([sample(g) for g in generators])

        u = draw(lambda g: torch.rand(width, generator=g, dtype=torch.float64))
        scale = draw(lambda g: torch.rand(1, generator=g, dtype=torch.float64))[:, :1]
        if t.norm == "inf":
            d = (2 * u - 1) * radius.cpu().unsqueeze(-1)
        else:
            if t.norm == "2":
                v = draw(lambda g: torch.randn(width, generator=g, dtype=torch.float64))
            else:
                v = -torch.log(u.clamp_min(1e-300)) * torch.sign(
                    draw(lambda g: torch.rand(width, generator=g, dtype=torch.float64)) - 0.5)
            size = vector_norm(v, t.norm).clamp_min(1e-300).unsqueeze(-1)
            d = v / size * scale * radius.cpu().unsqueeze(-1)
        return self.project(d.to(t.flat.device), radius, rows)

    def ascend(self, rows: torch.Tensor, radius: torch.Tensor, objective: Objective, steps: int,
               start: torch.Tensor | None = None, best: Best | None = None) -> tuple[Best, torch.Tensor]:
        """Projected steepest ascent of `objective` within each row's radius.

        Returns the best iterate by reported loss (the sample itself included) and the last iterate.
        """
        t = self.target
        zero = torch.zeros(len(rows), t.flat.shape[1], dtype=torch.float64, device=t.flat.device)
        if best is None:
            best = Best(zero.clone(), t.loss_of(t.logits(t.atoms(zero, rows)), rows))
        d = zero if start is None else start
        for step, fraction in enumerate(schedule(steps)):
            _, grad, logits = t.gradient(t.atoms(d, rows), objective)
            best.update(d, t.loss_of(logits, rows))
            if step == 0:
                self.note_zero_gradient(rows, grad)
            direction = steepest_ascent(grad, d, t.lower[rows], t.upper[rows], t.norm)
            d = self.project(d + fraction * radius.unsqueeze(-1) * direction, radius, rows)
        best.update(d, t.loss_of(t.logits(t.atoms(d, rows)), rows))
        return best, d

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

    def pointwise(self, d: torch.Tensor, steps: int) -> Distribution:
        """Q = (1/N) sum_i delta(x_i + d_i): one atom per sample."""
        t = self.target
        rows = self.rows()
        weights = torch.full((t.count,), 1.0 / t.total, dtype=torch.float64)
        return Distribution(t.atoms(d, rows), weights, rows.cpu(), steps, self.flags())
