"""The per-sample half of `certify`: growth curves, certified radii, slopes and candidate moves of a
range of samples, computed block by block, and their concatenation in sample order.

`certify` cuts its samples into blocks of `Shard.block` samples aligned to global sample indices
and computes every per-sample quantity of a block in one batch (`block_tables`). Batched float
kernels round differently for different batch sizes, so this is what makes the numbers of a
sample independent of how many processes share the work: a sharded run computes the same blocks,
gathers the tables (`SampleTables`, a few floats per sample and grid radius) and runs the global
steps (the dual over lambda, the knapsacks, the means) on exactly the tables one process has.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from verifier.bounds.network import BoundNetwork
from verifier.bounds.optimise import SlopeSearch
from verifier.cells import cell_analysis, displacement_box
from verifier.certify.aggregate import GrowthCurves
from verifier.certify.exactness import Candidates, candidates
from verifier.certify.growth import collect_evidence, growth_curves, margin_class_curves, with_cells
from verifier.certify.milp_route import ExactSettings, MilpReport, inactive, refine_with_milp
from verifier.certify.radii import certified_radii
from verifier.convert import ConvertedModel
from verifier.deadline import Deadline, Stopped, Terminated
from verifier.errors import ResourceLimitError
from verifier.geometry import dual_norm
from verifier.jacobian import logits_jacobian, loss_gradients
from verifier.losses import loss_values


CPU = torch.device("cpu")


@dataclass(frozen=True, eq=False)
class SampleTables:
    """Everything certify's global steps need from a range of samples (rows in sample order)."""

    clean: torch.Tensor  # (n,) clean loss
    correct: torch.Tensor  # (n,) bool, a tie is an error
    curves: GrowthCurves  # minimum over the routes (one row per sample)
    winner: torch.Tensor  # (n, K+1) winning route index (-1: none)
    class_curves: GrowthCurves | None  # margin loss: one row per (sample, wrong class)
    certified_radii: torch.Tensor  # (n,)
    local_slopes: torch.Tensor | None  # (n,) ||grad loss(x_i)||_* (None for zero_one)
    moves: Candidates  # candidate moves on the refined grid (exactness, §3.5)
    cell_radius: torch.Tensor | None  # (n,) exact cell radius, -inf where the cells were skipped
    fallbacks: tuple[str, ...]  # e.g. cells skipped for a block, or what a time limit cut short
    radii: torch.Tensor  # (K+1,) the grid of the curves (the exact route may refine one block's grid)
    milp_status: torch.Tensor  # (n, K+1) int8: what the exact route did at each curve point


@dataclass(frozen=True, eq=False)
class BlockInputs:
    """What the realising distribution needs again from one block: its samples and Jacobians."""

    offset: int  # index of the block's first sample among the local ones
    x: torch.Tensor
    y: torch.Tensor
    jacobian: torch.Tensor  # (n, C, d)
    lower: torch.Tensor
    upper: torch.Tensor
    logits: torch.Tensor  # (n, C) clean logits of the float64 twin


def block_tables(model: ConvertedModel, module: torch.nn.Module, network: BoundNetwork | None, x: torch.Tensor,
                 y: torch.Tensor, logits: torch.Tensor, norm: str, loss: str, box: tuple[float, float] | None,
                 radii: torch.Tensor, move_radii, deltas, p: float, global_slope: float, margin_slope: float,
                 exact: ExactSettings, deadline: Deadline, refine: Deadline, memory_limit_bytes: int | None,
                 progress: bool, exact_refusal: str = "", device: torch.device = CPU,
                 exact_network: BoundNetwork | None = None,
                 optimise: SlopeSearch | None = None) -> tuple[SampleTables, torch.Tensor, MilpReport]:
    """The tables of one block of samples (float64 inputs), its logits Jacobian (n, C, d) and what
    the exact route did. The bounds, cells, Jacobians and gradients run on `device` (`network`'s
    constants live there; `exact_network` is its CPU twin for the MILP route, default `network`);
    the tables come back on the CPU. Anytime: the refinements (tightened bounds, cells, the MILP route,
    bisection, candidates) run under `refine` and stop where they are, each cut a fallback line;
    `deadline` itself raises `Stopped`. `move_radii(radii)` gives the candidate radii of a grid.
    `exact_refusal` (non-empty): the exact route does not run, for that reason. `optimise`: the
    tightened margin bounds search the relaxations' free slopes (`verifier.bounds.optimise`)."""
    fallbacks: list[str] = []
    # The tightened bounds first: on a large model they matter more than the cells' tiny radii.
    evidence = collect_evidence(network, x, y, logits, norm, radii, box, None, device=device, progress=progress,
                                deadline=refine, memory_limit_bytes=memory_limit_bytes, optimise=optimise)
    fallbacks += evidence.notes
    if evidence.linear is None:  # no bound pass fits (a note says why): the bisection and MILP take none either
        network = exact_network = None
    deadline.check("the bounds per radius")
    cells = None
    if model.piecewise_linear:  # every kink is a site: the model is affine on each cell
        try:
            cells = cell_analysis(model, x, y, norm, box=box, device=str(device), deadline=refine,
                                  memory_limit_bytes=memory_limit_bytes).to(CPU)
        except ResourceLimitError as err:  # the cell route is skipped; the others still bound
            fallbacks.append(f"cells skipped: {err}")
        except Stopped as err:
            if isinstance(err, Terminated):
                raise
            fallbacks.append("cells skipped: time limit")
        deadline.check("cell analysis")
        evidence = with_cells(evidence, cells)
    if exact_refusal and exact.mode != "off":
        evidence, milp_report = inactive(exact, evidence, exact_refusal)
    else:
        try:
            milp_network = (exact_network if exact_network is not None else network) if loss != "dlr" else None
            evidence, milp_report = refine_with_milp(evidence, milp_network, x, norm, box, deltas, p, loss,
                                                     global_slope, margin_slope, exact, cells, refine)
        except Stopped as err:
            if isinstance(err, Terminated):
                raise
            evidence, milp_report = inactive(exact, evidence, "time limit")
            fallbacks.append("time limit: exact MILP route skipped")
    deadline.check("the exact MILP route")
    growth = growth_curves(evidence, loss, global_slope)
    class_curves = margin_class_curves(evidence, margin_slope) if loss == "margin" else None
    radii_certified = certified_radii(evidence, network, x, norm, box, cells, deadline=refine, device=device)
    deadline.check("the certified radii")
    if refine.expired():
        fallbacks.append("time limit: certified radii not (fully) refined by bisection")
    local = None
    if loss != "zero_one":  # the local slopes only feed the first-order estimate: a refinement
        gradients = _or_none(lambda: loss_gradients(model, x, y, loss, device=device, dtype=torch.float64,
                                                    deadline=refine).gradients)
        if gradients is None:
            fallbacks.append("time limit: loss gradients skipped, so no local slopes or first-order estimate")
        else:
            local = dual_norm(gradients.flatten(1).to(CPU), norm)
        deadline.check("the loss gradients")
    jacobian = cells.jacobian if cells is not None else _or_none(
        lambda: logits_jacobian(model, x, device, torch.float64, deadline=refine).jacobian.to(CPU))
    wanted = move_radii(evidence.radii)
    if jacobian is None:  # the logits Jacobian (C backward passes) is a refinement: without it, no linearised moves
        fallbacks.append("time limit: logits Jacobians skipped, so no linearised moves in the realising distribution")
        jacobian, wanted = torch.zeros(len(x), logits.shape[1], 0, dtype=x.dtype), wanted[:0]
    deadline.check("the logits Jacobians")
    lower, upper = displacement_box(x, box)
    moves = candidates(module, x, y, logits, jacobian, lower, upper, wanted, norm, loss, refine)
    deadline.check("the exactness candidates")
    if len(moves.radii) < len(wanted):
        fallbacks.append(f"time limit: exactness candidates at {len(moves.radii)} of {len(wanted)} radii")
    if milp_report.moves is not None:
        moves = moves.with_points(module, x, y, milp_report.moves, norm, loss)
    cell_radius = None
    if model.piecewise_linear:
        cell_radius = cells.radius if cells is not None else torch.full((len(x),), -torch.inf, dtype=x.dtype)
    tables = SampleTables(clean=loss_values(logits, y, loss), correct=loss_values(logits, y, "margin") < 0,
                          curves=growth.curves, winner=growth.winner, class_curves=class_curves,
                          certified_radii=radii_certified, local_slopes=local, moves=moves, cell_radius=cell_radius,
                          fallbacks=tuple(fallbacks), radii=evidence.radii, milp_status=milp_report.status)
    return tables, jacobian, milp_report


def _or_none(work: Callable[[], torch.Tensor]) -> torch.Tensor | None:
    """`work()`, or None when its deadline (a refinement's) runs out first; a signal still stops."""
    try:
        return work()
    except Stopped as err:
        if isinstance(err, Terminated):
            raise
        return None


def _cat(parts: Sequence[torch.Tensor | None]) -> torch.Tensor | None:
    """The parts in order; None when any is (e.g. a block whose local slopes a time limit cut)."""
    return None if any(part is None for part in parts) else torch.cat(list(parts))


def _cat_curves(parts: Sequence[GrowthCurves | None]) -> GrowthCurves | None:
    if parts[0] is None:
        return None
    return GrowthCurves(radii=parts[0].radii, values=torch.cat([c.values for c in parts]),
                        slopes=torch.cat([c.slopes for c in parts]), reach=torch.cat([c.reach for c in parts]),
                        tail=torch.cat([c.tail for c in parts]), tail_slope=torch.cat([c.tail_slope for c in parts]),
                        groups=parts[0].groups)


def _cat_moves(moves: Sequence[Candidates]) -> Candidates:
    """Candidates of consecutive ranges; under a time limit a block may have fewer radii (a prefix of
    the same list): the common prefix is kept, which is still a valid set of moves."""
    width = min(len(m.radii) for m in moves)
    if any(m.points is not None for m in moves):
        raise ValueError("explicit candidate points are only made for one block (the exact route)")
    return Candidates(radii=moves[0].radii[:width],
                      direction_class=torch.cat([m.direction_class[:, :width] for m in moves]),
                      distance=torch.cat([m.distance[:, :width] for m in moves]),
                      gain=torch.cat([m.gain[:, :width] for m in moves]))


def concat(parts: Sequence[SampleTables]) -> SampleTables:
    """The tables of consecutive sample ranges as one (exact: a concatenation)."""
    if len(parts) == 1:
        return parts[0]
    return SampleTables(
        clean=torch.cat([t.clean for t in parts]), correct=torch.cat([t.correct for t in parts]),
        curves=_cat_curves([t.curves for t in parts]), winner=torch.cat([t.winner for t in parts]),
        class_curves=_cat_curves([t.class_curves for t in parts]),
        certified_radii=torch.cat([t.certified_radii for t in parts]),
        local_slopes=_cat([t.local_slopes for t in parts]),
        moves=_cat_moves([t.moves for t in parts]),
        cell_radius=_cat([t.cell_radius for t in parts]),
        fallbacks=tuple(dict.fromkeys(f for t in parts for f in t.fallbacks)),
        radii=parts[0].radii, milp_status=torch.cat([t.milp_status for t in parts]),
    )
