"""What every attack aims at: the threat model, the forward/gradient passes, the best iterates.

`Target` owns what all attacks of one `attack()` call share: the module on its device in the
model's float dtype, the samples, labels, threat norm r, order p, loss, the box as displacement
bounds (float64), and the `Deadline` checked before every forward or gradient pass of a chunk of
atoms — i.e. inside every attack step, so a time limit stops an attack within one such pass.
Displacements `d` are kept in float64 and turned into model-dtype atoms by `Target.atoms`, which
rounds every coordinate towards its sample, so an atom's true distance never exceeds the one
computed from `d`. Every pass has a fixed row count (`rows_per_pass`: at most `ROWS_PER_PASS`,
fewer for a small sample or a large model; padded), so per-row results do not depend on which
other rows share the pass. In a sharded run (`verifier.distributed`)
`Target.shard` says which samples these are: `Target.total` is N and `Target.gather` brings every
rank's per-sample rows to the global steps. `Best` keeps two optima per row (the highest-loss point
for the risk, the most misclassified point for the accuracy).
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property

import torch

from verifier.deadline import NEVER, Deadline
from verifier.distributed import Shard
from verifier.jacobian import autograd_bytes
from verifier.losses import loss_values, other_logits
from verifier import resources

ROWS_PER_PASS = 256  # every forward/gradient pass sees exactly this many rows (padded): per-row results then
# do not depend on which other rows share the pass, so a sharded run computes what one process computes
MIN_ROWS_PER_PASS = 64  # the fewest rows a pass of a small model is padded to (fewer: more passes of little work)
SMALL_PASS_BYTES = 2**26  # ... where MIN_ROWS_PER_PASS rows fit in this many bytes of autograd tensors
RECENT_PASSES = 8  # a pass is predicted from the slowest of this many recent ones (a loaded machine varies)


def rows_per_pass(module: torch.nn.Module, sample: torch.Tensor, total: int, memory_limit_bytes: int | None,
                  shard: Shard | None = None) -> int:
    """Rows of every forward/gradient pass: `ROWS_PER_PASS`, or fewer when the whole sample has fewer
    rows to fill it (the next power of two of `total`: a 16-sample audit of a large CNN does not
    pay for 256 rows; at least `MIN_ROWS_PER_PASS` for a small model, whose passes cost little),
    and no more than fit in `verifier.resources.pass_bytes` of the limit (autograd's saved tensors of one row
    of `sample`, measured). A function of the model, the total sample count and the limit only, and
    the smallest over the ranks of a sharded run, so every rank pads to the same count. Where the
    limit binds (a large model), the default limit (a fraction of the free memory) may change the
    count between runs, hence the last bits of the numbers: give `--memory-limit` to pin it."""
    per_row = autograd_bytes(module, sample[:1]) + 3 * sample[:1].numel() * sample.element_size()
    fits = resources.rows_fitting(resources.pass_bytes(memory_limit_bytes), per_row)
    floor = min(MIN_ROWS_PER_PASS, max(1, SMALL_PASS_BYTES // max(per_row, 1)))
    wanted = max(floor, 1 << max(0, int(total) - 1).bit_length())
    rows = int(min(ROWS_PER_PASS, wanted, fits))
    if shard is not None and shard.distributed:
        rows = int(shard.gather_one(torch.tensor([rows])).min())
    return rows


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
    rows_per_pass: int = ROWS_PER_PASS  # rows of every pass (padded); `rows_per_pass()` sizes it
    timing: dict = field(default_factory=dict, compare=False)  # seconds per padded row: "forward", "gradient"
    # (the slowest of the last `RECENT_PASSES` passes of each kind, timed on the deadline's clock)
    recent: dict = field(default_factory=dict, compare=False)  # kind -> the last passes' seconds per row
    passes: dict = field(default_factory=dict, compare=False)  # kind -> passes run so far ("forward", "gradient")
    working_bytes: int = field(default_factory=resources.working_bytes)  # an attack's own tensors at once (`resources`)

    def with_deadline(self, deadline: Deadline) -> Target:
        """This target under another hard deadline, its samples' logits and pass timings shared (no pass)."""
        if deadline is self.deadline:
            return self
        other = replace(self, deadline=deadline)
        other.__dict__.update({k: v for k, v in self.__dict__.items() if k in ("flat", "clean_logits")})
        return other

    def rows_at_once(self, copies: int, itemsize: int = 8) -> int:
        """How many rows an attack may hold at once when each row takes `copies` tensors of D
        coordinates of `itemsize` bytes (iterates, gradients, best points...): from `working_bytes`."""
        return resources.rows_fitting(self.working_bytes, copies * self.x[0].numel() * itemsize)

    def step_seconds(self, rows: int) -> float:
        """How long one gradient step on `rows` rows should take, from the slowest recent passes (a
        gradient pass taken as three forward passes until one is timed; 0 before any pass)."""
        return self._padded_rows(rows) * self.timing.get("gradient", 3.0 * self.timing.get("forward", 0.0))

    def forward_seconds(self, rows: int) -> float:
        """How long forward passes of `rows` rows should take, from the slowest recent ones (0 before any)."""
        return self._padded_rows(rows) * self.timing.get("forward", 0.0)

    def _padded_rows(self, rows: int) -> int:
        step = self.fixed_batch or self.rows_per_pass
        return math.ceil(rows / step) * step

    def _timed(self, kind: str, began: float, rows: int) -> None:
        """Record a pass of `rows` padded rows that began at `began` (on the deadline's clock)."""
        passes = self.recent.setdefault(kind, deque(maxlen=RECENT_PASSES))
        passes.append((self.deadline.clock() - began) / rows)
        self.timing[kind] = max(passes)
        self.passes[kind] = self.passes.get(kind, 0) + 1

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

    @cached_property
    def flat(self) -> torch.Tensor:
        """The samples flattened, float64 (N, D), computed once."""
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
        step = self.fixed_batch or self.rows_per_pass
        return [slice(s, min(s + step, count)) for s in range(0, count, step)]

    def _padded(self, atoms: torch.Tensor) -> torch.Tensor:
        missing = (self.fixed_batch or self.rows_per_pass) - len(atoms)
        return torch.cat([atoms, atoms[-1:].expand(missing, *atoms.shape[1:])]) if missing > 0 else atoms

    @cached_property
    def clean_logits(self) -> torch.Tensor:
        """`logits(x)` of the samples themselves, computed once (every pass has the same rows count,
        so these are the values any pass gives them)."""
        return self.logits(self.x)

    def logits(self, atoms: torch.Tensor) -> torch.Tensor:
        """Logits (B, C) in float64 of model-dtype atoms, by forward passes without gradients."""
        if len(atoms) == 0:  # (the samples themselves are never empty)
            return self.clean_logits[:0]
        parts = []
        with torch.no_grad():
            for part in self._chunks(len(atoms)):
                self.deadline.check("an attack step")
                chunk, began = atoms[part], self.deadline.clock()
                padded = self._padded(chunk)
                parts.append(self.module(padded)[: len(chunk)].to(torch.float64))
                self._timed("forward", began, len(padded))
        return torch.cat(parts)

    def gradient(self, atoms: torch.Tensor, objective: Objective):
        """Objective values (B,), input gradients flattened to float64 (B, D) and logits (B, C)."""
        if len(atoms) == 0:
            flat = atoms.flatten(1).to(torch.float64)
            return flat.sum(1), flat, self.clean_logits[:0]
        values, grads, logits = [], [], []
        for part in self._chunks(len(atoms)):
            self.deadline.check("an attack step")
            began = self.deadline.clock()
            chunk = self._padded(atoms[part]).detach().requires_grad_(True)
            with torch.enable_grad():
                out = self.module(chunk)[: part.stop - part.start]
                value = objective(out, part)
                (grad,) = torch.autograd.grad(value.sum(), chunk)
            values.append(value.detach().to(torch.float64))
            grads.append(grad[: part.stop - part.start].flatten(1).to(torch.float64))
            logits.append(out.detach().to(torch.float64))
            self._timed("gradient", began, len(chunk))
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

    @classmethod
    def joined(cls, parts: list[Best]) -> Best:
        """The rows of `parts` one after the other (chunks of rows searched apart)."""
        return cls(*(torch.cat([getattr(b, name) for b in parts]) for name in ("d", "value", "flip", "margin")))

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
