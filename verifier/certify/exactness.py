"""Exactness report (method §3.5): an explicit distribution that realises the certificate.

Per sample and grid radius `s_k` the candidate point is the maximiser of the linearised margin
over `B(x_i, s_k) ∩ box` for the class that gains most (`z ≈ A_i x + b_i`, exact on the cell of a
piecewise-linear model, the first-order model elsewhere). Its true loss comes from a forward
pass and its cost `||x_ik - x_i||^p` is measured in float64. For `p = inf` each sample takes its
best candidate within `delta`; for `p < inf` the budget `delta^p` is split by the multiple-choice
fractional knapsack of `allocation.py` (at most two points per sample). `E_Q[loss]` is then a
lower bound on `R(delta)`, and the certificate is **exact** when it is within
`tolerance * max(1, |certificate|)` of that lower bound.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from verifier.certify.allocation import allocate
from verifier.deadline import NEVER, Deadline, Stopped, Terminated
from verifier.geometry import argmax_linear, max_linear, vector_norm
from verifier.losses import loss_values, margins

EXACT_TOLERANCE = 1e-3


@dataclass(frozen=True, eq=False)
class RealisedDistribution:
    """`Q = sum_m weights[m] * delta_{atoms[m]}`, each atom moved from sample `source[m]`."""

    delta: float
    atoms: torch.Tensor  # (M, *input shape)
    weights: torch.Tensor  # (M,), sums to 1
    source: torch.Tensor  # (M,) long
    risk: float  # E_Q[loss] by forward passes
    accuracy: float  # accuracy under Q (margin >= 0 is an error)
    cost: float  # W_p(Q, P_N) (p = inf: the largest move)


@dataclass(frozen=True, eq=False)
class Candidates:
    """Candidate moves of every sample on the radius grid (candidate 0 = no move)."""

    radii: torch.Tensor  # (K,)
    direction_class: torch.Tensor  # (N, K) long: the class whose linearised margin is maximised
    distance: torch.Tensor  # (N, K): ||x_ik - x_i||_r
    gain: torch.Tensor  # (N, K): loss(x_ik) - loss(x_i)
    points: torch.Tensor | None = None  # (N, E, d): explicit moves (e.g. MILP maximisers), zero = no move
    point_distance: torch.Tensor | None = None  # (N, E)
    point_gain: torch.Tensor | None = None  # (N, E)

    def with_points(self, module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, moves: torch.Tensor,
                    norm: str, loss: str) -> Candidates:
        """These candidates plus explicit displacements `moves` (N, E, d), evaluated by forward passes."""
        count, extra = moves.shape[:2]
        with torch.no_grad():
            clean = loss_values(module(x), y, loss)
            moved = module((x.unsqueeze(1) + moves.reshape(count, extra, *x.shape[1:])).flatten(0, 1))
            gain = loss_values(moved, y.repeat_interleave(extra), loss).reshape(count, extra) - clean[:, None]
        return replace(self, points=moves, point_distance=vector_norm(moves, norm), point_gain=gain)


def _moves(jacobian: torch.Tensor, logits: torch.Tensor, labels: torch.Tensor, lower: torch.Tensor,
           upper: torch.Tensor, radius: torch.Tensor, norm: str, classes: torch.Tensor | None = None):
    """The maximising class (unless given) and displacement of the linearised margin at one radius."""
    rows = torch.arange(len(labels))
    directions = jacobian - jacobian[rows, labels].unsqueeze(1)  # a_j - a_y: (N, C, d)
    if classes is None:
        gains = max_linear(directions, lower[:, None], upper[:, None], radius[:, None], norm)
        values = (margins(logits, labels) + gains).masked_fill(
            torch.nn.functional.one_hot(labels, logits.shape[1]).bool(), -math.inf)
        classes = values.argmax(-1)
    return classes, argmax_linear(directions[rows, classes], lower, upper, radius, norm)


def candidates(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor,
               jacobian: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, radii: torch.Tensor, norm: str,
               loss: str, deadline: Deadline = NEVER) -> Candidates:
    """Evaluate the candidate move of every sample at every radius (one forward pass per radius);
    `logits` are the module's clean logits of `x`.

    `deadline` is checked per radius; past it the candidates are those of the radii reached (the
    realising distribution is then built from fewer moves; a signal still stops everything)."""
    with torch.no_grad():
        clean = loss_values(logits, y, loss)
        flat_jacobian = jacobian.flatten(2)
        empty = torch.zeros(len(x), 0, dtype=x.dtype)
        classes, distances, gains = [empty.long()], [empty], [empty]
        try:
            for radius in radii:
                deadline.check("the exactness candidates")
                chosen, move = _moves(flat_jacobian, logits, y, lower, upper, radius.expand(len(x)), norm)
                moved = module(x + move.reshape(x.shape))
                classes.append(chosen[:, None])
                distances.append(vector_norm(move, norm)[:, None])
                gains.append((loss_values(moved, y, loss) - clean)[:, None])
        except Stopped as err:
            if isinstance(err, Terminated):
                raise
    return Candidates(radii=radii[:len(gains) - 1], direction_class=torch.cat(classes, 1),
                      distance=torch.cat(distances, 1), gain=torch.cat(gains, 1))


@dataclass(frozen=True, eq=False)
class Placed:
    """The atoms one range of samples contributes to Q for one pick (its lower or upper candidate)."""

    atoms: torch.Tensor  # (m, *input shape)
    weights: torch.Tensor  # (m,) probability mass (already divided by N)
    source: torch.Tensor  # (m,) long, sample index (shifted by the range's offset)
    values: torch.Tensor  # (m,) loss by a forward pass
    wrong: torch.Tensor  # (m,) bool, margin >= 0
    moved_by: torch.Tensor  # (m,) float64 displacement norm


def choose(found: Candidates, delta: float, p: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per sample (every sample of Q): candidate `low` with mass `1 - weight`, `high` with `weight`
    (0 = no move, 1..K the linearised moves, K+1.. the explicit points): p = inf the best candidate
    within delta, p < inf the knapsack of `allocate`."""
    count = len(found.gain)
    zero = torch.zeros(count, 1, dtype=found.gain.dtype)
    extra = [] if found.points is None else [found.point_gain]
    gains = torch.cat([zero, found.gain] + extra, 1)
    if math.isinf(p):
        within = (found.radii <= delta).expand(count, -1)
        if found.points is not None:
            within = torch.cat([within, found.point_distance <= delta], 1)
        usable = torch.cat([torch.ones(count, 1, dtype=torch.bool), within], 1)
        best = gains.masked_fill(~usable, -math.inf).argmax(1)
        return best, best, torch.zeros(count, dtype=torch.float64)
    distances = torch.cat([zero, found.distance] + ([] if found.points is None else [found.point_distance]), 1)
    allocation = allocate(distances**p, gains, delta**p)
    return allocation.low, allocation.high, allocation.weight


def place(module: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, jacobian: torch.Tensor, lower: torch.Tensor,
          upper: torch.Tensor, found: Candidates, picks: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
          total: int, norm: str, loss: str, offset: int = 0,
          logits: torch.Tensor | None = None) -> tuple[Placed, Placed]:
    """The atoms of these samples for both picks (rows of `found` and `picks` are these samples),
    the moved ones evaluated by one forward pass (`logits`: the clean ones, default computed);
    `total` is N of the masses 1/N."""
    low, high, weight = picks
    rows = torch.arange(len(x))
    linearised = len(found.radii)
    flat_jacobian = jacobian.flatten(2)
    placed, shifted = [], []
    with torch.no_grad():
        logits = module(x) if logits is None else logits
        for index, mass in ((low, 1.0 - weight), (high, weight)):
            keep = mass > 0
            shifted.append((keep & (index > 0))[keep])
            moved = x.clone()
            explicit = keep & (index > linearised)
            if explicit.any():
                moved[explicit] = x[explicit] + found.points[rows[explicit], index[explicit] - linearised - 1].reshape(
                    x[explicit].shape)
            chosen = keep & (index > 0) & (index <= linearised)
            if chosen.any():
                k = index[chosen] - 1
                radius = found.radii[k]
                _, move = _moves(flat_jacobian[chosen], logits[chosen], y[chosen], lower[chosen], upper[chosen],
                                 radius, norm, classes=found.direction_class[rows[chosen], k])
                moved[chosen] = x[chosen] + move.reshape(x[chosen].shape)
            placed.append((moved[keep], mass[keep] / total, rows[keep]))
        outputs = logits[torch.cat([source for _, _, source in placed])].clone()
        away = torch.cat(shifted)
        if away.any():  # only moved atoms need a forward pass; the others are the samples themselves
            outputs[away] = module(torch.cat([atoms for atoms, _, _ in placed])[away])
    parts, start = [], 0
    for atoms, weights, source in placed:
        out, labels = outputs[start:start + len(atoms)], y[source]
        start += len(atoms)
        wrong = margins(out, labels).masked_fill(
            torch.nn.functional.one_hot(labels, out.shape[1]).bool(), -math.inf).max(-1).values >= 0
        parts.append(Placed(atoms=atoms, weights=weights, source=source + offset, values=loss_values(out, labels, loss),
                            wrong=wrong, moved_by=vector_norm((atoms - x[source]).flatten(1).double(), norm)))
    return parts[0], parts[1]


def summarise(delta: float, p: float, low: Sequence[Placed], high: Sequence[Placed]) -> RealisedDistribution:
    """Q from the placed atoms of every range, every lower pick first (the order of one process)."""
    parts = [*low, *high]
    weights = torch.cat([part.weights for part in parts])
    moved_by = torch.cat([part.moved_by for part in parts])
    values, wrong = torch.cat([part.values for part in parts]), torch.cat([part.wrong for part in parts])
    if math.isinf(p):
        cost = float(moved_by.max()) if len(moved_by) else 0.0
    else:
        cost = float((weights * moved_by**p).sum()) ** (1.0 / p)
    return RealisedDistribution(delta=delta, atoms=torch.cat([part.atoms for part in parts]), weights=weights,
                                source=torch.cat([part.source for part in parts]),
                                risk=float((weights * values).sum()), accuracy=float((weights * (~wrong)).sum()),
                                cost=cost)


def is_exact(certificate: float | None, realised: float, tolerance: float = EXACT_TOLERANCE) -> bool:
    """Whether the certificate is met by an explicit distribution (§3.5)."""
    if certificate is None or not math.isfinite(certificate) or not math.isfinite(realised):
        return False  # an infinite certificate is met by nothing (inf <= tolerance * inf would say it is)
    gap = certificate - realised  # negative beyond rounding would be a soundness bug, never "exact"
    return -1e-6 * max(1.0, abs(certificate)) <= gap <= tolerance * max(1.0, abs(certificate))
