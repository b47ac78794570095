"""The bounds' batch invariant, checked when a bound network is built.

Every rule of `verifier.bounds` treats axis 0 of every tensor as the batch: intervals, relaxations
and back-substituted rows are per sample, and an adjoint is taken at one sample (`adjoints.transpose`).
A graph that moves the batch off axis 0 or folds it into another axis (nn.MultiheadAttention's
`(L, N, E)` views and `(L, N·H, d)` heads, as torch exports them) computes the right logits but
would break that invariant inside back-substitution. `batch_axis_problem` runs the network on two
seeded samples, alone and together, and names the first node whose value is not one row per sample
on axis 0, each row that sample's own value.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from verifier.bounds.network import BoundNetwork

# Float64 kernels may sum in an order that depends on the batch size: rows agree to ~1e-15.
_RTOL = 1e-7


def batch_axis_problem(network: BoundNetwork, sample_shape: tuple[int, ...], dtype: torch.dtype,
                       device: torch.device) -> tuple[str, str, str] | None:
    """(ONNX node, op, why) of the first node whose value does not keep the batch on axis 0 with
    rows independent of each other (run on two seeded uniform [0, 1) samples); None when all do."""
    with torch.no_grad():
        return _first_problem(network, sample_shape, dtype, device)


def _first_problem(network: BoundNetwork, sample_shape: tuple[int, ...], dtype: torch.dtype,
                   device: torch.device) -> tuple[str, str, str] | None:
    from verifier.bounds.network import forward  # network.py builds with this module

    generator = torch.Generator().manual_seed(0)
    pair = torch.rand(2, *sample_shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    runs = {"pair": {network.input: pair}, "first": {network.input: pair[:1]}, "second": {network.input: pair[1:]}}
    for node in network.nodes:
        shapes = {}
        for label, values in runs.items():
            try:
                values[node.name] = value = forward(node, [values[i] for i in node.inputs])
            except (RuntimeError, ValueError, IndexError, TypeError) as err:
                return node.onnx_node, node.op, (f"fails on {len(values[network.input])} sample(s) "
                                                 f"({type(err).__name__}: {_first_line(err)})")
            shapes[label] = tuple(value.shape) if isinstance(value, torch.Tensor) else None
        pair_value, first, second = (runs[k][node.name] for k in ("pair", "first", "second"))
        if not isinstance(pair_value, torch.Tensor):
            continue  # a multi-output op's tuple: its getitem nodes are checked
        if not (pair_value.dim() and len(pair_value) == 2 and len(first) == 1 and len(second) == 1
                and pair_value.shape[1:] == first.shape[1:] == second.shape[1:]):
            return node.onnx_node, node.op, (
                f"moves the batch off axis 0 (shape {shapes['first']} for 1 sample, {shapes['pair']} for 2); "
                "the bounds need the batch on axis 0 of every tensor")
        if not (_close(pair_value[:1], first) and _close(pair_value[1:], second)):
            return node.onnx_node, node.op, ("mixes samples along axis 0 (a sample's row differs when run "
                                             "beside another); the bounds need every row to be its own sample's")
    return None


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if not (a.is_floating_point() and b.is_floating_point()):
        return bool(torch.equal(a, b))
    scale = float(torch.nan_to_num(b.abs(), posinf=0.0, neginf=0.0).max()) if b.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=_RTOL, atol=_RTOL * max(1.0, scale), equal_nan=True))


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= 160 else line[:157] + "..."
