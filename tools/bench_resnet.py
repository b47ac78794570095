"""One-sample CROWN margin bound on a ResNet (not a test): wall time per radius, optionally profiled.

    .venv/bin/python tools/bench.py resnet [--model /work/corpus-cache/vnncomp2021/resnet_4b.onnx]
                                          [--radii 1/255,2/255] [--seed 0] [--profile cprofile|torch]

The issue-10 measurement: one uniform [0, 1] sample (seeded), its predicted class as the label,
`margin_bounds(..., tighten=True)` in the l_inf ball intersected with the box [0, 1], float64 on
the CPU, one bound per radius (the first includes warm-up). Prints one JSON line per radius
(wall and process CPU seconds, worst margin, the upper bounds) and, with `--profile`, the profile's top entries.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import sys
import time
import warnings
from fractions import Fraction
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from verifier.bounds.margins import margin_bounds  # noqa: E402
from verifier.bounds.network import BoundNetwork  # noqa: E402
from verifier.convert import convert_model  # noqa: E402
from verifier.onnx_io import load_model  # noqa: E402

DEFAULT_MODEL = Path("/work/corpus-cache/vnncomp2021/resnet_4b.onnx")


def bench_resnet(model: Path, radii: list[float], seed: int, shape: tuple[int, ...] | None = None,
                 profile: str | None = None, top: int = 25) -> dict:
    """Time one margin bound per radius on one sample; with `profile`, the top entries as text."""
    network = BoundNetwork.from_model(convert_model(load_model(model)), torch.float64, "cpu")
    shape = shape or (3, 32, 32)
    x = torch.rand((1, *shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    with torch.no_grad():
        y = network.evaluate(x).argmax(1)
    rows, report = [], ""
    profiler = cProfile.Profile() if profile == "cprofile" else None
    tracer = torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], record_shapes=True) \
        if profile == "torch" else None
    if tracer is not None:
        tracer.__enter__()
    for radius in radii:
        if profiler is not None:
            profiler.enable()
        start, cpu_start = time.perf_counter(), time.process_time()
        bounds = margin_bounds(network, x, y, radius, "inf", box=(0.0, 1.0), device="cpu", tighten=True)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        if profiler is not None:
            profiler.disable()
        rows.append({"radius": radius, "seconds": round(seconds, 3), "cpu_seconds": round(cpu_seconds, 3),
                     "worst_margin": float(bounds.worst_margin[0]),
                     "upper": [float(v) for v in bounds.upper[0]]})
    if profiler is not None:
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(top)
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(top)
        report = text.getvalue()
    if tracer is not None:
        tracer.__exit__(None, None, None)
        report = tracer.key_averages(group_by_input_shape=True).table(sort_by="self_cpu_time_total", row_limit=top)
    return {"model": str(model), "label": int(y[0]), "torch_threads": torch.get_num_threads(), "rows": rows,
            "profile": report}


def main(argv: list[str]) -> int:
    """`bench.py resnet`: one JSON line per radius, then the profile (if asked)."""
    parser = argparse.ArgumentParser(description="one-sample CROWN margin bound on a ResNet, per radius")
    parser.add_argument("--model", type=Path, default=DEFAULT_MODEL)
    parser.add_argument("--radii", default="1/255,2/255")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shape", default="3,32,32", help="per-sample input shape, comma-separated")
    parser.add_argument("--profile", choices=["cprofile", "torch"])
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)
    warnings.filterwarnings("ignore")
    radii = [float(Fraction(r)) for r in args.radii.split(",")]
    shape = tuple(int(s) for s in args.shape.split(","))
    result = bench_resnet(args.model, radii, args.seed, shape, args.profile, args.top)
    for row in result["rows"]:
        print(json.dumps({"model": result["model"], "label": result["label"], "threads": result["torch_threads"],
                          **row}))
    if result["profile"]:
        print(result["profile"])
    return 0
