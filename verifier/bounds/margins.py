"""`margin_bounds`: certified upper bounds on every margin `z_j - z_y` over `B(x, s) ∩ box` (§3.3)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from verifier.bounds.network import BoundNetwork
from verifier.bounds.propagate import InputSet, objective_upper_bounds
from verifier.cells import displacement_box
from verifier.convert import ConvertedModel
from verifier.device import resolve_device
from verifier.geometry import parse_norm


@dataclass(frozen=True)
class MarginBounds:
    """`upper[i, j] >= max over the set of z_j - z_y` (0 at j = y), per sample and radius."""

    norm: str
    radius: torch.Tensor  # (N,)
    labels: torch.Tensor  # (N,)
    upper: torch.Tensor  # (N, C)

    @property
    def worst_margin(self) -> torch.Tensor:
        """`max_{j != y} upper[i, j]`: an upper bound on the margin loss over the set (N,)."""
        mask = torch.nn.functional.one_hot(self.labels, self.upper.shape[1]).bool()
        return self.upper.masked_fill(mask, -torch.inf).max(1).values

    @property
    def certified(self) -> torch.Tensor:
        """Samples proved correct on the whole set (every `upper_j < 0`, ties count as errors)."""
        return self.worst_margin < 0


def margin_bounds(model: ConvertedModel | BoundNetwork, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray,
                  radius: torch.Tensor | float, norm: str | float = "inf", box: tuple[float, float] | None = None,
                  device: str = "auto", dtype: torch.dtype = torch.float64, tighten: bool = True) -> MarginBounds:
    """Upper bounds on all margins over `B_r(x_i, s_i) ∩ box` by linear bound propagation."""
    norm = parse_norm(norm)
    target = resolve_device(device)
    network = model if isinstance(model, BoundNetwork) else BoundNetwork.from_model(model, dtype, target)
    center = torch.as_tensor(x).to(device=target, dtype=dtype)
    labels = torch.as_tensor(y, dtype=torch.long, device=target)
    radii = torch.broadcast_to(torch.as_tensor(radius, dtype=dtype, device=target), (len(center),))
    lower, upper = displacement_box(center, box)
    region = InputSet(center=center, radius=radii, norm=norm, lower=lower, upper=upper)
    classes = network.evaluate(center[:1]).shape[-1]
    eye = torch.eye(classes, dtype=dtype, device=target)
    rows = eye.unsqueeze(0) - eye[labels].unsqueeze(1)  # row j: e_j - e_y
    values = objective_upper_bounds(network, region, rows, tighten)
    values = values.masked_fill(torch.nn.functional.one_hot(labels, classes).bool(), 0.0)
    return MarginBounds(norm=norm, radius=radii, labels=labels, upper=values)
