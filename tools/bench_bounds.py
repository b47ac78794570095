"""Tightness of the margin bounds against PGD (not a test): plain CROWN vs optimised slopes.

For each (model, norm, radius): the mean over samples of `bound - clean` and `PGD - clean` for
the worst margin `max_{j != y} z_j - z_y` over `B(x, r) ∩ [0, 1]`, the excess ratio
`(bound - clean) / (PGD - clean)` of the means, and the wall time of each bound: `crown` (the
default relaxations), `alpha` (`SlopeSearch()`: the final back-substitution's free lines searched,
intermediate intervals fixed), `alpha+intermediate` (`SlopeSearch(intermediate=True)`), and the
time of the PGD attack for scale. Usage:

    .venv/bin/python tools/bench_bounds.py [--samples 200] [--cases cnn:inf:1/255,mlp_relu:inf:8/255]
        [--steps 20] [--constant-pool] [--no-intermediate]

`--constant-pool` also bounds the CNN with the pre-issue-12 constant MaxPool relaxation.
"""

from __future__ import annotations

import argparse
import sys
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from bench import pgd_margin  # noqa: E402

from verifier.bounds import pool, propagate  # noqa: E402
from verifier.bounds.margins import margin_bounds  # noqa: E402
from verifier.bounds.network import BoundNetwork  # noqa: E402
from verifier.bounds.optimise import SlopeSearch  # noqa: E402
from verifier.convert import convert_model  # noqa: E402
from verifier.jacobian import prepared_module  # noqa: E402
from verifier.losses import loss_values  # noqa: E402
from verifier.onnx_io import load_model  # noqa: E402

CASES = "cnn:inf:1/255,cnn:inf:4/255,mlp_relu:inf:8/255,mlp_gelu:inf:8/255,mlp_silu:2:0.4,cnn:inf:8/255"


def _samples(name: str, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    data = np.load(ROOT / "models" / ("digits_test_image.npz" if name == "cnn" else "digits_test.npz"))
    return torch.from_numpy(data["x"][:count]).double(), torch.from_numpy(data["y"][:count]).long()


def _timed(function):
    start = time.perf_counter()
    result = function()
    return time.perf_counter() - start, result


def bench_case(name: str, norm: str, radius: float, count: int, steps: int, constant_pool: bool,
               intermediate: bool = True) -> dict:
    """Mean `bound - clean` of each bound and of PGD on one model and ball."""
    converted = convert_model(load_model(ROOT / "models" / f"digits_{name}.onnx"))
    network = BoundNetwork.from_model(converted)
    x, y = _samples(name, count)
    module = prepared_module(converted, "cpu", torch.float64)
    clean = loss_values(module(x), y, "margin").detach()
    attack_seconds, attack = _timed(lambda: pgd_margin(module, x, y, radius, norm) - clean)

    def bound(search: SlopeSearch | None) -> torch.Tensor:
        return margin_bounds(network, x, y, radius, norm, box=(0.0, 1.0), device="cpu", optimise=search).worst_margin

    margin_bounds(network, x[:2], y[:2], radius, norm, box=(0.0, 1.0), device="cpu",
                  optimise=SlopeSearch(steps=2, intermediate=True))  # warm-up: first-call costs out of the timings
    rows = {}
    crown_time, crown = _timed(lambda: bound(None))
    rows["crown"] = (crown_time, crown - clean)
    searches = [("alpha", SlopeSearch(steps=steps))] + \
        ([("alpha+intermediate", SlopeSearch(steps, intermediate=True))] if intermediate else [])
    for key, search in searches:
        seconds, alpha = _timed(lambda: bound(search))
        rows[key] = (seconds, alpha - clean)
        assert bool((alpha <= crown + 1e-9).all()) and bool((alpha >= attack + clean - 1e-9).all())
    if constant_pool and name == "cnn":
        default = propagate.pool_relaxation
        propagate.pool_relaxation = pool.constant_pool_relaxation
        try:
            rows["constant pool"] = _timed(lambda: bound(None))
            rows["constant pool"] = (rows["constant pool"][0], rows["constant pool"][1] - clean)
        finally:
            propagate.pool_relaxation = default
    pgd_mean = float(attack.mean())
    return {"model": name, "norm": norm, "radius": radius, "samples": len(x), "pgd": pgd_mean,
            "pgd_seconds": attack_seconds,
            "bounds": {key: {"excess": float(value.mean()), "ratio": float(value.mean()) / pgd_mean,
                             "seconds": seconds} for key, (seconds, value) in rows.items()}}


def main(argv: list[str] | None = None) -> int:
    """Run the cases and print one Markdown row per bound."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--cases", default=CASES)
    parser.add_argument("--steps", type=int, default=SlopeSearch().steps)
    parser.add_argument("--constant-pool", action="store_true")
    parser.add_argument("--no-intermediate", action="store_true", help="skip the alpha+intermediate bound")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print("| model | norm | radius | bound | mean bound − clean | PGD − clean | excess ratio | seconds | cost / CROWN |")
    print("|---|---|---|---|---|---|---|---|---|")
    for case in args.cases.split(","):
        name, norm, text = case.split(":")
        result = bench_case(name, norm, float(Fraction(text)), args.samples, args.steps, args.constant_pool,
                            not args.no_intermediate)
        crown = result["bounds"]["crown"]["seconds"]
        for key, row in result["bounds"].items():
            print(f"| {name} | {norm} | {text} | {key} | {row['excess']:.4f} | {result['pgd']:.4f} | "
                  f"{row['ratio']:.3f} | {row['seconds']:.2f} | {row['seconds'] / crown:.1f}× |", flush=True)
        print(f"| {name} | {norm} | {text} | PGD (2 × 50 steps) | | | | {result['pgd_seconds']:.2f} | "
              f"{result['pgd_seconds'] / crown:.1f}× |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
