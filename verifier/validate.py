"""Proof that the torch module computes what the ONNX file computes: onnxruntime as the oracle.

The original model (plus the exposed logits tensor as an extra output, computed by the head's
nodes of `verifier.head_logits.attach_logits` for a binary or probability head) runs in onnxruntime, the
converted module runs in torch, on the same inputs (in chunks of the user's fixed batch, if any,
sample by sample for a fixed batch of 1; a short last chunk padded by repeating its last sample,
the padding dropped); we report per-output max absolute and
relative differences, top-1 agreement on the logits, the providers actually used, and
pass/fail against `|torch - ort| <= atol + rtol * |ort|` elementwise, where equal values (the
same infinity, NaN in both) agree and NaN on one side only is an infinite difference. A
runtime that cannot run the model raises `RuntimeRunError` (one line, exit 2).
"""

from __future__ import annotations

from dataclasses import dataclass

import re

import numpy as np
import onnx
import torch

from verifier.convert import ConvertedModel, pad_rows
from verifier.data import check_labels
from verifier.device import resolve_device
from verifier.errors import RuntimeRunError, VerifierError
from verifier.graph import json_safe
from verifier.head_logits import attach_logits
from verifier.onnx_io import LoadedModel

_DEFAULT_CHUNK = 256
_REL_FLOOR = 1e-6
_DETAIL_LENGTH = 300
_ORT_NOISE = re.compile(r"\[ONNXRuntimeError\]\s*:\s*\d+\s*:\s*|/onnxruntime_src/\S+\s+\S+::\S+\(.*?\)\s*")


@dataclass(frozen=True)
class OutputDiff:
    """Differences on one output tensor."""

    name: str
    max_abs_diff: float
    max_rel_diff: float
    within_tolerance: bool

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return json_safe({
            "name": self.name,
            "max_abs_diff": self.max_abs_diff,
            "max_rel_diff": self.max_rel_diff,
            "within_tolerance": self.within_tolerance,
        })


@dataclass(frozen=True)
class ValidationReport:
    """Outcome of running the same inputs through onnxruntime and the torch module."""

    samples: int
    outputs: tuple[OutputDiff, ...]
    top1_agreement: float | None  # None when the logits have no class axis to compare
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
        """JSON-ready form (the keys documented in docs/cli.md; non-finite numbers as strings)."""
        return json_safe({
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
        })


def onnxruntime_session(model: onnx.ModelProto, device: torch.device, arena: bool = True):
    """An InferenceSession on CUDA when asked for and available, else the CPU provider. `arena=False`
    for a session that lives long beside other work (the attacks' replays): onnxruntime's CPU arena
    keeps the largest run's memory until the session ends; without it each run gives its memory back."""
    try:
        import onnxruntime as ort
    except ImportError as err:
        raise VerifierError("onnxruntime is not installed: pip install 'verifier[cpu]' (or '[gpu]')") from err
    providers = ["CPUExecutionProvider"]
    if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
        providers.insert(0, "CUDAExecutionProvider")
    ort.set_default_logger_severity(4)  # fatal only: its failures reach the user as our one line
    options = ort.SessionOptions()
    options.log_severity_level = 4
    options.enable_cpu_mem_arena = arena
    try:
        return ort.InferenceSession(model.SerializeToString(), sess_options=options, providers=providers)
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types for every failure
        raise RuntimeRunError("onnxruntime", _detail(err)) from err


def _detail(err: Exception) -> str:
    """A runtime's error as one short line (onnxruntime's source paths and codes dropped)."""
    text = _ORT_NOISE.sub("", " ".join(str(err).split())) or type(err).__name__
    return text if len(text) <= _DETAIL_LENGTH else text[: _DETAIL_LENGTH - 3] + "..."


def oracle_model(loaded: LoadedModel, converted: ConvertedModel) -> onnx.ModelProto:
    """The user's model as onnxruntime runs it: with the head's logits nodes when it needs them."""
    return loaded.proto if converted.head is None else attach_logits(loaded.proto, converted.head)


def with_outputs(model: onnx.ModelProto, names: tuple[str, ...]) -> onnx.ModelProto:
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


def _unpadded(outputs: list[np.ndarray], size: int, padded: int) -> list[np.ndarray]:
    """The rows of the real samples of a padded chunk (outputs without a batch axis as they are)."""
    if size == padded:
        return outputs
    return [o[:size] if np.ndim(o) and np.shape(o)[0] == padded else o for o in outputs]


def _joined(parts: list[np.ndarray]) -> np.ndarray:
    """Batch chunks back together: concatenated along the first axis; flattened first when a chunk
    is a scalar (one per chunk) or the chunks disagree beyond the first axis."""
    arrays = [np.asarray(p, dtype=np.float64) for p in parts]
    if len(arrays) == 1:
        return arrays[0]
    if any(a.ndim == 0 for a in arrays):
        return np.concatenate([a.reshape(-1) for a in arrays])
    try:
        return np.concatenate(arrays)
    except ValueError:
        return np.concatenate([a.reshape(-1) for a in arrays])


def _compare(name: str, candidate: np.ndarray, reference: np.ndarray, atol: float, rtol: float) -> OutputDiff:
    """Differences of one output; equal values (same infinity, NaN on both sides) differ by 0."""
    with np.errstate(invalid="ignore", over="ignore"):
        same = (candidate == reference) | (np.isnan(candidate) & np.isnan(reference))
        error = np.where(same, 0.0, np.abs(candidate - reference))
        error = np.where(np.isnan(error), np.inf, error)  # NaN on one side only
        relative = error / np.fmax(np.abs(reference), _REL_FLOOR)
        within = same | (error <= atol + rtol * np.abs(reference))
    return OutputDiff(
        name=name,
        max_abs_diff=float(error.max(initial=0.0)),
        max_rel_diff=float(np.nan_to_num(relative, nan=np.inf).max(initial=0.0)),
        within_tolerance=bool(np.all(within)),
    )


def run_onnxruntime(session, names: list[str], input_name: str, x: np.ndarray, fixed) -> list[np.ndarray]:
    """One onnxruntime run; a failure becomes `RuntimeRunError` (hinting at a hard-coded batch)."""
    try:
        return session.run(names, {input_name: x})
    except Exception as err:  # noqa: BLE001 - onnxruntime raises its own exception types
        hint = ""
        if len(x) > 1 and not isinstance(fixed, int):
            try:
                session.run(names, {input_name: x[:1]})
                hint = (f"it runs one sample but not {len(x)}: the model seems to hard-code its batch size "
                        "although its input declares a dynamic one")
            except Exception:  # noqa: BLE001 - the single sample fails too: no batch hint
                hint = ""
        raise RuntimeRunError("onnxruntime", _detail(err), hint) from err


def _run_torch(module: torch.nn.Module, x: np.ndarray, device: torch.device) -> list[np.ndarray]:
    """One forward pass of the converted module; a failure becomes `RuntimeRunError`."""
    try:
        with torch.no_grad():
            result = module(torch.from_numpy(x).to(device))
    except Exception as err:  # noqa: BLE001 - torch raises many exception types from converted modules
        raise RuntimeRunError("torch (the converted module)", f"{type(err).__name__}: {_detail(err)}") from err
    result = result if isinstance(result, (tuple, list)) else (result,)
    return [(r.float() if r.dtype == torch.bfloat16 else r).detach().cpu().numpy() for r in result]


def _top1(logits_ort: np.ndarray, logits_torch: np.ndarray, samples: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Logits as (rows, classes) for argmax, or None when there is no class to compare."""
    rows = samples if logits_ort.ndim and logits_ort.shape[0] == samples else 1
    if logits_ort.size == 0 or logits_ort.shape != logits_torch.shape or logits_ort.size % rows:
        return None
    return logits_ort.reshape(rows, -1), logits_torch.reshape(rows, -1)


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
    session = onnxruntime_session(with_outputs(oracle_model(loaded, converted), converted.output_names),
                                  torch_device)
    module = converted.module.to(torch_device)
    spec = converted.input_spec
    fixed = spec.shape[0] if spec.shape and isinstance(spec.shape[0], int) and spec.shape[0] > 0 else None
    ort_parts: list[list[np.ndarray]] = []
    torch_parts: list[list[np.ndarray]] = []
    for part in _batches(len(x), fixed):
        chunk = pad_rows(x[part], fixed or 1)  # the user's fixed batch: a short last chunk is padded
        size = part.stop - part.start
        ort_parts.append(_unpadded(run_onnxruntime(session, list(converted.output_names), spec.name, chunk, fixed),
                                   size, len(chunk)))
        torch_parts.append(_unpadded(_run_torch(module, chunk, torch_device), size, len(chunk)))
    diffs = []
    for index, name in enumerate(converted.output_names):
        reference = _joined([p[index] for p in ort_parts])
        candidate = _joined([p[index] for p in torch_parts])
        if reference.shape != candidate.shape:
            raise VerifierError(f"output {name!r}: onnxruntime shape {reference.shape} != torch {candidate.shape}")
        diffs.append(_compare(name, candidate, reference, atol, rtol))
    table = _top1(_joined([p[converted.logits_index] for p in ort_parts]),
                  _joined([p[converted.logits_index] for p in torch_parts]), len(x))
    agreement = None if table is None else float(np.mean(table[0].argmax(1) == table[1].argmax(1)))
    accuracies: tuple[float | None, float | None] = (None, None)
    if table is not None and y is not None and len(table[0]) == len(y):
        logits_ort, logits_torch = table
        check_labels(y, logits_ort.shape[1])
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
