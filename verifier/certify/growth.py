"""Per-sample upper growth functions on a radius grid: the minimum over the sound routes (§3).

Routes, each sound on `B(x_i, s) ∩ box` (inf where it does not apply):
- `cell`: the exact in-cell LP while `s <= r_i` (piecewise-linear models);
- `linear`: back-substituted margin bounds `UB_j(s)` turned into the loss;
- `jacobian`: the upper Riemann sum of slope bounds, `sum_{m<=k} Lambda(s_m) (s_m - s_{m-1})`;
- `global`: `Lip(loss) * s`.
The minimum is made non-decreasing from the right (`g(s_k) <= g(s_m) <= gbar(s_m)` for m > k),
which is sound and only tightens. Which route won is kept per sample and radius.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from verifier.bounds.margins import margin_bounds, margins_from
from verifier.bounds.network import BoundNetwork
from verifier.bounds.propagate import margin_problem, propagate
from verifier.bounds.slopes import slopes_from
from verifier.cells import CellAnalysis
from verifier.certify.aggregate import GrowthCurves
from verifier.losses import loss_values

ROUTES = ("cell", "linear", "jacobian", "global")


@dataclass(frozen=True)
class RouteGrowth:
    """The combined curves, each route's values (N, K+1), and the winning route index per point."""

    curves: GrowthCurves
    by_route: dict[str, torch.Tensor]
    winner: torch.Tensor
    clean_loss: torch.Tensor  # (N,)


def loss_from_margins(class_margins: torch.Tensor, loss: str) -> torch.Tensor:
    """Upper bound on the loss from upper bounds on every margin `z_j - z_y` (-inf at j = y)."""
    worst = class_margins.max(-1).values
    if loss == "margin":
        return worst
    if loss == "zero_one":
        return (worst >= 0).to(class_margins.dtype)
    # CE = log(1 + sum_{j != y} exp(z_j - z_y)), increasing in every margin.
    return torch.nn.functional.softplus(torch.logsumexp(class_margins, dim=-1))


def box_reach(x: torch.Tensor, box: tuple[float, float] | None, norm: str) -> torch.Tensor:
    """`D_i = max over the box of ||x - x_i||` (inf without a box)."""
    flat = x.flatten(1)
    if box is None:
        return torch.full((len(flat),), math.inf, dtype=flat.dtype, device=flat.device)
    far = torch.maximum(flat - box[0], box[1] - flat)
    return torch.linalg.vector_norm(far, {"inf": math.inf, "2": 2.0, "1": 1.0}[norm], dim=1)


def growth_curves(network: BoundNetwork | None, x: torch.Tensor, y: torch.Tensor, logits: torch.Tensor, loss: str,
                  norm: str, radii: torch.Tensor, box: tuple[float, float] | None, global_slope: float,
                  cells: CellAnalysis | None = None, device: str = "cpu") -> RouteGrowth:
    """Upper growth of `loss` for every sample on `radii` (radii[0] == 0), minimum over the routes."""
    count, points = len(x), len(radii)
    if loss == "zero_one":
        global_slope = math.inf  # the error indicator has no Lipschitz constant
    clean = loss_values(logits, y, loss)
    inf = torch.full((count, points), math.inf, dtype=radii.dtype, device=radii.device)
    routes = {name: inf.clone() for name in ROUTES}
    slopes = torch.full((count, points), global_slope, dtype=radii.dtype, device=radii.device)
    if math.isfinite(global_slope):
        routes["global"] = global_slope * radii.expand(count, -1)
    if cells is not None:
        inside = radii.unsqueeze(0) <= cells.radius.unsqueeze(1)
        exact = loss_from_margins(cells.class_margins(radii), loss) - clean.unsqueeze(1)
        routes["cell"] = torch.where(inside, exact, inf)
    if network is not None:
        riemann = torch.zeros(count, dtype=radii.dtype, device=radii.device)
        for k in range(1, points):
            problem = margin_problem(network, x, y, radii[k], norm, box, torch.device(device), radii.dtype)
            state = propagate(network, problem.region)  # one propagation serves both routes
            bounds = margins_from(problem, state)
            routes["linear"][:, k] = loss_from_margins(
                bounds.upper.masked_fill(bounds.labels.unsqueeze(1) == torch.arange(bounds.upper.shape[1]),
                                         -math.inf), loss) - clean
            if loss != "zero_one":
                lam = slopes_from(problem, state).loss_slope
                slopes[:, k] = torch.minimum(slopes[:, k], lam)
                riemann = riemann + slopes[:, k] * (radii[k] - radii[k - 1])
                routes["jacobian"][:, k] = riemann
    for values in routes.values():
        values[:, 0] = 0.0
    stacked = torch.stack([routes[name] for name in ROUTES])  # (R, N, K+1)
    best, winner = stacked.min(0)
    best = torch.flip(torch.cummin(torch.flip(best, [1]), 1).values, [1]).clamp_min(0.0)
    if loss == "zero_one":
        tail = 1.0 - clean
    elif network is not None and box is not None:
        whole = margin_bounds(network, x, y, math.inf, norm, box=box, device=device)
        tail = loss_from_margins(whole.upper.masked_fill(whole.labels.unsqueeze(1) == torch.arange(
            whole.upper.shape[1]), -math.inf), loss) - clean
    else:
        tail = torch.full((count,), math.inf, dtype=radii.dtype)
    curves = GrowthCurves(radii=radii, values=best, slopes=slopes, reach=box_reach(x, box, norm),
                          tail=torch.maximum(tail, best[:, -1]),
                          tail_slope=torch.full((count,), global_slope, dtype=radii.dtype))
    return RouteGrowth(curves=curves, by_route=routes, winner=winner, clean_loss=clean)
