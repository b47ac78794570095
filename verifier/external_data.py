"""External tensor data, read safely: inside the model's folder, by each tensor's own size.

Audits run on untrusted files. An external location must be a regular file inside the model's
folder (no absolute path, no `..`, no symlink out of it), must not be the model file itself, and
is read for exactly the bytes the tensor's shape and type need from its offset — never "the rest
of the file". Sizes are checked against the memory limit and the 2 GiB a protobuf can hold
before anything is read.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import onnx
from google.protobuf.descriptor import FieldDescriptor

from verifier.errors import ExternalDataError, format_bytes
from verifier.resources import require_within

PROTOBUF_LIMIT = 2**31 - 1  # one serialised ModelProto (onnx.checker, onnxruntime) holds at most this
_HALF_BYTE_TYPES = frozenset(
    getattr(onnx.TensorProto, name) for name in ("INT4", "UINT4", "FLOAT4E2M1") if hasattr(onnx.TensorProto, name)
)


def all_tensors(message) -> Iterator[onnx.TensorProto]:
    """Every TensorProto anywhere in a proto message: initializers, sparse tensors, attributes,
    sub-graphs, function bodies, training info (found by reflection, so no place is missed)."""
    for descriptor, value in message.ListFields():
        if descriptor.type != FieldDescriptor.TYPE_MESSAGE:
            continue
        for item in value if is_repeated(descriptor) else (value,):
            if isinstance(item, onnx.TensorProto):
                yield item
            else:
                yield from all_tensors(item)


def is_repeated(descriptor: FieldDescriptor) -> bool:
    """Whether a protobuf field is repeated (`is_repeated` on protobuf >= 5.29, `label` before)."""
    flag = getattr(descriptor, "is_repeated", None)
    return bool(flag) if flag is not None else descriptor.label == FieldDescriptor.LABEL_REPEATED


def _external_entries(tensor: onnx.TensorProto) -> dict[str, str]:
    """The tensor's external-data key/value pairs (a repeated key: the last one wins, as in onnx)."""
    return {entry.key: entry.value for entry in tensor.external_data}


def load_external_data(proto: onnx.ModelProto, model_file: Path, limit: int) -> None:
    """Read external tensors, refusing locations that leave the model's own folder, the model file
    itself, and sizes over the memory limit or the protobuf limit (checked before reading)."""
    total = proto.ByteSize()
    for tensor in all_tensors(proto):
        if tensor.data_location != onnx.TensorProto.EXTERNAL:
            continue
        location = _external_entries(tensor).get("location", "")
        try:
            needed = _expected_bytes(tensor, location)
            total += needed
            require_within(f"external tensor {tensor.name!r} ({location})", needed, limit)
            if total > PROTOBUF_LIMIT:
                raise ExternalDataError(tensor.name, location, f"the model's tensors reach {format_bytes(total)}, "
                                        "over the 2 GiB one ONNX protobuf can hold; models that large are not "
                                        "analysed")
            tensor.raw_data = _read_external(tensor, location, model_file, needed)
        except ExternalDataError:
            raise
        except (ValueError, OSError, RuntimeError) as err:
            reason = getattr(err, "strerror", None) or " ".join(str(err).split())[:300]
            raise ExternalDataError(tensor.name, location, f"cannot read it ({type(err).__name__}: {reason})") from err
        tensor.data_location = onnx.TensorProto.DEFAULT
        del tensor.external_data[:]
    still = [t.name for t in all_tensors(proto) if t.data_location == onnx.TensorProto.EXTERNAL]
    if still:
        raise ExternalDataError(still[0], "", "external data left unresolved")


def _expected_bytes(tensor: onnx.TensorProto, location: str) -> int:
    """Bytes a dense tensor of this shape and type holds (the external read is exactly this)."""
    count = 1
    for dim in tensor.dims:
        count *= max(int(dim), 0)
    if tensor.data_type in _HALF_BYTE_TYPES:
        return (count + 1) // 2
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        raise ExternalDataError(tensor.name, location, f"data type {tensor.data_type} cannot be stored "
                                "externally") from None
    if tensor.data_type == onnx.TensorProto.STRING:
        raise ExternalDataError(tensor.name, location, "string tensors cannot be stored externally")
    return count * itemsize


def _read_external(tensor: onnx.TensorProto, location: str, model_file: Path, needed: int) -> bytes:
    """The `needed` bytes of one external tensor, read only from a regular file inside the model's
    folder that is not the model file itself."""
    base_dir = model_file.parent
    entries = _external_entries(tensor)
    if not location:
        raise ExternalDataError(tensor.name, location, "no location given")
    if "\x00" in location:
        raise ExternalDataError(tensor.name, location, "the location contains a NUL byte")
    if os.path.isabs(location) or Path(location).drive or ".." in Path(location).parts:
        raise ExternalDataError(tensor.name, location, "it leaves the model's folder")
    offset = _non_negative(tensor, location, entries, "offset", 0)
    length = _non_negative(tensor, location, entries, "length", None)
    target = (base_dir / location).resolve()
    if not target.is_relative_to(base_dir):
        raise ExternalDataError(tensor.name, location, "it resolves outside the model's folder (symlink?)")
    if not target.is_file():
        raise ExternalDataError(tensor.name, location, "file not found next to the model")
    if target == model_file:
        raise ExternalDataError(tensor.name, location, "it is the model file itself")
    if length is not None and length != needed:
        raise ExternalDataError(tensor.name, location, f"length {length} bytes, but the tensor's shape and type "
                                f"need {needed}")
    size = target.stat().st_size
    if offset + needed > size:
        raise ExternalDataError(tensor.name, location, f"file too short ({size} bytes; the tensor needs {needed} "
                                f"from offset {offset})")
    with target.open("rb") as handle:
        handle.seek(offset)
        return handle.read(needed)


def _non_negative(tensor: onnx.TensorProto, location: str, entries: dict[str, str], key: str,
                  default: int | None) -> int | None:
    text = entries.get(key)
    if text is None or text == "":
        return default
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise ExternalDataError(tensor.name, location, f"{key} {text!r} is not a non-negative integer")
    return value
