"""`solve_margins`: the largest margins `max z_j - z_y` of one sample over `B(x_i, s) ∩ box` by MILP (§8).

The network is an `EncodedNetwork` (affine maps and `max(h, alpha h)` units). With the interval
`[l, h]` of every unit's input (our own interval/CROWN bounds over the same set, sound), a unit
is stated exactly: `v = h` when `l >= 0`, `v = alpha h` when `h <= 0`, and otherwise with one
binary `a` (big-M from `l`, `h`, method §8):
    v >= u,  v >= alpha u,  v <= u - (1 - alpha) l (1 - a),  v <= alpha u + (1 - alpha) h a.
The input set is linear for ℓ∞ (bounds) and ℓ1 (`t >= |x - x_i|`, `sum t <= s`), inside the box.
HiGHS (`scipy.optimize.milp`) solves one MILP per wrong class, the classes in decreasing order
of their linear bound; a class whose linear bound is already at most the best margin found is
not solved (it cannot be the maximum). The bound used is the solver's **dual bound** (the best
LP bound over its open nodes), an upper bound on the optimum at any stop, padded for the
solver's floating-point tolerances; at optimality it meets the incumbent within the gap.

With a `Penalty(lam, p)` the objective is `z_j - z_y - lam ||x - x_i||^p` (the inner sup of the
W_p dual, method §8): `tau >= ||x - x_i||` is linear (ℓ∞: `tau >= |x_k - x_ik|`; ℓ1: `tau >= sum t`)
and `w >= tau^p` is relaxed to the tangents of the convex `tau^p` at `TANGENTS` points of
`[0, s]` (`w >= a^p + p a^(p-1) (tau - a)`): every true point stays feasible with `w = tau^p`, so
the dual bound still bounds the penalised optimum from above.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import scipy.sparse as sp
from scipy.optimize import Bounds, LinearConstraint, milp

from verifier.exact.encode import AffineNode, EncodedNetwork, NotEncodable, UnitNode

RELATIVE_GAP = 1e-6
TANGENTS = 48  # tangent points of tau^p (the relaxation's gap at most lam s^p / (4 (TANGENTS-1)^2) for p = 2)
PAD = 1e-6  # relative + absolute pad on the dual bound for the solver's feasibility tolerances


@dataclass(frozen=True)
class MilpLimits:
    """Per-MILP limits (None: no limit)."""

    time_limit: float | None = 5.0
    node_limit: int | None = None


@dataclass(frozen=True)
class Penalty:
    """The transport price `lam ||x - x_i||^p` subtracted from every margin (the W_p dual's inner sup)."""

    lam: float
    p: float


@dataclass(frozen=True)
class MarginSolution:
    """Upper bounds on every margin of one sample over one set, and the worst point found."""

    upper: np.ndarray  # (C,): sound upper bounds of z_j - z_y (the linear bound where not solved; -inf at y)
    solved: np.ndarray  # (C,) bool: bounded by a MILP (False: pruned by its linear bound, or the true class)
    optimal: bool  # every MILP that ran proved optimality: max_j upper is the exact worst margin (to the gap)
    point: np.ndarray | None  # (d,): a maximiser of the worst margin (solver coordinates; project before use)
    best: float  # the solver's margin at `point` (-inf when none)
    binaries: int  # unstable units (binaries) in the MILP
    nodes: int  # branch-and-bound nodes over all classes
    seconds: float


@dataclass(frozen=True)
class _Program:
    """The constraint system of one sample and set; objectives are added per class."""

    matrix: sp.csr_matrix
    row_low: np.ndarray
    row_high: np.ndarray
    var_low: np.ndarray
    var_high: np.ndarray
    integrality: np.ndarray
    output_start: int
    binaries: int
    price_column: int | None = None  # w >= ||x - x_i||^p under a Penalty


class _Rows:
    """Sparse rows `low <= A v <= high`, appended one block at a time."""

    def __init__(self) -> None:
        self.rows: list[np.ndarray] = []
        self.cols: list[np.ndarray] = []
        self.vals: list[np.ndarray] = []
        self.low: list[np.ndarray] = []
        self.high: list[np.ndarray] = []
        self.count = 0

    def add(self, terms: list[tuple[np.ndarray, np.ndarray]], low: np.ndarray, high: np.ndarray) -> None:
        """Rows `low <= sum_k coefficients_k * v[columns_k] <= high`, one per entry of `low`."""
        size = len(low)
        index = np.arange(self.count, self.count + size)
        for columns, coefficients in terms:
            self.rows.append(index)
            self.cols.append(np.asarray(columns))
            self.vals.append(np.broadcast_to(np.asarray(coefficients, dtype=np.float64), (size,)))
        self.low.append(np.asarray(low, dtype=np.float64))
        self.high.append(np.asarray(high, dtype=np.float64))
        self.count += size

    def add_row(self, columns: np.ndarray, coefficients: np.ndarray, low: float, high: float) -> None:
        """One row `low <= coefficients · v[columns] <= high`."""
        self.rows.append(np.full(len(columns), self.count))
        self.cols.append(np.asarray(columns))
        self.vals.append(np.asarray(coefficients, dtype=np.float64))
        self.low.append(np.array([low], dtype=np.float64))
        self.high.append(np.array([high], dtype=np.float64))
        self.count += 1

    def add_matrix(self, block: sp.spmatrix, col_start: int) -> None:
        """Append the nonzeros of `block` (its rows aligned with the rows added next) at `col_start`."""
        coo = block.tocoo()
        self.rows.append(coo.row + self.count)
        self.cols.append(coo.col + col_start)
        self.vals.append(coo.data)

    def matrix(self, columns: int) -> tuple[sp.csr_matrix, np.ndarray, np.ndarray]:
        data = [np.concatenate(part) if part else np.zeros(0) for part in (self.rows, self.cols, self.vals)]
        shape = (self.count, columns)
        return (sp.csr_matrix((data[2], (data[0].astype(np.int64), data[1].astype(np.int64))), shape=shape),
                np.concatenate(self.low), np.concatenate(self.high))


@contextlib.contextmanager
def _native_output_silenced() -> Iterator[None]:
    """HiGHS prints some diagnostics with C `printf` whatever its options say; the library never
    prints (and `--json` keeps stdout strict JSON), so file descriptors 1 and 2 go to /dev/null
    while the solver runs."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    saved = [os.dup(fd) for fd in (1, 2)]
    sink = os.open(os.devnull, os.O_WRONLY)
    try:
        for fd in (1, 2):
            os.dup2(sink, fd)
        yield
    finally:
        for fd, copy in zip((1, 2), saved):
            os.dup2(copy, fd)
            os.close(copy)
        os.close(sink)


def unstable_units(encoded: EncodedNetwork, intervals: dict[str, tuple[np.ndarray, np.ndarray]]) -> int:
    """Units whose input interval straddles 0 (each costs the MILP one binary)."""
    return sum(int(((intervals[n.input][0] < 0) & (intervals[n.input][1] > 0)).sum())
               for n in encoded.nodes if isinstance(n, UnitNode))


def _program(encoded: EncodedNetwork, center: np.ndarray, lower: np.ndarray, upper: np.ndarray, radius: float,
             norm: str, intervals: dict[str, tuple[np.ndarray, np.ndarray]],
             penalty: Penalty | None = None) -> _Program:
    start, columns = {}, 0
    for name in [encoded.input] + [n.name for n in encoded.nodes]:
        start[name], columns = columns, columns + encoded.widths[name]
    var_low, var_high = [None] * len(start), [None] * len(start)
    order = {name: k for k, name in enumerate(start)}
    d = encoded.widths[encoded.input]
    var_low[0] = center + np.maximum(lower, -radius)
    var_high[0] = center + np.minimum(upper, radius)
    for node in encoded.nodes:
        low, high = intervals[node.name]
        var_low[order[node.name]], var_high[order[node.name]] = low, high
    rows = _Rows()
    binaries: list[tuple[int, np.ndarray]] = []
    for node in encoded.nodes:
        out = np.arange(start[node.name], start[node.name] + encoded.widths[node.name])
        if isinstance(node, AffineNode):  # v - sum_k M_k u_k = offset
            for name, block in zip(node.inputs, node.matrices):
                rows.add_matrix(-block, start[name])
            rows.add([(out, 1.0)], node.offset, node.offset)
            continue
        pre = np.arange(start[node.input], start[node.input] + len(out))
        low, high = intervals[node.input]
        if not (np.isfinite(low).all() and np.isfinite(high).all()):
            raise NotEncodable(f"unbounded input interval at {node.name}: no big-M")
        alpha = node.alpha
        active, inactive = low >= 0, (high <= 0) & ~(low >= 0)
        for mask, slope in ((active, 1.0), (inactive, alpha)):
            if mask.any():
                s = np.broadcast_to(slope, out.shape)[mask]
                rows.add([(out[mask], 1.0), (pre[mask], -s)], np.zeros(mask.sum()), np.zeros(mask.sum()))
        split = ~(active | inactive)
        if not split.any():
            continue
        count = int(split.sum())
        a = np.arange(columns, columns + count)
        columns += count
        binaries.append((a[0], a))
        v, u, al, lo, hi = out[split], pre[split], alpha[split], low[split], high[split]
        zeros, inf = np.zeros(count), np.full(count, np.inf)
        rows.add([(v, 1.0), (u, -1.0)], zeros, inf)  # v >= u
        rows.add([(v, 1.0), (u, -al)], zeros, inf)  # v >= alpha u
        rows.add([(v, 1.0), (u, -1.0), (a, -(1 - al) * lo)], -inf, -(1 - al) * lo)  # v <= u - (1-alpha) l (1-a)
        rows.add([(v, 1.0), (u, -al), (a, -(1 - al) * hi)], -inf, zeros)  # v <= alpha u + (1-alpha) h a
    integer_columns = np.concatenate([a for _, a in binaries]) if binaries else np.zeros(0, dtype=np.int64)
    low_parts = [var_low[k] for k in range(len(start))] + [np.zeros(len(integer_columns))]
    high_parts = [var_high[k] for k in range(len(start))] + [np.ones(len(integer_columns))]
    if norm == "1":  # t >= |x - x_i|, sum t <= s
        t = np.arange(columns, columns + d)
        columns += d
        x = np.arange(d)
        rows.add([(t, 1.0), (x, -1.0)], -center, np.full(d, np.inf))
        rows.add([(t, 1.0), (x, 1.0)], center, np.full(d, np.inf))
        rows.add_row(t, np.ones(d), -np.inf, radius)
        low_parts.append(np.zeros(d))
        high_parts.append(np.full(d, radius))
    elif norm != "inf":
        raise NotEncodable(f"the ℓ{norm} ball is not polyhedral: the exact mode needs norm inf or 1")
    price = None
    if penalty is not None:
        tau, price = columns, columns + 1
        columns += 2
        if norm == "1":  # tau >= sum t
            rows.add_row(np.concatenate([[tau], t]), np.concatenate([[1.0], -np.ones(d)]), 0.0, np.inf)
        else:  # tau >= |x_k - x_ik|
            x = np.arange(d)
            taus = np.full(d, tau)
            rows.add([(taus, 1.0), (x, -1.0)], -center, np.full(d, np.inf))
            rows.add([(taus, 1.0), (x, 1.0)], center, np.full(d, np.inf))
        points = np.linspace(0.0, radius, TANGENTS)  # w - p a^(p-1) tau >= (1 - p) a^p
        rows.add([(np.full(TANGENTS, price), 1.0), (np.full(TANGENTS, tau), -penalty.p * points ** (penalty.p - 1))],
                 (1 - penalty.p) * points ** penalty.p, np.full(TANGENTS, np.inf))
        low_parts.append(np.zeros(2))
        high_parts.append(np.array([radius, radius ** penalty.p]))
    matrix, row_low, row_high = rows.matrix(columns)
    integrality = np.zeros(columns)
    integrality[integer_columns] = 1
    return _Program(matrix, row_low, row_high, np.concatenate(low_parts), np.concatenate(high_parts), integrality,
                    start[encoded.output], len(integer_columns), price)


def solve_margins(encoded: EncodedNetwork, center: np.ndarray, label: int, lower: np.ndarray, upper: np.ndarray,
                  radius: float, norm: str, intervals: dict[str, tuple[np.ndarray, np.ndarray]],
                  linear_upper: np.ndarray, limits: MilpLimits = MilpLimits(),
                  penalty: Penalty | None = None) -> MarginSolution:
    """Worst margins of one sample over `{x_i + d : lower <= d <= upper, ||d||_norm <= radius}`.

    `intervals[name]` bounds every tensor of the network over that set (flattened, sound);
    `linear_upper[j]` is a sound upper bound on `z_j - z_y` (prunes classes, caps every result).
    With a `penalty` every margin is `z_j - z_y - lam ||d||^p` (and `linear_upper` bounds that).
    """
    began = time.perf_counter()
    program = _program(encoded, center, lower, upper, radius, norm, intervals, penalty)
    classes = len(linear_upper)
    result = np.array(linear_upper, dtype=np.float64)
    result[label] = -math.inf
    solved = np.zeros(classes, dtype=bool)
    optimal, best, point, nodes = True, -math.inf, None, 0
    constraint = LinearConstraint(program.matrix, program.row_low, program.row_high)
    bounds = Bounds(program.var_low, program.var_high)
    options = {"mip_rel_gap": RELATIVE_GAP, "presolve": True}
    if limits.time_limit is not None:
        options["time_limit"] = float(limits.time_limit)
    if limits.node_limit is not None:
        options["node_limit"] = int(limits.node_limit)
    for j in np.argsort(-result, kind="stable"):
        if j == label or result[j] <= best:
            continue  # the true class, or a class whose linear bound cannot beat the best margin found
        objective = np.zeros(program.matrix.shape[1])
        objective[program.output_start + j] = -1.0
        objective[program.output_start + label] += 1.0
        if penalty is not None:
            objective[program.price_column] = penalty.lam
        constraints = [constraint]
        if math.isfinite(best):  # only a margin above the best one found matters: z_j - z_y >= best
            constraints.append(LinearConstraint(-objective[None, :], best, np.inf))
        with _native_output_silenced():
            outcome = milp(objective, integrality=program.integrality, bounds=bounds, constraints=constraints,
                           options=options)
        nodes += int(getattr(outcome, "mip_node_count", 0) or 0)
        dual = getattr(outcome, "mip_dual_bound", None)
        if outcome.status == 2 and math.isfinite(best):
            dual = -best  # infeasible above the best margin: z_j - z_y < best on the whole set
            outcome.status = 0
        elif program.binaries == 0 and outcome.status == 0:
            dual = outcome.fun  # an LP: its optimum is its own dual bound
        if outcome.status not in (0, 1) or dual is None or not np.isfinite(dual):
            optimal = False  # no usable bound: the linear bound stays
            continue
        bound = -float(dual)
        bound += PAD * (1.0 + abs(bound))
        result[j] = min(result[j], bound)
        solved[j] = True
        optimal = optimal and outcome.status == 0
        if outcome.x is not None and -float(outcome.fun) > best:
            best, point = -float(outcome.fun), np.asarray(outcome.x[: encoded.widths[encoded.input]])
    return MarginSolution(upper=result, solved=solved, optimal=optimal, point=point, best=best,
                          binaries=program.binaries, nodes=nodes, seconds=time.perf_counter() - began)


def project_displacement(move: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor, radius: float,
                         norm: str) -> torch.Tensor:
    """A solver's displacement put exactly inside `{lower <= d <= upper, ||d|| <= radius}` (float64)."""
    move = torch.minimum(torch.maximum(move, torch.clamp(lower, min=-radius)), torch.clamp(upper, max=radius))
    if norm == "1":
        length = float(move.abs().sum())
        if length > radius:  # the box contains 0, so shrinking stays inside it
            move = move * (radius / length) * (1.0 - 1e-12)
    return move
