"""Fuzz the `verifier` CLI with mutated models and data archives; count the outcomes.

    python tools/fuzz.py --cases 300 --seed 0          # prints a table; --json for the counts

Each case mutates a small seed model (a 16-8-3 ReLU MLP built here) or its data archive in one
way (bit flips, truncation, NaN/Inf/huge constants, degenerate shapes, opsets, op types, odd
node names, external data, archive damage, dtypes, labels) and runs one command in-process.
A case passes when the exit code is 0, 1, 2 or 3; on 2, stderr is exactly one line starting
`verifier: error:`; no traceback ever reaches stderr; stdout never holds a NaN; and a command
that exits 2 writes no file. tests/test_fuzz.py runs a few seeded cases of the same harness;
docs/reliability.md records a long run.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import random
import sys
import tempfile
import time
import zipfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

COMMANDS = ("inspect", "validate", "certify", "attack", "audit")
ALLOWED_EXITS = frozenset({0, 1, 2, 3})


def seed_model(rng: np.random.Generator) -> onnx.ModelProto:
    """A 16-8-3 ReLU MLP (Gemm, Relu, Gemm) with a dynamic batch, opset 17."""
    w1, w2 = rng.normal(size=(8, 16)).astype(np.float32), rng.normal(size=(3, 8)).astype(np.float32)
    nodes = [helper.make_node("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1),
             helper.make_node("Relu", ["h"], ["a"], name="relu"),
             helper.make_node("Gemm", ["a", "w2", "b2"], ["logits"], name="fc2", transB=1)]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(np.zeros(8, np.float32), "b1"),
             numpy_helper.from_array(w2, "w2"), numpy_helper.from_array(np.zeros(3, np.float32), "b2")]
    graph = helper.make_graph(nodes, "seed", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 16])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="fuzz")
    model.ir_version = 8
    return model


def seed_data(rng: np.random.Generator, count: int = 6) -> dict[str, np.ndarray]:
    return {"x": rng.random((count, 16)).astype(np.float32), "y": rng.integers(0, 3, count).astype(np.int64)}


# --- model mutations (each returns the bytes of the file to write) --------------------------

def _bytes(model: onnx.ModelProto) -> bytes:
    return model.SerializeToString()


def flip_bits(model, rng, folder):
    raw = bytearray(_bytes(model))
    for _ in range(int(rng.integers(1, 8))):
        raw[int(rng.integers(len(raw)))] ^= 1 << int(rng.integers(8))
    return bytes(raw)


def truncate(model, rng, folder):
    raw = _bytes(model)
    return raw[: int(rng.integers(0, len(raw)))]


def special_constant(model, rng, folder):
    tensor = model.graph.initializer[int(rng.integers(len(model.graph.initializer)))]
    values = numpy_helper.to_array(tensor).copy()
    values.flat[int(rng.integers(values.size))] = rng.choice([np.nan, np.inf, -np.inf, 3e38, -3e38, 1e-45])
    tensor.CopyFrom(numpy_helper.from_array(values, tensor.name))
    return _bytes(model)


def odd_dims(model, rng, folder):
    value = rng.choice([model.graph.input[0], model.graph.output[0]])
    dims = value.type.tensor_type.shape.dim
    dim = dims[int(rng.integers(len(dims)))]
    choice = int(rng.integers(5))
    if choice == 0:
        dim.dim_value = 0
    elif choice == 1:
        dim.dim_value = int(rng.choice([10**10, 10**9, 2**40]))
    elif choice == 2:
        dim.dim_param = "weird dim"
    elif choice == 3:
        dim.Clear()
    else:
        del value.type.tensor_type.shape.dim[-1]
    return _bytes(model)


def opset(model, rng, folder):
    model.opset_import[0].version = int(rng.integers(1, 30))
    model.ir_version = int(rng.integers(1, 13))
    return _bytes(model)


def op_type(model, rng, folder):
    node = model.graph.node[int(rng.integers(len(model.graph.node)))]
    node.op_type = str(rng.choice(["Sigmoid", "Tanh", "Softmax", "LeakyRelu", "Abs", "Neg", "Exp", "Log", "Sqrt",
                                   "Reciprocal", "Floor", "MatMul", "Add", "Mul", "Identity", "NoSuchOp"]))
    if rng.random() < 0.5:
        node.attribute.append(helper.make_attribute("alpha", float(rng.choice([np.nan, -1.0, 1e30]))))
    return _bytes(model)


def drop_nodes(model, rng, folder):
    keep = int(rng.integers(0, len(model.graph.node)))
    del model.graph.node[keep:]
    return _bytes(model)


def node_names(model, rng, folder):
    for node in model.graph.node:
        node.name = str(rng.choice(['a"b', "new\nline", "back\\slash", "", "fc1", "__init__", "é", "1x", "self",
                                    "n0_relu", "class"]))
    return _bytes(model)


def input_dtype(model, rng, folder):
    model.graph.input[0].type.tensor_type.elem_type = int(rng.choice(
        [TensorProto.INT64, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BOOL, TensorProto.STRING]))
    return _bytes(model)


def external(model, rng, folder):
    tensor = model.graph.initializer[int(rng.integers(len(model.graph.initializer)))]
    payload = tensor.raw_data or numpy_helper.to_array(tensor).tobytes()
    name = str(rng.choice(["w.bin", "../w.bin", "/etc/passwd", "model.onnx", "missing.bin", "w.bin\x00x"]))
    if name == "w.bin":
        (folder / "w.bin").write_bytes(payload[: int(rng.integers(0, len(payload) + 1))] if rng.random() < 0.5
                                       else payload)
    tensor.data_location = TensorProto.EXTERNAL
    tensor.ClearField("raw_data")
    del tensor.float_data[:]
    tensor.external_data.add(key="location", value=name)
    if rng.random() < 0.5:
        tensor.external_data.add(key=str(rng.choice(["offset", "length"])),
                                 value=str(rng.choice(["-1", "0", "7", "abc", str(2**62)])))
    return _bytes(model)


MODEL_MUTATIONS: tuple[Callable, ...] = (flip_bits, truncate, special_constant, odd_dims, opset, op_type,
                                         drop_nodes, node_names, input_dtype, external)


# --- data mutations (each returns the bytes of the archive) ---------------------------------

def _archive(arrays: dict) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def data_values(data, rng):
    x = data["x"].astype(rng.choice([np.float64, np.float32, np.float16]))
    x.flat[int(rng.integers(x.size))] = rng.choice([np.nan, np.inf, 1e39, -1e39, 7e4, 1e300])
    return _archive({**data, "x": x})


def data_shapes(data, rng):
    x = data["x"]
    choice = int(rng.integers(6))
    x = [np.float32(1.0), x[:0], x[:, :0], x[..., None], x[:, :5], x.reshape(-1)][choice]
    return _archive({**data, "x": x})


def data_labels(data, rng):
    y = data["y"]
    y = [y + 3, y - 1, y.astype(np.float32), y[:-1], y[:, None], np.array(["a"] * len(y))][int(rng.integers(6))]
    return _archive({**data, "y": y})


def data_keys(data, rng):
    arrays = dict(data)
    arrays.pop(str(rng.choice(["x", "y"])))
    if rng.random() < 0.5:
        arrays["extra"] = np.zeros(3)
    return _archive(arrays)


def data_bytes(data, rng):
    raw = bytearray(_archive(data))
    if rng.random() < 0.5:
        return bytes(raw[: int(rng.integers(len(raw)))])
    for _ in range(int(rng.integers(1, 6))):
        raw[int(rng.integers(len(raw)))] ^= 1 << int(rng.integers(8))
    return bytes(raw)


def data_members(data, rng):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("x.npy", bytes(rng.integers(0, 256, 64, dtype=np.uint8)))
        archive.writestr("y.npy", b"")
    return buffer.getvalue()


DATA_MUTATIONS: tuple[Callable, ...] = (data_values, data_shapes, data_labels, data_keys, data_bytes, data_members)


# --- running one case -------------------------------------------------------------------------

@dataclass(frozen=True)
class Outcome:
    """What one case did and whether it broke a rule (`problem` is None when it passed)."""

    mutation: str
    command: str
    exit_code: int
    problem: str | None
    first_line: str


@contextlib.contextmanager
def captured_output():
    """Capture what Python prints (sys.stdout/sys.stderr, wherever they point) and what native code
    writes to file descriptors 1 and 2 (onnxruntime logs from C++); yields {1: out, 2: err}."""
    saved = {fd: os.dup(fd) for fd in (1, 2)}
    files = {fd: tempfile.TemporaryFile(mode="w+b") for fd in (1, 2)}
    python = {1: io.StringIO(), 2: io.StringIO()}
    texts: dict[int, str] = {}
    sys.stdout.flush(), sys.stderr.flush()
    try:
        for fd, handle in files.items():
            os.dup2(handle.fileno(), fd)
        with contextlib.redirect_stdout(python[1]), contextlib.redirect_stderr(python[2]):
            yield texts
    finally:
        for fd, handle in files.items():
            os.dup2(saved[fd], fd)
            os.close(saved[fd])
            handle.seek(0)
            texts[fd] = python[fd].getvalue() + handle.read().decode("utf-8", "replace")
            handle.close()


def _argv(command: str, model: Path, data: Path, out: Path) -> list[str]:
    budget = ["--delta", "0.01", "--box", "0,1"]
    return {
        "inspect": ["inspect", str(model), "--json"],
        "validate": ["validate", str(model), "--data", str(data), "--json"],
        "certify": ["certify", str(model), "--data", str(data), "--grid-points", "4", "--json", *budget],
        "attack": ["attack", str(model), "--data", str(data), "--method", "pgd", "--steps", "3", "--json", *budget],
        "audit": ["audit", str(model), "--data", str(data), "--attacks", "pgd", "--out",
                  str(out), "--quiet", *budget],
    }[command]


def run_case(seed: int, mutate_data: bool | None = None, command: str | None = None) -> Outcome:
    """Build, mutate and run one case (fully determined by `seed` and the two choices)."""
    from verifier import cli

    rng = np.random.default_rng(seed)
    picker = random.Random(seed)
    mutate_data = picker.random() < 0.4 if mutate_data is None else mutate_data
    command = command or picker.choice(COMMANDS[1:] if mutate_data else COMMANDS)
    with tempfile.TemporaryDirectory(prefix="verifier-fuzz-") as folder_name:
        folder = Path(folder_name)
        model_path, data_path, out = folder / "model.onnx", folder / "data.npz", folder / "report"
        model, data = seed_model(rng), seed_data(rng)
        if mutate_data:
            mutation = picker.choice(DATA_MUTATIONS)
            model_path.write_bytes(_bytes(model))
            data_path.write_bytes(mutation(data, rng))
        else:
            mutation = picker.choice(MODEL_MUTATIONS)
            model_path.write_bytes(mutation(model, rng, folder))
            data_path.write_bytes(_archive(data))
        before = set(folder.rglob("*"))
        with captured_output() as texts:
            try:
                code = cli.main(_argv(command, model_path, data_path, out))
            except SystemExit as stop:  # argparse
                code = int(stop.code or 0)
        written = set(folder.rglob("*")) - before
    err, stdout = texts[2], texts[1]
    lines = [line for line in err.splitlines() if line.strip()]
    problem = None
    if code not in ALLOWED_EXITS:
        problem = f"exit {code}"
    elif "Traceback" in err:
        problem = "traceback on stderr"
    elif code == 2 and (len(lines) != 1 or not lines[0].startswith("verifier: error: ")):
        problem = f"exit 2 with {len(lines)} stderr line(s)"
    elif code == 2 and written:
        problem = f"exit 2 but wrote {sorted(p.name for p in written)}"
    elif _nan_in(stdout):
        problem = "NaN in stdout"
    return Outcome(mutation.__name__, command, code, problem, lines[0][:300] if lines else "")


def _nan_in(stdout: str) -> bool:
    """Whether a number in the JSON on stdout is NaN (an error object's message may say "NaN")."""
    try:
        payload = json.loads(stdout) if stdout.strip() else {}
    except json.JSONDecodeError:
        return "NaN" in stdout
    if isinstance(payload, dict) and "error" in payload:
        return False
    return "NaN" in json.dumps(payload)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(1)
    began = time.monotonic()
    outcomes = [run_case(args.seed * 1_000_003 + k) for k in range(args.cases)]
    seconds = time.monotonic() - began
    counts = Counter((o.mutation, o.exit_code) for o in outcomes)
    problems = [o for o in outcomes if o.problem]
    if args.json:
        print(json.dumps({"cases": len(outcomes), "seconds": round(seconds, 1),
                          "exits": dict(Counter(str(o.exit_code) for o in outcomes)),
                          "by_mutation": {f"{m} exit {c}": n for (m, c), n in sorted(counts.items())},
                          "problems": [o.__dict__ for o in problems]}, indent=2))
    else:
        print(f"{len(outcomes)} cases in {seconds:.0f} s; exits {dict(sorted(Counter(o.exit_code for o in outcomes).items()))}")
        for (mutation, code), count in sorted(counts.items()):
            print(f"  {mutation:<18} exit {code}: {count}")
        for outcome in problems:
            print(f"PROBLEM {outcome.mutation} {outcome.command}: {outcome.problem}: {outcome.first_line}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
