"""Margin-bound tightness on the shipped models (not a test): mean (bound - clean) vs PGD, per radius.

    .venv/bin/python tools/bench_margins.py [--models transformer] [--samples 200] [--radii 1/255,4/255]

For every model and l_inf radius (box [0, 1]): the mean over samples of the upper bound on the
worst margin minus the clean margin, the same for the best PGD margin (tools/bench.py's attack),
their ratio (the excess ratio, 1 = tight), whether every attack stayed under its bound, and the
bound's wall time. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench import pgd_margin  # noqa: E402
from digits_models import input_shape  # noqa: E402

from verifier.bounds.margins import margin_bounds  # noqa: E402
from verifier.bounds.network import BoundNetwork  # noqa: E402
from verifier.convert import convert_model  # noqa: E402
from verifier.jacobian import prepared_module  # noqa: E402
from verifier.losses import loss_values  # noqa: E402
from verifier.onnx_io import load_model  # noqa: E402


def bench(name: str, samples: int, radii: list[float]) -> list[dict]:
    """One row per radius for model `name` on the first `samples` test samples."""
    converted = convert_model(load_model(ROOT / "models" / f"digits_{name}.onnx"))
    data = np.load(ROOT / "models" / ("digits_test_image.npz" if name == "cnn" else "digits_test.npz"))
    x = torch.from_numpy(data["x"][:samples]).double().reshape(-1, *input_shape(name))
    y = torch.from_numpy(data["y"][:samples]).long()
    module = prepared_module(converted, "cpu", torch.float64)
    network = BoundNetwork.from_model(converted)
    clean = loss_values(module(x), y, "margin").detach()
    rows = []
    for radius in radii:
        start = time.perf_counter()
        bound = margin_bounds(network, x, y, radius, "inf", box=(0.0, 1.0), device="cpu").worst_margin
        seconds = time.perf_counter() - start
        attack = pgd_margin(module, x, y, radius, "inf")
        excess, gain = float((bound - clean).mean()), float((attack - clean).mean())
        rows.append({"model": name, "radius": radius, "bound": excess, "pgd": gain, "ratio": excess / gain,
                     "sound": bool((attack <= bound + 1e-9).all()), "seconds": seconds, "samples": len(x)})
    return rows


def main(argv: list[str] | None = None) -> int:
    """Print the Markdown table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="transformer")
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--radii", default="1/255,4/255")
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    radii = [float(Fraction(r)) for r in args.radii.split(",")]
    print("| model | radius | N | bound − clean | PGD − clean | excess ratio | PGD ≤ bound | bound time |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        for row in bench(name, args.samples, radii):
            print(f"| {row['model']} | {row['radius']:.5f} | {row['samples']} | {row['bound']:.4f} | {row['pgd']:.4f} "
                  f"| {row['ratio']:.2f} | {row['sound']} | {row['seconds']:.1f} s |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
