"""Benchmark data from VNN-COMP properties: the images at the centre of box properties (not a test).

A VNN-COMP MNIST property (mnistfc, 2021) bounds every pixel by `clip(x - eps, 0, 1) <= X_i <=
clip(x + eps, 0, 1)`; the image `x` is recovered exactly up to float32 rounding (from the end
that was not clipped). Labels are the model's own onnxruntime argmax; extra samples (to reach
`--count`) are seeded uniform [0, 1] images.

    python tools/vnnlib_data.py MODEL.onnx OUT.npz --eps 0.03 --count 16 prop_0_0.03.vnnlib ...
"""

from __future__ import annotations

import argparse
import re

import numpy as np
import onnxruntime as ort

_BOUND = re.compile(r"\(assert \((<=|>=) X_(\d+) ([-0-9.eE]+)\)\)")


def image_of(text: str, eps: float) -> np.ndarray:
    """The centre image of one property's input box."""
    bounds: dict[int, list[float]] = {}
    for op, index, value in _BOUND.findall(text):
        bounds.setdefault(int(index), [0.0, 1.0])[0 if op == ">=" else 1] = float(value)
    low = np.array([bounds[i][0] for i in range(len(bounds))])
    high = np.array([bounds[i][1] for i in range(len(bounds))])
    centre = np.where(low <= 0.0, np.maximum(high - eps, 0.0), np.where(high >= 1.0, low + eps, (low + high) / 2))
    return centre.clip(0.0, 1.0)


def main() -> None:
    """Write x (count, *input shape) float32 and y (onnxruntime argmax) to an npz file."""
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("properties", nargs="+")
    parser.add_argument("--eps", type=float, required=True)
    parser.add_argument("--count", type=int, default=16)
    args = parser.parse_args()
    session = ort.InferenceSession(args.model, providers=["CPUExecutionProvider"])
    spec = session.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in spec.shape[1:]]
    images = [image_of(open(path).read(), args.eps) for path in args.properties][: args.count]
    rng = np.random.default_rng(0)
    images += [rng.random(int(np.prod(shape))) for _ in range(args.count - len(images))]
    x = np.stack(images).reshape(len(images), *shape).astype(np.float32)
    y = np.concatenate([session.run(None, {spec.name: x[i:i + 1]})[0] for i in range(len(x))]).argmax(1)
    np.savez(args.out, x=x, y=y)
    print(f"{args.out}: x {x.shape}, y {np.bincount(y, minlength=10).tolist()} (per class)")


if __name__ == "__main__":
    main()
