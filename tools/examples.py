"""Write the files of the README's interface examples, so that those commands run as written.

    .venv/bin/python tools/examples.py DIR      # then, in DIR, the README's commands

Writes, all small and seeded:
- `logreg.onnx` + `digits.npz`: scikit-learn's `LogisticRegression` on the bundled digits
  (pixels / 16 in [0, 1]), exported by `skl2onnx.to_onnx(model, x[:1])`; the data is 64 held-out
  digits with their true labels;
- `columns.onnx` + `wine.npz`: scikit-learn's `Pipeline(ColumnTransformer(StandardScaler |
  OneHotEncoder), LogisticRegression)` on the bundled wine data, exported by skl2onnx with one
  input per column group, `numeric` (float32, 11 measurements in [0, 1]) and `categorical`
  (int64, 2 binned measurements: tools/corpus_sklearn.py says how); the data is the 48
  held-out rows with their true labels (npz keys `numeric`, `categorical`, `y`);
- `two.onnx` + `two.npz`: a two-input MLP, `a` (N, 4) and `b` (N, 3) concatenated -> Gemm ->
  Relu -> Gemm -> 3 logits; npz keys `a`, `b`, `y` (labels: the model's own argmax);
- `text.onnx` + `ids.npz`: a text classifier on int64 token ids (N, 6): embedding `Gather` (its
  output is the tensor `emb`) -> mean over the tokens -> Gemm -> 3 logits; npz key `x` = the ids;
- `net.onnx` + `prop.vnnlib`: a 2-16-16-3 ReLU net on (1, 2) and a VNN-COMP local-robustness
  property (an l-inf box of radius 0.02 around a correctly classified point: class 0 must stay
  the top logit).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


def _save(path: Path, nodes: list, inputs: list, outputs: list, weights: dict[str, np.ndarray]) -> None:
    graph = helper.make_graph(nodes, path.stem, inputs, outputs,
                              [numpy_helper.from_array(v, k) for k, v in weights.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))


def _run(path: Path, feeds: dict[str, np.ndarray]) -> np.ndarray:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def write_logreg(folder: Path) -> None:
    """`logreg.onnx`, `digits.npz` (64 held-out digits, true labels)."""
    import skl2onnx
    from sklearn.datasets import load_digits
    from sklearn.linear_model import LogisticRegression

    digits = load_digits()
    x, y = (digits.data / 16.0).astype(np.float32), digits.target.astype(np.int64)
    model = LogisticRegression(max_iter=2000).fit(x[:1500], y[:1500])
    onnx.save(skl2onnx.to_onnx(model, x[:1], target_opset=OPSET), str(folder / "logreg.onnx"))
    np.savez(folder / "digits.npz", x=x[1500:1564], y=y[1500:1564])


def write_columns(folder: Path) -> None:
    """`columns.onnx` (inputs numeric, categorical), `wine.npz` (the held-out rows, true labels)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from corpus_sklearn import WINE_TRAIN_ROWS, columns_holdout, export_sklearn

    export_sklearn("skl-columns-logreg", folder / "columns.onnx")
    inputs, y = columns_holdout(178 - WINE_TRAIN_ROWS)
    np.savez(folder / "wine.npz", **inputs, y=y)


def write_two_inputs(folder: Path, rng: np.random.Generator) -> None:
    """`two.onnx` (inputs a, b), `two.npz` (a, b in [0, 1), labels the model's argmax)."""
    nodes = [helper.make_node("Concat", ["a", "b"], ["ab"], axis=1),
             helper.make_node("Gemm", ["ab", "w1", "b1"], ["h"]),
             helper.make_node("Relu", ["h"], ["r"]),
             helper.make_node("Gemm", ["r", "w2", "b2"], ["logits"])]
    weights = {"w1": rng.normal(size=(7, 16)), "b1": rng.normal(size=16) * 0.1,
               "w2": rng.normal(size=(16, 3)), "b2": np.zeros(3)}
    path = folder / "two.onnx"
    _save(path, nodes, [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["N", 4]),
                        helper.make_tensor_value_info("b", TensorProto.FLOAT, ["N", 3])],
          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
          {k: v.astype(np.float32) for k, v in weights.items()})
    a, b = rng.uniform(size=(32, 4)).astype(np.float32), rng.uniform(size=(32, 3)).astype(np.float32)
    np.savez(folder / "two.npz", a=a, b=b, y=_run(path, {"a": a, "b": b}).argmax(1).astype(np.int64))


def write_text(folder: Path, rng: np.random.Generator) -> None:
    """`text.onnx` (int64 ids -> Gather `emb` -> mean -> Gemm), `ids.npz` (x = ids, y)."""
    vocabulary, width = 50, 8
    nodes = [helper.make_node("Gather", ["table", "ids"], ["emb"], axis=0),
             helper.make_node("ReduceMean", ["emb"], ["pooled"], axes=[1], keepdims=0),
             helper.make_node("Gemm", ["pooled", "w", "b"], ["logits"])]
    weights = {"table": rng.normal(size=(vocabulary, width)), "w": rng.normal(size=(width, 3)), "b": np.zeros(3)}
    path = folder / "text.onnx"
    _save(path, nodes, [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N", 6])],
          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])],
          {k: v.astype(np.float32) for k, v in weights.items()})
    ids = rng.integers(0, vocabulary, size=(32, 6)).astype(np.int64)
    np.savez(folder / "ids.npz", x=ids, y=_run(path, {"ids": ids}).argmax(1).astype(np.int64))


def write_vnnlib(folder: Path, rng: np.random.Generator, radius: float = 0.02) -> None:
    """`net.onnx` (1, 2) -> 3 logits and `prop.vnnlib` around a point of class 0."""
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h1"]), helper.make_node("Relu", ["h1"], ["r1"]),
             helper.make_node("Gemm", ["r1", "w2", "b2"], ["h2"]), helper.make_node("Relu", ["h2"], ["r2"]),
             helper.make_node("Gemm", ["r2", "w3", "b3"], ["logits"])]
    weights = {"w1": rng.normal(size=(2, 16)), "b1": rng.normal(size=16) * 0.1, "w2": rng.normal(size=(16, 16)) / 4,
               "b2": np.zeros(16), "w3": rng.normal(size=(16, 3)), "b3": np.zeros(3)}
    path = folder / "net.onnx"
    _save(path, nodes, [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2])],
          [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, 3])],
          {k: v.astype(np.float32) for k, v in weights.items()})
    grid = rng.uniform(-1, 1, size=(400, 2)).astype(np.float32)
    scores = np.concatenate([_run(path, {"x": p[None]}) for p in grid])
    gaps = scores[:, 0] - scores[:, 1:].max(1)
    point = grid[int(gaps.argmax())]  # the clearest class-0 point: robust at this radius
    lines = ["; local robustness: class 0 stays the top logit within l-inf radius %g" % radius]
    lines += [f"(declare-const X_{i} Real)" for i in range(2)] + [f"(declare-const Y_{j} Real)" for j in range(3)]
    for i, value in enumerate(point):
        lines += [f"(assert (>= X_{i} {value - radius:.6f}))", f"(assert (<= X_{i} {value + radius:.6f}))"]
    lines.append("(assert (or (and (>= Y_1 Y_0)) (and (>= Y_2 Y_0))))")  # the negation: some class beats 0
    (folder / "prop.vnnlib").write_text("\n".join(lines) + "\n")


def main(argv: list[str]) -> int:
    """Write every example into the folder given (created when missing)."""
    if len(argv) != 1:
        print(__doc__.strip().splitlines()[2].strip(), file=sys.stderr)
        return 2
    folder = Path(argv[0])
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    write_logreg(folder)
    write_columns(folder)
    write_two_inputs(folder, rng)
    write_text(folder, rng)
    write_vnnlib(folder, rng)
    print(f"wrote logreg.onnx digits.npz columns.onnx wine.npz two.onnx two.npz text.onnx ids.npz net.onnx prop.vnnlib in {folder}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
