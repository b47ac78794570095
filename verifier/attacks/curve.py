"""The curve attack `wda-curve` (beyond the paper; method §5 "Curve attack").

Per sample, attack points x_ik at several radii: for every (sample, radius) pair, in one batch,
the base's point-wise engine `Attack.search` (APGD on the loss from a random start, then APGD on
the targeted DLR loss for each of the top-k wrong classes, on every pair; `steps` default 30
per run), the highest-loss iterate of every run kept. Measured costs
`t_ik = ||x_ik - x_i||_r^p` (float64, from the returned atoms) and gains
`loss(x_ik) - loss(x_i)`; the upper concave hull in t of (0, 0) and these points; a greedy
multiple-choice fractional knapsack on the hull's segments (value per cost = slope) under
`sum_i t_i <= N delta^p` (`verifier.certify.allocation.allocate`, the sample itself as candidate
0); Q explicit with at most two atoms per sample (the two hull vertices around the sample's
allocated cost). p = inf: every point moves within delta, so each atom is
the best attack point at distance <= delta.
`radii` (1-D tensor of absolute radii, shared by every delta; the deltas are always added):
default the certificate's grid (`verifier.certify.certificate.radius_grid` with its default 24
points and the attack's box: geometric from max/100 up to N^(1/p) max(delta), capped at 20
max(delta) and at the box's reach), so that the allocation works on the radii the certificate
aggregates over, plus `SMALL_RADII` (4) geometric radii from min(delta)/8 up to its first
radius (at small budgets small moves of many samples are what pays); p = inf: the deltas only (the search at radius delta already covers every
smaller radius). Per-sample radii (p in (1, inf), default grid, option `wpgd`, default True):
W-PGD's highest-risk atom at every delta and the engine's point at that atom's radius join each
sample's candidates (after the grid's, whose points are unchanged), so the knapsack is never below
W-PGD's own allocation, the first-order optimum the shared grid only brackets at small budgets.
The attack points do not depend on delta: one pass serves every delta. Memory: the (sample,
radius) rows are searched in chunks sized from the target's working memory (`Target.rows_at_once`),
and each chunk leaves only its candidates' distances and gains plus, in the model dtype, the atoms
an allocation can still choose (`Candidates`), never an (N, K, D) float64 tensor.
Example: `CurveAttack(target, radii=torch.tensor([0.05, 0.1, 0.2])).run([0.1])`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence

import torch

from verifier.attacks.base import ASCEND_COPIES, SHRINK, Attack
from verifier.attacks.draws import occurrences
from verifier.attacks.result import Distribution
from verifier.attacks.wpgd import WPGD
from verifier.certify.allocation import allocate, upper_hull
from verifier.certify.certificate import grid_of
from verifier.certify.growth import box_reach
from verifier.geometry import vector_norm

SMALL_RADII = 4  # radii added from min(delta)/8 up to the certificate grid's first radius


def default_radii(count: int, reach: float, deltas: Sequence[float], p: float) -> torch.Tensor:
    """The default radius grid (absolute radii): the certificate's grid of `count` samples whose
    farthest point in the box is `reach` away (p = inf: the deltas)."""
    if math.isinf(p) or not any(d > 0 for d in deltas):
        return torch.tensor([float(d) for d in deltas], dtype=torch.float64)
    grid = grid_of(count, reach, deltas, p, 24)
    first, smallest = float(grid[grid > 0].min()), min(float(d) for d in deltas if d > 0)
    if smallest / 8 >= first:
        return grid
    # below the grid's first radius: small moves of many samples win at small budgets
    below = torch.logspace(math.log10(smallest / 8), math.log10(first), SMALL_RADII + 1, dtype=torch.float64)[:-1]
    return torch.cat([below, grid])


class CurveAttack(Attack):
    """Attack points on a radius grid, concave hull in cost, multiple-choice fractional knapsack."""

    name = "wda-curve"
    default_steps = 30

    def _points(self, deltas: Sequence[float]) -> Candidates:
        t = self.target
        given = self.options.get("radii")
        if given is None:
            box = self.options.get("box")
            reach = (float(t.gather(box_reach(t.x.cpu().to(torch.float64), box, t.norm))[0].max())
                     if box is not None else math.inf)
            grid = default_radii(t.total, reach, deltas, t.p)
        else:
            grid = torch.as_tensor(given, dtype=torch.float64)
        grid = torch.unique(torch.cat([grid.flatten().cpu(), torch.tensor([float(d) for d in deltas],
                                                                          dtype=torch.float64)]))
        grid = grid[grid > 0].to(t.flat.device)
        if len(grid) == 0:  # every delta is 0: nothing moves
            return Candidates(t.count, 0, math.inf)
        own = self.wpgd_points(deltas)  # (N, J, *shape): per-sample radii of W-PGD's allocation
        extra = own.shape[1]
        own_rows = self.rows(extra)
        own_radii = self._distances(own.flatten(0, 1), own_rows).view(t.count, extra)
        radii = torch.cat([grid.expand(t.count, len(grid)), own_radii], 1)  # the grid first: its rows'
        width = radii.shape[1]  # results (and random starts) are those of a search on it alone
        store = Candidates(t.count, width + extra, t.p)
        clean = t.loss_of(t.clean_logits, self.rows())
        if extra and not self.out_of_time(rows=t.count * extra):  # W-PGD's atoms themselves are candidates too
            gain = t.loss_of(t.logits(own.flatten(0, 1)), own_rows) - clean[own_rows]
            store.add(own_rows, torch.arange(width, width + extra).repeat(t.count), own.flatten(0, 1),
                      self._distances(own.flatten(0, 1), own_rows), gain)
        del own
        rows, radius = self.rows(width), radii.flatten()
        occurrence, first = occurrences(rows), self.draws
        topk = int(self.options.get("topk", 9))
        size = t.rows_at_once(ASCEND_COPIES * (topk + 1))  # the chunks `search` itself would take
        for start in range(0, len(rows), size):
            part = slice(start, start + size)
            self.draws = first  # every chunk draws what the whole search would: per (sample, occurrence)
            best = self.search(rows[part], radius[part], self.steps, every_row=True, occurrence=occurrence[part])
            atoms = t.atoms(best.d, rows[part])
            store.add(rows[part], torch.arange(len(rows))[part] % width, atoms,
                      self._distances(atoms, rows[part]), best.value - clean[rows[part]])
            store.prune(range(start // width, min(start + size, len(rows)) // width))  # samples now complete
        return store

    def _distances(self, atoms: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """`||atom - x_i||_r` in float64 of model-dtype atoms on rows of samples `rows`."""
        t = self.target
        return vector_norm(atoms.flatten(1).to(torch.float64) - t.flat[rows], t.norm)

    def wpgd_points(self, deltas: Sequence[float]) -> torch.Tensor:
        """W-PGD's highest-risk atoms at every positive delta (N, J, *input shape): sample-specific
        radii (its first-order allocation, `||d_i|| ~ ||g_i||_*^(q-1)`), which the shared grid only
        brackets; none for p = inf (point-wise), p = 1 (W-PGD is undefined), given `radii` (the
        points then sit on exactly those) or option `wpgd=False`."""
        t = self.target
        positive = [float(d) for d in deltas if d > 0]
        chosen = self.options.get("radii") is None and self.options.get("wpgd", True)
        if math.isinf(t.p) or t.p == 1 or not chosen or not positive:
            return t.x[:, None][:, :0]
        # within this attack's time share, reserving the replays of every delta this part serves
        runner = WPGD(t, seed=self.seed, budget=self.until, reserve=self.replays_due())
        runner.first_step_open = self.first_step_open
        points = torch.stack([runner.attack(delta).atoms for delta in positive], 1)
        self.cut = self.cut or runner.cut
        self.first_step_open = self.first_step_open and runner.first_step_open
        return points

    def _pointwise(self, distance: torch.Tensor, gain: torch.Tensor, delta: float) -> list[tuple[int, int, float]]:
        """p = inf: the best point within delta per local sample, as (sample, point or -1, weight)."""
        usable = torch.where(distance <= delta, gain, torch.full_like(gain, -math.inf))
        value, k = usable.max(-1)
        n = self.target.total
        return [(i, int(k[i]) if value[i] > 0 else -1, 1.0 / n) for i in range(len(gain))]

    def _allocated(self, distance: torch.Tensor, gain: torch.Tensor, delta: float) -> list[tuple[int, int, float]]:
        """p < inf: hull segments, knapsack over every rank's samples, and at most two atoms per local
        sample (`allocate`)."""
        t = self.target
        distance, gain = t.gather(distance, gain)
        n = len(gain)
        unmoved = torch.zeros(n, 1, dtype=torch.float64)  # candidate 0 of `allocate`: the sample itself
        costs = torch.cat([unmoved, distance.to(torch.float64) ** t.p], 1)
        gains = torch.cat([unmoved, gain.to(torch.float64)], 1)
        allocation = allocate(costs, gains, delta**t.p)
        out = []
        for i, (low, high, weight) in enumerate(zip(t.local(allocation.low).tolist(), t.local(allocation.high).tolist(),
                                                    t.local(allocation.weight).tolist())):
            if weight <= 0:
                out.append((i, low - 1, 1.0 / n))
            else:
                out.append((i, low - 1, (1 - weight) / n))
                out.append((i, high - 1, weight / n))
        return out

    def run(self, deltas: Sequence[float]) -> list[Distribution]:
        """One batch of attack points for every delta, then one hull allocation per delta."""
        t = self.target
        start = time.perf_counter()
        self.deltas_per_part = len(deltas)  # one batch of points serves every delta (and moves each one's atoms)
        self.begin(1)
        store = self._points(deltas)
        shared = time.perf_counter() - start
        out = []
        for delta in deltas:
            start = time.perf_counter()
            limit = float(delta) * (1 - SHRINK)
            if math.isinf(t.p):
                choice = self._pointwise(store.distance, store.gain, float(delta))
            else:
                choice = self._allocated(store.distance, store.gain, limit)
            choice = [c for c in choice if c[2] > 0]
            parts = [t.x[i:i + 1] if k < 0 else store.atom(i, k) for i, k, _ in choice]
            out.append(Distribution(
                torch.cat(parts), torch.tensor([w for _, _, w in choice], dtype=torch.float64),
                torch.tensor([i for i, _, _ in choice], dtype=torch.int64), self.steps * self.runs,
                self.flags(moved=any(k >= 0 and float(store.distance[i, k]) > 0 for i, k, _ in choice)),
                shared + time.perf_counter() - start))
        return out


class Candidates:
    """The curve attack's candidates, stored compactly: per (sample, candidate) its measured distance
    and gain (dense float64 tables on the CPU; 0, 0 where none was found), and the atom itself (model
    dtype, one (1, *input shape) tensor per kept candidate) only while it may still be allocated: a
    candidate that gains nothing is never stored, and once a sample's candidates are all in, only those
    `allocate` can choose are kept (p < inf: its upper concave hull, `upper_hull`, the very vertices
    `allocate` takes; p = inf: its Pareto front in (distance, gain), which holds the first best point
    within any radius). Instead of an (N, K, D) tensor, the moved atoms on some N x (hull) rows."""

    def __init__(self, count: int, width: int, p: float) -> None:
        self.distance = torch.zeros(count, width, dtype=torch.float64)
        self.gain = torch.zeros(count, width, dtype=torch.float64)
        self.p = p
        self.atoms: dict[tuple[int, int], torch.Tensor] = {}

    def add(self, samples: torch.Tensor, slots: torch.Tensor, atoms: torch.Tensor, distance: torch.Tensor,
            gain: torch.Tensor) -> None:
        """Candidates `slots[m]` of samples `samples[m]`: atom `atoms[m]`, its distance and gain."""
        samples, slots = samples.cpu(), slots.cpu()
        self.distance[samples, slots] = distance.cpu().to(torch.float64)
        self.gain[samples, slots] = gain.cpu().to(torch.float64)
        for m in (gain > 0).nonzero().squeeze(-1).tolist():
            self.atoms[(int(samples[m]), int(slots[m]))] = atoms[m:m + 1].clone()  # not a view of the chunk

    def prune(self, samples) -> None:
        """Drop the atoms of `samples` that no allocation can choose (their candidates are all in)."""
        for i in samples:
            costs, gains = self.distance[i].tolist(), self.gain[i].tolist()
            if math.isinf(self.p):
                keep = {k for k in range(len(costs)) if not any(
                    costs[j] <= costs[k] and (gains[j] > gains[k] or (gains[j] == gains[k] and j < k))
                    for j in range(len(costs)) if j != k)}
            else:
                powered = [0.0] + (self.distance[i].to(torch.float64) ** self.p).tolist()
                keep = {v - 1 for v in upper_hull(powered, [0.0] + gains) if v > 0}
            for k in range(len(costs)):
                if k not in keep:
                    self.atoms.pop((i, k), None)

    def atom(self, sample: int, slot: int) -> torch.Tensor:
        """The stored atom (1, *input shape) of candidate `slot` of `sample`."""
        return self.atoms[(sample, slot)]
