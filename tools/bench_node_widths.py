"""Where a bound gets loose (not a test): per-node interval widths of `propagate` against sampled ranges.

For the first N test digits and an ℓ∞ ball ∩ [0, 1]: every node's mean interval width, the mean
width of the range its values take on S random vertices of the ball's box (a lower bound on the
true range), and their ratio; then the worst-margin bound. `--oracle NODE[+NODE…]` (a diagnosis,
unsound) also re-propagates with those nodes' intervals replaced by the sampled range widened by
half its width on each side, to show which node's looseness the final bound depends on. Usage:

    .venv/bin/python tools/bench_node_widths.py [--model transformer] [--radius 8/255] [--samples 3]
        [--vertices 400] [--oracle node_layer_norm_2.centred]
"""

from __future__ import annotations

import argparse
import sys
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from verifier.bounds.network import BoundNetwork  # noqa: E402
from verifier.bounds.propagate import Bounds, margin_problem, propagate, upper_bound  # noqa: E402
from verifier.convert import convert_model  # noqa: E402
from verifier.onnx_io import load_model  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Print one Markdown row per node, then the margin bound (and each oracle's)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="transformer")
    parser.add_argument("--radius", default="8/255")
    parser.add_argument("--samples", type=int, default=3)
    parser.add_argument("--vertices", type=int, default=400)
    parser.add_argument("--oracle", action="append", default=[])
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    generator = torch.Generator().manual_seed(0)
    network = BoundNetwork.from_model(convert_model(load_model(ROOT / "models" / f"digits_{args.model}.onnx")))
    data = np.load(ROOT / "models" / ("digits_test_image.npz" if args.model == "cnn" else "digits_test.npz"))
    x = torch.from_numpy(data["x"][:args.samples]).double()
    y = torch.from_numpy(data["y"][:args.samples]).long()
    problem = margin_problem(network, x, y, float(Fraction(args.radius)), "inf", (0.0, 1.0), torch.device("cpu"),
                             torch.float64)
    low, high = problem.region.interval()
    pick = torch.rand(args.vertices, *x.shape, generator=generator, dtype=torch.float64) < 0.5
    values = network.values(torch.where(pick, low, high).flatten(0, 1))
    sampled = {}
    for name, value in values.items():
        value = value.reshape(args.vertices, len(x), *value.shape[1:])
        sampled[name] = (value.amin(0), value.amax(0))

    def worst_margin(state: Bounds) -> float:
        bound = upper_bound(network, state, problem.region, network.output, problem.rows)
        return float(bound.masked_fill(problem.true_class, -torch.inf).max(1).values.mean())

    state = propagate(network, problem.region)
    print("| node | op | interval width | sampled width | ratio |")
    print("|---|---|---|---|---|")
    for node in network.nodes:
        (lo, hi), (s_lo, s_hi) = state.intervals[node.name], sampled[node.name]
        width, seen = (hi - lo).flatten(1).mean(1), (s_hi - s_lo).flatten(1).mean(1)
        print(f"| {node.name} | {node.op} | {float(width.mean()):.4g} | {float(seen.mean()):.4g} | "
              f"{float((width / seen.clamp_min(1e-12)).mean()):.3g} |")
    print(f"\nmean worst-margin bound: {worst_margin(state):.4f}")
    for group in args.oracle:
        fake = {}
        for name in group.split("+"):
            s_lo, s_hi = sampled[name]
            fake[name] = (s_lo - 0.5 * (s_hi - s_lo), s_hi + 0.5 * (s_hi - s_lo))
        print(f"oracle {group}: {worst_margin(propagate(network, problem.region, prior=Bounds(fake, {}))):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
