"""The one exception family of verifier: every failure a user can cause has a typed subclass.

Each subclass builds a one-line, human message from its fields; the CLI prints it and exits
with ``exit_code`` (2 for bad input). A raw traceback is never the answer to a bad file.
"""

from __future__ import annotations

from collections.abc import Sequence


class VerifierError(Exception):
    """Root of every error verifier raises on purpose; ``str(err)`` is one line for humans."""

    exit_code: int = 2

    def __init__(self, message: str) -> None:
        super().__init__(" ".join(message.split()))


class ModelFileError(VerifierError):
    """The model file is missing, unreadable, not ONNX, or damaged."""


class ModelNotFoundError(ModelFileError):
    """No file at the given path."""

    def __init__(self, path: str) -> None:
        super().__init__(f"model file not found: {path}")


class NotOnnxError(ModelFileError):
    """The bytes are not an ONNX ModelProto."""

    def __init__(self, path: str, detail: str = "") -> None:
        extra = f" ({detail})" if detail else ""
        super().__init__(f"{path} is not an ONNX model{extra}")


class TruncatedModelError(ModelFileError):
    """The file starts like an ONNX model but cannot be parsed to the end."""

    def __init__(self, path: str, size: int) -> None:
        super().__init__(
            f"{path} looks like an ONNX model but is truncated or corrupted ({size} bytes could not be parsed)"
        )


class ExternalDataError(ModelFileError):
    """External tensor data is missing, too short, or points outside the model's folder."""

    def __init__(self, tensor: str, location: str, reason: str) -> None:
        shown = location if len(location) <= 120 else location[:117] + "..."
        super().__init__(f"external data of tensor {tensor!r} at {shown!r} refused: {reason}")


class CheckerError(VerifierError):
    """onnx.checker or strict shape inference rejected the model."""

    def __init__(self, what: str, detail: str, node: str | None = None) -> None:
        where = f" at node {node!r}" if node else ""
        super().__init__(f"{what} failed{where}: {detail}")


class UnknownDomainError(VerifierError):
    """A node uses an operator domain that is neither standard ONNX nor defined in the model."""

    def __init__(self, nodes: Sequence[tuple[str, str, str]]) -> None:
        listed = ", ".join(f"{op} (domain {dom!r}) at node {name!r}" for name, op, dom in nodes)
        super().__init__(f"unknown operator domain: {listed}")


class SparseTensorError(VerifierError):
    """The model stores sparse tensors (sparse initializers or a sparse Constant), which are not analysed."""

    def __init__(self, places: Sequence[str]) -> None:
        super().__init__(f"sparse tensors are not supported: {', '.join(places)}; store them as dense tensors")


class InputSpecError(VerifierError):
    """The model's data inputs are not what a robustness analysis can perturb."""


class NonFloatInputError(InputSpecError):
    """The data input is not a floating-point tensor."""

    def __init__(self, name: str, dtype: str) -> None:
        super().__init__(
            f"input {name!r} has dtype {dtype}; verifier perturbs continuous inputs and needs a float tensor "
            "(--perturb TENSOR names a float tensor inside the graph, e.g. an embedding's output; "
            "`verifier inspect` lists candidates)"
        )


class MultipleInputsError(InputSpecError):
    """The model has more than one (or no) data input."""

    def __init__(self, names: Sequence[str]) -> None:
        if names:
            msg = (f"the model has {len(names)} data inputs ({', '.join(names)}); name the perturbed one with "
                   "--perturb NAME (the others are held fixed, read per sample from the data file by name)")
        else:
            msg = "the model has no data input"
        super().__init__(msg)


class UnsupportedOpsError(VerifierError):
    """Some nodes cannot be converted or analysed; all of them are listed at once."""

    def __init__(self, purpose: str, nodes: Sequence[tuple[str, str, str]]) -> None:
        self.nodes = tuple(nodes)
        listed = "; ".join(f"{op} at node {name!r} ({why})" for name, op, why in nodes)
        super().__init__(f"unsupported for {purpose}: {len(self.nodes)} node(s): {listed}")


class UnsupportedModelError(VerifierError):
    """The model as a whole is outside what verifier analyses (an untested opset, an empty graph)."""


class ConversionError(VerifierError):
    """onnx2torch failed on a graph that passed the support check."""


class RuntimeRunError(VerifierError):
    """onnxruntime (the oracle) or torch (the converted module) cannot run the model on the inputs."""

    def __init__(self, runtime: str, detail: str, hint: str = "") -> None:
        extra = f" ({hint})" if hint else ""
        super().__init__(f"{runtime} cannot run the model: {detail}{extra}")


class DataError(VerifierError):
    """A data file (npz with ``x`` and ``y``) is missing, malformed, or does not fit the model."""


class UsageError(VerifierError):
    """A command-line value is out of range or inconsistent."""


class NonFiniteError(VerifierError):
    """A NaN or an infinity where a number is needed: a constant, an input, a logit or a result."""


class ResourceLimitError(VerifierError):
    """The work would need more memory than the limit allows (``--memory-limit`` raises it)."""

    def __init__(self, what: str, needed: int, limit: int) -> None:
        super().__init__(f"{what} needs {format_bytes(needed)}, over the memory limit of {format_bytes(limit)} "
                         "(raise it with --memory-limit, e.g. --memory-limit 32G)")


def format_bytes(count: float) -> str:
    """A byte count for humans: `512 B`, `3.2 MiB`, `4.66 TiB`."""
    value = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if value < 1024 or unit == "PiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.3g} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
