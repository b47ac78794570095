"""Benchmark of the exact mode (issue 16; not a test): MILP worst margins vs the linear bounds.

    .venv/bin/python tools/bench_exact.py [--samples 40] [--part radii,w2,winf,bab,cnn,demo] [--on-seconds 600]

- `radii`: per radius (1, 4, 8, 16/255, ℓ∞ ∩ [0, 1], the ReLU MLP), the excess
  `(bound − clean) / (truth − clean)` of the mean worst margin for the linear (CROWN) bound and
  PGD, where `truth` is the MILP optimum; the MILP's time as a multiple of one plain bound.
- `w2`: the W_2 margin certificate at the audit budgets with `--exact off`, `auto` and `on`, its
  excess over the best rigorous lower bound (the realising distributions and the attacks), the
  budgets reported exact, and the time of `certify`.
- `winf`: the same for W_∞ (every atom moves at most delta).
- `bab`: ReLU-splitting branch and bound alone (no MILP) per radius: the excess over the best
  lower bound (its leaves' real points, PGD), complete points, time over one plain bound.
- `cnn`: the same on the CNN (`models/digits_cnn.onnx`, MaxPool: plain interval splits), a few samples.
- `demo`: `make demo`'s certify step (200 samples, W_2, CE, the audit's budgets) with exact off and
  auto: time, certificates, exactness.
Runs with one torch thread (on a shared 2-core machine torch's thread pool makes small tensor ops
ms-slow; say so when quoting figures).
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch

from verifier.attacks import attack
from verifier.bounds.margins import margin_bounds
from verifier.bounds.network import BoundNetwork
from verifier.bounds.propagate import InputSet, margin_problem
from verifier.certify.certificate import certify
from verifier.certify.milp_route import ExactSettings
from verifier.convert import convert_model
from verifier.exact.margins import milp_margins
from verifier.exact.milp import MilpLimits
from verifier.exact.relu_bab import relu_split_margins
from verifier.losses import margins
from verifier.onnx_io import load_model

MODEL, DATA = "models/digits_mlp_relu.onnx", "models/digits_test.npz"
CNN = "models/digits_cnn.onnx"
AUDIT_DELTAS = (1 / 255, 2 / 255, 4 / 255, 8 / 255)
BOX = (0.0, 1.0)


def _worst_clean(module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        logits = module(x)
    values = margins(logits, y).masked_fill(torch.nn.functional.one_hot(y, logits.shape[1]).bool(), -math.inf)
    return values.max(1).values


def radii_part(converted, loaded, x: torch.Tensor, y: torch.Tensor) -> None:
    network = BoundNetwork.from_model(converted)
    module = converted.logits_module.double()
    clean = float(_worst_clean(module, x, y).mean())
    margin_bounds(network, x, y, 1 / 255, "inf", BOX)  # warm-up: the first propagation pays one-off costs
    print("| radius | linear (CROWN) excess | PGD excess | MILP optimal | MILP time / one plain bound |")
    print("|---|---|---|---|---|")
    for k in (1, 4, 8, 16):
        radius = k / 255
        began = time.perf_counter()
        linear = margin_bounds(network, x, y, radius, "inf", BOX).worst_margin
        plain = time.perf_counter() - began
        began = time.perf_counter()
        solutions = milp_margins(network, x, y, radius, "inf", BOX, MilpLimits(time_limit=120.0))
        exact_seconds = time.perf_counter() - began
        truth = float(np.mean([s.upper.max() for s in solutions]))
        pgd = attack(converted, loaded, x.float().numpy(), y.numpy(), ["pgd"], [radius], p=math.inf, norm="inf",
                     loss="margin", box=BOX, device="cpu").results[0].risk
        optimal = sum(s.optimal for s in solutions)
        print(f"| {k}/255 | {(float(linear.mean()) - clean) / (truth - clean):.3f} | {(pgd - clean) / (truth - clean):.3f} "
              f"| {optimal}/{len(solutions)} | {exact_seconds / plain:.0f}× ({exact_seconds:.1f} s vs {plain:.2f} s) |",
              flush=True)


def w2_part(converted, loaded, x: np.ndarray, y: np.ndarray, on_seconds: float, p: float = 2.0,
            deltas=AUDIT_DELTAS) -> None:
    runs = {}
    for mode in ("off", "auto", "on"):
        settings = ExactSettings(mode, seconds=on_seconds) if mode == "on" else mode
        began = time.perf_counter()
        result = certify(converted, x, y, list(deltas), p=p, norm="inf", loss="margin", box=BOX, exact=settings)
        runs[mode] = (result, time.perf_counter() - began)
        print(f"certify --exact {mode}: {runs[mode][1]:.1f} s; {result.exact_mode.to_dict()}", flush=True)
    attacked = attack(converted, loaded, x, y, ["wdapp", "pgd", "wda-curve"], list(deltas), p=p, norm="inf",
                      loss="margin", box=BOX, device="cpu")
    print("| delta | lower bound | excess off | excess auto | excess on | exact off/auto/on | MILP share (on) |")
    print("|---|---|---|---|---|---|---|")
    for index, delta in enumerate(deltas):
        rows = {mode: run[0].results[index] for mode, run in runs.items()}
        clean = rows["off"].clean_risk
        lower = max([r.realised_risk for r in rows.values()]
                    + [a.risk for a in attacked.results if a.delta == delta])
        excess = {mode: (r.certificate - clean) / (lower - clean) for mode, r in rows.items()}
        exact = "/".join("yes" if rows[m].exact else "no" for m in ("off", "auto", "on"))
        share = rows["on"].curve_sources.get("milp_exact", 0.0)
        print(f"| {round(delta * 255)}/255 | {lower:.4f} | {excess['off']:.3f} | {excess['auto']:.3f} | "
              f"{excess['on']:.3f} | {exact} | {share:.0%} |", flush=True)


def bab_part(converted, x: torch.Tensor, y: torch.Tensor, seconds: float, radii=(1, 4, 8, 16)) -> None:
    """ReLU splitting alone (no MILP): per radius the excess of the mean worst margin over the best
    lower bound (the leaves' real points, or PGD), and the time over one plain bound."""
    network = BoundNetwork.from_model(converted)
    module = converted.logits_module.double()
    clean = float(_worst_clean(module, x, y).mean())
    margin_bounds(network, x, y, 1 / 255, "inf", BOX)  # warm-up
    print("| radius | linear (CROWN) excess | split excess | complete | split time / one plain bound |")
    print("|---|---|---|---|---|")
    for k in radii:
        radius = k / 255
        began = time.perf_counter()
        linear = margin_bounds(network, x, y, radius, "inf", BOX).worst_margin
        plain = time.perf_counter() - began
        problem = margin_problem(network, x, y, radius, "inf", BOX, torch.device("cpu"), torch.float64)
        began = time.perf_counter()
        solutions = [relu_split_margins(network, _row(problem.region, i), int(y[i]), seconds=seconds)
                     for i in range(len(x))]
        spent = time.perf_counter() - began
        # The route caps a split by the linear bound (min of two sound bounds); so does this figure.
        bound = float(np.mean([min(float(s.upper.max()), float(v)) for s, v in zip(solutions, linear)]))
        floor = float(np.mean([s.floor for s in solutions]))
        pgd = attack(converted, None, x.float().numpy(), y.numpy(), ["pgd"], [radius], p=math.inf, norm="inf",
                     loss="margin", box=BOX, device="cpu").results[0].risk
        lower = max(floor, pgd)
        excess = [(value - clean) / (lower - clean) for value in (float(linear.mean()), bound)]
        print(f"| {k}/255 | {excess[0]:.3f} | {excess[1]:.3f} "
              f"| {sum(s.complete for s in solutions)}/{len(solutions)} | {spent / plain:.0f}× ({spent:.1f} s vs "
              f"{plain:.2f} s) |", flush=True)


def _row(region: InputSet, i: int) -> InputSet:
    return InputSet(region.center[i:i + 1], region.radius[i:i + 1], region.norm, region.lower[i:i + 1],
                    region.upper[i:i + 1])


def demo_part(converted, x: np.ndarray, y: np.ndarray) -> None:
    for mode in ("off", "auto"):
        began = time.perf_counter()
        result = certify(converted, x, y, list(AUDIT_DELTAS), p=2.0, norm="inf", loss="ce", box=BOX, exact=mode)
        seconds = time.perf_counter() - began
        values = ", ".join(f"{r.certificate:.4f}{'*' if r.exact else ''}" for r in result.results)
        print(f"demo certify --exact {mode}: {seconds:.1f} s; certificates {values} (* exact); "
              f"{result.exact_mode.to_dict()}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=40)
    parser.add_argument("--part", default="radii,w2,demo")
    parser.add_argument("--on-seconds", type=float, default=600.0, help="MILP time budget of --exact on (w2)")
    parser.add_argument("--split-seconds", type=float, default=2.0, help="ReLU splitting per sample (bab, cnn)")
    parser.add_argument("--cnn-samples", type=int, default=5)
    parser.add_argument("--deltas", default=None, help="w2/winf budgets in 1/255 (default 1,2,4,8)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    loaded = load_model(MODEL)
    converted = convert_model(loaded)
    data = np.load(DATA)
    parts = args.part.split(",")
    x, y = data["x"][: args.samples], data["y"][: args.samples]
    if "radii" in parts:
        radii_part(converted, loaded, torch.from_numpy(x).double(), torch.from_numpy(y).long())
    deltas = AUDIT_DELTAS if args.deltas is None else tuple(float(d) / 255 for d in args.deltas.split(","))
    if "w2" in parts:
        w2_part(converted, loaded, x, y, args.on_seconds, deltas=deltas)
    if "winf" in parts:
        w2_part(converted, loaded, x, y, args.on_seconds, p=math.inf)
    if "bab" in parts:
        bab_part(converted, torch.from_numpy(x).double(), torch.from_numpy(y).long(), args.split_seconds)
    if "cnn" in parts:
        cnn = convert_model(load_model(CNN))
        cnn_x = data["x"][: args.cnn_samples].reshape(-1, 1, 8, 8)
        bab_part(cnn, torch.from_numpy(cnn_x).double(), torch.from_numpy(data["y"][: args.cnn_samples]).long(),
                 args.split_seconds, radii=(4, 8))
    if "demo" in parts:
        demo_part(converted, data["x"][:200], data["y"][:200])


if __name__ == "__main__":
    main()
