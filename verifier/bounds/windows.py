"""Sliding-window geometry of Conv and pooling: SAME padding and the sums of a pooling map.

`same_pads` splits ONNX's SAME_UPPER / SAME_LOWER padding of one axis (used by `ops.conv` and
the pooling gains). `pool_sums` measures a pooling map `y = A x` without building it: the most
windows an input lies in (`m`), and A's largest column and row sums for AveragePool (each window
averages its taps with divisor = taps inside the padded input with `count_include_pad`, else
taps inside the input). `verifier.bounds.lipschitz_rules` turns these into gains: MaxPool
1 / m / sqrt m, AveragePool row / column / sqrt(row col) (inf / 1 / 2). Pooling is a Kronecker
product over axes, so the per-axis numbers multiply. An axis of unknown size is bounded by its
kernel: tap j meets position p in at most one window (`j d = p mod s`).
"""

from __future__ import annotations

import math

import numpy as np


def same_pads(size: int, kernel: int, stride: int, dilation: int, lower: bool) -> tuple[int, int]:
    """(begin, end) padding of one axis for auto_pad SAME_LOWER (`lower`) or SAME_UPPER."""
    total = max((math.ceil(size / stride) - 1) * stride + (kernel - 1) * dilation + 1 - size, 0)
    first = total - total // 2 if lower else total // 2
    return first, total - first


def pool_axis(size: int, k: int, s: int, d: int, pads: tuple[int, int], ceil: bool, include: bool):
    """One axis of a pooling map: (max column sum, max row sum, max windows per input)."""
    begin, end = pads
    extent = size + begin + end - (k - 1) * d - 1
    count = (-(-extent // s) if ceil else extent // s) + 1  # extra ceil-mode windows only add
    sums, hits, row = np.zeros(size), np.zeros(size), 0.0
    for o in range(max(count, 0)):
        taps = [o * s - begin + j * d for j in range(k)]
        valid = [t for t in taps if 0 <= t < size]
        if valid:  # divisor: taps inside the padded input (include) or inside the input
            divisor = sum(-begin <= t < size + end for t in taps) if include else len(valid)
            sums[valid] += 1.0 / divisor
            hits[valid] += 1
            row = max(row, len(valid) / divisor)
    return float(sums.max(initial=0.0)), row, float(hits.max(initial=0.0))


def pool_sums(kernel: list[int], strides: list[int], dilations: list[int], pads: list[int], ceil: bool,
              auto_pad: str, include: bool, sizes: list) -> tuple[float, float, float]:
    """(max column sum, max row sum, max windows per input) of a pooling map, axes multiplied."""
    n = len(kernel)
    col = row = windows = 1.0
    for axis, (k, s, d, size) in enumerate(zip(kernel, strides, dilations, sizes)):
        if not isinstance(size, int):  # tap j meets position p in one window at most (j d = p mod s)
            per_axis = math.ceil(k / (s // math.gcd(s, d)))
            exact_divisor = not ceil and auto_pad in ("NOTSET", "VALID") and (include or not any(pads))
            windows, col = windows * per_axis, col * per_axis / (k if exact_divisor else 1)
            continue
        axis_pads = (pads[axis], pads[axis + n])
        if auto_pad != "NOTSET":
            axis_pads = (0, 0) if auto_pad == "VALID" else same_pads(size, k, s, d, auto_pad == "SAME_LOWER")
        c, r, w = pool_axis(size, k, s, d, axis_pads, ceil, include)
        col, row, windows = col * c, row * r, windows * w
    return col, row, windows
