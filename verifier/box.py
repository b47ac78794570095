"""The input domain as one value: a box per coordinate, and coordinates held at each sample's value.

Every stage reaches the box through `displacement_box` (cells, bounds, certify, attacks), as
displacement bounds `lo - x <= d <= hi - x` per sample. `Box` extends the scalar `(low, high)`
pair in two ways without changing those signatures:
- **per-coordinate ends**: `low`/`high` arrays broadcastable to one sample (a data file's
  `lo`/`hi`, or `(0 - mean) / std` .. `(1 - mean) / std` per channel of a normalised image,
  `normalised_box` for `--mean`/`--std`);
- **held coordinates**: only the first `prod(free_shape)` flattened coordinates (the perturbed
  tensor, of shape `free_shape` per sample) may move; the rest get
  displacement bounds `0 <= d <= 0`, which is how inputs held fixed per sample (packed behind
  the perturbed one, `verifier.perturb`) stay exactly at their values in every bound, cell
  radius and attack projection (the geometry of `verifier.geometry` is exact with `lo = hi = 0`).

`Box` is a tuple `(low, high)` of the envelope (the smallest and largest end) so that code that
only shows or serialises the box, or over-estimates reach from it (sound: a larger reach only
delays the whole-box cap), keeps working.
"""

from __future__ import annotations

import math

from typing import TYPE_CHECKING

import numpy as np

from verifier.errors import VerifierError

if TYPE_CHECKING:  # torch is imported where it is used: data.py (no torch before the input checks) imports Box
    import torch


class Box(tuple):
    """`(envelope low, envelope high)`, with per-coordinate `low`/`high` (broadcastable to one
    sample, or to `free_shape`) and the shape of the coordinates that may move (None: all)."""

    low: np.ndarray | float
    high: np.ndarray | float
    free_shape: tuple[int, ...] | None

    def __new__(cls, low: np.ndarray | float, high: np.ndarray | float,
                free_shape: tuple[int, ...] | None = None) -> Box:
        low_arr, high_arr = np.asarray(low, dtype=np.float64), np.asarray(high, dtype=np.float64)
        if low_arr.size == 0 or high_arr.size == 0:
            raise VerifierError("the box needs at least one value for low and high")
        envelope = (float(low_arr.min()), float(high_arr.max()))
        box = super().__new__(cls, envelope)
        box.low = low_arr if low_arr.ndim else float(low_arr)
        box.high = high_arr if high_arr.ndim else float(high_arr)
        box.free_shape = None if free_shape is None else tuple(int(d) for d in free_shape)
        if not bool(np.all(np.broadcast_to(low_arr, np.broadcast_shapes(low_arr.shape, high_arr.shape))
                           < high_arr)):
            raise VerifierError("the box needs low < high at every coordinate")
        return box

    def __reduce__(self):
        return (Box, (self.low, self.high, self.free_shape))

    @property
    def free(self) -> int | None:
        """How many leading flattened coordinates may move (None: all)."""
        return None if self.free_shape is None else math.prod(self.free_shape)

    @property
    def per_coordinate(self) -> bool:
        """Whether the ends differ per coordinate (arrays), not one scalar pair."""
        return isinstance(self.low, np.ndarray) or isinstance(self.high, np.ndarray)

    def ends(self, sample_shape: tuple[int, ...], like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(low, high) flattened to one sample of the free part's shape, as tensors like `like`."""
        import torch

        low = np.array(np.broadcast_to(np.asarray(self.low), sample_shape)).reshape(-1)
        high = np.array(np.broadcast_to(np.asarray(self.high), sample_shape)).reshape(-1)
        return (torch.as_tensor(low, dtype=like.dtype, device=like.device),
                torch.as_tensor(high, dtype=like.dtype, device=like.device))

    def displacement(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(low - x, high - x) per flattened sample, 0 on held coordinates; refuses x outside."""
        import torch

        flat = x.flatten(1)
        free = flat.shape[1] if self.free is None else self.free
        moving = flat[:, :free]
        shape = tuple(x.shape[1:]) if self.free_shape is None else self.free_shape
        try:
            low, high = self.ends(shape, moving)
        except ValueError as err:
            raise VerifierError(f"the box's low/high (shapes {np.shape(self.low)}, {np.shape(self.high)}) do not "
                                f"broadcast to one sample of shape {shape}") from err
        outside = ((moving < low) | (moving > high)).any(1)
        if outside.any():
            first = int(outside.nonzero()[0])
            raise VerifierError(f"{int(outside.sum())} sample(s) lie outside the box {self.describe()} "
                                f"(first: sample {first}); every sample must lie in the box")
        held = torch.zeros_like(flat[:, free:])
        return torch.cat([low - moving, held], 1), torch.cat([high - moving, held], 1)

    def describe(self) -> str:
        """`[low, high]`, or the envelope of per-coordinate ends, plus held coordinates."""
        text = f"[{self[0]:g}, {self[1]:g}]" + (" per coordinate (envelope)" if self.per_coordinate else "")
        return text + (f", only the first {self.free} coordinates move" if self.free is not None else "")

    def to_dict(self) -> dict:
        """JSON-ready form (ends as nested lists when per coordinate)."""
        def plain(value):
            return value.tolist() if isinstance(value, np.ndarray) else value
        return {"low": plain(self.low), "high": plain(self.high),
                "free_shape": None if self.free_shape is None else list(self.free_shape)}


def channel_axis(sample_shape: tuple[int, ...], channels: int) -> int:
    """The axis of one sample that `channels` per-channel values run along: the first axis of
    that size (NCHW's C), so the last one (NHWC) only when no earlier axis has that size."""
    for axis, size in enumerate(sample_shape):
        if size == channels:
            return axis
    raise VerifierError(f"{channels} per-channel values (--mean/--std) but no axis of a sample of shape "
                        f"{tuple(sample_shape)} has {channels} entries")


def normalised_box(mean: tuple[float, ...], std: tuple[float, ...], sample_shape: tuple[int, ...],
                   raw: tuple[float, float] = (0.0, 1.0)) -> Box:
    """The box of a normalised input `(v - mean_c) / std_c`, raw values v in `raw` (default
    [0, 1]): `((raw_low - mean_c) / std_c, (raw_high - mean_c) / std_c)` on channel c
    (`channel_axis`); one value of each applies to every coordinate."""
    mean_arr, std_arr = np.asarray(mean, dtype=np.float64), np.asarray(std, dtype=np.float64)
    if mean_arr.shape != std_arr.shape or mean_arr.ndim != 1 or not mean_arr.size:
        raise VerifierError(f"--mean and --std need the same number of values (got {mean_arr.size} and "
                            f"{std_arr.size})")
    if not (np.all(np.isfinite(mean_arr)) and np.all(np.isfinite(std_arr)) and np.all(std_arr > 0)):
        raise VerifierError("--mean needs finite values and --std finite values > 0")
    shape = [1] * len(sample_shape)
    if mean_arr.size > 1:
        shape[channel_axis(tuple(sample_shape), mean_arr.size)] = mean_arr.size
    low = ((raw[0] - mean_arr) / std_arr).reshape(shape if mean_arr.size > 1 else ())
    high = ((raw[1] - mean_arr) / std_arr).reshape(shape if mean_arr.size > 1 else ())
    return Box(low, high)


def as_box(box: tuple[float, float] | Box | None) -> Box | None:
    """A `Box` from a `(low, high)` pair (None stays None: no box)."""
    if box is None or isinstance(box, Box):
        return box
    return Box(float(box[0]), float(box[1]))


def displacement_box(x: torch.Tensor, box: tuple[float, float] | Box | None) -> tuple[torch.Tensor, torch.Tensor]:
    """(box_lo - x, box_hi - x) flattened per sample; ±inf without a box. Refuses x outside the box."""
    import torch

    if box is None:
        flat = x.flatten(1)
        return torch.full_like(flat, -math.inf), torch.full_like(flat, math.inf)
    return as_box(box).displacement(x)
