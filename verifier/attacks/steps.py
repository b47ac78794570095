"""Ascent steps shared by every attack (method §5): steepest-ascent directions and projections
for the threat norms r in {inf, 2, 1}, plain PGD's cosine step schedule, APGD's checkpoints
(Croce & Hein, ICML 2020) and the dual exponent of p. Pure functions on tensors.
"""

from __future__ import annotations

import math

import torch

from verifier.geometry import vector_norm


def steepest_ascent(g: torch.Tensor, d: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
                    norm: str) -> torch.Tensor:
    """Unit steepest-ascent direction of gradients `g` (B, D): inf sign(g), 2 g/||g||, 1 the signed
    coordinate of largest |g_k| that still has room in the box; 0 where g = 0."""
    if norm == "inf":
        return torch.sign(g)
    if norm == "2":
        size = vector_norm(g, "2").unsqueeze(-1)
        return torch.where(size > 0, g / size.clamp_min(1e-300), torch.zeros_like(g))
    room = torch.where(g > 0, upper - d, d - lower)
    score = torch.where(room > 0, g.abs(), torch.zeros_like(g))
    best, k = score.max(-1, keepdim=True)
    step = torch.zeros_like(g).scatter_(-1, k, torch.sign(g.gather(-1, k)))
    return torch.where(best > 0, step, torch.zeros_like(g))


def project_ball(d: torch.Tensor, radius: torch.Tensor, norm: str) -> torch.Tensor:
    """Euclidean projection of each row of `d` (B, D) onto the r-ball of its radius (B,)."""
    r = radius.unsqueeze(-1)
    if norm == "inf":
        return torch.maximum(torch.minimum(d, r), -r)
    if norm == "2":
        size = vector_norm(d, "2").unsqueeze(-1)
        return d * torch.where(size > r, r / size.clamp_min(1e-300), torch.ones_like(size))
    size = d.abs()
    ordered = torch.sort(size, -1, descending=True).values
    partial = torch.cumsum(ordered, -1)
    count = torch.arange(1, d.shape[-1] + 1, dtype=d.dtype, device=d.device)
    active = (ordered - (partial - r) / count) > 0
    rho = (active * count).max(-1, keepdim=True).values.clamp_min(1).long()
    theta = (partial.gather(-1, rho - 1) - r) / rho
    shrunk = torch.sign(d) * (size - theta).clamp_min(0.0)
    return torch.where(size.sum(-1, keepdim=True) <= r, d, shrunk)


def schedule(steps: int) -> list[float]:
    """Step sizes as fractions of the radius: cosine decay from 0.5, never below 1/steps (plain PGD)."""
    return [max(0.25 * (1 + math.cos(math.pi * t / steps)), 1.0 / steps) for t in range(steps)]


def checkpoints(steps: int) -> set[int]:
    """APGD's checkpoints: the first after 22 % of the steps, each next interval 3 % shorter, >= 6 %."""
    interval, shrink, shortest = max(int(0.22 * steps), 1), max(int(0.03 * steps), 1), max(int(0.06 * steps), 1)
    out, at = set(), interval
    while at < steps:
        out.add(at)
        interval = max(interval - shrink, shortest)
        at += interval
    return out


def dual_exponent(p: float) -> float:
    """q with 1/p + 1/q = 1."""
    return math.inf if p == 1 else (1.0 if math.isinf(p) else p / (p - 1.0))
