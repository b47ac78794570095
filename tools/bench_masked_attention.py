"""Causal-masked attention (not a test): margin bounds of torch's nn.TransformerEncoderLayer with a
constant `src_mask`, against sign-PGD plus sampling, at ℓ∞ 1/255 and 4/255 ∩ [-1, 1].

The models are those of tests/test_batch_axis.py (seeded weights, 3 tokens x 2 features, d = 8,
2 heads), exported by both torch exporters; 16 samples uniform in [-1, 1]. One Markdown row per
model and radius: mean bound − clean margin, mean attack − clean margin, their ratio, whether the
attack stays below the bound everywhere, the whole-box bound's excess, and the bound's wall time.
Usage: .venv/bin/python tools/bench_masked_attention.py
"""

from __future__ import annotations

import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from test_batch_axis import _EncoderModel  # noqa: E402
from test_decompose import _attacked, _export  # noqa: E402

from verifier.bounds.margins import margin_bounds  # noqa: E402
from verifier.bounds.network import BoundNetwork  # noqa: E402
from verifier.convert import convert_model  # noqa: E402
from verifier.losses import loss_values  # noqa: E402
from verifier.onnx_io import load_model  # noqa: E402

MODELS = [("legacy-relu-causal", False, "relu", False), ("legacy-gelu-normfirst-causal", False, "gelu", True),
          ("dynamo-gelu-causal", True, "gelu", False)]


def main() -> int:
    torch.set_num_threads(1)
    print("| model | radius | bound − clean | attack − clean | ratio | attack ≤ bound | whole box − clean | bound s |")
    print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as folder:
        for name, dynamo, activation, norm_first in MODELS:
            torch.manual_seed(0)
            path = str(Path(folder) / f"{name}.onnx")
            _export(_EncoderModel(activation, norm_first, causal=True).eval(), 6, path, dynamo)
            converted = convert_model(load_model(path))
            network = BoundNetwork.from_model(converted)
            module = converted.logits_module.double()
            x = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, size=(16, 6)))
            y = module(x).argmax(1)
            clean = loss_values(module(x), y, "margin").detach()
            whole = margin_bounds(network, x, y, math.inf, "inf", box=(-1.0, 1.0), device="cpu").worst_margin
            for radius in (1 / 255, 4 / 255):
                began = time.perf_counter()
                bound = margin_bounds(network, x, y, radius, "inf", box=(-1.0, 1.0), device="cpu").worst_margin
                seconds = time.perf_counter() - began
                found = _attacked(module, x, y, radius, box=(-1.0, 1.0))
                excess, reached = float((bound - clean).mean()), float((found - clean).mean())
                print(f"| {name} | {round(radius * 255)}/255 | {excess:.6f} | {reached:.6f} | {excess / reached:.3f} | "
                      f"{bool((found <= bound + 1e-9).all())} | {float((whole - clean).mean()):.3f} | {seconds:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
