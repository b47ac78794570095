"""Replay in onnxruntime: every returned atom is re-evaluated by the original ONNX model.

The reported risk and accuracy come from onnxruntime's logits (the oracle, as in
`verifier.validate`). An atom that is its sample itself (an attack starved of steps returns the
samples) takes the samples' logits, computed once per runtime in passes of the same row count,
so only moved atoms cost a pass, and an accuracy atom equal to its risk atom takes that atom's
logits. When the accuracy atoms' own passes would end past the hard deadline (`Target.deadline`,
as predicted from the slowest passes so far), the accuracy is measured on the risk atoms
(feasible too, a weaker number; flagged `ACCURACY_ON_RISK`). When torch and onnxruntime disagree on an atom, on its error indicator
(margin >= 0) or on its loss beyond `1e-4 + 1e-4 |loss|`, the result carries the flag
"onnxruntime-disagrees" and the onnxruntime value is what counts.
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch

from verifier.attacks.base import Target
from verifier.attacks.result import AttackResult, Distribution, atom_distances, cost_of
from verifier.convert import ConvertedModel
from verifier.errors import NonFiniteError
from verifier.finite import require_finite_logits
from verifier.losses import loss_values
from verifier.onnx_io import LoadedModel
from verifier.validate import onnxruntime_session, oracle_model, run_onnxruntime, with_outputs

LOSS_ATOL = 1e-4
LOSS_RTOL = 1e-4
ROWS = 256  # default rows per onnxruntime run, padded: per-row results do not depend on the other rows
ACCURACY_ON_RISK = "accuracy measured on the risk atoms (its own atoms' replay did not fit the time limit)"


class Replayer:
    """An onnxruntime session of the original model that returns the logits of a batch, in runs of
    `rows` rows (padded; `attack()` gives its target's `rows_per_pass`, sized to the sample and the
    memory limit: 16 samples of a large CNN are not padded to 256 images)."""

    def __init__(self, loaded: LoadedModel, model: ConvertedModel, device: torch.device, rows: int = ROWS) -> None:
        self.rows = int(rows)
        self.name = model.output_names[model.logits_index]
        self.session = onnxruntime_session(with_outputs(oracle_model(loaded, model), (self.name,)), device,
                                           arena=False)  # it lives beside the attacks' passes: no kept arena
        self.input_name = model.input_spec.name
        shape = model.input_spec.shape
        self.fixed = shape[0] if shape and isinstance(shape[0], int) else None
        self._samples: tuple[torch.Tensor, torch.Tensor] | None = None  # (samples, their logits), once
        self.row_seconds = 0.0  # the slowest run so far, per padded row (wall seconds)

    def samples_logits(self, x: torch.Tensor) -> torch.Tensor:
        """`logits(x)` of a target's samples, computed on the first call for these samples only."""
        if self._samples is None or self._samples[0] is not x:
            self._samples = (x, self.logits(x))
        return self._samples[1]

    def logits(self, atoms: torch.Tensor) -> torch.Tensor:
        """Logits (M, C) in float64 from onnxruntime (fixed-batch models get padded chunks)."""
        data = atoms.detach().cpu().numpy()
        step = self.fixed or self.rows
        parts = []
        for start in range(0, len(data), step):
            chunk = data[start:start + step]
            size = len(chunk)
            if size < step:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], step - size, axis=0)])
            began = time.perf_counter()
            (out,) = run_onnxruntime(self.session, [self.name], self.input_name, chunk, self.fixed)
            self.row_seconds = max(self.row_seconds, (time.perf_counter() - began) / step)
            parts.append(np.asarray(out, dtype=np.float64).reshape(len(chunk), -1)[:size])
        return torch.from_numpy(np.concatenate(parts))

    def seconds(self, rows: int) -> float:
        """How long runs of `rows` rows should take (padded; from the slowest run so far, 0 before any)."""
        step = self.fixed or self.rows
        return -(-rows // step) * step * self.row_seconds


def disagreeing(torch_logits: torch.Tensor, ort_logits: torch.Tensor, labels: torch.Tensor, loss: str) -> torch.Tensor:
    """Per atom: whether its error indicator or loss differs between the two runtimes."""
    error_t = loss_values(torch_logits, labels, "margin") >= 0
    error_o = loss_values(ort_logits, labels, "margin") >= 0
    loss_t, loss_o = loss_values(torch_logits, labels, loss), loss_values(ort_logits, labels, loss)
    off = (loss_t - loss_o).abs() > LOSS_ATOL + LOSS_RTOL * loss_o.abs()
    return (error_t != error_o) | off



def _replayed(atoms: torch.Tensor, labels: torch.Tensor, target: Target, replayer: Replayer | None,
              source: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits of atoms (onnxruntime when replayed) and, per atom, whether the two runtimes disagree;
    atoms equal to their sample `x[source]` take the samples' logits (no pass)."""
    atoms = atoms.to(target.x.device)
    moved = (atoms.flatten(1) != target.x[source.to(target.x.device)].flatten(1)).any(1).cpu()
    torch_logits = _merged(target.clean_logits.cpu()[source], moved, lambda: target.logits(atoms[moved]).cpu())
    if replayer is None:
        return torch_logits, torch.zeros(len(labels), dtype=torch.bool)
    logits = _merged(replayer.samples_logits(target.x)[source], moved, lambda: replayer.logits(atoms[moved]))
    return logits, disagreeing(torch_logits, logits, labels, target.loss)


def _merged(samples: torch.Tensor, moved: torch.Tensor, of_moved) -> torch.Tensor:
    """The samples' logits, with the rows `moved` replaced by `of_moved()` (called only when some moved)."""
    if not bool(moved.any()):
        return samples
    merged = samples.clone()
    merged[moved] = of_moved().to(merged.dtype)
    return merged


def measure(method: str, delta: float, dist: Distribution, target: Target, replayer: Replayer | None,
            clean: tuple[float, float]) -> AttackResult:
    """Risk, accuracy and transport cost of one distribution (onnxruntime values when replayed); the
    accuracy is measured on `dist.accuracy_atoms` when the attack gave them.

    The atoms are taken in order of their source sample (stable), so the sums over atoms run in
    one order whichever rank evaluated which atoms; sources are global sample indices. A rank
    without accuracy atoms of its own (its samples' accuracy optima are their risk optima) lends
    its risk atoms to the accuracy set, which is what one process's accuracy atoms hold there.
    """
    order = torch.sort(dist.source.cpu(), stable=True).indices
    source, atoms = dist.source.cpu()[order], dist.atoms[order.to(dist.atoms.device)]
    labels = target.y.cpu()[source]
    logits, off = _replayed(atoms, labels, target, replayer, source)
    accuracy_atoms, accuracy_logits, accuracy_off = atoms, logits, off
    flags = list(dist.flags)
    own = torch.zeros(len(labels), dtype=torch.bool)  # rows whose accuracy atom is not their risk atom
    if dist.accuracy_atoms is not None:
        accuracy_atoms = dist.accuracy_atoms[order.to(dist.accuracy_atoms.device)]
        own = (accuracy_atoms.flatten(1) != atoms.flatten(1)).any(1).cpu()
    fits = _fits(target, replayer, int(own.sum()))  # every rank asks: one exchange in a sharded run
    if dist.accuracy_atoms is not None:
        if not fits:
            accuracy_atoms = atoms
            flags.append(ACCURACY_ON_RISK)
        elif bool(own.any()):
            accuracy_logits, accuracy_off = logits.clone(), off.clone()
            accuracy_logits[own], accuracy_off[own] = _replayed(accuracy_atoms[own.to(accuracy_atoms.device)],
                                                                labels[own], target, replayer, source[own])
    has_accuracy = torch.full((len(labels),), accuracy_atoms is not atoms)
    x = target.x.cpu()
    (weights, losses, accuracy_margins, distance, accuracy_distance, off, accuracy_off, has_accuracy, atoms,
     accuracy_atoms, source) = target.gather(
        dist.weights.cpu().to(torch.float64)[order], loss_values(logits, labels, target.loss),
        loss_values(accuracy_logits, labels, "margin"), atom_distances(atoms, source, x, target.norm),
        atom_distances(accuracy_atoms, source, x, target.norm), off, accuracy_off, has_accuracy,
        atoms.detach().cpu(), accuracy_atoms.detach().cpu(), target.sample_ids()[source])
    separate = bool(has_accuracy.any())  # one process: the attack gave accuracy atoms
    cost = cost_of(weights, distance, target.p)
    count = int(off.sum())
    if separate:
        cost = max(cost, cost_of(weights, accuracy_distance, target.p))
        count += int(accuracy_off.sum())
    if replayer is None:
        flags.append("not-replayed")
    elif count:
        flags.append(f"onnxruntime-disagrees ({count} of {len(off)} atoms)")
    correct = (accuracy_margins < 0).to(torch.float64)
    nan_atoms = int((torch.isnan(losses) | torch.isnan(accuracy_margins))[weights > 0].sum())
    if nan_atoms:
        raise NonFiniteError(f"attack {method} at delta {delta:g}: the model's loss is NaN at {nan_atoms} "
                             "perturbed input(s) (the model overflows its dtype there), so no risk is reported")
    if cost > delta * (1 + 1e-6):
        flags.append("over-budget")
    return AttackResult(
        method=method, delta=float(delta), p=float(target.p), norm=target.norm, loss=target.loss,
        risk=float((weights * losses).sum()), robust_accuracy=float((weights * correct).sum()),
        clean_risk=clean[0], clean_accuracy=clean[1], transport_cost=cost, steps=int(dist.steps),
        seconds=float(dist.seconds), flags=tuple(flags), replayed_in_onnxruntime=replayer is not None,
        atoms=atoms, weights=weights, source=source, accuracy_atoms=accuracy_atoms if separate else None,
    )


def _fits(target: Target, replayer: Replayer | None, rows: int) -> bool:
    """Whether the torch and onnxruntime passes of `rows` moved atoms should end before the hard deadline
    (one answer for every rank of a sharded run)."""
    hard = target.deadline
    cost = target.forward_seconds(rows) + (replayer.seconds(rows) if replayer is not None else 0.0)
    fits = rows == 0 or math.isinf(hard.at) or hard.clock() + cost <= hard.at
    return fits if target.shard is None else bool(target.gather(torch.tensor([fits]))[0].all())


def clean_numbers(target: Target, replayer: Replayer | None) -> tuple[float, float]:
    """(clean risk, clean accuracy) of the sample, from onnxruntime when replayed."""
    logits = replayer.samples_logits(target.x) if replayer is not None else target.clean_logits.cpu()
    require_finite_logits(logits, "onnxruntime" if replayer is not None else "torch")
    labels = target.y.cpu()
    losses, correct = target.gather(loss_values(logits, labels, target.loss),
                                    (loss_values(logits, labels, "margin") < 0).to(torch.float64))
    risk, accuracy = float(losses.mean()), float(correct.mean())
    return risk, accuracy
