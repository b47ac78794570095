"""Train the digits example models, export them to ONNX and write ``models/``.

This script owns the contents of ``models/``: ``digits_<name>.onnx`` for every model in
``digits_models.NAMES`` (dynamo exporter, opset 18, dynamic batch axis, BatchNormalization
kept in the CNN), the test split as ``digits_test.npz`` (flat, (360, 64)) and
``digits_test_image.npz`` ((360, 1, 8, 8), for the CNN), and ``README.md`` describing them.
Every export is checked with ``onnx.checker`` and against onnxruntime.  The run is
deterministic (fixed seeds, deterministic algorithms, one intra-op thread).

Usage: ``.venv/bin/python tools/make_models.py [--out DIR] [--quick]``
"""

from __future__ import annotations

import argparse
import collections
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
import digits_models as dm  # noqa: E402

SEED = 0
OPSET = 18
TOLERANCE = 1e-5
REPO_ROOT = Path(__file__).resolve().parent.parent

ARCHITECTURE = {
    "mlp_relu": "MLP 64-64-32-10 (Gemm)",
    "mlp_gelu": "MLP 64-64-32-10 (Gemm)",
    "mlp_silu": "MLP 64-64-32-10 (Gemm)",
    "cnn": "CNN conv8-BN-pool, conv16-BN-pool, linear 64-10",
    "transformer": "1-block pre-norm transformer, 8 tokens x 8, d=16, 2 heads, MLP 16-32-16",
}
ACTIVATIONS = {
    "mlp_relu": "ReLU",
    "mlp_gelu": "GELU (erf)",
    "mlp_silu": "SiLU",
    "cnn": "ReLU, MaxPool",
    "transformer": "Softmax, GELU (erf), LayerNorm",
}
# (epochs, learning rate) per model for the full run.
SCHEDULE = {
    "mlp_relu": (100, 3e-3),
    "mlp_gelu": (100, 3e-3),
    "mlp_silu": (100, 3e-3),
    "cnn": (100, 3e-3),
    "transformer": (200, 3e-3),
}
QUICK_EPOCHS = 3
BATCH_SIZE = 64


@dataclass
class Result:
    """What the README records about one exported model."""

    name: str
    file: str
    params: int
    torch_accuracy: float
    onnx_accuracy: float
    max_abs_diff: float
    size_bytes: int
    ops: dict[str, int] = field(default_factory=dict)


def log(message: str) -> None:
    """Print a progress line to stderr."""
    print(message, file=sys.stderr, flush=True)


def set_determinism(seed: int) -> None:
    """Seed torch and numpy and switch torch to deterministic, single-threaded kernels."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)


def train(name: str, x: np.ndarray, y: np.ndarray, epochs: int, lr: float, seed: int) -> nn.Module:
    """Build model ``name`` and train it with Adam on minibatches of (x, y); return it in eval mode."""
    torch.manual_seed(seed)
    model = dm.build(name)
    xt = torch.from_numpy(x).reshape(-1, *dm.input_shape(name))
    yt = torch.from_numpy(y)
    optimiser = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=1e-4)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, T_max=max(epochs, 1))
    # Label smoothing keeps the logits moderate (max |logit| about 5 on the test set), which keeps
    # float32 rounding differences between torch and onnxruntime far below the tolerance.
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(yt), generator=generator)
        total = 0.0
        for start in range(0, len(yt), BATCH_SIZE):
            idx = perm[start : start + BATCH_SIZE]
            optimiser.zero_grad()
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            optimiser.step()
            total += loss.item() * len(idx)
        scheduler.step()
        if epoch == epochs - 1 or (epoch + 1) % 50 == 0:
            log(f"  {name}: epoch {epoch + 1}/{epochs} train loss {total / len(yt):.4f}")
    return model.eval()


def check_export(
    path: Path, model: nn.Module, name: str, x: np.ndarray, y: np.ndarray
) -> tuple[float, float, float, dict[str, int]]:
    """Check ``path`` with onnx.checker and onnxruntime; return (torch acc, onnx acc, max diff, op histogram)."""
    import onnx
    import onnxruntime as ort

    proto = onnx.load(str(path))
    onnx.checker.check_model(proto, full_check=True)
    ops = dict(sorted(collections.Counter(n.op_type for n in proto.graph.node).items()))
    if name == "cnn" and ops.get("BatchNormalization", 0) != 2:
        raise RuntimeError(f"{path}: expected 2 BatchNormalization nodes, found ops {ops}")
    if [i.name for i in proto.graph.input] != ["input"] or [o.name for o in proto.graph.output] != ["logits"]:
        raise RuntimeError(f"{path}: unexpected input/output names")

    xs = x.reshape(-1, *dm.input_shape(name))
    with torch.no_grad():
        ref = model(torch.from_numpy(xs)).numpy()
    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.intra_op_num_threads = 1
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    out = session.run(None, {"input": xs})[0]
    single = session.run(None, {"input": xs[:1]})[0]  # the batch axis really is dynamic
    diff = float(max(np.abs(out - ref).max(), np.abs(single - ref[:1]).max()))
    if not diff < TOLERANCE:
        raise RuntimeError(f"{path}: onnxruntime differs from torch by {diff:.3g} >= {TOLERANCE}")
    log(f"  max |logit| {np.abs(ref).max():.2f}")
    torch_acc = float((ref.argmax(1) == y).mean())
    onnx_acc = float((out.argmax(1) == y).mean())
    return torch_acc, onnx_acc, diff, ops


def write_readme(out: Path, results: list[Result], quick: bool) -> None:
    """Write ``out/README.md`` describing the produced files."""
    lines = [
        "# Example models: scikit-learn digits",
        "",
        "Small classifiers for scikit-learn's bundled digits data set (8x8 grey-scale images,",
        "10 classes; pixels scaled to [0, 1] by dividing by 16), trained with",
        "`tools/make_models.py` and exported with torch's dynamo (torch.export-based) ONNX",
        f"exporter at opset {OPSET}. Architectures live in `tools/digits_models.py`.",
        "",
    ]
    if quick:
        lines += ["**These files come from a `--quick` smoke run (a few epochs): accuracies are low.**", ""]
    lines += [
        "| file | architecture | activation(s) | exporter + opset | parameters | test accuracy | size (KB) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| `{r.file}` | {ARCHITECTURE[r.name]} | {ACTIVATIONS[r.name]} | dynamo, opset {OPSET} "
            f"| {r.params:,} | {100 * r.onnx_accuracy:.2f}% | {r.size_bytes / 1024:.1f} |"
        )
    lines += [
        "",
        "Every model has one input `input` (float32) and one output `logits` (float32, shape",
        "`[batch, 10]`); axis 0 (`batch`) is dynamic. The MLPs and the transformer take",
        "`[batch, 64]` (the image flattened row by row); the CNN takes `[batch, 1, 8, 8]`.",
        "Parameters count trainable torch parameters (the CNN's BatchNorm running statistics",
        "are extra initializers). Test accuracy is measured with onnxruntime on the 360 test",
        f"images; onnxruntime matches torch to < {TOLERANCE:g} (max abs difference on the logits).",
        "",
        "Graph notes:",
        "",
        "- All constants are initializers (no `Constant` nodes). The MLPs and the transformer",
        "  use the exporter's default `optimize=True`.",
        "- GELU (erf form) appears decomposed at opset 18: `Div(x, sqrt 2) -> Erf -> Add 1",
        "  -> Mul 0.5 -> Mul x` (a single `Gelu` op only appears from opset 20 on).",
        "- The CNN keeps its two `BatchNormalization` nodes (not folded into the convolutions):",
        "  it is exported with `optimize=False`, then only the Flatten is simplified to a",
        "  `Reshape` with the constant target `[-1, 64]` and constants lifted to initializers.",
        "- The transformer's attention is written by hand (q/k/v Linear, Reshape/Transpose into",
        "  2 heads, MatMul, scale `Mul`, Softmax); Linear layers on `[batch, 8, 16]` tensors are",
        "  `MatMul` (pre-transposed weight initializer) + `Add` bias, only the head is a `Gemm`.",
        "  Its `Reshape`s have constant targets with -1 in the batch position and `allowzero=1`.",
        "  Mean pooling over tokens is `ReduceSum` (axes `[1]`, keepdims 0) followed by `Mul 1/8`.",
        "- The exporter's per-node Python stack traces (absolute paths) are stripped; the other",
        "  node metadata (module namespace, FX node) is kept.",
        "",
        "## ONNX op types",
        "",
        "| file | ops (count) |",
        "|---|---|",
    ]
    for r in results:
        lines.append(f"| `{r.file}` | " + ", ".join(f"{op} {n}" for op, n in r.ops.items()) + " |")
    lines += [
        "",
        "## Test data",
        "",
        "- `digits_test.npz`: `x` float32 `(360, 64)` in [0, 1], `y` int64 `(360,)` labels.",
        "- `digits_test_image.npz`: the same samples with `x` shaped `(360, 1, 8, 8)` for the CNN.",
        "",
        "The split is a seeded permutation (seed 0) of the 1797 samples: 360 test, 1437 train.",
        "",
        "## Regenerating",
        "",
        "```",
        ".venv/bin/python tools/make_models.py            # writes models/",
        ".venv/bin/python tools/make_models.py --quick    # few epochs, smoke test",
        ".venv/bin/python tools/make_models.py --out DIR  # somewhere else",
        "```",
        "",
        "Training is deterministic (fixed seeds, `torch.use_deterministic_algorithms`, one",
        "thread), so rerunning with the same torch/onnxscript versions reproduces the files.",
        "",
    ]
    (out / "README.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    """Train, export, check and describe all digits models; return the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "models", help="output folder (default: models/)")
    parser.add_argument("--quick", action="store_true", help=f"train {QUICK_EPOCHS} epochs only (smoke test)")
    args = parser.parse_args(argv)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    set_determinism(SEED)
    started = time.time()

    x_train, y_train, x_test, y_test = dm.load_digits_split(SEED)
    log(f"digits: {len(y_train)} train, {len(y_test)} test samples -> {out}")
    np.savez(out / "digits_test.npz", x=x_test, y=y_test)
    np.savez(out / "digits_test_image.npz", x=x_test.reshape(-1, 1, 8, 8), y=y_test)

    results: list[Result] = []
    for index, name in enumerate(dm.NAMES):
        epochs, lr = SCHEDULE[name]
        if args.quick:
            epochs = QUICK_EPOCHS
        t0 = time.time()
        model = train(name, x_train, y_train, epochs, lr, SEED + index)
        path = out / f"digits_{name}.onnx"
        dm.export_onnx(model, name, path, opset=OPSET, dynamo=True, batch=None)
        torch_acc, onnx_acc, diff, ops = check_export(path, model, name, x_test, y_test)
        params = sum(p.numel() for p in model.parameters())
        size = path.stat().st_size
        log(
            f"{name}: {params} params, test accuracy torch {100 * torch_acc:.2f}% / onnxruntime "
            f"{100 * onnx_acc:.2f}%, max abs diff {diff:.2e}, {size / 1024:.1f} KB, "
            f"{time.time() - t0:.1f}s"
        )
        log(f"  ops: {ops}")
        results.append(Result(name, path.name, params, torch_acc, onnx_acc, diff, size, ops))

    write_readme(out, results, args.quick)
    log(f"wrote {len(results)} models, 2 npz files and README.md in {time.time() - started:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
