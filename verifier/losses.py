"""Per-sample losses on logits (method §1), one tie convention everywhere.

`margin = max_{j != y} z_j - z_y` (a sample is an error iff margin >= 0), `ce` (cross-entropy),
`zero_one` (1 iff margin >= 0), and `dlr` (AutoAttack's difference-of-logits ratio, attacks only:
it is not Lipschitz, so certificates report null for it).
"""

from __future__ import annotations

import torch

from verifier.errors import UsageError

LOSSES = ("ce", "margin", "zero_one", "dlr")
DIFFERENTIABLE_LOSSES = ("ce", "margin", "dlr")


def check_loss(name: str) -> str:
    """Return `name` if it is a known loss, else raise a `UsageError` naming the choices."""
    if name not in LOSSES:
        raise UsageError(f"unknown loss {name!r}; choose one of {', '.join(LOSSES)}")
    return name


def other_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Logits with the true class masked to -inf (shape N x C)."""
    mask = torch.nn.functional.one_hot(labels, logits.shape[-1]).bool()
    return logits.masked_fill(mask, -torch.inf)


def margins(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """`m_j = z_j - z_y` for every class (0 at j = y), shape N x C."""
    return logits - logits.gather(-1, labels.unsqueeze(-1))


def loss_values(logits: torch.Tensor, labels: torch.Tensor, loss: str) -> torch.Tensor:
    """Per-sample loss (shape N)."""
    check_loss(loss)
    true = logits.gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    best_other = other_logits(logits, labels).max(-1).values
    if loss == "margin":
        return best_other - true
    if loss == "zero_one":
        return (best_other >= true).to(logits.dtype)
    if loss == "ce":
        return torch.nn.functional.cross_entropy(logits, labels, reduction="none")
    if logits.shape[-1] < 3:
        raise UsageError("the dlr loss needs at least 3 classes")
    ordered = torch.sort(logits, dim=-1, descending=True).values
    return (best_other - true) / (ordered[:, 0] - ordered[:, 2] + 1e-12)
