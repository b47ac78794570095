"""`split_margins`: input-splitting branch and bound on one sample's margins (method §8), for
low-dimensional inputs and any net the linear bounds cover (smooth activations included).

The set `B(x_i, s) ∩ box` (ℓ∞) is a box; it is cut into leaves along their widest coordinate, the
leaves with the highest bound first, a batch of them at a time. Each leaf is bounded by the
bounds package's own interval + CROWN pass (`propagate`, `upper_bound`) on that sub-box, so every
leaf bound is sound and the maximum over the leaves (they cover the set) is an upper bound on
the worst margin at any stop; the leaf centres' forward passes give a lower bound. It stops when
the two meet within `tolerance`, or after `max_leaves` leaves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from verifier.bounds.network import BoundNetwork
from verifier.bounds.propagate import InputSet, propagate, upper_bound

ORDER = "inf"


@dataclass(frozen=True)
class SplitSolution:
    """Upper bounds on every margin over the set (max over leaves), the best point found, the effort."""

    upper: np.ndarray  # (C,): sound upper bounds of z_j - z_y (-inf at y)
    best: float  # the largest margin at a leaf centre (a lower bound on the worst margin)
    point: np.ndarray  # (d,): that centre
    leaves: int  # leaves bounded
    complete: bool  # max_j upper - best <= tolerance


def split_margins(network: BoundNetwork, center: torch.Tensor, label: int, low: torch.Tensor, high: torch.Tensor,
                  tolerance: float = 1e-3, max_leaves: int = 4096, batch: int = 64) -> SplitSolution:
    """Worst margins of one sample over the box `[low, high]` (flattened input; ℓ∞ ball ∩ box)."""
    center = torch.as_tensor(center, dtype=torch.float64).reshape(1, -1)
    shape = center.shape[1:]
    classes = network.classes or int(network.evaluate(center[:1]).shape[-1])
    eye = torch.eye(classes, dtype=torch.float64)
    rows = eye - eye[label]  # e_j - e_y
    leaves_low, leaves_high = low.reshape(1, -1).double(), high.reshape(1, -1).double()
    leaf_upper = _bound(network, rows, leaves_low, leaves_high, shape)
    best, point = _best_centre(network, label, leaves_low, leaves_high, shape, -math.inf, None)
    done_upper = torch.full((classes,), -math.inf, dtype=torch.float64)  # leaves that cannot matter any more
    count = 1
    while True:
        worst = leaf_upper.max(1).values
        top = float(torch.maximum(worst.max(), done_upper.max()))
        if top - best <= tolerance * max(1.0, abs(best)) or count >= max_leaves:
            break
        # Leaves whose bound is already within the tolerance of the best point stay; the rest are split.
        settled = worst - best <= tolerance * max(1.0, abs(best))
        done_upper = torch.maximum(done_upper, leaf_upper[settled].max(0).values) if settled.any() else done_upper
        leaf_upper, leaves_low, leaves_high = leaf_upper[~settled], leaves_low[~settled], leaves_high[~settled]
        if len(leaf_upper) == 0:
            break
        order = torch.argsort(leaf_upper.max(1).values, descending=True)
        chosen, kept = order[: min(batch, max_leaves - count)], order[min(batch, max_leaves - count):]
        if len(chosen) == 0:
            break
        children_low, children_high = _split(leaves_low[chosen], leaves_high[chosen])
        children = _bound(network, rows, children_low, children_high, shape)
        best, point = _best_centre(network, label, children_low, children_high, shape, best, point)
        leaf_upper = torch.cat([leaf_upper[kept], children])
        leaves_low = torch.cat([leaves_low[kept], children_low])
        leaves_high = torch.cat([leaves_high[kept], children_high])
        count += len(children)
    per_class = torch.maximum(leaf_upper.max(0).values if len(leaf_upper) else done_upper, done_upper)
    per_class[label] = -math.inf
    complete = float(per_class.max()) - best <= tolerance * max(1.0, abs(best))
    return SplitSolution(per_class.numpy(), best, point.reshape(-1).numpy(), count, complete)


def _split(low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each box cut in two halves across its widest coordinate: (2B, d) lows and highs."""
    axis = (high - low).argmax(1)
    rows = torch.arange(len(low))
    middle = (low[rows, axis] + high[rows, axis]) / 2
    left_high, right_low = high.clone(), low.clone()
    left_high[rows, axis] = middle
    right_low[rows, axis] = middle
    return torch.cat([low, right_low]), torch.cat([left_high, high])


def _bound(network: BoundNetwork, rows: torch.Tensor, low: torch.Tensor, high: torch.Tensor, shape) -> torch.Tensor:
    """Sound upper bounds (B, C) of every margin on each box (an ℓ∞ ball around its centre, no box)."""
    centre = (low + high) / 2
    radius = ((high - low) / 2).max(1).values
    region = InputSet(center=centre.reshape(len(low), *shape), radius=radius, norm=ORDER, lower=low - centre,
                      upper=high - centre)
    state = propagate(network, region)
    return upper_bound(network, state, region, network.output, rows.expand(len(low), -1, -1).clone())


def _best_centre(network, label: int, low, high, shape, best: float, point):
    with torch.no_grad():
        centres = (low + high) / 2
        logits = network.evaluate(centres.reshape(len(low), *shape))
    margin = (logits - logits[:, label:label + 1]).index_fill(1, torch.tensor([label]), -math.inf).max(1).values
    index = int(margin.argmax())
    if float(margin[index]) > best:
        return float(margin[index]), centres[index]
    return best, point
