"""Per-sample random draws of the attacks: numbered draws instead of one shared stream.

Each row of a draw gets its own CPU generator seeded from (seed, global sample index, draw
number, the row's occurrence among its sample's rows), so the numbers a sample gets do not depend
on which other samples run in the same process or chunk: a sharded run (`verifier.distributed`)
draws what one process draws, on any device.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch

from verifier.geometry import vector_norm


def occurrences(rows: torch.Tensor) -> torch.Tensor:
    """Per row, how many earlier rows belong to the same sample (0 for a sample's first row), on the CPU."""
    seen: dict[int, int] = {}
    counts = []
    for sample in rows.cpu().tolist():
        counts.append(seen.get(sample, 0))
        seen[sample] = counts[-1] + 1
    return torch.tensor(counts, dtype=torch.long)


def seeded_generators(seed: int, samples: torch.Tensor, draw: int, occurrence: torch.Tensor) -> list[torch.Generator]:
    """One CPU generator per row of global sample index `samples[k]` and occurrence `occurrence[k]`."""
    generators = []
    for sample, seen in zip(samples.tolist(), occurrence.tolist()):
        state = np.random.SeedSequence([int(seed), sample, int(draw), seen]).generate_state(2)
        generators.append(torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1])))
    return generators


def ball_displacements(generators: list[torch.Generator], width: int, radius: torch.Tensor, norm: str) -> torch.Tensor:
    """A random displacement (rows, width) in float64 inside each row's r-ball, from each row's own
    generator (uniform coordinates for r = inf; a random direction times a uniform fraction otherwise)."""
    def draw(sample: Callable[[torch.Generator], torch.Tensor]) -> torch.Tensor:
        if not generators:
            return torch.zeros(0, width, dtype=torch.float64)
        return torch.stack([sample(g) for g in generators])

    u = draw(lambda g: torch.rand(width, generator=g, dtype=torch.float64))
    scale = draw(lambda g: torch.rand(1, generator=g, dtype=torch.float64))[:, :1]
    radius = radius.cpu().unsqueeze(-1)
    if norm == "inf":
        return (2 * u - 1) * radius
    if norm == "2":
        v = draw(lambda g: torch.randn(width, generator=g, dtype=torch.float64))
    else:
        v = -torch.log(u.clamp_min(1e-300)) * torch.sign(
            draw(lambda g: torch.rand(width, generator=g, dtype=torch.float64)) - 0.5)
    size = vector_norm(v, norm).clamp_min(1e-300).unsqueeze(-1)
    return v / size * scale * radius
