"""The transposes back-substitution applies (bounds-design §3): affine maps, activation lines, one-hot rows.

`affine_adjoint` takes an `Affine` rule's written adjoint (`ops.Affine.adjoint`: a Conv's input
gradient, a Gemm's transposed matrix, a sum's copies, a reshape back) or, without one, the vjp of
its linear map vmapped over the rows. Rows that are still signed unit vectors (`UnitRows`: the
objectives of a tightening, `+-e_i` at the node bounded, passed on unchanged by a sum) go through
a rule's `unit_adjoint` instead: a Conv's transpose of `e_i` is its kernel placed at the unit's
window, read from the weight rather than computed by a convolution of a one-hot tensor.
`relaxation_adjoint` takes each coefficient through the upper line where it is positive and the
lower line elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from verifier.bounds import ops, relaxations


@dataclass(frozen=True)
class UnitRows:
    """Rows `sign_k * e_{index[n, k]}` over a node's flattened units (index (N, K), sign (K,))."""

    index: torch.Tensor
    sign: torch.Tensor

    def times(self, factor: float) -> UnitRows:
        """The same units with every sign multiplied by `factor`."""
        return UnitRows(self.index, self.sign * factor)


def affine_adjoint(rule: ops.Affine, lam: torch.Tensor, shapes: list[torch.Size], units: UnitRows | None = None):
    """Adjoint of the linear part applied to lam (N, K, *out), and <lam, offset>; `units`: lam is
    those unit rows (then a rule's `unit_adjoint` is used where it has one)."""
    count, objectives = lam.shape[:2]
    zeros = [torch.zeros(1, *shape, dtype=lam.dtype, device=lam.device) for shape in shapes]
    adjoints = None
    if units is not None and rule.unit_adjoint is not None:
        adjoints = rule.unit_adjoint(units.index.reshape(-1), units.sign.to(lam.dtype).repeat(count), shapes)
    flat = lam.reshape(count * objectives, *lam.shape[2:])
    if adjoints is None and rule.adjoint is not None:
        adjoints = rule.adjoint(flat, shapes)
    if adjoints is None:
        adjoints = transpose(rule.linear, zeros, flat)
    contributions = [a.reshape(count, objectives, *a.shape[1:]) for a in adjoints]
    offset_value = rule(*zeros)
    if not (isinstance(offset_value, torch.Tensor) and offset_value.abs().sum() > 0):
        offset = torch.zeros(count, objectives, dtype=lam.dtype, device=lam.device)
    elif units is not None:  # <sign e_i, offset> = sign * offset_i
        offset = units.sign.to(lam.dtype) * offset_value.expand(1, *lam.shape[2:]).reshape(-1)[units.index]
    else:
        offset = (lam * offset_value.unsqueeze(1)).flatten(2).sum(-1)
    return contributions, offset


def units_passed(rule: ops.Affine, units: UnitRows | None, shapes: list[torch.Size], out_shape: torch.Size):
    """The unit rows each input receives when the rule passes its rows on unchanged up to a sign (a sum
    of same-shape tensors), else Nones."""
    if units is None or rule.unit_signs is None or any(shape != out_shape for shape in shapes):
        return [None] * len(shapes)
    return [units.times(sign) for sign in rule.unit_signs]


def transpose(linear, zeros: list[torch.Tensor], rows: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The adjoint of a linear map applied to each of `rows` (B, *out): one vjp at a single point,
    vmapped over the rows (half the work of a vjp at a batch of B, whose forward pass is wasted)."""
    _, pullback = torch.func.vjp(linear, *zeros)
    try:
        return torch.func.vmap(lambda row: tuple(a.squeeze(0) for a in pullback(row.unsqueeze(0))))(rows)
    except RuntimeError:  # an op without a batching rule: one vjp at the whole batch
        batch = [z.expand(len(rows), *z.shape[1:]).contiguous() for z in zeros]
        return torch.func.vjp(linear, *batch)[1](rows)


def relaxation_adjoint(relax: relaxations.Relaxation, lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """`lam` through an activation's lines: each coefficient takes the upper line where positive, the
    lower line elsewhere; returns the coefficients on its input and `<lam+, upper offset> + <lam-, lower offset>`.

    With lines shared by the objectives, the choice is made only on the units whose two lines differ
    (a ReLU's unstable units); elsewhere both lines are one, of offset 0, and `lam` is multiplied by its slope.
    """
    lines = [per_objective(line, lam) for line in (relax.upper_slope, relax.lower_slope, relax.upper_offset,
                                                   relax.lower_offset)]
    if lam.dim() <= 2 or any(line.dim() != lam.dim() or line.shape[1] != 1 or line.shape[0] != lam.shape[0]
                             or line.shape[2:] != lam.shape[2:] for line in lines):  # the fast path needs full lines
        upper_slope, lower_slope, upper_offset, lower_offset = lines
        positive = lam > 0
        contribution = lam * torch.where(positive, upper_slope, lower_slope)  # = lam+ * upper + lam- * lower
        zero = torch.zeros((), dtype=lam.dtype, device=lam.device)
        return contribution, (inner(torch.where(positive, lam, zero), upper_offset)
                              + inner(torch.where(positive, zero, lam), lower_offset))
    count, objectives = lam.shape[:2]
    upper_slope, lower_slope, upper_offset, lower_offset = (line.reshape(count, 1, -1) for line in lines)
    differ = ((upper_slope != lower_slope) | (upper_offset != 0) | (lower_offset != 0)).flatten(1)  # (N, units)
    # Each sample's differing units first (ascending), padded to the sample with the most by units whose
    # lines agree (there the choice gives `lam * lower_slope` again and the offsets add 0).
    width = int(differ.sum(1).max())
    order = torch.argsort((~differ).to(torch.int8), dim=1, stable=True)[:, :width].unsqueeze(1)  # (N, 1, M)
    flat = lam.reshape(count, objectives, -1)
    contribution = flat * lower_slope
    index = order.expand(count, objectives, width)
    picked = flat.gather(2, index)  # gather/scatter_: 2-3x faster along the last axis than index_select
    positive = picked > 0
    zero = torch.zeros((), dtype=lam.dtype, device=lam.device)
    upper_slope, lower_slope, upper_offset, lower_offset = (line.gather(2, order) for line in (
        upper_slope, lower_slope, upper_offset, lower_offset))
    contribution.scatter_(2, index, picked * torch.where(positive, upper_slope, lower_slope))
    bias = inner(torch.where(positive, picked, zero), upper_offset)
    if bool(lower_offset.any()):  # a ReLU's lower lines have no offset
        bias = bias + inner(torch.where(positive, zero, picked), lower_offset)
    return contribution.reshape(lam.shape), bias


def per_objective(line: torch.Tensor, lam: torch.Tensor) -> torch.Tensor:
    """A relaxation line (N, *units) shared by the objectives gets their axis; one per objective
    (N, K, *units, from `verifier.bounds.optimise`) is used as it is."""
    return line if line.dim() == lam.dim() else line.unsqueeze(1)


def inner(lam: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Σ over unit axes of lam * values, with infinities times zero counted as zero."""
    if lam.dim() == 2:  # one number per sample (a reduction over all its axes): a single unit
        lam, values = lam.unsqueeze(-1), values.unsqueeze(-1)
    if values.shape[1] == 1 and values.shape[0] == lam.shape[0] and bool(torch.isfinite(values).all()):
        # values (N, 1, *units) shared by the objectives: one batched matrix-vector product.
        return torch.bmm(lam.flatten(2), values.flatten(1).unsqueeze(-1).to(lam.dtype)).squeeze(-1)
    product = lam * values
    product = torch.where(lam == 0, torch.zeros_like(product), product)
    return product.flatten(2).sum(-1)
