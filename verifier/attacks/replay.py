"""Replay in onnxruntime: every returned atom is re-evaluated by the original ONNX model.

The reported risk and accuracy come from onnxruntime's logits (the oracle, as in
`verifier.validate`). When torch and onnxruntime disagree on an atom, on its error indicator
(margin >= 0) or on its loss beyond `1e-4 + 1e-4 |loss|`, the result carries the flag
"onnxruntime-disagrees" and the onnxruntime value is what counts.
"""

from __future__ import annotations

import numpy as np
import torch

from verifier.attacks.base import Target
from verifier.attacks.result import AttackResult, Distribution, transport_cost
from verifier.convert import ConvertedModel
from verifier.errors import NonFiniteError
from verifier.finite import require_finite_logits
from verifier.losses import loss_values
from verifier.onnx_io import LoadedModel
from verifier.validate import onnxruntime_session, oracle_model, run_onnxruntime, with_outputs

LOSS_ATOL = 1e-4
LOSS_RTOL = 1e-4
_CHUNK = 1024


class Replayer:
    """An onnxruntime session of the original model that returns the logits of a batch."""

    def __init__(self, loaded: LoadedModel, model: ConvertedModel, device: torch.device) -> None:
        self.name = model.output_names[model.logits_index]
        self.session = onnxruntime_session(with_outputs(oracle_model(loaded, model), (self.name,)), device)
        self.input_name = model.input_spec.name
        shape = model.input_spec.shape
        self.fixed = shape[0] if shape and isinstance(shape[0], int) else None

    def logits(self, atoms: torch.Tensor) -> torch.Tensor:
        """Logits (M, C) in float64 from onnxruntime (fixed-batch models get padded chunks)."""
        data = atoms.detach().cpu().numpy()
        step = self.fixed or _CHUNK
        parts = []
        for start in range(0, len(data), step):
            chunk = data[start:start + step]
            size = len(chunk)
            if self.fixed and size < self.fixed:
                chunk = np.concatenate([chunk, np.repeat(chunk[-1:], self.fixed - size, axis=0)])
            (out,) = run_onnxruntime(self.session, [self.name], self.input_name, chunk, self.fixed)
            parts.append(np.asarray(out, dtype=np.float64).reshape(len(chunk), -1)[:size])
        return torch.from_numpy(np.concatenate(parts))


def disagreements(torch_logits: torch.Tensor, ort_logits: torch.Tensor, labels: torch.Tensor, loss: str) -> int:
    """Number of atoms whose error indicator or loss differs between the two runtimes."""
    error_t = loss_values(torch_logits, labels, "margin") >= 0
    error_o = loss_values(ort_logits, labels, "margin") >= 0
    loss_t, loss_o = loss_values(torch_logits, labels, loss), loss_values(ort_logits, labels, loss)
    off = (loss_t - loss_o).abs() > LOSS_ATOL + LOSS_RTOL * loss_o.abs()
    return int(((error_t != error_o) | off).sum())


def _replayed(atoms: torch.Tensor, labels: torch.Tensor, target: Target,
              replayer: Replayer | None) -> tuple[torch.Tensor, int]:
    """Logits of atoms (onnxruntime when replayed) and how many atoms the two runtimes disagree on."""
    torch_logits = target.logits(atoms.to(target.x.device)).cpu()
    if replayer is None:
        return torch_logits, 0
    logits = replayer.logits(atoms)
    return logits, disagreements(torch_logits, logits, labels, target.loss)


def measure(method: str, delta: float, dist: Distribution, target: Target, replayer: Replayer | None,
            clean: tuple[float, float]) -> AttackResult:
    """Risk, accuracy and transport cost of one distribution (onnxruntime values when replayed); the
    accuracy is measured on `dist.accuracy_atoms` when the attack gave them."""
    source = dist.source.cpu()
    labels = target.y.cpu()[source]
    weights = dist.weights.cpu().to(torch.float64)
    logits, count = _replayed(dist.atoms, labels, target, replayer)
    accuracy_logits, cost = logits, transport_cost(dist.atoms, weights, source, target.x.cpu(), target.p,
                                                   target.norm)
    if dist.accuracy_atoms is not None:
        accuracy_logits, more = _replayed(dist.accuracy_atoms, labels, target, replayer)
        count += more
        cost = max(cost, transport_cost(dist.accuracy_atoms, weights, source, target.x.cpu(), target.p,
                                        target.norm))
    flags = list(dist.flags)
    if replayer is None:
        flags.append("not-replayed")
    elif count:
        flags.append(f"onnxruntime-disagrees ({count} of {len(labels)} atoms)")
    losses = loss_values(logits, labels, target.loss)
    accuracy_margins = loss_values(accuracy_logits, labels, "margin")
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
        atoms=dist.atoms.detach().cpu(), weights=weights, source=source,
        accuracy_atoms=None if dist.accuracy_atoms is None else dist.accuracy_atoms.detach().cpu(),
    )


def clean_numbers(target: Target, replayer: Replayer | None) -> tuple[float, float]:
    """(clean risk, clean accuracy) of the sample, from onnxruntime when replayed."""
    logits = replayer.logits(target.x) if replayer is not None else target.logits(target.x).cpu()
    require_finite_logits(logits, "onnxruntime" if replayer is not None else "torch")
    labels = target.y.cpu()
    risk = float(loss_values(logits, labels, target.loss).mean())
    accuracy = float((loss_values(logits, labels, "margin") < 0).to(torch.float64).mean())
    return risk, accuracy
