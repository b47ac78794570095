"""The bounds' batch invariant, checked (and restored where it can be) when a bound network is built.

Every rule of `verifier.bounds` treats axis 0 of every tensor as the batch: intervals, relaxations
and back-substituted rows are per sample, and an adjoint is taken at one sample (`adjoints.transpose`).
nn.MultiheadAttention, as torch exports it, computes in `(L, N, E)` views and folds the batch into
the heads, `(L, N·H, d)` and `(N·H, L, d)`: right logits, but a broken invariant. `batch_first`
runs the network on two seeded samples, alone and together, and reads each tensor's `Layout`: the
axis that holds the batch as the middle factor of `outer · N · inner`. Where some tensor has the
batch elsewhere than axis 0, every node touching such a tensor is re-laid out: its inputs are
taken per sample (`(N, *per_sample)`, a permutation of the batched tensor), moved to the graph's
layout, the node's own rule applied there, and its output moved back. Affine and interval rules are
wrapped so (a permutation on each side keeps `|L|` exact); elementwise activations and bilinear
products act on the per-sample form directly. The re-laid network is checked against the original
on the same samples. What cannot be laid out (no single axis scales with the batch, rows that mix)
is refused, naming the first such node.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import torch

from verifier.bounds import bilinear, ops

if TYPE_CHECKING:
    from verifier.bounds.network import BoundNetwork, BoundNode

# Float64 kernels may sum in an order that depends on the batch size: rows agree to ~1e-15.
_RTOL = 1e-7
Problem = tuple[str, str, str]


@dataclass(frozen=True)
class Layout:
    """Where a tensor holds the batch: axis `axis` of its batched shape is `outer · N · inner`;
    `shape` is its batched shape for one sample."""

    axis: int
    outer: int
    inner: int
    shape: tuple[int, ...]

    @property
    def normal(self) -> bool:
        """The batch is axis 0 as it is (nothing to move)."""
        return self.axis == 0 and self.outer == self.inner == 1

    @property
    def per_sample(self) -> tuple[int, ...]:
        """One sample's shape in the per-sample form (the batch axis dropped when it holds nothing else)."""
        rest = self.outer * self.inner
        return self.shape[:self.axis] + ((rest,) if rest > 1 else ()) + self.shape[self.axis + 1:]

    def to_samples(self, t: torch.Tensor) -> torch.Tensor:
        """The batched tensor as (N, *per_sample)."""
        count = t.shape[self.axis] // (self.outer * self.inner)
        split = t.reshape(*self.shape[:self.axis], self.outer, count, self.inner, *self.shape[self.axis + 1:])
        return split.movedim(self.axis + 1, 0).reshape(count, *self.per_sample)

    def from_samples(self, u: torch.Tensor) -> torch.Tensor:
        """(N, *per_sample) back to the graph's batched tensor."""
        count = len(u)
        split = u.reshape(count, *self.shape[:self.axis], self.outer, self.inner, *self.shape[self.axis + 1:])
        return split.movedim(0, self.axis + 1).reshape(*self.shape[:self.axis], self.outer * count * self.inner,
                                                       *self.shape[self.axis + 1:])


def batch_first(network: BoundNetwork, sample_shape: tuple[int, ...], dtype: torch.dtype,
                device: torch.device) -> tuple[BoundNetwork, Problem | None]:
    """`network` with every tensor's batch on axis 0 (itself when that holds already), or the
    (ONNX node, op, why) of the first node that keeps it from being laid out so."""
    generator = torch.Generator().manual_seed(0)
    pair = torch.rand(2, *sample_shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    with torch.no_grad():
        layouts, _, problem = _layouts(network, pair, keep=False)  # the common case: only live values held
        if problem is not None:
            return network, problem
        if all(_normal(layout) for layout in layouts.values()):
            return network, None
        layouts, runs, _ = _layouts(network, pair, keep=True)  # every value, for the check of the re-laid network
        laid = replace(network, nodes=tuple(_laid_out(node, layouts, dtype, device) for node in network.nodes))
        return laid, _mismatch(laid, layouts, runs)


def _layouts(network: BoundNetwork, pair: torch.Tensor, keep: bool):
    """Every tensor's layout from runs on `pair` and on each of its two samples (`keep`: every run's
    values returned; else each is dropped after its last reader, as a large model needs)."""
    from verifier.bounds.network import forward  # network.py builds with this module

    runs = {"pair": {network.input: pair}, "first": {network.input: pair[:1]}, "second": {network.input: pair[1:]}}
    layouts: dict[str, Layout | tuple[Layout, ...]] = {network.input: Layout(0, 1, 1, (1, *pair.shape[1:]))}
    last_read = {name: index for index, node in enumerate(network.nodes) for name in node.inputs}
    for index, node in enumerate(network.nodes):
        for label, values in runs.items():
            try:
                values[node.name] = forward(node, [values[i] for i in node.inputs])
            except (RuntimeError, ValueError, IndexError, TypeError) as err:
                return layouts, runs, (node.onnx_node, node.op, f"fails on {len(values[network.input])} sample(s) "
                                                                f"({type(err).__name__}: {_first_line(err)})")
        pair_value, first, second = (runs[k][node.name] for k in ("pair", "first", "second"))
        parts = [_layout(*v) for v in zip(pair_value, first, second)] if isinstance(pair_value, (tuple, list)) \
            else [_layout(pair_value, first, second)]
        reason = next((p for p in parts if isinstance(p, str)), None)
        if reason is not None:
            return layouts, runs, (node.onnx_node, node.op, reason)
        layouts[node.name] = tuple(parts) if isinstance(pair_value, (tuple, list)) else parts[0]
        if not keep:
            for values in runs.values():
                for name in [n for n in values if last_read.get(n, -1) <= index]:
                    del values[name]
    return layouts, runs, None


def _layout(pair: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> Layout | str:
    """The layout that makes `pair` the two samples' rows, or why there is none."""
    one, two = tuple(first.shape), tuple(pair.shape)
    scaled = [k for k, (a, b) in enumerate(zip(one, two)) if a != b]
    if len(one) != len(two) or len(scaled) != 1 or two[scaled[0]] != 2 * one[scaled[0]] or one != tuple(second.shape):
        return (f"moves the batch off axis 0 in a way the bounds cannot follow (shape {one} for 1 sample, {two} "
                "for 2: no single axis holds it)")
    axis = scaled[0]
    for outer in (d for d in range(1, one[axis] + 1) if one[axis] % d == 0):
        layout = Layout(axis, outer, one[axis] // outer, one)
        rows = layout.to_samples(pair)
        if _close(rows[:1], layout.to_samples(first)) and _close(rows[1:], layout.to_samples(second)):
            return layout
    return "mixes samples (a sample's values differ when run beside another); the bounds need them apart"


def _normal(layout: Layout | tuple[Layout, ...]) -> bool:
    return all(_normal(p) for p in layout) if isinstance(layout, tuple) else layout.normal


def _to(layout: Layout | tuple[Layout, ...], value):
    if isinstance(layout, tuple):
        return tuple(_to(p, v) for p, v in zip(layout, value))
    return layout.to_samples(value)


def _from(layout: Layout | tuple[Layout, ...], value):
    if isinstance(layout, tuple):
        return tuple(_from(p, v) for p, v in zip(layout, value))
    return layout.from_samples(value)


def _laid_out(node: BoundNode, layouts: dict, dtype: torch.dtype, device: torch.device) -> BoundNode:
    """The node acting on per-sample tensors (itself when all its tensors are normal)."""
    ins, out = [layouts[i] for i in node.inputs], layouts[node.name]
    if all(_normal(layout) for layout in (*ins, out)):
        return node
    rule = node.rule
    if node.op == "getitem":  # an element of a tuple: the layout moves with it
        return node
    if isinstance(rule, ops.Affine) and not any(isinstance(layout, tuple) for layout in ins):
        zeros = [torch.zeros(1, *layout.per_sample, dtype=dtype, device=device) for layout in ins]
        return replace(node, rule=_affine(rule, ins, out, zeros))
    if isinstance(rule, ops.Interval) and not isinstance(rule, bilinear.Product):
        return replace(node, rule=_interval(rule, ins, out))
    return node  # elementwise activations and bilinear products act per sample as they are (checked after)


def _moved(function, ins: list, out):
    def call(*tensors: torch.Tensor):
        return _to(out, function(*(_from(layout, t) for t, layout in zip(tensors, ins))))
    return call


def _affine(rule: ops.Affine, ins: list[Layout], out, zeros: list[torch.Tensor]) -> ops.Affine:
    """`rule` between per-sample tensors; its constant term is one sample's value at 0 (a structural
    op's `linear` may hold one, as a Pad with a value does: it moves to the offset here)."""
    linear = _moved(rule, ins, out)
    if isinstance(out, tuple):  # a Split: pure data movement, no constant term
        return ops.Affine(linear, _moved(rule.magnitude, ins, out), workspace=rule.workspace)
    offset = linear(*zeros)
    return ops.Affine(lambda *u: linear(*u) - offset, _moved(rule.magnitude, ins, out), offset,
                      workspace=rule.workspace)


def _interval(rule: ops.Interval, ins: list, out) -> ops.Interval:
    def bounds(pairs):
        low, high = rule.rule([(_from(layout, lo), _from(layout, hi)) for (lo, hi), layout in zip(pairs, ins)])
        return _to(out, low), _to(out, high)
    return ops.Interval(bounds, _moved(rule.forward, ins, out))


def _mismatch(laid: BoundNetwork, layouts: dict[str, Layout | None], runs: dict) -> Problem | None:
    """The first node of the re-laid network whose per-sample value is not the original's, moved."""
    from verifier.bounds.network import forward

    for label in ("pair", "first"):
        original = runs[label]
        values = {laid.input: original[laid.input]}
        for node in laid.nodes:
            try:
                values[node.name] = value = forward(node, [values[i] for i in node.inputs])
            except (RuntimeError, ValueError, IndexError, TypeError) as err:
                return node.onnx_node, node.op, f"cannot act per sample ({type(err).__name__}: {_first_line(err)})"
            layout = layouts[node.name]
            moved = _to(layout, original[node.name])
            if not all(_close(v, m) for v, m in zip(*((value, moved) if isinstance(layout, tuple)
                                                       else ((value,), (moved,))))):
                return node.onnx_node, node.op, ("holds the batch off axis 0 and its rule cannot act per sample; "
                                                 "the bounds need the batch on axis 0")
    return None


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    if a.shape != b.shape:
        return False
    if not (a.is_floating_point() and b.is_floating_point()):
        return bool(torch.equal(a, b))
    scale = float(torch.nan_to_num(b.abs(), posinf=0.0, neginf=0.0).max()) if b.numel() else 0.0
    return bool(torch.allclose(a, b, rtol=_RTOL, atol=_RTOL * max(1.0, scale), equal_nan=True))


def _first_line(err: Exception) -> str:
    text = str(err).strip().splitlines()
    line = text[0] if text else type(err).__name__
    return line if len(line) <= 160 else line[:157] + "..."

