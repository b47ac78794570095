"""`split_bound`: CROWN bounds of a leaf of ReLU splitting with its split constraints (β-CROWN, method §8).

On an `EncodedNetwork` (affine maps, units `max(h, a h)`), for objectives `c` over the leaf's set
`{x in the ball ∩ box : s_u h_u(x) >= 0 for the split units u}` (signs `s_u = ±1`):
`max c z(x) <= max_{x in ball ∩ box} [c z(x) + sum_u beta_u s_u h_u(x)]` for any `beta >= 0` (weak
duality), and the right side is bounded by back-substitution through each unit's lines on the
leaf's intervals `[l, h]` (upper: the chord; lower: slope `alpha in [a, 1]`, any of which is
valid). `beta` and `alpha` are free parameters, so a few projected gradient steps lower the bound
and the least bound seen over the steps is sound. The intercept term `lam+ * offset` of each
unstable unit is its BaBSR branching score.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from verifier.bounds.propagate import InputSet
from verifier.geometry import argmax_linear
from verifier.exact.encode import AffineNode, EncodedNetwork, UnitNode

STEPS = 12
LEARNING_RATE = 0.2


@dataclass(frozen=True)
class DenseNetwork:
    """An `EncodedNetwork` with its affine maps as dense float64 tensors (for batched back-substitution)."""

    encoded: EncodedNetwork
    matrices: dict[str, tuple[torch.Tensor, ...]]
    offsets: dict[str, torch.Tensor]
    alphas: dict[str, torch.Tensor]

    @classmethod
    def of(cls, encoded: EncodedNetwork) -> DenseNetwork:
        """Dense copies of every affine map of `encoded`."""
        matrices, offsets, alphas = {}, {}, {}
        for node in encoded.nodes:
            if isinstance(node, AffineNode):
                matrices[node.name] = tuple(torch.from_numpy(np.asarray(m.todense())) for m in node.matrices)
                offsets[node.name] = torch.from_numpy(node.offset)
            else:
                alphas[node.name] = torch.from_numpy(node.alpha)
        return cls(encoded, matrices, offsets, alphas)


def dense_forward(net: DenseNetwork, x: torch.Tensor) -> torch.Tensor:
    """The logits (classes,) of one flattened input `x` through the dense maps (a check on the LP's point)."""
    values = {net.encoded.input: x.to(torch.float64)}
    for node in net.encoded.nodes:
        if isinstance(node, AffineNode):
            values[node.name] = net.offsets[node.name] + sum(
                matrix @ values[name] for name, matrix in zip(node.inputs, net.matrices[node.name]))
        else:
            pre = values[node.input]
            values[node.name] = torch.maximum(pre, net.alphas[node.name] * pre)
    return values[net.encoded.output]


def split_bound(net: DenseNetwork, region: InputSet, intervals: dict[str, tuple[torch.Tensor, torch.Tensor]],
                signs: dict[str, torch.Tensor], rows: torch.Tensor,
                steps: int = STEPS, learning_rate: float = LEARNING_RATE) -> tuple[torch.Tensor, dict, torch.Tensor]:
    """Sound upper bounds (B, K) of `rows` (B, K, classes) · logits over each leaf, the per-unit
    scores (B, width) of every unit node (for the row with the largest bound) and one candidate
    point (B, d) per leaf (the maximiser of that row's linear bound: inside the ball ∩ box, not
    necessarily in the leaf).

    `intervals[name]` (B, *shape): the leaf's bounds of every tensor; `signs[pre]` (B, width) int:
    +1 / -1 where the unit reading `pre` is split active / inactive, 0 elsewhere.
    """
    encoded = net.encoded
    flat = {name: (low.flatten(1), high.flatten(1)) for name, (low, high) in intervals.items()}
    units = [n for n in encoded.nodes if isinstance(n, UnitNode)]
    lines = {n.name: _lines(*flat[n.input], net.alphas[n.name]) for n in units}
    count, objectives = rows.shape[:2]
    betas = {n.input: torch.zeros(count, objectives, flat[n.input][0].shape[1], dtype=rows.dtype, requires_grad=True)
             for n in units if (signs[n.input] != 0).any()}
    slopes = {n.name: lines[n.name][4].unsqueeze(1).expand(-1, objectives, -1).clone().requires_grad_(True)
              for n in units}
    best = torch.full((count, objectives), torch.inf, dtype=rows.dtype)
    scores: dict = {}
    optimiser = torch.optim.Adam(list(betas.values()) + list(slopes.values()), lr=learning_rate)
    for step in range(steps + 1):
        with torch.enable_grad():
            value, intercepts, lam = _backward(net, region, lines, signs, rows, betas, slopes)
        better = value.detach() < best
        best = torch.where(better, value.detach(), best)
        if step == 0 or better.any():
            worst = best.argmax(1)
            scores = {name: part[torch.arange(count), worst] for name, part in intercepts.items()}
            direction = lam[torch.arange(count), worst]
        if step == steps:
            break
        optimiser.zero_grad()
        value.sum().backward()
        optimiser.step()
        with torch.no_grad():  # back to the valid parameters: beta >= 0, alpha in [a, 1]
            for beta in betas.values():
                beta.clamp_(min=0.0)
            for node in units:
                slopes[node.name].copy_(torch.maximum(torch.minimum(slopes[node.name], torch.ones(())),
                                                      net.alphas[node.name].to(rows.dtype)))
    # The maximiser of the last linear bound of the worst row: a point of the ball ∩ box to evaluate.
    points = region.center.flatten(1) + argmax_linear(direction, region.lower, region.upper, region.radius, region.norm)
    return best, scores, points


def _lines(low: torch.Tensor, high: torch.Tensor, alpha: torch.Tensor):
    """Upper line (slope, offset) and the default lower slope of `max(h, a h)` on [low, high] (B, w)."""
    a = alpha.to(low.dtype).expand_as(low)
    active, inactive = low >= 0, (high <= 0) & ~(low >= 0)
    unstable = ~(active | inactive)
    width = torch.where(unstable, high - low, torch.ones_like(low))
    chord = torch.where(unstable, (high - a * low) / width, torch.where(active, torch.ones_like(low), a))
    offset = torch.where(unstable, a * low - chord * low, torch.zeros_like(low))
    lower = torch.where(unstable, torch.where(high >= -low, torch.ones_like(low), a), chord)
    return chord, offset, active, inactive, lower


def _backward(net: DenseNetwork, region: InputSet, lines, signs, rows, betas, slopes):
    """One back-substitution with the given beta and lower slopes: bounds (B, K) and intercept terms."""
    encoded = net.encoded
    pending: dict[str, torch.Tensor] = {encoded.output: rows}
    for pre, beta in betas.items():
        term = beta * signs[pre].to(rows.dtype).unsqueeze(1)
        pending[pre] = pending[pre] + term if pre in pending else term
    bias = torch.zeros(rows.shape[:2], dtype=rows.dtype)
    intercepts = {}
    for node in reversed(encoded.nodes):
        lam = pending.pop(node.name, None)
        if lam is None:
            continue
        if isinstance(node, AffineNode):
            bias = bias + lam @ net.offsets[node.name]
            contributions = [lam @ matrix for matrix in net.matrices[node.name]]
            names = node.inputs
        else:
            chord, offset, active, inactive, _ = lines[node.name]
            stable_slope = torch.where(active, torch.ones_like(chord), chord)  # chord == a on inactive units
            lower = torch.where((active | inactive).unsqueeze(1), stable_slope.unsqueeze(1), slopes[node.name])
            positive, negative = lam.clamp_min(0), lam.clamp_max(0)
            intercept = positive * offset.unsqueeze(1)
            intercepts[node.name] = intercept.detach()
            bias = bias + intercept.sum(-1)
            contributions = [positive * chord.unsqueeze(1) + negative * lower]
            names = (node.input,)
        for name, contribution in zip(names, contributions):
            pending[name] = pending[name] + contribution if name in pending else contribution
    lam = pending.pop(encoded.input)
    value = bias + region.maximise(lam.reshape(*lam.shape[:2], *region.center.shape[1:]))
    return value + 1e-12 * (1.0 + value.abs()), intercepts, lam.detach()
