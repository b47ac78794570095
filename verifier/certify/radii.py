"""Certified radii (method §4): per correctly classified sample, a radius below its true minimal
flip distance — the exact in-cell one, or the largest radius whose margin bounds prove every
`UB_j < 0`, refined beyond the grid by bisection that only ever returns a verified radius."""

from __future__ import annotations

import math

import torch

from verifier.bounds.margins import margin_bounds
from verifier.bounds.network import BoundNetwork
from verifier.cells import CellAnalysis
from verifier.certify.growth import MarginEvidence
from verifier.deadline import NEVER, Deadline, Stopped, Terminated


def certified_radii(evidence: MarginEvidence, network: BoundNetwork | None, x: torch.Tensor, norm: str,
                    box: tuple[float, float] | None, cells: CellAnalysis | None = None,
                    bisection_steps: int = 8, deadline: Deadline = NEVER,
                    device: torch.device | str = "cpu") -> torch.Tensor:
    """`c_i` for every sample (0 for misclassified ones, inf when the whole box is proved safe);
    the bisection's bounds run on `device` (that of `network`'s constants)."""
    radii, labels = evidence.radii, evidence.labels
    true_class = torch.nn.functional.one_hot(labels, evidence.logits.shape[1]).bool()
    clean_worst = (evidence.logits - evidence.logits.gather(1, labels[:, None])).masked_fill(
        true_class, -math.inf).max(1).values
    correct = clean_worst < 0
    certified = torch.zeros(len(labels), dtype=radii.dtype)
    if evidence.linear is not None:
        safe = evidence.linear.max(-1).values < 0  # (N, K+1), radius 0 = the clean margin
        last = safe.to(torch.int64).cumprod(1).sum(1) - 1
        low = torch.where(last >= 0, radii[last.clamp_min(0)], torch.zeros_like(certified))
        beyond = (last + 1).clamp_max(len(radii) - 1)
        high = torch.where(last + 1 < len(radii), radii[beyond], torch.minimum(evidence.reach, 2 * radii[-1]))
        if evidence.whole_box is not None:
            whole_safe = evidence.whole_box.max(-1).values < 0
            low = torch.where(whole_safe & correct, torch.full_like(low, math.inf), low)
        low = _bisect(network, x, labels, norm, box, low, high, correct & (last >= 0) & torch.isfinite(low),
                      bisection_steps, deadline, device)
        certified = low
    if cells is not None:
        certified = torch.maximum(certified, cells.certified_radius())
    return torch.where(correct, certified, torch.zeros_like(certified))


def _bisect(network: BoundNetwork | None, x: torch.Tensor, labels: torch.Tensor, norm: str,
            box: tuple[float, float] | None, low: torch.Tensor, high: torch.Tensor, active: torch.Tensor,
            steps: int, deadline: Deadline, device: torch.device | str) -> torch.Tensor:
    """Raise `low` (verified safe) towards `high` (not verified) where `active`; returns verified radii
    (past `deadline`, those verified so far; a signal still stops everything).

    Each step tries the cheap interval-based bound first and runs the tightened one only for the
    samples it does not prove: a proof by either is a proof, and a sample the cheap bound proves only
    gets a larger radius. (Seeding the tightened pass with the intervals of a larger ball was tried:
    relaxations on the smaller intervals are not always tighter, and some radii came out smaller.)"""
    active = active & (high > low) & torch.isfinite(high)
    if network is None or not active.any():
        return low
    low, high = low.clone(), high.clone()
    index = active.nonzero().squeeze(1)
    for _ in range(steps):
        middle = (low[index] + high[index]) / 2
        try:
            proved = _proved(network, x[index], labels[index], middle, norm, box, False, deadline, device)
            rest = (~proved).nonzero().squeeze(1)
            if len(rest):
                proved[rest] = _proved(network, x[index[rest]], labels[index[rest]], middle[rest], norm, box, True,
                                       deadline, device)
        except Stopped as err:
            if isinstance(err, Terminated):
                raise
            break
        low[index] = torch.where(proved, middle, low[index])
        high[index] = torch.where(proved, high[index], middle)
    return low


def _proved(network: BoundNetwork, x: torch.Tensor, labels: torch.Tensor, radius: torch.Tensor, norm: str,
            box: tuple[float, float] | None, tighten: bool, deadline: Deadline,
            device: torch.device | str) -> torch.Tensor:
    """Which samples the margin bounds (tightened or interval-based) prove correct on their balls (CPU)."""
    return margin_bounds(network, x, labels, radius, norm, box=box, device=str(device), dtype=x.dtype,
                         tighten=tighten, deadline=deadline).certified.cpu()
