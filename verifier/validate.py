"""Proof that the torch module computes what the ONNX file computes: onnxruntime as the oracle.

The original model (plus the exposed logits tensor as an extra output) runs in onnxruntime, the
converted module runs in torch, on the same inputs; we report per-output max absolute and
relative differences, top-1 agreement on the logits, the providers actually used, and
pass/fail against `|torch - ort| <= atol + rtol * |ort|` elementwise.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
import torch

from verifier.convert import ConvertedModel
from verifier.device import resolve_device
from verifier.errors import VerifierError
from verifier.onnx_io import LoadedModel

_DEFAULT_CHUNK = 256
_REL_FLOOR = 1e-6


@dataclass(frozen=True)
class OutputDiff:
    """Differences on one output tensor."""

    name: str
    max_abs_diff: float
    max_rel_diff: float
    within_tolerance: bool

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "name": self.name,
            "max_abs_diff": self.max_abs_diff,
            "max_rel_diff": self.max_rel_diff,
            "within_tolerance": self.within_tolerance,
        }


@dataclass(frozen=True)
class ValidationReport:
    """Outcome of running the same inputs through onnxruntime and the torch module."""

    samples: int
    outputs: tuple[OutputDiff, ...]
    top1_agreement: float
    providers: tuple[str, ...]
    torch_device: str
    atol: float
    rtol: float
    accuracy_onnxruntime: float | None = None
    accuracy_torch: float | None = None

    @property
    def max_abs_diff(self) -> float:
        """Largest absolute difference over all outputs."""
        return max(o.max_abs_diff for o in self.outputs)

    @property
    def max_rel_diff(self) -> float:
        """Largest relative difference over all outputs (relative to max(|ort|, 1e-6))."""
        return max(o.max_rel_diff for o in self.outputs)

    @property
    def passed(self) -> bool:
        """Whether every output agrees within `atol + rtol * |ort|`."""
        return all(o.within_tolerance for o in self.outputs)

    def to_dict(self) -> dict:
        """JSON-ready form (the keys documented in docs/cli.md)."""
        return {
            "passed": self.passed,
            "samples": self.samples,
            "max_abs_diff": self.max_abs_diff,
            "max_rel_diff": self.max_rel_diff,
            "top1_agreement": self.top1_agreement,
            "providers": list(self.providers),
            "torch_device": self.torch_device,
            "atol": self.atol,
            "rtol": self.rtol,
            "accuracy": None if self.accuracy_onnxruntime is None else {
                "onnxruntime": self.accuracy_onnxruntime, "torch": self.accuracy_torch},
            "outputs": [o.to_dict() for o in self.outputs],
        }


def onnxruntime_session(model: onnx.ModelProto, device: torch.device):
    """An InferenceSession on CUDA when asked for and available, else the CPU provider."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise VerifierError("onnxruntime is not installed: pip install 'verifier[cpu]' (or '[gpu]')") from err
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=providers)


def _with_outputs(model: onnx.ModelProto, names: tuple[str, ...]) -> onnx.ModelProto:
    """A copy of `model` that also outputs the named intermediate tensors."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    present = {o.name for o in copy.graph.output}
    known = {vi.name: vi for vi in copy.graph.value_info}
    for name in names:
        if name in present:
            continue
        if name in known:
            copy.graph.output.append(known[name])
        else:
            copy.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return copy


def _batches(count: int, fixed_batch: int | str | None) -> list[slice]:
    step = fixed_batch if isinstance(fixed_batch, int) and fixed_batch > 0 else _DEFAULT_CHUNK
    return [slice(start, min(start + step, count)) for start in range(0, count, step)]


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    """Batch chunks back together (a single chunk may be a scalar output)."""
    return (parts[0] if len(parts) == 1 else np.concatenate(parts)).astype(np.float64)


def validate_against_onnxruntime(
    loaded: LoadedModel,
    converted: ConvertedModel,
    x: np.ndarray,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    device: str = "auto",
    y: np.ndarray | None = None,
) -> ValidationReport:
    """Run `x` through onnxruntime and the converted module and compare every output.

    With labels `y`, the top-1 accuracy of both runtimes is reported too.
    """
    torch_device = resolve_device(device)
    session = onnxruntime_session(_with_outputs(loaded.proto, converted.output_names), torch_device)
    module = converted.module.to(torch_device)
    spec = converted.input_spec
    fixed = spec.shape[0] if spec.shape else None
    if isinstance(fixed, int) and len(x) % fixed:
        raise VerifierError(f"the model has a fixed batch of {fixed}; give a multiple of it ({len(x)} samples)")
    ort_parts: list[list[np.ndarray]] = []
    torch_parts: list[list[np.ndarray]] = []
    for part in _batches(len(x), fixed):
        ort_parts.append(session.run(list(converted.output_names), {spec.name: x[part]}))
        with torch.no_grad():
            result = module(torch.from_numpy(x[part]).to(torch_device))
        result = result if isinstance(result, (tuple, list)) else (result,)
        torch_parts.append([r.detach().cpu().numpy() for r in result])
    diffs = []
    for index, name in enumerate(converted.output_names):
        reference = _joined([p[index] for p in ort_parts])
        candidate = _joined([p[index] for p in torch_parts])
        if reference.shape != candidate.shape:
            raise VerifierError(f"output {name!r}: onnxruntime shape {reference.shape} != torch {candidate.shape}")
        error = np.abs(candidate - reference)
        diffs.append(OutputDiff(
            name=name,
            max_abs_diff=float(error.max(initial=0.0)),
            max_rel_diff=float((error / np.maximum(np.abs(reference), _REL_FLOOR)).max(initial=0.0)),
            within_tolerance=bool(np.all(error <= atol + rtol * np.abs(reference))),
        ))
    logits_ort = _joined([p[converted.logits_index] for p in ort_parts])
    logits_torch = _joined([p[converted.logits_index] for p in torch_parts])
    rows = len(x) if logits_ort.ndim and logits_ort.shape[0] == len(x) else 1
    logits_ort, logits_torch = logits_ort.reshape(rows, -1), logits_torch.reshape(rows, -1)
    agreement = float(np.mean(logits_ort.argmax(1) == logits_torch.argmax(1)))
    accuracies: tuple[float | None, float | None] = (None, None)
    if y is not None and rows == len(y):
        if y.min(initial=0) < 0 or y.max(initial=0) >= logits_ort.shape[1]:
            raise VerifierError(f"labels must lie in [0, {logits_ort.shape[1] - 1}] for this model's "
                                f"{logits_ort.shape[1]} classes (got {y.min()}..{y.max()})")
        accuracies = (float(np.mean(logits_ort.argmax(1) == y)), float(np.mean(logits_torch.argmax(1) == y)))
    return ValidationReport(
        samples=len(x),
        outputs=tuple(diffs),
        top1_agreement=agreement,
        providers=tuple(session.get_providers()),
        torch_device=str(torch_device),
        atol=atol,
        rtol=rtol,
        accuracy_onnxruntime=accuracies[0],
        accuracy_torch=accuracies[1],
    )
