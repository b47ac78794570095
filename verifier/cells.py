"""Activation cells of piecewise-linear networks (method §3.2).

At a sample `x_i` the activation pattern fixes a polyhedral cell on which the network is affine,
`z = A_i x + b_i` with `A_i` the exact Jacobian. Every kink is an affine constraint `kappa` on the
cell (ReLU/LeakyReLU/PReLU/Abs: the unit's input; Clip: input minus each bound; MaxPool: the
window's winner minus each other entry). The exact cell radius is the distance, within the input
box, from `x_i` to the nearest constraint boundary; inside it the margin growth and the minimal
flip distance are small LPs solved exactly by `verifier.geometry`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import numpy as np
import torch
import torch.nn.functional as F

from verifier.box import displacement_box
from verifier.convert import ConvertedModel, pad_rows
from verifier.deadline import NEVER, Deadline, Stopped
from verifier.device import resolve_device
from verifier.errors import VerifierError
from verifier.geometry import dual_norm, max_linear, max_linear_rate, parse_norm, radius_to_reach
from verifier.graph import PIECEWISE_LINEAR_KINDS, ActivationSite
from verifier.jacobian import batched_jacobian
from verifier.losses import margins
from verifier.resources import memory_limit, require_within

_CHUNK = 64
_CELL_BUDGET = 2**30  # bytes per differentiation pass: samples x unit rows x (inputs + activations)


@dataclass(frozen=True)
class CellAnalysis:
    """Per-sample cells: affine maps, exact radii, patterns, and the box around each sample."""

    norm: str
    labels: torch.Tensor  # (N,)
    logits: torch.Tensor  # (N, C)
    jacobian: torch.Tensor  # A_i: (N, C, d), input flattened
    offset: torch.Tensor  # b_i = z_i - A_i x_i: (N, C)
    radius: torch.Tensor  # exact cell radius within the box: (N,)
    closest_site: torch.Tensor  # site index of the nearest kink (-1: no kink can be reached)
    patterns: dict[int, torch.Tensor]  # site index -> pattern (sign of units / argmax of windows)
    lower: torch.Tensor  # box - x_i, lower end of the displacement: (N, d)
    upper: torch.Tensor  # box - x_i, upper end: (N, d)

    def to(self, device: torch.device | str) -> CellAnalysis:
        """The same analysis with every tensor on `device` (certify keeps its tables on the CPU)."""
        moved = {f.name: getattr(self, f.name) for f in fields(self)}
        moved = {name: value.to(device) if isinstance(value, torch.Tensor) else value for name, value in moved.items()}
        moved["patterns"] = {site: pattern.to(device) for site, pattern in self.patterns.items()}
        return replace(self, **moved)

    @property
    def margins(self) -> torch.Tensor:
        """`m_j = z_j - z_y` at the samples (N, C)."""
        return margins(self.logits, self.labels)

    def _directions(self) -> torch.Tensor:
        rows = torch.arange(len(self.labels), device=self.labels.device)
        return self.jacobian - self.jacobian[rows, self.labels].unsqueeze(1)  # a_j - a_y

    def class_margins(self, radii: torch.Tensor | float) -> torch.Tensor:
        """Exact in-cell `max (z_j - z_y)` over `B(x_i, s) ∩ box` per class (N, K, C; -inf at j = y)."""
        radii = torch.as_tensor(radii, dtype=self.jacobian.dtype, device=self.jacobian.device)
        if radii.dim() == 1:
            radii = radii.expand(len(self.labels), -1)
        directions = self._directions().unsqueeze(1)  # (N, 1, C, d)
        gains = max_linear(directions, self.lower[:, None, None], self.upper[:, None, None],
                           radii.unsqueeze(-1), self.norm)  # (N, K, C)
        others = _mask_true(self.margins, self.labels)
        return (others.unsqueeze(1) + gains).masked_fill(_true_mask(others, self.labels).unsqueeze(1), -math.inf)

    def class_margin_rates(self, radii: torch.Tensor | float) -> torch.Tensor:
        """Supergradients in `s` of the in-cell `class_margins` (N, K, C; 0 at j = y): their tangents
        bound them from above at larger radii while those stay in the cell (concavity)."""
        radii = torch.as_tensor(radii, dtype=self.jacobian.dtype, device=self.jacobian.device)
        if radii.dim() == 1:
            radii = radii.expand(len(self.labels), -1)
        directions = self._directions().unsqueeze(1)
        rates = max_linear_rate(directions, self.lower[:, None, None], self.upper[:, None, None],
                                radii.unsqueeze(-1), self.norm)
        return rates.masked_fill(_true_mask(self.margins, self.labels).unsqueeze(1), 0.0)

    def margin_growth(self, radii: torch.Tensor | float) -> torch.Tensor:
        """Exact in-cell margin growth `g_i(s)` (§3.2) for radii `s` (N, K) or (K,); exact for s <= r_i."""
        others = _mask_true(self.margins, self.labels)
        return self.class_margins(radii).max(-1).values - others.max(-1).values.unsqueeze(-1)

    def flip_distance(self) -> torch.Tensor:
        """Smallest in-cell distance at which some `m_j >= 0` (0 if already wrong); exact when <= radius."""
        base = self.margins
        targets = (-base).masked_fill(_true_mask(base, self.labels), math.inf)
        distances = radius_to_reach(self._directions(), self.lower[:, None], self.upper[:, None], targets, self.norm)
        return distances.min(-1).values

    def certified_radius(self) -> torch.Tensor:
        """A radius below the true minimal flip distance: the in-cell one, capped at the cell radius."""
        return torch.minimum(self.flip_distance(), self.radius)


def _true_mask(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.one_hot(labels, values.shape[-1]).bool()


def _mask_true(values: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return values.masked_fill(_true_mask(values, labels), -math.inf)


def cell_analysis(model: ConvertedModel, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray,
                  norm: str | float = "inf", box: tuple[float, float] | None = None,
                  device: str = "auto", dtype: torch.dtype = torch.float64,
                  deadline: Deadline = NEVER, memory_limit_bytes: int | None = None) -> CellAnalysis:
    """Cells of a piecewise-linear model at samples `x` with labels `y` (float64 by default;
    `deadline` is checked before every chunk of samples and every site in it).

    The exact analysis differentiates every activation unit with respect to every input
    coordinate, a chunk of units at a time: each chunk's rows are reduced to its nearest kink at
    once, so only the logits' Jacobian is kept. Chunks of samples and of units are sized to
    `memory_limit_bytes` (default `resources.memory_limit()`, at most `_CELL_BUDGET` per pass);
    a model whose single row already needs more raises `ResourceLimitError` before anything large
    is allocated."""
    norm = parse_norm(norm)
    sites = _piecewise_linear_sites(model)
    target = resolve_device(device)
    probe = model.probe_module([s.index for s in sites]).to(device=target, dtype=dtype)
    inputs = torch.as_tensor(x).to(device=target, dtype=dtype)
    labels = torch.as_tensor(y, dtype=torch.long, device=target)
    lower, upper = displacement_box(inputs, box)
    fixed = model.module_batch
    row, classes = _bytes_per_row(probe, sites, inputs[:fixed or 1])
    limit = memory_limit(memory_limit_bytes)
    require_within("the exact cell analysis of one sample (the logits and one activation unit differentiated with "
                   "respect to every input coordinate)", row * (classes + 1), limit)
    budget = min(limit, _CELL_BUDGET)
    step = fixed or max(1, min(_CHUNK, budget // (row * (classes + 1))))
    rows_per_pass = max(1, budget // (row * step))
    parts = []
    chunks = math.ceil(len(inputs) / step)
    for i in range(0, len(inputs), step):
        deadline.check("cell analysis")
        parts.append(_analyse_chunk(probe, sites, inputs[i:i + step], lower[i:i + step], upper[i:i + step], norm,
                                    fixed, rows_per_pass, deadline, chunks if i == 0 else 0))
    logits = torch.cat([p[0] for p in parts])
    jacobian = torch.cat([p[1] for p in parts])
    return CellAnalysis(
        norm=norm,
        labels=labels,
        logits=logits,
        jacobian=jacobian,
        offset=logits - torch.einsum("ncd,nd->nc", jacobian, inputs.flatten(1)),
        radius=torch.cat([p[2] for p in parts]),
        closest_site=torch.cat([p[3] for p in parts]),
        patterns={s.index: torch.cat([p[4][s.index] for p in parts]) for s in sites},
        lower=lower,
        upper=upper,
    )


def _bytes_per_row(probe: torch.nn.Module, sites: list[ActivationSite], x: torch.Tensor) -> tuple[int, int]:
    """Peak bytes of one differentiated output row of one sample — its Jacobian row over D inputs and
    the replicated forward/backward pass (a copy of the input and every activation, kept for the
    backward pass and its gradients) — and the number of classes."""
    with torch.no_grad():
        logits, values = probe(x)
    activations = sum(values[s.index][0][0].numel() + values[s.index][1][0].numel() for s in sites)
    inputs = x[0].numel()
    return (inputs + 3 * (inputs + activations)) * x.element_size(), logits[0].numel()


def _piecewise_linear_sites(model: ConvertedModel) -> list[ActivationSite]:
    others = [s for s in model.logit_sites if s.kind not in PIECEWISE_LINEAR_KINDS]
    if others:
        listed = ", ".join(f"{s.kind} at {s.nodes[0]}" for s in others[:5])
        raise VerifierError(f"cell analysis needs a piecewise-linear model; found {listed}")
    if model.uncovered_nonlinear:
        listed = ", ".join(model.display_name(key) for key in model.uncovered_nonlinear[:5])
        raise VerifierError(f"cell analysis needs every nonlinearity to be an activation site; "
                            f"not analysable as cells: {listed}")
    return list(model.logit_sites)


def _analyse_chunk(probe: torch.nn.Module, sites: list[ActivationSite], x: torch.Tensor, lower: torch.Tensor,
                   upper: torch.Tensor, norm: str, fixed_batch: int | None, rows_per_pass: int,
                   deadline: Deadline, predict_chunks: int = 0):
    """One chunk of samples. `predict_chunks` > 0 (the first chunk, of that many): after its second
    pass over a chunk of units (the first one carries the warm-up), stop (`Stopped`) when the passes
    left, at that pass's time, cannot finish before `deadline` — a ResNet-50 at 224² needs hours of
    them, and the work so far would be thrown away at the limit anyway."""
    count = len(x)
    with torch.no_grad():
        logits, values = probe(pad_rows(x, fixed_batch or 1))  # a fixed batch: the last chunk padded
    logits = logits[:count]
    values = {index: (pre[:count], post[:count]) for index, (pre, post) in values.items()}
    classes = logits.shape[-1]
    jac = batched_jacobian(lambda v: probe(v)[0].flatten(1), x, classes, fixed_batch).detach().flatten(2)
    radius = torch.full((len(x),), math.inf, dtype=x.dtype, device=x.device)
    closest = torch.full((len(x),), -1, dtype=torch.long, device=x.device)
    patterns: dict[int, torch.Tensor] = {}
    passes = sum(_unit_passes(site, values[site.index][0], rows_per_pass) for site in sites)
    done = 0
    for site in sites:
        pre = values[site.index][0]
        width = _unit_width(site, pre, rows_per_pass)
        site_patterns = []
        for start in range(0, pre[0].numel(), width):
            deadline.check("cell analysis")
            stop = min(start + width, pre[0].numel())

            def units(v: torch.Tensor, index=site.index, start=start, stop=stop) -> torch.Tensor:
                return probe(v)[1][index][0].flatten(1)[:, start:stop]

            began = deadline.clock()
            grads = batched_jacobian(units, x, stop - start, fixed_batch).detach().flatten(2)
            done += 1
            if predict_chunks and done == 2:
                left = (deadline.clock() - began) * (passes * predict_chunks - 2)
                predict_chunks = 0
                if deadline.at != math.inf and deadline.clock() + left > deadline.at:
                    raise Stopped(f"cell analysis: its {left:.3g} s of unit passes left would not "
                                  "finish within the time limit")
            part = pre.flatten(1)[:, start:stop]
            if site.kind == "max_pool":
                part = part.reshape(count, -1, *pre.shape[2:])
            kappa, kappa_grad, pattern = _constraints(site, part, grads.reshape(*part.shape, -1))
            site_patterns.append(pattern)
            distance = _distance_to_kinks(kappa, kappa_grad, lower, upper, norm, known=radius)
            nearer = distance < radius
            radius = torch.where(nearer, distance, radius)
            closest = torch.where(nearer, torch.full_like(closest, site.index), closest)
        merged = torch.cat(site_patterns, 1)
        patterns[site.index] = merged if site.kind == "max_pool" else merged.reshape(pre.shape)
    return logits, jac, radius, closest, patterns


def _unit_width(site: ActivationSite, pre: torch.Tensor, rows_per_pass: int) -> int:
    """Units per pass of `_analyse_chunk` along a flattened site; a MaxPool chunk holds whole
    channels (its windows)."""
    block = math.prod(pre.shape[2:]) if site.kind == "max_pool" else 1
    return max(block, rows_per_pass // block * block)


def _unit_passes(site: ActivationSite, pre: torch.Tensor, rows_per_pass: int) -> int:
    """How many passes `_analyse_chunk` makes over the units of one site."""
    return math.ceil(pre[0].numel() / _unit_width(site, pre, rows_per_pass))


_FIRST_CANDIDATES = 64


def _distance_to_kinks(kappa: torch.Tensor, grad: torch.Tensor, lower: torch.Tensor, upper: torch.Tensor,
                       norm: str, known: torch.Tensor | None = None) -> torch.Tensor:
    """Per sample: min over constraints of the in-box distance to {kappa = 0} (kappa affine on the cell),
    and of `known` (a distance already found, e.g. in an earlier chunk of units).

    Without the box the distance is `|kappa| / ||grad||_*`, a lower bound of the in-box one; the exact
    (sorting) computation runs only on the constraints whose lower bound could still be the minimum.
    """
    count, constraints = kappa.shape
    known = torch.full_like(lower[:, 0], math.inf) if known is None else known
    if not constraints:
        return known
    constant = (grad == 0).all(-1)
    toward_zero = -torch.sign(kappa).unsqueeze(-1) * grad
    toward_zero = torch.where((kappa == 0).unsqueeze(-1), grad, toward_zero)
    floor = torch.where(constant, math.inf, kappa.abs() / dual_norm(toward_zero, norm)) * (1.0 - 1e-9)
    floor = torch.nan_to_num(floor, nan=0.0)
    take = min(_FIRST_CANDIDATES, constraints)
    while True:
        nearest = floor.topk(take, dim=1, largest=False).indices  # (n, take)
        rows = toward_zero.gather(1, nearest.unsqueeze(-1).expand(-1, -1, toward_zero.shape[-1]))
        distances = radius_to_reach(rows, lower[:, None], upper[:, None], kappa.abs().gather(1, nearest), norm)
        distances = torch.where(constant.gather(1, nearest), math.inf, distances)
        best = torch.minimum(distances.min(-1).values, known)
        if take == constraints:
            return best
        # Every constraint left out is at least its floor away: done once the best beats them all.
        rest = floor.topk(take + 1, dim=1, largest=False).values[:, -1]
        if bool((best <= rest).all()):
            return best
        take = min(constraints, 4 * take)


def _constraints(site: ActivationSite, pre: torch.Tensor, grads: torch.Tensor):
    """Kink values kappa (n, K), their gradients (n, K, d), and the pattern of one site."""
    n, d = pre.shape[0], grads.shape[-1]
    if site.kind in ("relu", "leaky_relu", "prelu", "abs"):
        return pre.reshape(n, -1), grads.reshape(n, -1, d), torch.sign(pre)
    if site.kind == "clip":
        kappas, kappa_grads = [], []
        flat, flat_grads = pre.reshape(n, -1), grads.reshape(n, -1, d)
        for bound in (site.params.get("min"), site.params.get("max")):
            if bound is not None:
                kappas.append(flat - bound)
                kappa_grads.append(flat_grads)
        pattern = torch.zeros_like(pre, dtype=torch.long)
        if "min" in site.params:
            pattern = torch.where(pre < site.params["min"], -1, pattern)
        if "max" in site.params:
            pattern = torch.where(pre > site.params["max"], 1, pattern)
        if not kappas:
            return flat[:, :0], flat_grads[:, :0], pattern
        return torch.cat(kappas, 1), torch.cat(kappa_grads, 1), pattern
    if site.kind == "max_pool":
        return _max_pool_constraints(site, pre, grads)
    raise VerifierError(f"no cell rule for {site.kind} at {site.nodes[0]}")


def window_index(params: dict, node: str, height: int, width: int, device: torch.device) -> torch.Tensor:
    """(windows, taps) flat input positions of each 2-D MaxPool window, -1 for padding."""
    if params.get("auto_pad", "NOTSET") not in ("NOTSET", "VALID"):
        raise VerifierError(f"MaxPool auto_pad={params['auto_pad']} is not supported (node {node})")
    kernel = [int(k) for k in _as_list(params.get("kernel_shape"))]
    if len(kernel) != 2:
        raise VerifierError(f"only 2-D MaxPool is supported (node {node})")
    strides = [int(s) for s in _as_list(params.get("strides", [1, 1]))]
    pads = [int(p) for p in _as_list(params.get("pads", [0, 0, 0, 0]))]
    dilations = [int(v) for v in _as_list(params.get("dilations", [1, 1]))]
    ceil = bool(int(params.get("ceil_mode", 0)))
    index = torch.arange(height * width, dtype=torch.float64, device=device).reshape(1, 1, height, width)
    extra = []
    for axis, size in enumerate((height, width)):
        span = dilations[axis] * (kernel[axis] - 1) + 1
        padded = size + pads[axis] + pads[axis + 2]
        count = (padded - span) / strides[axis] + 1
        outputs = math.ceil(count) if ceil else math.floor(count)
        extra.append(max(0, (outputs - 1) * strides[axis] + span - padded))
    index = F.pad(index, (pads[1], pads[3] + extra[1], pads[0], pads[2] + extra[0]), value=-1.0)
    windows = F.unfold(index, kernel, dilation=dilations, stride=strides)  # (1, taps, windows)
    return windows[0].T.round().long()


def _as_list(value) -> list:
    return [] if value is None else list(value)


def _max_pool_constraints(site: ActivationSite, pre: torch.Tensor, grads: torch.Tensor):
    n, channels, height, width = pre.shape
    d = grads.shape[-1]
    index = window_index(site.params, site.nodes[0], height, width, pre.device)  # (W, T)
    valid = index >= 0
    safe = index.clamp_min(0)
    flat = pre.reshape(n, channels, height * width)
    values = flat[:, :, safe].masked_fill(~valid, -math.inf)  # (n, c, W, T)
    winner = values.argmax(-1, keepdim=True)  # (n, c, W, 1)
    flat_grads = grads.reshape(n, channels, height * width, d)
    win_pos = safe.expand(n, channels, -1, -1).gather(-1, winner)  # (n, c, W, 1)
    kappa = values.gather(-1, winner) - values  # (n, c, W, T): winner minus each entry
    win_grad = flat_grads.gather(2, win_pos.reshape(n, channels, -1, 1).expand(-1, -1, -1, d))
    other_grad = flat_grads[:, :, safe.reshape(-1)].reshape(n, channels, *safe.shape, d)
    kappa_grad = win_grad.reshape(n, channels, -1, 1, d) - other_grad
    keep = valid.expand_as(kappa) & (torch.arange(index.shape[1], device=pre.device) != winner)
    kappa = torch.where(keep, kappa, torch.full_like(kappa, math.inf))
    kappa_grad = torch.where(keep.unsqueeze(-1), kappa_grad, torch.zeros_like(kappa_grad))
    return kappa.reshape(n, -1), kappa_grad.reshape(n, -1, d), winner.squeeze(-1)
