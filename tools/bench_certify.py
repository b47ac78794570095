"""Benchmark of `certify` and the attacks on the digits models (issues 4 and 5; not a test).

Per model and budget: clean risk, each attack's risk / accuracy / time, the certificate, the
global bound, the excess ratio `(certificate − clean) / (best attack − clean)` (1 = tight), the
certified accuracy, exactness; and the speed of `certify` as a multiple of one batched
forward+backward pass and of the PGD attack on the same budgets. Run through `tools/bench.py
certify` (see there for options).
"""

from __future__ import annotations

import math
import time

import numpy as np
import torch
from digits_models import input_shape, load_digits_split

from verifier.attacks import attack
from verifier.certify.certificate import certify
from verifier.convert import convert_model
from verifier.jacobian import prepared_module
from verifier.losses import loss_values
from verifier.onnx_io import load_model

AUDIT_DELTAS = (1 / 255, 2 / 255, 4 / 255, 8 / 255)
METHODS = ("wdapp", "wda", "pgd", "wpgd", "wda-curve")


def _samples(name: str, count: int) -> tuple[np.ndarray, np.ndarray]:
    x_train, y_train, x_test, y_test = load_digits_split()
    x = np.concatenate([x_test, x_train])[:count].reshape(-1, *input_shape(name))
    return x, np.concatenate([y_test, y_train])[:count]


def _forward_backward_seconds(converted, x: np.ndarray, y: np.ndarray, loss: str) -> float:
    module = prepared_module(converted, "cpu", torch.float32)
    inputs, labels = torch.from_numpy(x), torch.from_numpy(y)

    def once() -> None:
        point = inputs.clone().requires_grad_(True)
        loss_values(module(point), labels, loss).sum().backward()

    once()
    best = math.inf
    for _ in range(5):
        start = time.perf_counter()
        once()
        best = min(best, time.perf_counter() - start)
    return best


def bench_certify(name: str, samples: int, p: float, norm: str, loss: str,
                  deltas: tuple[float, ...] = AUDIT_DELTAS, methods: tuple[str, ...] = METHODS) -> dict:
    """Certificates against every attack on one model and threat model."""
    loaded = load_model(f"models/digits_{name}.onnx")
    converted = convert_model(loaded)
    x, y = _samples(name, samples)
    base = _forward_backward_seconds(converted, x, y, loss if loss != "zero_one" else "margin")
    start = time.perf_counter()
    certificate = certify(converted, x, y, list(deltas), p=p, norm=norm, loss=loss, box=(0.0, 1.0))
    certify_seconds = time.perf_counter() - start
    attacks = {}
    for method in methods:
        if method == "wpgd" and p == 1:
            continue
        began = time.perf_counter()
        report = attack(converted, loaded, x, y, [method], list(deltas), p=p, norm=norm, loss=loss,
                        box=(0.0, 1.0), seed=0, device="cpu")
        attacks[method] = {"seconds": time.perf_counter() - began, "results": report.results}
    rows = []
    for index, row in enumerate(certificate.results):
        per_method = {m: {"risk": a["results"][index].risk, "accuracy": a["results"][index].robust_accuracy}
                      for m, a in attacks.items()}
        best = max(v["risk"] for v in per_method.values())
        gain = best - row.clean_risk
        rows.append({
            "delta": row.delta, "clean": row.clean_risk, "attacks": per_method, "best_attack": best,
            "realised": row.realised_risk, "certificate": row.certificate, "global": row.global_bound,
            "excess_ratio": None if row.certificate is None or gain <= 1e-12 else (row.certificate - row.clean_risk) / gain,
            "certified_accuracy": row.certified_accuracy,
            "best_attack_accuracy": min(v["accuracy"] for v in per_method.values()), "exact": row.exact,
        })
    pgd_seconds = attacks.get("pgd", {}).get("seconds")
    return {
        "model": name, "samples": len(x), "p": p, "norm": norm, "loss": loss,
        "forward_backward_s": base, "certify_s": certify_seconds,
        "certify_over_forward_backward": certify_seconds / base,
        "certify_over_pgd": None if not pgd_seconds else certify_seconds / pgd_seconds,
        "attack_seconds": {m: a["seconds"] for m, a in attacks.items()},
        "exact_up_to_delta": certificate.exact_up_to_delta, "rows": rows,
    }


def markdown(result: dict) -> str:
    """One table per run, ready for docs/benchmarks.md."""
    p = "∞" if math.isinf(result["p"]) else f"{result['p']:g}"
    lines = [f"#### {result['model']}, N = {result['samples']}, W_{p}, ℓ{result['norm']}, {result['loss']} "
             f"(certify {result['certify_s']:.1f} s = {result['certify_over_forward_backward']:.0f}× fwd+bwd"
             + (f", {result['certify_over_pgd']:.1f}× PGD" if result["certify_over_pgd"] else "") + ")", "",
             "| delta | clean | " + " | ".join(result["attack_seconds"]) + " | certificate | global | excess ratio "
             "| certified acc. | attacked acc. | exact |",
             "|" + "---|" * (9 + len(result["attack_seconds"]))]
    for row in result["rows"]:
        cells = [f"{row['delta']:.4g}", f"{row['clean']:.4g}"]
        cells += [f"{row['attacks'][m]['risk']:.4g}" for m in result["attack_seconds"]]
        ratio = "–" if row["excess_ratio"] is None else f"{row['excess_ratio']:.2f}"
        global_bound = "–" if row["global"] is None else f"{row['global']:.4g}"
        cells += [f"{row['certificate']:.4g}", global_bound, ratio, f"{row['certified_accuracy']:.1%}",
                  f"{row['best_attack_accuracy']:.1%}", "yes" if row["exact"] else "no"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", attack_table(result)]
    return "\n".join(lines)


def attack_table(result: dict) -> str:
    """Distributional robust accuracy per attack and budget, strength vs W-PGD, time vs PGD."""
    methods = list(result["attack_seconds"])
    lines = ["| delta | " + " | ".join(f"{m} acc." for m in methods) + " |", "|" + "---|" * (1 + len(methods))]
    for row in result["rows"]:
        lines.append(f"| {row['delta']:.4g} | " + " | ".join(f"{row['attacks'][m]['accuracy']:.1%}" for m in methods)
                     + " |")
    seconds = result["attack_seconds"]
    pgd = seconds.get("pgd")
    timing = ", ".join(f"{m} {s:.1f} s" + (f" ({s / pgd:.1f}× PGD)" if pgd else "") for m, s in seconds.items())
    lines += ["", f"Attack times over all budgets: {timing}."]
    if "wpgd" in seconds:
        gains = {m: [row["attacks"][m]["risk"] - row["clean"] for row in result["rows"]] for m in methods}
        ratios = []
        for m in methods:
            paired = [a / b for a, b in zip(gains[m], gains["wpgd"]) if b > 1e-12]
            if paired:
                ratios.append(f"{m} {min(paired):.2f}–{max(paired):.2f}")
        lines.append("Strength vs W-PGD (risk gain over clean, ratio per budget): " + ", ".join(ratios) + ".")
    return "\n".join(lines)
