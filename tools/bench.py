"""Benchmarks of the exact-analysis core (not a test): speed and tightness on the digits models.

Times are reported as multiples of one batched forward+backward pass on the same samples;
tightness as the excess ratio `(bound - clean) / (PGD - clean)` of each route for the mean
margin (p = inf, method §3.6): 1 is tight. Usage:

    .venv/bin/python tools/bench.py [--samples 1000] [--models mlp_relu,cnn] [--out docs/bench.json]
    .venv/bin/python tools/bench.py certify [--samples 1000] [--models mlp_relu] [--p 2] [--norm inf]
                                           [--loss ce] [--out docs/bench-certify.json]

`resnet` (tools/bench_resnet.py) times one sample's CROWN margin bound on a CIFAR ResNet per radius
(`--profile cprofile|torch` adds the profile). `certify` (tools/bench_certify.py) compares certificates with every attack on the audit budgets
1/255 .. 8/255 and prints Markdown tables for docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tools"))

from digits_models import input_shape, load_digits_split  # noqa: E402

from verifier.bounds.global_lipschitz import global_lipschitz  # noqa: E402
from verifier.bounds.margins import margin_bounds  # noqa: E402
from verifier.bounds.network import BoundNetwork  # noqa: E402
from verifier.bounds.slopes import slope_bounds  # noqa: E402
from verifier.cells import cell_analysis  # noqa: E402
from verifier.convert import convert_model  # noqa: E402
from verifier.convert.normalize import normalize_model  # noqa: E402
from verifier.jacobian import logits_jacobian, prepared_module  # noqa: E402
from verifier.losses import loss_values  # noqa: E402
from verifier.onnx_io import load_model  # noqa: E402

BUDGETS = {"inf": [0.002, 0.005, 0.01, 0.02, 0.04], "2": [0.02, 0.05, 0.1, 0.2, 0.4]}


def timed(function, repeat: int = 1) -> tuple[float, object]:
    """Best wall time of `repeat` runs and the last result."""
    best, result = math.inf, None
    for _ in range(repeat):
        start = time.perf_counter()
        result = function()
        best = min(best, time.perf_counter() - start)
    return best, result


def pgd_margin(module, x, y, radius: float, norm: str, steps: int = 50) -> torch.Tensor:
    """Per-sample best margin of a plain PGD with random restarts inside B(x, radius) ∩ [0, 1]."""
    best = loss_values(module(x), y, "margin").detach()
    for restart in range(2):
        generator = torch.Generator().manual_seed(restart)
        noise = (torch.rand(x.shape, generator=generator, dtype=x.dtype) * 2 - 1) * radius
        point = project(x, x + noise * (restart > 0), radius, norm)
        for step in range(steps):
            point.requires_grad_(True)
            loss = loss_values(module(point), y, "margin")
            (grad,) = torch.autograd.grad(loss.sum(), point)
            flat = grad.flatten(1)
            direction = flat.sign() if norm == "inf" else flat / flat.norm(dim=1, keepdim=True).clamp_min(1e-30)
            size = radius * (0.25 if step < steps // 2 else 0.05)
            point = project(x, point.detach() + size * direction.reshape(x.shape), radius, norm)
            best = torch.maximum(best, loss_values(module(point), y, "margin").detach())
    return best


def project(x: torch.Tensor, point: torch.Tensor, radius: float, norm: str) -> torch.Tensor:
    """Into the ball (clamp for inf, rescale for 2), then into the box."""
    delta = (point - x).flatten(1)
    if norm == "inf":
        delta = delta.clamp(-radius, radius)
    else:
        delta = delta * torch.clamp(radius / delta.norm(dim=1, keepdim=True).clamp_min(1e-30), max=1.0)
    return (x + delta.reshape(x.shape)).clamp(0.0, 1.0)


def bench_model(name: str, samples: int) -> dict:
    """Speed and tightness of every route on one shipped model."""
    loaded = load_model(ROOT / "models" / f"digits_{name}.onnx")
    converted = convert_model(loaded)
    x_train, y_train, x_test, y_test = load_digits_split()
    x_all = np.concatenate([x_test, x_train])[:samples].reshape(-1, *input_shape(name))
    y_all = np.concatenate([y_test, y_train])[:samples]
    x = torch.from_numpy(x_all).double()
    y = torch.from_numpy(y_all).long()
    module = prepared_module(converted, "cpu", torch.float64)

    def forward_backward():
        point = x.clone().requires_grad_(True)
        loss_values(module(point), y, "ce").sum().backward()

    forward_backward()  # warm-up: first calls pay for lazy initialisation
    logits_jacobian(converted, x[:8], device="cpu", dtype=torch.float64)
    base, _ = timed(forward_backward, repeat=5)
    report: dict = {"model": name, "samples": len(x), "forward_backward_s": base, "times": {}, "tightness": {}}
    jac_time, _ = timed(lambda: logits_jacobian(converted, x, device="cpu", dtype=torch.float64))
    loop_count = min(len(x), 100)
    loop_time, _ = timed(lambda: [torch.autograd.functional.jacobian(lambda v: module(v.unsqueeze(0))[0], xi)
                                  for xi in x[:loop_count]])
    report["times"]["jacobian_x"] = jac_time / base
    report["times"]["jacobian_vs_loop_speedup"] = (loop_time / loop_count * len(x)) / jac_time
    family_is_pl = all(s.kind in ("relu", "max_pool", "leaky_relu", "prelu", "abs", "clip")
                       for s in converted.logit_sites)
    network = BoundNetwork.from_model(converted)
    clean = loss_values(module(x), y, "margin").detach()
    for norm, budgets in BUDGETS.items():
        cells = None
        if family_is_pl:
            cell_time, cells = timed(lambda: cell_analysis(converted, x, y, norm, box=(0.0, 1.0), device="cpu"))
            report["times"][f"cells_{norm}_x"] = cell_time / base
            report[f"median_cell_radius_{norm}"] = float(cells.radius.median())
        lipschitz = global_lipschitz(normalize_model(loaded.proto), norm).loss_constant("margin")
        rows = []
        for budget in budgets:
            bound_time, bounds = timed(lambda: margin_bounds(network, x, y, budget, norm, box=(0.0, 1.0), device="cpu"))
            slope_time, slopes = timed(lambda: slope_bounds(network, x, y, budget, norm, box=(0.0, 1.0), device="cpu"))
            attack = pgd_margin(module, x, y, budget, norm)
            gain = float((attack - clean).mean())
            routes = {
                "linear": float((bounds.worst_margin - clean).mean()),
                "jacobian": float((slopes.loss_slope * budget).mean()),
                "global": lipschitz * budget,
            }
            row = {"budget": budget, "pgd_gain": gain, "bound_time_x": bound_time / base,
                   "slope_time_x": slope_time / base,
                   "excess_ratio": {k: (v / gain if gain > 0 else None) for k, v in routes.items()}}
            if cells is not None:
                inside = cells.radius >= budget
                growth = cells.margin_growth(torch.full((len(x), 1), budget, dtype=torch.float64))[:, 0]
                attack_inside = float((attack - clean)[inside].mean()) if inside.any() else 0.0
                row["cell_fraction_exact"] = float(inside.double().mean())
                row["excess_ratio"]["cell_lp"] = (float(growth[inside].mean()) / attack_inside
                                                  if inside.any() and attack_inside > 0 else None)
            rows.append(row)
        report["tightness"][norm] = rows
    return report


def main_certify(argv: list[str]) -> int:
    """`bench.py certify`: certificates vs attacks, Markdown on stdout, JSON to --out."""
    from bench_certify import bench_certify, markdown

    parser = argparse.ArgumentParser(description="certificates vs attacks on the audit budgets")
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--models", default="mlp_relu")
    parser.add_argument("--p", type=float, default=2.0)
    parser.add_argument("--norm", default="inf")
    parser.add_argument("--loss", default="ce")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    results = [bench_certify(name, args.samples, args.p, args.norm, args.loss) for name in args.models.split(",")]
    for result in results:
        print(markdown(result) + "\n")
    if args.out:
        args.out.write_text(json.dumps({"torch_threads": torch.get_num_threads(), "results": results}, indent=2,
                                       default=float) + "\n")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and print (and optionally save) a JSON report."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["certify"]:
        return main_certify(argv[1:])
    if argv[:1] == ["resnet"]:
        from bench_resnet import main as main_resnet
        return main_resnet(argv[1:])
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=1000)
    parser.add_argument("--models", default="mlp_relu,cnn")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    results = [bench_model(name, args.samples) for name in args.models.split(",")]
    text = json.dumps({"torch_threads": torch.get_num_threads(), "results": results}, indent=2)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
