"""Global Lipschitz baseline (method §3.1): one constant for the whole input space.

`global_lipschitz` walks the normalised graph in topological order keeping, per tensor `t`, a
bound `L[t]` with `||t(x) - t(x')||_r <= L[t] ||x - x'||_r` (r the threat norm on flattened
per-sample tensors): `L = 1` at the input, 0 for constants, one rule per op family in `RULES`
(`lipschitz_rules.py`, with the derivations), and each activation site (standalone or decomposed)
one step with its kind's global slope bound. Ops without a global constant (LayerNorm, attention
products, division by a variable, an inner Softmax, unknown ops) give `+inf` and are listed in
`unbounded_at`; nothing raises.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import onnx

from verifier.bounds.lipschitz_rules import INF, RULES, UNBOUNDED, Dim, OpView, matrix_norm, pooling_gain, times
from verifier.bounds.smooth import LIPSCHITZ
from verifier.convert.normalize import VERIFIER_DOMAIN, NormalizedModel
from verifier.errors import UsageError
from verifier.geometry import NORMS
from verifier.graph import ActivationSite, OperatorGraph

# Lip of margin / CE w.r.t. the logits in the same norm r: margin = max_{j != y} (e_j - e_y).z,
# so |margin(z) - margin(z')| <= max_j ||e_j - e_y||_* ||z - z'||_r, and ||e_j - e_y||_* is 2 (dual
# l1), sqrt 2 (l2), 1 (dual l_inf). CE's gradient softmax(z) - e_y has ||.||_1 = 2(1 - p_y) <= 2,
# ||.||_2 <= sqrt 2 (1 - p_y) and ||.||_inf <= 1: the same constants.
LOSS_LIP_Z = {"inf": 2.0, "2": math.sqrt(2.0), "1": 1.0}
# Global bounds on |sigma'|, rounded up at the 5th decimal (`smooth.LIPSCHITZ`, float64 maxima checked
# in tests/test_global_lipschitz.py): GELU' max 1.1289041 at sqrt 2 (erf) / 1.1289931 at 1.4185
# (tanh): 1.12891 / 1.12900; SiLU' max 1.0998393 at 2.3994: 1.09984; HardSwish' = x/3 + 1/2 on
# (-3, 3) reaches 1.5; sigmoid' <= 1/4; tanh', softplus' <= 1; relu, abs, clip 1.
ACTIVATION_CONSTANTS = dict(LIPSCHITZ)
_STANDARD = ("", "ai.onnx")


@dataclass(frozen=True)
class GlobalLipschitz:
    """A global Lipschitz bound of the logits map (and of the losses) in one threat norm."""

    norm: str
    logits_constant: float
    per_node: dict[str, float] = field(default_factory=dict)
    unbounded_at: tuple[tuple[str, str], ...] = ()

    def loss_constant(self, loss: str) -> float:
        """Lipschitz bound of `loss` in the threat norm: `Lip_z(loss) * logits_constant`."""
        if loss in ("margin", "ce"):
            return times(LOSS_LIP_Z[self.norm], self.logits_constant)
        if loss in ("zero_one", "dlr"):
            return INF
        raise UsageError(f"unknown loss {loss!r}; expected margin, ce, zero_one or dlr")

    def to_dict(self) -> dict:
        """JSON-ready form (an infinite constant is null)."""
        return {"norm": self.norm, "logits_constant": _finite(self.logits_constant),
                "per_node": {k: _finite(v) for k, v in self.per_node.items()},
                "unbounded_at": [{"node": n, "op": op} for n, op in self.unbounded_at]}


def _finite(value: float) -> float | None:
    """The value, or None for an infinite one (JSON has no inf)."""
    return value if math.isfinite(value) else None


_OWN_DOMAIN_OPS = frozenset({"Reshape", "Slice"})


def _site_gain(site: ActivationSite, op: OpView) -> float:
    """Global slope bound of an activation site (a Softmax inside the net has none)."""
    if site.kind == "max_pool":
        return pooling_gain(op)
    if site.kind == "leaky_relu":
        return max(1.0, abs(float(site.params.get("alpha", 0.01))))
    if site.kind == "prelu":
        slope = op.const(1)
        return INF if slope is None else max(1.0, float(np.max(np.abs(slope), initial=0.0)))
    if site.kind == "gelu":
        return ACTIVATION_CONSTANTS["gelu_tanh" if site.params.get("approximate") == "tanh" else "gelu"]
    return ACTIVATION_CONSTANTS.get(site.kind, INF)


def _check_norm(norm: str) -> str:
    """The threat norm as one of NORMS, or a UsageError."""
    if str(norm) not in NORMS:
        raise UsageError(f"unknown threat norm {norm!r}; expected one of {', '.join(NORMS)}")
    return str(norm)


def _shapes(proto: onnx.ModelProto) -> dict[str, tuple[Dim, ...]]:
    """Known tensor shapes (ints, symbolic names, or None): value infos, else shape inference."""
    infos = [*proto.graph.input, *proto.graph.value_info, *proto.graph.output]
    if len(proto.graph.value_info) == 0:
        copy = onnx.ModelProto()
        copy.CopyFrom(proto)
        for node in copy.graph.node:  # verifier's Reshape/Slice have ONNX's semantics
            if node.domain == VERIFIER_DOMAIN:
                node.domain = ""
        try:
            infos = [*onnx.shape_inference.infer_shapes(copy).graph.value_info, *infos]
        except (onnx.shape_inference.InferenceError, onnx.checker.ValidationError, RuntimeError, ValueError):
            pass  # unknown shapes only make broadcast-dependent rules more conservative
    found: dict[str, tuple[Dim, ...]] = {}
    for vi in infos:
        if vi.type.HasField("tensor_type") and vi.type.tensor_type.HasField("shape"):
            dims = vi.type.tensor_type.shape.dim
            found[vi.name] = tuple(int(d.dim_value) if d.HasField("dim_value") else (d.dim_param or None) for d in dims)
    return found


def global_lipschitz(model: NormalizedModel, norm: str, free: int | None = None) -> GlobalLipschitz:
    """Bound the Lipschitz constant of the logits in threat norm `norm` ("inf", "2" or "1").

    `free`: only the first `free` coordinates of the (packed, `(N, width)`) input move (held
    inputs of `--perturb` sit behind them), so a Slice of the input beyond them is a constant."""
    norm = _check_norm(norm)
    graph = OperatorGraph(model.proto)
    logits = model.output_names[model.logits_index]
    needed = graph.ancestors_of_tensors([logits])
    sites = graph.find_activations()
    owner = {key: site for site in sites for key in site.nodes}
    lips: dict[str, float] = {model.input_name: 1.0}
    shapes = _shapes(model.proto)
    per_node: dict[str, float] = {}
    unbounded: list[tuple[str, str]] = []
    for key in graph.topological_order():
        node = graph.nodes[key]
        if key not in needed or all(graph.is_constant(t) for t in node.output if t):
            continue
        op = OpView(node, norm, graph, lips, shapes)
        site = owner.get(key)
        if free is not None and _held_slice(op, model.input_name, free):
            gain, lip = 0.0, 0.0
        elif site is not None:
            if site.output not in node.output:
                continue  # an inner node of a decomposed activation: the site is one step
            gain = _site_gain(site, op)
            lip = times(gain, lips.get(site.input, INF) if not graph.is_constant(site.input) else 0.0)
        else:
            known = node.domain in _STANDARD or (node.domain == VERIFIER_DOMAIN and node.op_type in _OWN_DOMAIN_OPS)
            rule = RULES.get(node.op_type) if known else None
            try:
                gain, lip = rule(op) if rule is not None else UNBOUNDED
            except (ValueError, IndexError, TypeError, KeyError, ZeroDivisionError):
                gain, lip = UNBOUNDED  # malformed attributes / shapes: no bound, never a crash
        per_node[key] = gain
        if math.isinf(gain) and lip != 0.0:  # a gain that meets no variation (held inputs) bounds nothing
            unbounded.append((key, node.op_type if node.domain in _STANDARD else f"{node.domain}.{node.op_type}"))
        for tensor in node.output:
            if tensor:
                lips[tensor] = lip
    constant = 0.0 if graph.is_constant(logits) else lips.get(logits, INF)
    return GlobalLipschitz(norm=norm, logits_constant=float(constant), per_node=per_node,
                           unbounded_at=tuple(unbounded))


def _held_slice(op: OpView, input_name: str, free: int) -> bool:
    """A Slice of the packed input's coordinates `>= free` along axis 1 (held, never moved)."""
    node = op.node
    if node.op_type != "Slice" or node.input[0] != input_name or len(node.input) < 4:
        return False
    starts, axes = op.const(1), op.const(3)
    return (starts is not None and axes is not None and starts.size == 1 and int(axes.ravel()[0]) in (1, -1)
            and int(starts.ravel()[0]) >= free)


__all__ = ["ACTIVATION_CONSTANTS", "LOSS_LIP_Z", "NORMS", "RULES", "GlobalLipschitz", "global_lipschitz",
           "matrix_norm"]
