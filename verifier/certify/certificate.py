"""`certify`: upper bounds on the Wasserstein robust risk over a grid of budgets (method §2–§4).

The pipeline: clean losses → the global Lipschitz baseline → growth curves on one radius grid
shared by every delta (minimum over the routes of `growth.py`) → the §2 aggregation per delta
→ `certificate = clean + min(aggregated excess, global closed form)`. Alongside: the global
bound, Bai et al.'s first-order estimate `clean + delta * Upsilon` (an estimate, not a bound) and
the certified accuracy (§4). A model without bound rules falls back to the global baseline,
flagged in `fallbacks`.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from verifier.bounds.global_lipschitz import global_lipschitz
from verifier.bounds.network import BoundNetwork
from verifier.cells import CellAnalysis, cell_analysis
from verifier.certify.accuracy import certified_accuracy
from verifier.certify.aggregate import excess_bound, grid
from verifier.certify.growth import ROUTES, box_reach, collect_evidence, growth_curves
from verifier.convert import ConvertedModel
from verifier.convert.normalize import NormalizedModel
from verifier.errors import UsageError, VerifierError
from verifier.geometry import dual_norm, parse_norm
from verifier.graph import PIECEWISE_LINEAR_KINDS
from verifier.jacobian import loss_gradients
from verifier.losses import check_loss, loss_values


@dataclass(frozen=True)
class DeltaCertificate:
    """Numbers for one budget delta (None where a quantity does not apply)."""

    delta: float
    clean_risk: float
    certificate: float | None
    global_bound: float | None
    first_order_estimate: float | None
    certified_accuracy: float

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class Certificate:
    """Certificates of one model and sample for every delta, with the route statistics."""

    loss: str
    p: float
    norm: str
    box: tuple[float, float] | None
    samples: int
    results: tuple[DeltaCertificate, ...]
    routes_won: dict[str, int]
    fallbacks: tuple[str, ...]

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "loss": self.loss, "p": self.p, "norm": self.norm, "box": self.box, "samples": self.samples,
            "results": [r.to_dict() for r in self.results], "routes_won": dict(self.routes_won),
            "fallbacks": list(self.fallbacks),
        }


def _normalized(model: ConvertedModel) -> NormalizedModel:
    return NormalizedModel(proto=model.normalized, input_name=model.input_spec.name,
                           output_names=model.output_names, logits_index=model.logits_index)


def _upsilon(model: ConvertedModel, x: torch.Tensor, y: torch.Tensor, loss: str, norm: str, p: float) -> float:
    """Bai et al.'s `(mean ||grad loss(x_i)||_*^q)^(1/q)` with 1/p + 1/q = 1."""
    gradients = loss_gradients(model, x, y, loss, device="cpu", dtype=torch.float64).gradients
    sizes = dual_norm(gradients.flatten(1), norm)
    if math.isinf(p):
        return float(sizes.mean())
    if p == 1:
        return float(sizes.max())
    q = p / (p - 1.0)
    return float((sizes**q).mean() ** (1.0 / q))


def _certified_radii(margin_values: torch.Tensor, radii: torch.Tensor, clean_margin: torch.Tensor,
                     cells: CellAnalysis | None) -> torch.Tensor:
    """Largest grid radius whose margin bound stays < 0 (and the in-cell radius when larger)."""
    safe = (clean_margin.unsqueeze(1) + margin_values) < 0  # non-increasing along the grid
    last = safe.to(torch.int64).cumprod(1).sum(1) - 1  # index of the last safe radius, -1 if none
    radius = torch.where(last >= 0, radii[last.clamp_min(0)], torch.zeros_like(clean_margin))
    if cells is not None:
        radius = torch.maximum(radius, cells.certified_radius())
    return torch.where(clean_margin < 0, radius, torch.zeros_like(radius))


def certify(model: ConvertedModel, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray,
            deltas: Sequence[float], p: float = 2.0, norm: str | float = "2", loss: str = "ce",
            box: tuple[float, float] | None = None, grid_points: int = 24) -> Certificate:
    """Certificates (upper bounds on R(delta)) for every delta, on CPU in float64."""
    norm, loss = parse_norm(norm), check_loss(loss)
    if p < 1:
        raise UsageError(f"p must be >= 1 (got {p})")
    if not deltas or min(deltas) < 0:
        raise UsageError("give at least one delta, all >= 0")
    inputs = torch.as_tensor(x).to(torch.float64)
    labels = torch.as_tensor(y, dtype=torch.long)
    logits = model.logits_module.double()(inputs).detach()
    clean = loss_values(logits, labels, loss)
    margins = loss_values(logits, labels, "margin")
    fallbacks: list[str] = []
    lipschitz = global_lipschitz(_normalized(model), norm)
    network: BoundNetwork | None
    try:
        network = BoundNetwork.from_model(model)
    except VerifierError as err:
        network = None
        fallbacks.append(str(err))
    cells = None
    if all(site.kind in PIECEWISE_LINEAR_KINDS for site in model.logit_sites):
        cells = cell_analysis(model, inputs, labels, norm, box=box, device="cpu")
    top = max(deltas) * (1.0 if math.isinf(p) else min(len(inputs) ** (1.0 / p), 20.0))
    top = min(top, float(box_reach(inputs, box, norm).max())) if box is not None else top
    radii = torch.unique(torch.cat([grid(max(top, max(deltas)), grid_points),
                                    torch.tensor([float(d) for d in deltas], dtype=torch.float64)]))
    evidence = collect_evidence(network, inputs, labels, logits, norm, radii, box, cells)
    margin_growth = growth_curves(evidence, "margin", lipschitz.loss_constant("margin"))
    growth = margin_growth if loss in ("margin", "dlr") else growth_curves(  # dlr: no certificate
        evidence, loss, lipschitz.loss_constant(loss))
    radii_certified = _certified_radii(margin_growth.curves.values, radii, margins, cells)
    correct = margins < 0
    upsilon = _upsilon(model, inputs, labels, loss, norm, p) if loss in ("ce", "margin") else None
    slope = lipschitz.loss_constant(loss) if loss != "dlr" else math.inf
    results = []
    for delta in deltas:
        clean_risk = float(clean.mean())
        global_bound = clean_risk + delta * slope if math.isfinite(slope) else None
        certificate = None
        if loss != "dlr":
            excess, _ = excess_bound(growth.curves, float(delta), p)
            candidates = [clean_risk + excess] + ([global_bound] if global_bound is not None else [])
            certificate = min(candidates)
            if loss == "zero_one":
                certificate = min(certificate, 1.0)
        results.append(DeltaCertificate(
            delta=float(delta), clean_risk=clean_risk, certificate=certificate, global_bound=global_bound,
            first_order_estimate=None if upsilon is None else clean_risk + delta * upsilon,
            certified_accuracy=certified_accuracy(radii_certified, correct, float(delta), p),
        ))
    won = Counter(ROUTES[int(i)] for i in growth.winner[:, 1:].flatten())
    return Certificate(loss=loss, p=p, norm=norm, box=box, samples=len(inputs), results=tuple(results),
                       routes_won=dict(won), fallbacks=tuple(fallbacks))
