"""`certify`: upper bounds on the Wasserstein robust risk over a grid of budgets (method §2–§4).

The pipeline: clean losses → the global Lipschitz baseline → growth curves on one radius grid
shared by every delta (minimum over the routes of `growth.py`) → the §2 aggregation per delta
→ `certificate = clean + min(aggregated excess, global closed form)`. Alongside: the global
bound, Bai et al.'s first-order estimate `clean + delta * Upsilon` (an estimate, not a bound) and
the certified accuracy (§4), and the exactness report (§3.5): an explicit distribution built
from the samples' linearised maximisers, whose forward-pass risk is a lower bound on R(delta);
the certificate is `exact` when it meets that lower bound. A model without bound rules falls
back to the global baseline, flagged in `fallbacks`. The per-sample half runs block by block
(`tables.py`); what follows it sees only the concatenated tables, so a sharded run
(`verifier.distributed`) gathers them and computes the same certificate.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import torch

from verifier.bounds.global_lipschitz import global_lipschitz
from verifier.bounds.network import BoundNetwork
from verifier.bounds.optimise import SlopeSearch
from verifier.box import Box
from verifier.cells import displacement_box
from verifier.certify.accuracy import certified_accuracy
from verifier.certify.aggregate import excess_bound, grid, linear_closed_form, penalised_excess, used_points
from verifier.certify.exactness import (EXACT_TOLERANCE, Candidates, Placed, RealisedDistribution, choose, is_exact,
                                        place, summarise)
from verifier.certify.growth import ROUTES, RouteGrowth, box_reach
from verifier.certify.milp_route import ExactSettings, MilpReport, curve_sources
from verifier.certify.penalty_route import penalised_sources
from verifier.certify.tables import BlockInputs, block_tables, concat
from verifier.convert import ConvertedModel
from verifier.convert.normalize import NormalizedModel
from verifier.data import check_labels
from verifier.data import save_distributions as write_distributions
from verifier.deadline import NEVER, Deadline
from verifier.device import resolve_device
from verifier.distributed import Shard
from verifier.errors import UsageError, VerifierError
from verifier.finite import require_finite_inputs, require_finite_logits, require_no_nan
from verifier.geometry import parse_norm
from verifier.jacobian import chunked_logits, prepared_module
from verifier.losses import check_loss
from verifier.resources import pass_bytes

# Under a time limit the refinements get this share of the time left; the rest is for the
# Jacobians, the aggregation per delta and the realising distributions.
REFINE_SHARE = 0.8


@dataclass(frozen=True)
class DeltaCertificate:
    """Numbers for one budget delta (None where a quantity does not apply)."""

    delta: float
    clean_risk: float
    certificate: float | None  # upper bound on R(delta)
    global_bound: float | None  # the global-Lipschitz closed form (an upper bound, loose)
    first_order_estimate: float | None  # Bai et al.'s clean + delta * Upsilon: an estimate, not a bound
    certified_accuracy: float  # lower bound on the accuracy of every Q within the budget
    realised_risk: float  # E_Q[loss] of the explicit distribution: a lower bound on R(delta)
    realised_accuracy: float  # accuracy under that distribution: an upper bound on the robust accuracy
    exact: bool | None  # certificate within tolerance of realised_risk (§3.5); None without a certificate
    in_cell_mass: float | None  # mass of the realising distribution whose atoms stay in their sample's cell
    fallbacks: tuple[str, ...]  # model-level fallbacks and samples whose bound came from the global route
    # share of the samples whose decisive growth-curve point came from each route (milp_exact, milp_bound,
    # cell, linear, jacobian, global; unmoved: the sample gains nothing at this budget)
    curve_sources: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {**self.__dict__, "fallbacks": list(self.fallbacks)}


@dataclass(frozen=True, eq=False)
class Certificate:
    """Certificates of one model and sample for every delta, with the route statistics."""

    loss: str
    p: float
    norm: str
    box: tuple[float, float] | None
    samples: int
    clean_accuracy: float  # top-1 accuracy on the sample (a tie is an error)
    results: tuple[DeltaCertificate, ...]
    exact_up_to_delta: float | None  # largest requested delta up to which every certificate was exact
    routes_won: dict[str, int]
    fallbacks: tuple[str, ...]
    local_slopes: torch.Tensor | None  # exact ||grad loss(x_i)||_* per sample (None for zero_one)
    global_slope: float | None  # the global Lipschitz constant of the loss (None when unbounded)
    certified_radii: torch.Tensor  # c_i per sample (0 when misclassified)
    distributions: tuple[RealisedDistribution, ...]  # one per delta, replayable by an attack
    exact_mode: MilpReport | None = None  # what the MILP route (§8) did

    def to_dict(self) -> dict:
        """JSON-ready form (the distributions are left out: save them with `save_distributions`)."""
        return {
            "loss": self.loss, "p": self.p, "norm": self.norm, "box": self.box, "samples": self.samples,
            "clean_accuracy": self.clean_accuracy,
            "results": [r.to_dict() for r in self.results], "exact_up_to_delta": self.exact_up_to_delta,
            "routes_won": dict(self.routes_won), "fallbacks": list(self.fallbacks),
            "global_slope": self.global_slope,
            "local_slopes": None if self.local_slopes is None else self.local_slopes.tolist(),
            "certified_radii": self.certified_radii.tolist(),
            "exact_mode": None if self.exact_mode is None else self.exact_mode.to_dict(),
        }

    def to_text(self) -> str:
        """A short table for people: one line per delta."""
        def number(value: float | None) -> str:
            return "-" if value is None else f"{value:.4g}"

        lines = [f"loss {self.loss}, W_{'inf' if math.isinf(self.p) else f'{self.p:g}'}, norm {self.norm}, "
                 f"box {'none' if self.box is None else f'[{self.box[0]:g}, {self.box[1]:g}]'}, "
                 f"{self.samples} samples; "
                 "exact up to delta "
                 f"{'-' if self.exact_up_to_delta is None else f'{self.exact_up_to_delta:g}'}",
                 f"{'delta':>10} {'clean':>9} {'realised>=':>10} {'cert<=':>9} {'global':>9} {'1st-order~':>10} "
                 f"{'cert.acc':>8}  exact"]
        for r in self.results:
            lines.append(f"{r.delta:>10.4g} {r.clean_risk:>9.4g} {r.realised_risk:>10.4g} {number(r.certificate):>9} "
                         f"{number(r.global_bound):>9} {number(r.first_order_estimate):>10} "
                         f"{r.certified_accuracy:>8.2%}  {'yes' if r.exact else 'no'}")
        lines.append("realised>=: risk of the explicit realising distribution (a lower bound); cert<=: the certificate "
                     "(an upper bound); 1st-order~: Bai et al.'s estimate, not a bound")
        if self.exact_mode is not None and self.exact_mode.active:
            m = self.exact_mode
            solver = "branch and bound" if m.solver == "split" else "MILP"
            penalised = f", {m.penalised_points} penalised MILP point(s)" if m.penalised_points else ""
            lines.append(f"exact mode ({m.mode}): {solver} at {m.solved} curve point(s), {m.optimal} solved to "
                         f"optimality, {m.skipped} left to the linear bounds{penalised}, {m.seconds:.1f} s")
        if self.fallbacks:
            lines.append("fallbacks: " + "; ".join(self.fallbacks))
        return "\n".join(lines)


def _normalized(model: ConvertedModel) -> NormalizedModel:
    return NormalizedModel(proto=model.normalized, input_name=model.input_spec.name,
                           output_names=model.output_names, logits_index=model.logits_index)


def _upsilon(local_slopes: torch.Tensor, p: float) -> float:
    """Bai et al.'s `(mean ||grad loss(x_i)||_*^q)^(1/q)` with 1/p + 1/q = 1."""
    if math.isinf(p):
        return float(local_slopes.mean())
    if p == 1:
        return float(local_slopes.max())
    q = p / (p - 1.0)
    return float((local_slopes**q).mean() ** (1.0 / q))


def slope_search(optimise_slopes: bool | str) -> SlopeSearch | None:
    """The search `certify(optimise_slopes=...)` asks for: None (off), the final parameters
    (True / "final") or the intermediate bounds too ("intermediate")."""
    if optimise_slopes in (False, None, "off"):
        return None
    if optimise_slopes not in (True, "final", "intermediate"):
        raise UsageError(f"--optimise-slopes takes final or intermediate (got {optimise_slopes!r})")
    return SlopeSearch(intermediate=optimise_slopes == "intermediate")


def radius_grid(inputs: torch.Tensor, deltas: Sequence[float], p: float, box, norm: str,
                grid_points: int) -> torch.Tensor:
    """One grid for every delta: up to the farthest a whole sample can move (N^(1/p) delta, capped),
    then for p < inf `grid_of`'s doublings; the curve attack (`verifier.attacks.curve`) attacks at
    these radii too."""
    reach = float(box_reach(inputs, box, norm).max()) if box is not None else math.inf
    return grid_of(len(inputs), reach, deltas, p, grid_points)


FAR_DOUBLINGS = 4  # grid radii past N^(1/p) delta: top * 2, 4, 8, 16 (capped by the reach)


def grid_of(count: int, reach: float, deltas: Sequence[float], p: float, grid_points: int) -> torch.Tensor:
    """`radius_grid` of `count` samples whose farthest point in the box is `reach` away (inf: no box):
    the form a sharded run uses, with N and the reach over every rank.

    For p < inf a fraction of a sample's mass may travel past N^(1/p) delta (method §2, "Reach"): a
    few doublings beyond it (and the reach itself when it comes within them) give bounds there
    instead of the tail piece's slope and whole-box cap alone."""
    top = max(deltas) * (1.0 if math.isinf(p) else min(count ** (1.0 / p), 20.0))
    top = min(top, reach)
    top = max(top, max(deltas), 1e-6)  # a grid even when every delta is 0
    far = torch.zeros(0, dtype=torch.float64)
    if not math.isinf(p):
        far = top * 2.0 ** torch.arange(1, FAR_DOUBLINGS + 1, dtype=torch.float64)
        last = [reach] if top < reach <= top * 2.0 ** FAR_DOUBLINGS else []
        far = torch.cat([far[far < reach], torch.tensor(last, dtype=torch.float64)])
    return torch.unique(torch.cat([grid(top, grid_points), far,
                                   torch.tensor([float(d) for d in deltas], dtype=torch.float64)]))


def _refined(radii: torch.Tensor, factor: int) -> torch.Tensor:
    """The positive grid radii with `factor - 1` extra points in every interval (candidate moves)."""
    steps = torch.linspace(0.0, 1.0, factor + 1, dtype=radii.dtype)[1:]
    inner = radii[:-1, None] + (radii[1:] - radii[:-1])[:, None] * steps[None, :]
    return inner.flatten()


def _global_fallbacks(growth: RouteGrowth, radii: torch.Tensor, delta: float) -> tuple[str, ...]:
    """Samples whose growth at delta's grid point came from the global route."""
    index = int(torch.searchsorted(radii, torch.tensor(delta, dtype=radii.dtype)))
    if index == 0 or index >= len(radii):
        return ()
    count = int((growth.winner[:, index] == ROUTES.index("global")).sum())
    return (f"{count} sample(s): global bound",) if count else ()


def certify(model: ConvertedModel, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray,
            deltas: Sequence[float], p: float = 2.0, norm: str | float = "2", loss: str = "ce",
            box: tuple[float, float] | None = None, grid_points: int = 24,
            exact_tolerance: float = EXACT_TOLERANCE, progress: bool = False,
            deadline: Deadline = NEVER, memory_limit_bytes: int | None = None,
            refine_share: float = REFINE_SHARE, exact: ExactSettings | str = "auto",
            shard: Shard | None = None, device: str = "cpu", optimise_slopes: bool | str = False) -> Certificate:
    """Certificates (upper bounds on R(delta)) for every delta, in float64.

    `device` (auto | cpu | cuda) is where the heavy per-sample work runs: bound propagation, the
    cell analysis, Jacobians and gradients; the per-sample tables, the aggregation, the MILP route
    and the exactness candidates stay on the CPU. `auto` means the CPU here: the CUDA path runs only
    when asked for (`cuda`), until a GPU run of tools/gpu_check.sh has checked it.

    `exact` (auto | on | off, or `ExactSettings`) runs the MILP route (§8) at the curve points
    the certificates depend on: `auto` only where it is cheap (see `certify.milp_route`). It needs
    every sample in one block: with more than `shard.block` samples it does not run (said in
    `exact_mode.reason`, and in `fallbacks` under `on`).

    Work sized from shapes stays under `memory_limit_bytes` (default `resources.memory_limit()`):
    the exact cell analysis is skipped, with a fallback note, when one sample would not fit.

    Anytime under `deadline`: the refinements (cell analysis, tightened bounds per radius,
    bisection of certified radii, exactness candidates) get the first `refine_share` of the time
    left and stop where they are when it runs out, leaving coarser but sound routes (interval-based
    bounds, larger radii, the global bound), each cut stated in `fallbacks`. Past `deadline`
    itself (checked between chunks of work in every step) `verifier.deadline.Stopped` is raised and
    nothing is returned.

    Per-sample work runs block by block (`shard.block` samples, default `distributed.BLOCK`);
    with a `shard` of a sharded run, `x` and `y` are this rank's samples, the per-sample tables
    are gathered and every rank returns the certificate one process computes over all samples.

    `optimise_slopes`: the tightened margin bounds also search the relaxations' free slopes
    (alpha-CROWN style, `verifier.bounds.optimise`): tighter, several times slower. True or "final":
    the final back-substitution's parameters; "intermediate": also every later unstable node's input
    bounds re-bounded with their own parameters at each step (tighter again, far slower).
    """
    norm, loss = parse_norm(norm), check_loss(loss)
    if not p >= 1:
        raise UsageError(f"p must be >= 1 (got {p})")
    if not deltas or not all(d >= 0 and math.isfinite(d) for d in deltas):
        raise UsageError("give at least one delta, all finite and >= 0")
    _require_finite_model_logits(model, x, memory_limit_bytes)
    inputs = torch.as_tensor(x).to(torch.float64)
    labels = torch.as_tensor(y, dtype=torch.long)
    shard = Shard.whole(len(inputs)) if shard is None else shard
    if shard.count != len(inputs):
        raise UsageError(f"the shard has {shard.count} samples but x has {len(inputs)}")
    module = prepared_module(model, "cpu", torch.float64)  # a float64 copy; the model is left as it is
    fallbacks: list[str] = []
    lipschitz = global_lipschitz(_normalized(model), norm, box.free if isinstance(box, Box) else None)
    network: BoundNetwork | None
    # `auto` stays on the CPU until the CUDA path has been checked on a GPU (tools/gpu_check.sh)
    target = torch.device("cpu") if device == "auto" else resolve_device(device)
    cpu_network: BoundNetwork | None
    try:
        network = cpu_network = BoundNetwork.from_model(model)
        if target.type != "cpu":  # the bounds' constants on the device; the MILP route reads the CPU twin
            network = BoundNetwork.from_model(model, torch.float64, target)
    except VerifierError as err:
        network = cpu_network = None
        fallbacks.append(str(err))
    deadline.check("the certificate's set-up")
    refine = deadline.sooner(refine_share)
    settings = exact if isinstance(exact, ExactSettings) else ExactSettings(mode=exact)
    one_block = shard.total <= shard.block
    refusal = "" if one_block else (f"the exact route needs every sample in one block ({shard.total} samples, "
                                    f"blocks of {shard.block}: --block-size)")
    if refusal and settings.mode == "on":
        fallbacks.append(f"exact MILP route not run: {refusal}")
    reach = float(shard.gather_one(box_reach(inputs, box, norm)).max()) if box is not None else math.inf
    radii = grid_of(shard.total, reach, deltas, p, grid_points)

    def move_radii(grid_radii: torch.Tensor) -> torch.Tensor:
        far = torch.logspace(0.0, 4.0, 9, dtype=torch.float64)[1:] * grid_radii[-1]  # small mass moved far (p < inf)
        extra = far[far <= reach] if not math.isinf(p) else far[:0]
        return torch.cat([_refined(grid_radii, 4), extra])

    parts, blocks, reports = [], [], []
    local_blocks = list(shard.blocks())
    for number, part in enumerate(local_blocks):
        block_x, block_y = inputs[part], labels[part]
        logits = chunked_logits(module, block_x, pass_bytes(memory_limit_bytes), model.module_batch)
        require_finite_logits(logits, "torch, float64")
        check_labels(block_y.numpy(), logits.shape[1])
        tables, jacobian, report = block_tables(
            model, module, network, block_x, block_y, logits, norm, loss, box, radii, move_radii, deltas, p,
            lipschitz.loss_constant(loss), lipschitz.loss_constant("margin"), settings, deadline,
            refine.sooner(1.0 / (len(local_blocks) - number)),  # the refinement time left, shared by the blocks left
            memory_limit_bytes, progress, refusal, device=target, exact_network=cpu_network,
            optimise=slope_search(optimise_slopes))
        parts.append(tables)
        reports.append(report)
        blocks.append(BlockInputs(part.start, block_x, block_y, jacobian, *displacement_box(block_x, box), logits))
    tables = concat(parts)
    tables = concat(shard.objects(tables)) if shard.distributed else tables
    milp_report = reports[0] if one_block else replace(reports[0], status=tables.milp_status)
    fallbacks += tables.fallbacks
    radii = tables.radii  # the exact mode may have refined the grid where the certificate is decided
    growth = RouteGrowth(curves=tables.curves, by_route={}, winner=tables.winner, clean_loss=tables.clean)
    correct = tables.correct
    local = tables.local_slopes
    upsilon = _upsilon(local, p) if loss in ("ce", "margin") and local is not None else None
    slope = lipschitz.loss_constant(loss) if loss != "dlr" else math.inf
    results, distributions = [], []
    rounding = 8 * torch.finfo(model.input_dtype).eps
    clean_risk = float(tables.clean.mean())
    for delta in deltas:
        deadline.check("the certificates per delta")
        global_bound = clean_risk + delta * slope if math.isfinite(slope) else None
        accuracy = certified_accuracy(tables.certified_radii, correct, float(delta), p)
        certificate, sources = None, {}
        if loss != "dlr":
            excess, lam = excess_bound(tables.curves, float(delta), p)
            family = tables.curves
            if tables.class_curves is not None:
                class_excess, class_lam = excess_bound(tables.class_curves, float(delta), p)
                if class_excess < excess:
                    excess, lam, family = class_excess, class_lam, tables.class_curves
            if delta > 0:
                sources = curve_sources(growth, used_points(family, float(delta), p, lam), milp_report.status,
                                        milp_report.solver or "milp")
            families = [f for f in (tables.curves, tables.class_curves) if f is not None]
            for bound in milp_report.penalised if one_block else ():  # §8: each is sound at any delta
                penalised = penalised_excess(bound, families, float(delta), p)
                if penalised < excess:
                    excess, sources = penalised, penalised_sources(bound, families, p)
            closed_forms = [clean_risk + linear_closed_form(tables.curves.tail_slope, float(delta), p)]
            closed_forms += [global_bound] if global_bound is not None else []
            certificate = min([clean_risk + excess] + closed_forms)  # §3.7: every candidate is sound
            if loss == "zero_one":  # the error rate is also at most 1 - certified accuracy (§4)
                certificate = min(certificate, 1.0, 1.0 - accuracy)
            # The bounds are for the float64 twin; the deployed model rounds in its own dtype.
            certificate += rounding * max(1.0, abs(certificate))
            if loss == "zero_one":
                certificate = min(certificate, 1.0)
        low, high = _placed(module, blocks, tables.moves, shard, choose(tables.moves, float(delta), p), norm, loss)
        realised = summarise(float(delta), p, low, high)
        distributions.append(realised)
        alarm = certificate is not None and realised.risk > certificate + rounding * max(1.0, abs(certificate))
        alarms = ("SOUNDNESS ALARM: the realising distribution's risk exceeds the certificate; please report "
                  "this model (a bug in verifier)",) if alarm else ()
        results.append(DeltaCertificate(
            delta=float(delta), clean_risk=clean_risk, certificate=certificate, global_bound=global_bound,
            first_order_estimate=None if upsilon is None else clean_risk + delta * upsilon,
            certified_accuracy=accuracy,
            realised_risk=realised.risk, realised_accuracy=realised.accuracy,
            exact=None if certificate is None else is_exact(certificate, realised.risk, exact_tolerance),
            in_cell_mass=None if tables.cell_radius is None else _in_cell_mass([*low, *high], tables.cell_radius),
            fallbacks=alarms + tuple(fallbacks) + _global_fallbacks(growth, radii, float(delta)),
            curve_sources=sources,
        ))
    won = Counter(ROUTES[int(i)] for i in tables.winner[:, 1:].flatten() if i >= 0)
    result = Certificate(loss=loss, p=p, norm=norm, box=box, samples=shard.total,
                         clean_accuracy=float(correct.double().mean()), results=tuple(results),
                         exact_up_to_delta=_exact_up_to(results), routes_won=dict(won), fallbacks=tuple(fallbacks),
                         local_slopes=local, global_slope=slope if math.isfinite(slope) else None,
                         certified_radii=tables.certified_radii, distributions=tuple(distributions),
                         exact_mode=milp_report)
    require_no_nan(result.to_dict(), "the certificate")
    return result


def _rows_of(found: Candidates, rows: slice) -> Candidates:
    """The candidates of samples `rows` (global indices)."""
    return Candidates(radii=found.radii, direction_class=found.direction_class[rows], distance=found.distance[rows],
                      gain=found.gain[rows], points=None if found.points is None else found.points[rows],
                      point_distance=None if found.point_distance is None else found.point_distance[rows],
                      point_gain=None if found.point_gain is None else found.point_gain[rows])


def _placed(module: torch.nn.Module, blocks: list[BlockInputs], found: Candidates, shard: Shard,
            picks: tuple[torch.Tensor, torch.Tensor, torch.Tensor], norm: str, loss: str
            ) -> tuple[list[Placed], list[Placed]]:
    """Every rank's atoms of the realising distribution, block by block, in sample order."""
    low, high = [], []
    for inputs in blocks:
        rows = slice(shard.start + inputs.offset, shard.start + inputs.offset + len(inputs.x))
        lower_pick, upper_pick = place(module, inputs.x, inputs.y, inputs.jacobian, inputs.lower, inputs.upper,
                                       _rows_of(found, rows), tuple(t[rows] for t in picks), shard.total, norm, loss,
                                       rows.start, inputs.logits)
        low.append(lower_pick)
        high.append(upper_pick)
    if not shard.distributed:
        return low, high
    every = shard.objects((low, high))
    return [p for lows, _ in every for p in lows], [p for _, highs in every for p in highs]


def _require_finite_model_logits(model: ConvertedModel, x: torch.Tensor | np.ndarray,
                                 memory_limit_bytes: int | None = None) -> None:
    """The inputs and clean logits must be finite in the model's own dtype, not only in float64."""
    dtype = model.input_dtype
    inputs = torch.as_tensor(x).to(dtype)
    require_finite_inputs(inputs, "x")
    logits = chunked_logits(prepared_module(model, "cpu", dtype), inputs, pass_bytes(memory_limit_bytes),
                            model.module_batch)
    require_finite_logits(logits, f"torch, {str(dtype).replace('torch.', '')}")


def _in_cell_mass(placed: Sequence[Placed], radius: torch.Tensor) -> float:
    """Probability mass of atoms within their sample's exact cell radius (where the analysis is exact)."""
    moved = torch.cat([part.moved_by for part in placed])
    source = torch.cat([part.source for part in placed])
    weights = torch.cat([part.weights for part in placed])
    return float(weights[moved <= radius[source]].sum())


def _exact_up_to(results: Sequence[DeltaCertificate]) -> float | None:
    """The largest requested delta such that the certificate is exact there and at every smaller one
    (None when the smallest is not exact)."""
    reached = None
    for row in sorted(results, key=lambda r: r.delta):
        if not row.exact:
            break
        reached = row.delta
    return reached


def save_distributions(result: Certificate, path: str | os.PathLike[str]) -> None:
    """Write every delta's realising distribution to one npz (`atoms_k`, `weights_k`, `source_k`, `deltas`)."""
    write_distributions(path, [(d.atoms.numpy(), d.weights.numpy(), d.source.numpy()) for d in result.distributions],
                        deltas=np.array([d.delta for d in result.distributions]))
