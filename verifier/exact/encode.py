"""A `BoundNetwork` as sparse affine maps and ReLU-family units: the sample-independent half of the MILP.

Every affine node `v = L(u_1, …) + b` becomes its matrices `∂v/∂u_k` (exact: `L` is linear, read
off by one Jacobian of the rule at zero) and its offset `b`; every activation node becomes its
per-unit negative-side slope `alpha` (`σ(h) = h` for `h >= 0`, `alpha h` for `h < 0`; ReLU 0,
LeakyReLU/PReLU their slope, which must lie in [0, 1] so that `σ = max(h, alpha h)` is convex).
Any other node (smooth activations, MaxPool, interval-only rules) makes the network unencodable:
`encode_network` raises `NotEncodable` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from verifier.bounds import ops
from verifier.bounds.network import Activation, BoundNetwork

_MAX_DENSE = 2**24  # units_out x units_in entries read off per affine input (128 MB float64)


class NotEncodable(ValueError):
    """The network has a node the MILP cannot state exactly."""


@dataclass(frozen=True)
class AffineNode:
    """`v = sum_k matrices[k] @ u_{inputs[k]} + offset` on flattened units."""

    name: str
    inputs: tuple[str, ...]
    matrices: tuple[sp.csr_matrix, ...]
    offset: np.ndarray


@dataclass(frozen=True)
class UnitNode:
    """`v = max(u, alpha u)` unit by unit (alpha in [0, 1])."""

    name: str
    input: str
    alpha: np.ndarray


@dataclass(frozen=True)
class EncodedNetwork:
    """The network's nodes in topological order, with the width of every tensor (flattened)."""

    input: str
    output: str
    nodes: tuple[AffineNode | UnitNode, ...]
    widths: dict[str, int]
    shapes: dict[str, tuple[int, ...]]  # per-sample shape of every tensor

    @property
    def unit_count(self) -> int:
        """Number of activation units (an upper bound on the MILP's binaries)."""
        return sum(self.widths[n.name] for n in self.nodes if isinstance(n, UnitNode))


def encode_network(network: BoundNetwork, input_shape: tuple[int, ...]) -> EncodedNetwork:
    """Read off the affine maps and unit slopes of `network` for one sample of `input_shape`."""
    dtype = torch.float64
    values = {network.input: torch.zeros(1, *input_shape, dtype=dtype)}
    nodes: list[AffineNode | UnitNode] = []
    for node in network.nodes:
        rule = node.rule
        inputs = [values[name] for name in node.inputs]
        if isinstance(rule, ops.Affine):
            nodes.append(_affine(node.name, node.inputs, rule, inputs))
            values[node.name] = rule(*inputs)
        elif isinstance(rule, Activation) and rule.kind in ("relu", "leaky_relu", "prelu"):
            values[node.name] = rule.forward(inputs[0])
            nodes.append(UnitNode(node.name, node.inputs[0], _alpha(rule, inputs[0])))
        else:
            kind = rule.kind if isinstance(rule, Activation) else type(rule).__name__
            raise NotEncodable(f"node {node.onnx_node} ({node.op}, {kind}) has no exact MILP form")
    shapes = {name: tuple(value.shape[1:]) for name, value in values.items()}
    widths = {name: int(np.prod(shape, dtype=np.int64)) for name, shape in shapes.items()}
    return EncodedNetwork(network.input, network.output, tuple(nodes), widths, shapes)


def _affine(name: str, input_names: tuple[str, ...], rule: ops.Affine, inputs: list[torch.Tensor]) -> AffineNode:
    out = rule(*[torch.zeros_like(value) for value in inputs])  # the offset: the map at 0
    offset = out.reshape(-1).detach().numpy().astype(np.float64)
    matrices = []
    for position, value in enumerate(inputs):
        if out.numel() * value.numel() > _MAX_DENSE:
            raise NotEncodable(f"affine node {name} is too large for the exact mode "
                               f"({out.numel()} x {value.numel()} coefficients)")

        def of_one(u: torch.Tensor, position: int = position) -> torch.Tensor:
            args = list(inputs)
            args[position] = u
            return rule.linear(*args).reshape(-1)

        jacobian = torch.func.jacrev(of_one)(value).reshape(out.numel(), value.numel())
        matrices.append(sp.csr_matrix(jacobian.detach().numpy()))
    return AffineNode(name, input_names, tuple(matrices), offset)


def _alpha(rule: Activation, pre: torch.Tensor) -> np.ndarray:
    width = pre[0].numel()
    if rule.kind == "relu":
        alpha = np.zeros(width)
    elif rule.kind == "leaky_relu":
        alpha = np.full(width, float(rule.params.get("alpha", 0.01)))
    else:  # prelu: the slope broadcasts against one sample's tensor
        alpha = torch.broadcast_to(rule.slope.to(torch.float64), pre.shape[1:]).reshape(-1).numpy().copy()
    if (alpha < 0).any() or (alpha > 1).any():
        raise NotEncodable(f"{rule.kind} with a slope outside [0, 1] is not convex: no exact MILP form here")
    return alpha
