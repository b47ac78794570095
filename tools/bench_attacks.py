"""Attack benchmarks (not a test): verifier's point-wise attack against reference AutoAttack, and
the distributional attacks of two verifier checkouts side by side.

    .venv/bin/python tools/bench_attacks.py pointwise --samples 200 --autoattack DIR [--models cnn,...]
    .venv/bin/python tools/bench_attacks.py distributional --samples 200 [--root /work/main] [--norm inf]

`pointwise`: on each shipped model at l_inf {1,2,4,8,16}/255 and l_2 {0.1,0.25,0.5} (box [0, 1],
seed 0, one torch thread): the robust accuracy of the pre-APGD PGD (`steps=50, topk=0,
plain=True`), of today's default `pgd` (APGD-CE + APGD-T), and of AutoAttack's standard version
(APGD-CE, APGD-T, FAB-T, Square), every one re-evaluated in onnxruntime, with wall times.
`DIR` is a folder holding fra31/auto-attack's `autoattack` package; it is imported from there
at bench time only (it is no dependency of verifier). Without `--autoattack` the AutoAttack
columns are left out.
`distributional`: `attack(..., methods=["all"])` at W_2 (CE, box [0, 1]) on the budgets given,
with the verifier package imported from `--root` (default: this checkout), so that two
checkouts can be compared on identical inputs.
Prints one JSON line per measurement (stdout) for the tables in docs/benchmarks.md.
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
SHIPPED = {"mlp_relu": "digits_test.npz", "mlp_gelu": "digits_test.npz", "mlp_silu": "digits_test.npz",
           "cnn": "digits_test_image.npz", "transformer": "digits_test.npz"}
POINTWISE = [("inf", k / 255) for k in (1, 2, 4, 8, 16)] + [("2", e) for e in (0.1, 0.25, 0.5)]


def _load(name: str, samples: int):
    from verifier.convert import convert_model
    from verifier.onnx_io import load_model
    loaded = load_model(ROOT / "models" / f"digits_{name}.onnx")
    data = np.load(ROOT / "models" / SHIPPED[name])
    return loaded, convert_model(loaded), data["x"][:samples], data["y"][:samples]


class _Images(torch.nn.Module):
    """AutoAttack's view of a model: image-shaped inputs (N, 1, 8, 8) reshaped to the model's."""

    def __init__(self, module: torch.nn.Module, shape: tuple[int, ...]) -> None:
        super().__init__()
        self.module, self.shape = module, shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module(x.reshape(len(x), *self.shape))


def _autoattack(folder: str, module, replayer, x: np.ndarray, y: np.ndarray, norm: str, eps: float) -> dict:
    sys.path.insert(0, folder)
    from autoattack import AutoAttack
    images = torch.from_numpy(x).reshape(len(x), 1, 8, 8)
    labels = torch.from_numpy(y)
    runner = AutoAttack(_Images(module, x.shape[1:]).eval(), norm={"inf": "Linf", "2": "L2"}[norm], eps=eps,
                        version="standard", device="cpu", verbose=False, seed=0)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        adversarial = runner.run_standard_evaluation(images, labels, bs=len(x))
    seconds = time.perf_counter() - start
    moved = adversarial.reshape(len(x), -1).double() - images.reshape(len(x), -1).double()
    size = float(torch.linalg.vector_norm(moved, math.inf if norm == "inf" else 2, dim=1).max())
    logits = replayer.logits(adversarial.reshape(x.shape).float())
    accuracy = float((logits.argmax(-1) == labels).double().mean())
    return {"accuracy": accuracy, "seconds": seconds, "largest_move": size}


def pointwise(args) -> None:
    from verifier.attacks import _target
    from verifier.attacks.pgd import PGD
    from verifier.attacks.replay import Replayer, clean_numbers, measure
    from verifier.deadline import NEVER
    device = torch.device("cpu")
    for name in args.models.split(","):
        loaded, model, x, y = _load(name, args.samples)
        replayer = Replayer(loaded, model, device)
        for norm, eps in POINTWISE:
            target = _target(model, x, y, math.inf, norm, "ce", (0.0, 1.0), device, NEVER)
            clean = clean_numbers(target, replayer)
            row = {"model": name, "norm": norm, "eps": eps, "samples": len(x), "clean_accuracy": clean[1]}
            for label, options in (("old_pgd", {"steps": 50, "topk": 0, "plain": True}), ("pgd", {})):
                start = time.perf_counter()
                (dist,) = PGD(target, generator=torch.Generator().manual_seed(0), **options).run([eps])
                result = measure("pgd", eps, dist, target, replayer, clean)
                row[label] = {"accuracy": result.robust_accuracy, "risk": result.risk,
                              "seconds": time.perf_counter() - start, "flags": list(result.flags)}
            if args.autoattack:
                row["autoattack"] = _autoattack(args.autoattack, target.module, replayer, x, y, norm, eps)
            print(json.dumps(row), flush=True)


def distributional(args) -> None:
    from verifier.attacks import attack
    deltas = [float(eval(d, {})) for d in args.deltas.split(",")]  # fractions like 4/255
    for name in args.models.split(","):
        loaded, model, x, y = _load(name, args.samples)
        start = time.perf_counter()
        report = attack(model, loaded, x, y, ["all"], deltas, p=2.0, norm=args.norm, loss="ce", box=(0.0, 1.0))
        total = time.perf_counter() - start
        for r in report.results:
            print(json.dumps({"model": name, "norm": args.norm, "method": r.method, "delta": r.delta,
                              "risk": r.risk, "accuracy": r.robust_accuracy, "clean_risk": r.clean_risk,
                              "seconds": r.seconds, "total_seconds": total, "flags": list(r.flags),
                              "root": str(ROOT)}), flush=True)


def main() -> None:
    global ROOT
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("kind", choices=("pointwise", "distributional"))
    parser.add_argument("--samples", type=int, default=200)
    parser.add_argument("--models", default=",".join(SHIPPED))
    parser.add_argument("--autoattack", default=None, help="folder holding the `autoattack` package")
    parser.add_argument("--root", default=str(ROOT), help="the verifier checkout to import")
    parser.add_argument("--norm", default="inf")
    parser.add_argument("--deltas", default="1/255,2/255,4/255,8/255")
    args = parser.parse_args()
    ROOT = Path(args.root).resolve()
    sys.path.insert(0, str(ROOT))
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")
    (pointwise if args.kind == "pointwise" else distributional)(args)


if __name__ == "__main__":
    main()
