"""What an attack returns: the explicit distribution Q, its measured numbers, and the report.

`Distribution` is what an attack's loop builds (atoms, weights, the clean sample each atom comes
from); `AttackResult` adds the numbers measured on it (risk and accuracy under Q replayed in
onnxruntime, the transport cost in float64); `AttackReport` collects one result per
(method, delta). `transport_cost` is the cost of the coupling that moves each atom's mass from
its source sample: an upper bound on `W_p(Q, P_N)`, and the number every budget check uses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from verifier.geometry import vector_norm
from verifier.graph import json_safe


@dataclass(frozen=True, eq=False)
class Distribution:
    """Q = sum_m weights[m] * delta(atoms[m], y[source[m]]), built by one attack for one delta.

    `accuracy_atoms` (same shape, weights and sources, or None: the same atoms) is a second
    distribution within the same budget on which the accuracy is measured: a point-wise attack
    keeps two optima per sample, the highest-loss iterate (the risk) and a misclassified one."""

    atoms: torch.Tensor  # (M, *input shape), model dtype
    weights: torch.Tensor  # (M,) float64, summing to 1
    source: torch.Tensor  # (M,) int64, index of the clean sample each atom comes from
    steps: int
    flags: tuple[str, ...] = ()
    seconds: float = 0.0
    accuracy_atoms: torch.Tensor | None = None


def transport_cost(atoms: torch.Tensor, weights: torch.Tensor, source: torch.Tensor, x: torch.Tensor,
                   p: float, norm: str) -> float:
    """`(sum_m w_m ||atom_m - x_source(m)||_r^p)^(1/p)` in float64; p = inf: the largest distance
    of an atom with positive weight."""
    return cost_of(weights, atom_distances(atoms, source, x, norm), p)


def atom_distances(atoms: torch.Tensor, source: torch.Tensor, x: torch.Tensor, norm: str) -> torch.Tensor:
    """`||atom_m - x_source(m)||_r` per atom, in float64 on the CPU (`source` indexes the rows of `x`)."""
    sources = x.detach().cpu().to(torch.float64)[source.cpu()].flatten(1)
    return vector_norm(atoms.detach().cpu().to(torch.float64).flatten(1) - sources, norm)


def cost_of(weights: torch.Tensor, distance: torch.Tensor, p: float) -> float:
    """The coupling's cost from its weights and atom distances (see `transport_cost`)."""
    w = weights.detach().to(torch.float64).cpu()
    if math.isinf(p):
        positive = distance[w > 0]
        return float(positive.max()) if len(positive) else 0.0
    return float((w * distance**p).sum() ** (1.0 / p))


@dataclass(frozen=True, eq=False)
class AttackResult:
    """One attack at one budget: numbers from onnxruntime forward passes of the returned atoms."""

    method: str
    delta: float
    p: float
    norm: str
    loss: str
    risk: float  # E_Q[loss]
    robust_accuracy: float  # Q(margin < 0)
    clean_risk: float
    clean_accuracy: float
    transport_cost: float  # float64 cost of the returned coupling(s) (<= delta)
    steps: int
    seconds: float
    flags: tuple[str, ...]
    replayed_in_onnxruntime: bool
    atoms: torch.Tensor = field(repr=False)
    weights: torch.Tensor = field(repr=False)
    source: torch.Tensor = field(repr=False)
    accuracy_atoms: torch.Tensor | None = field(default=None, repr=False)  # where the accuracy was measured
    accuracy_weights: torch.Tensor | None = field(default=None, repr=False)  # its weights (None: `weights`)
    accuracy_source: torch.Tensor | None = field(default=None, repr=False)  # its sources (None: `source`)

    def to_dict(self) -> dict:
        """JSON-ready form (the distribution itself is left out)."""
        return json_safe({
            "method": self.method, "delta": self.delta, "p": self.p, "norm": self.norm, "loss": self.loss,
            "risk": self.risk, "robust_accuracy": self.robust_accuracy, "clean_risk": self.clean_risk,
            "clean_accuracy": self.clean_accuracy, "transport_cost": self.transport_cost,
            "atoms": int(len(self.weights)), "steps": self.steps, "seconds": self.seconds,
            "flags": list(self.flags), "replayed_in_onnxruntime": self.replayed_in_onnxruntime,
        })


@dataclass(frozen=True, eq=False)
class AttackReport:
    """Every (method, delta) result of one `attack()` call, plus the methods that were skipped."""

    p: float
    norm: str
    loss: str
    box: tuple[float, float] | None
    samples: int
    seed: int
    results: tuple[AttackResult, ...]
    skipped: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        """JSON-ready form: {"p","norm","loss","box","samples","seed","results","skipped"}."""
        return json_safe({
            "p": self.p, "norm": self.norm, "loss": self.loss,
            "box": None if self.box is None else list(self.box), "samples": self.samples, "seed": self.seed,
            "results": [r.to_dict() for r in self.results], "skipped": list(self.skipped),
        })

    def to_text(self) -> str:
        """A short table, one line per (method, delta)."""
        head = (f"W_{_number(self.p)} attacks, threat norm l_{self.norm}, loss {self.loss}, "
                f"{self.samples} samples, box {'none' if self.box is None else f'[{self.box[0]:g}, {self.box[1]:g}]'}")
        rows = [f"{'method':<10} {'delta':>8} {'risk':>10} {'clean':>10} {'rob.acc':>8} {'cost':>9} {'sec':>6}  flags"]
        for r in self.results:
            rows.append(f"{r.method:<10} {r.delta:>8.4g} {r.risk:>10.5g} {r.clean_risk:>10.5g} "
                        f"{r.robust_accuracy:>8.2%} {r.transport_cost:>9.4g} {r.seconds:>6.2f}  "
                        f"{', '.join(r.flags) or '-'}")
        rows += [f"skipped: {s}" for s in self.skipped]
        return "\n".join([head, *rows])


def _number(p: float) -> str:
    return "inf" if math.isinf(p) else f"{p:g}"
