"""Sample data for a model: `.npz` files with `x` (float inputs) and `y` (integer labels).

`load_samples` checks a file against the model's input spec and says precisely what does not
fit; `random_samples` makes seeded inputs of the model's shape when the user gives no data.
"""

from __future__ import annotations

import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from verifier.box import Box
from verifier.errors import DataError
from verifier.finite import require_finite_inputs
from verifier.onnx_io import TensorSpec
from verifier.resources import require_within, tensor_bytes


@dataclass(frozen=True, eq=False)
class Samples:
    """Inputs `x` (N, *sample shape) in the model's dtype, labels `y` (N,) or None, and the box the
    file states per coordinate (`lo`, `hi`), if any."""

    x: np.ndarray
    y: np.ndarray | None
    source: str
    box: Box | None = None  # per-coordinate ends from the file's `lo`/`hi` arrays (None: not given)

    def __len__(self) -> int:
        return int(self.x.shape[0])


def load_samples(path: str | os.PathLike[str], spec: TensorSpec, limit: int | None = None,
                 memory_limit_bytes: int | None = None) -> Samples:
    """Read and check `x`/`y` from an npz file for a model input; keep the first `limit` samples.

    Members are size-checked against the memory limit before they are decompressed; inputs are
    checked finite after the cast to the model's dtype (x = 1e39 overflows float32)."""
    arrays = load_arrays(path, memory_limit_bytes)
    if "x" not in arrays:
        raise DataError(f"{path} has no array 'x' (found: {', '.join(sorted(arrays)) or 'nothing'})")
    x = arrays["x"]
    if not np.issubdtype(x.dtype, np.floating):
        raise DataError(f"'x' in {path} has dtype {x.dtype}; inputs must be floating point")
    if x.ndim == 0 or (len(x) and x.size == 0):
        raise DataError(f"'x' in {path} has shape {tuple(x.shape)}: it needs a leading sample axis and at least "
                        "one feature per sample")
    y = arrays.get("y")
    if y is not None:
        if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1 or len(y) != len(x):
            raise DataError(f"'y' in {path} must be a 1-D integer array with one label per row of 'x' "
                            f"(got dtype {y.dtype}, shape {y.shape}, {len(x)} inputs)")
    if len(x) == 0:
        raise DataError(f"'x' in {path} contains no samples")
    if limit is not None:
        if limit < 1:
            raise DataError(f"the number of samples must be at least 1 (got {limit})")
        x, y = x[:limit], (None if y is None else y[:limit])
    check_fits(x, spec, str(path))
    _require_fixed_batch_fits(spec, memory_limit_bytes)
    with np.errstate(over="ignore", invalid="ignore"):
        cast = np.ascontiguousarray(x.astype(spec.dtype, copy=False))
    require_finite_inputs(cast, f"'x' in {path}")
    return Samples(x=cast, y=None if y is None else y.astype(np.int64), source=str(path),
                   box=file_box(arrays, cast.shape[1:], str(path)))


def file_box(arrays: dict[str, np.ndarray], sample_shape: tuple[int, ...], source: str) -> Box | None:
    """The per-coordinate box of a data file: `lo` and `hi` broadcastable to one sample (None
    when the file has neither)."""
    low, high = arrays.get("lo"), arrays.get("hi")
    if low is None and high is None:
        return None
    if low is None or high is None:
        raise DataError(f"{source} has {'lo' if high is None else 'hi'} without {'hi' if high is None else 'lo'}; "
                        "a per-input box needs both")
    for name, value in (("lo", low), ("hi", high)):
        if not np.issubdtype(value.dtype, np.number) or not np.all(np.isfinite(value) | np.isinf(value)):
            raise DataError(f"'{name}' in {source} must hold numbers")
        try:
            np.broadcast_to(value, sample_shape)
        except ValueError as err:
            raise DataError(f"'{name}' in {source} has shape {value.shape}, which does not broadcast to one "
                            f"sample of shape {tuple(sample_shape)}") from err
    if np.isnan(low).any() or np.isnan(high).any() or not np.all(np.broadcast_to(low, sample_shape)
                                                                 < np.broadcast_to(high, sample_shape)):
        raise DataError(f"'lo' and 'hi' in {source} need lo < hi at every coordinate")
    return Box(low.astype(np.float64), high.astype(np.float64))


def load_arrays(path: str | os.PathLike[str], memory_limit_bytes: int | None = None) -> dict[str, np.ndarray]:
    """Every array of an npz data file (size-checked before decompressing), or one `DataError`."""
    file = Path(path)
    if not file.is_file():
        raise DataError(f"data file not found: {path}")
    if not zipfile.is_zipfile(file):
        with file.open("rb") as handle:
            magic = handle.read(6)
        kind = "a .npy array" if magic == b"\x93NUMPY" else "not an .npz (zip) archive"
        raise DataError(f"{path} is {kind}: give an .npz with arrays x (inputs) and y (labels), "
                        "e.g. numpy.savez('data.npz', x=x, y=y)")
    return _read_archive(file, str(path), memory_limit_bytes)


def _read_archive(file: Path, source: str, memory_limit_bytes: int | None) -> dict[str, np.ndarray]:
    """Every member of an npz as an array; any archive problem is one `DataError`."""
    try:
        with zipfile.ZipFile(file) as archive:
            require_within(f"the arrays of {source}", sum(info.file_size for info in archive.infolist()),
                           memory_limit_bytes)
            encrypted = [info.filename for info in archive.infolist() if info.flag_bits & 0x1]
        if encrypted:
            raise DataError(f"{source} has encrypted members ({', '.join(encrypted)}); give an unencrypted .npz")
        with np.load(file, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
    except DataError:
        raise
    except Exception as err:  # noqa: BLE001 - zipfile/zlib/numpy raise many types for damaged archives
        if isinstance(err, MemoryError):
            raise DataError(f"{source} is too large to load into memory") from err
        detail = " ".join(str(err).split())[:200] or type(err).__name__
        raise DataError(f"{source} is not a readable .npz file ({type(err).__name__}: {detail})") from err
    not_arrays = sorted(name for name, value in arrays.items() if not isinstance(value, np.ndarray))
    if not_arrays:
        raise DataError(f"{source}: members {', '.join(not_arrays)} are not .npy arrays; write the file with "
                        "numpy.savez('data.npz', x=x, y=y)")
    return arrays


def check_fits(x: np.ndarray, spec: TensorSpec, source: str) -> None:
    """Raise `DataError` unless `x` (with a leading sample axis) fits the input's shape."""
    if spec.shape is None:
        return
    if x.ndim != len(spec.shape) or x.shape[0] == 0:
        raise DataError(f"inputs in {source} have shape {tuple(x.shape)}; model input {spec.name!r} "
                        f"expects {_describe(spec.shape)}")
    for axis, (got, want) in enumerate(zip(x.shape[1:], spec.shape[1:]), start=1):
        if isinstance(want, int) and want != got:
            raise DataError(f"inputs in {source} have shape {tuple(x.shape)}; model input {spec.name!r} "
                            f"expects {_describe(spec.shape)} (axis {axis}: {got} != {want})")


def _require_fixed_batch_fits(spec: TensorSpec, memory_limit_bytes: int | None) -> None:
    """A model with a fixed batch runs that many samples per forward pass, whatever the data holds."""
    if spec.shape and isinstance(spec.shape[0], int) and spec.shape[0] > 1 and \
            all(isinstance(d, int) for d in spec.shape[1:]):
        require_within(f"one forward pass of the model's fixed batch of {spec.shape[0]} samples",
                       tensor_bytes(spec.shape, np.dtype(spec.dtype).itemsize), memory_limit_bytes)


def random_samples(spec: TensorSpec, count: int, seed: int = 0, memory_limit_bytes: int | None = None) -> Samples:
    """Seeded uniform [0, 1) inputs of the model's per-sample shape (size-checked before allocating)."""
    if spec.shape is None or any(not isinstance(d, int) for d in spec.shape[1:]):
        raise DataError(f"input {spec.name!r} has shape {_describe(spec.shape)}: give --data, "
                        "random inputs need fixed sizes beyond the batch axis")
    if count < 1:
        raise DataError(f"the number of samples must be at least 1 (got {count})")
    # float64 draws first, then the cast: both live at once
    require_within(f"{count} random input(s) of shape {_describe(spec.shape[1:])}",
                   tensor_bytes((count, *spec.shape[1:]), 8 + np.dtype(spec.dtype).itemsize), memory_limit_bytes)
    rng = np.random.default_rng(seed)
    x = rng.random((count, *spec.shape[1:])).astype(spec.dtype)
    return Samples(x=x, y=None, source=f"random uniform [0, 1), seed {seed}")


def _describe(shape: tuple[int | str | None, ...] | None) -> str:
    if shape is None:
        return "an unknown shape"
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"


def save_distributions(path: str | os.PathLike[str], distributions: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray]],
                       **index: np.ndarray) -> None:
    """Write explicit distributions to one npz: `atoms_k`, `weights_k`, `source_k` per entry k,
    plus index arrays (e.g. `deltas`, `methods`) whose entry k describes distribution k."""
    if os.path.isdir(path):
        raise DataError(f"cannot write {path}: it is a folder (give a file name ending in .npz)")
    arrays = dict(index)
    for k, (atoms, weights, source) in enumerate(distributions):
        arrays |= {f"atoms_{k}": atoms, f"weights_{k}": weights, f"source_{k}": source}
    try:
        np.savez_compressed(path, **arrays)
    except OSError as err:
        raise DataError(f"cannot write {path}: {err.strerror or err}") from err


def check_labels(labels: np.ndarray, classes: int) -> None:
    """Raise `DataError` unless every label is a class index of a model with `classes` outputs."""
    labels = np.asarray(labels)
    if labels.size and (labels.min() < 0 or labels.max() >= classes):
        raise DataError(f"labels must lie in [0, {classes - 1}] for this model's {classes} classes "
                        f"(got {labels.min()}..{labels.max()})")


def fit_box(x: np.ndarray, box: tuple[float, float] | Box | None, source: str) -> tuple[float, float] | Box | None:
    """The box with its bounds rounded outward to `x`'s dtype (a float32 2.6400001 is the bound
    2.64 as float32 data holds it), after checking that every value lies in it; `DataError`
    naming the sample, feature and value furthest outside otherwise. A per-coordinate `Box`
    comes back as a `Box` (its ends rounded the same way, coordinate by coordinate)."""
    if box is None:
        return None
    dtype = x.dtype if np.issubdtype(x.dtype, np.floating) else np.dtype(np.float64)
    per_coordinate = isinstance(box, Box) and box.per_coordinate
    if per_coordinate:
        shape = tuple(x.shape[1:])
        low = _outward(np.broadcast_to(np.asarray(box.low), shape).reshape(-1), dtype, -np.inf)
        high = _outward(np.broadcast_to(np.asarray(box.high), shape).reshape(-1), dtype, np.inf)
    else:
        low, high = _outward(box[0], dtype, -np.inf), _outward(box[1], dtype, np.inf)
    flat = np.asarray(x).reshape(len(x), -1).astype(np.float64)
    excess = np.maximum(low - flat, flat - high)
    if excess.size and excess.max() > 0:
        sample, feature = np.unravel_index(int(excess.argmax()), excess.shape)
        index = np.unravel_index(int(feature), x.shape[1:]) if x.ndim > 2 else (int(feature),)
        outside = int(np.count_nonzero((excess > 0).any(1)))
        value = str(np.asarray(x).reshape(len(x), -1)[sample, feature])  # shortest repr in x's own dtype
        where = "the per-coordinate box lo..hi" if per_coordinate else f"the box [{box[0]:g}, {box[1]:g}]"
        raise DataError(f"{outside} sample(s) in {source} lie outside {where}; furthest: "
                        f"sample {int(sample)}, feature {', '.join(map(str, index))}, value "
                        f"{value} ({dtype.name}); every value must lie in the box "
                        f"(up to the rounding of {dtype.name})")
    if per_coordinate:
        return Box(low.reshape(x.shape[1:]), high.reshape(x.shape[1:]), box.free_shape)
    return float(low), float(high)


def _outward(bound, dtype: np.dtype, direction: float):
    """`bound` (a number or an array) rounded to `dtype`, then one step further out where rounding
    moved it inward."""
    bound = np.asarray(bound, dtype=np.float64)
    rounded = bound.astype(dtype)
    inward = rounded > bound if direction < 0 else rounded < bound
    result = np.where(inward, np.nextafter(rounded, np.asarray(direction, dtype=dtype)), rounded).astype(np.float64)
    return float(result) if result.ndim == 0 else result


def budget_scale_warning(x: np.ndarray, deltas: Sequence[float], norm: str,
                         box: tuple[float, float] | None = None) -> str | None:
    """A warning when the budgets are tiny or huge for the data's scale, else None.

    Budgets are absolute, in the threat norm of the input space. The scale of one sample's
    displacement is the median feature spread (the box width when given, else the range over the
    sample of each feature) times D^(1/r) for the threat norm r (1 for inf, sqrt(D) for 2, D for
    1). A largest budget under 1e-3 of it moves nothing visible (e.g. 8/255 on raw 0..255 pixels);
    a smallest positive one over it moves samples across the whole data range.
    """
    flat = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    if box is not None:
        spread = float(box[1] - box[0])
    else:
        ranges = flat.max(axis=0) - flat.min(axis=0) if len(flat) > 1 else np.abs(flat[0])
        spread = float(np.median(ranges))
    positive = [d for d in deltas if d > 0]
    if not positive or not np.isfinite(spread) or spread <= 0:
        return None
    features = flat.shape[1]
    scale = spread * {"inf": 1.0, "2": features ** 0.5, "1": float(features)}.get(norm, 1.0)
    where = "the box width" if box is not None else "the median feature range of the data"
    if max(positive) < 1e-3 * scale:
        return (f"the budgets (largest {max(positive):.3g}) are under 1e-3 of one sample's scale in the l_{norm} "
                f"norm ({scale:.3g}, from {where} {spread:.3g}): they are absolute, in the model's input units "
                "(scale them to the input, e.g. 8/255 of a 0..255 pixel range is 8)")
    if min(positive) > scale:
        return (f"the budgets (smallest {min(positive):.3g}) exceed one sample's scale in the l_{norm} norm "
                f"({scale:.3g}, from {where} {spread:.3g}): every sample can be moved across the whole data range")
    return None
