"""Small torch models for scikit-learn's bundled digits data set, and their ONNX export.

This module owns the model zoo used to produce the example networks in ``models/``:
the architectures (three MLPs, a small CNN with BatchNorm, a one-block transformer),
the deterministic digits train/test split, and a thin wrapper around
``torch.onnx.export`` that works with both the dynamo (default) and the legacy
TorchScript exporter at opsets 17, 18 and 20.  Nothing here downloads anything:
the digits data (8x8 images, 10 classes, 1797 samples) ships with scikit-learn.
"""

from __future__ import annotations

import contextlib
import io
import logging
import math
import os
import warnings
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    import onnx_ir

NAMES: tuple[str, ...] = ("mlp_relu", "mlp_gelu", "mlp_silu", "cnn", "transformer")
"""Model names accepted by :func:`build` and :func:`input_shape`."""

N_TEST = 360
"""Number of samples in the test split (the remaining 1437 are for training)."""


def _activation(name: str) -> nn.Module:
    """Return a fresh activation module for ``name`` ("relu", "gelu" (erf form) or "silu")."""
    if name == "relu":
        return nn.ReLU()
    if name == "gelu":
        return nn.GELU(approximate="none")
    if name == "silu":
        return nn.SiLU()
    raise ValueError(f"unknown activation {name!r}; expected relu, gelu or silu")


class MLP(nn.Module):
    """Fully connected 64 -> 64 -> 32 -> 10 network on flattened 8x8 images."""

    def __init__(self, activation: str = "relu") -> None:
        super().__init__()
        self.activation = activation
        self.net = nn.Sequential(
            nn.Linear(64, 64),
            _activation(activation),
            nn.Linear(64, 32),
            _activation(activation),
            nn.Linear(32, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (N, 64) inputs to (N, 10) logits."""
        return self.net(x)


class SmallCNN(nn.Module):
    """Two conv/BatchNorm/ReLU/max-pool stages and a linear head on (N, 1, 8, 8) images."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 8, 3, padding=1),
            nn.BatchNorm2d(8),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(8, 16, 3, padding=1),
            nn.BatchNorm2d(16),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(16 * 2 * 2, 10),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (N, 1, 8, 8) inputs to (N, 10) logits."""
        return self.net(x)


class TinyTransformer(nn.Module):
    """One pre-norm encoder block over the 8 image rows (8 tokens x 8 pixels), hand-written.

    Attention is spelled out with explicit q/k/v Linear layers, Reshape/Transpose for
    the heads, MatMul and Softmax (no ``nn.MultiheadAttention``; no ``Tensor.chunk``, which
    exports as Split (dynamo) or a Shape/Gather/Div/Slice chain (legacy)), so both exporters
    emit the same plain ops at opsets 17, 18 and 20.
    """

    def __init__(
        self, tokens: int = 8, features: int = 8, dim: int = 16, heads: int = 2, hidden: int = 32
    ) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError("dim must be divisible by heads")
        self.tokens, self.features, self.dim, self.heads = tokens, features, dim, heads
        self.head_dim = dim // heads
        self.embed = nn.Linear(features, dim)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim) * 0.02)
        self.ln1 = nn.LayerNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, dim)
        self.v = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.ln2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="none")
        self.fc2 = nn.Linear(hidden, dim)
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 10)

    def _split_heads(self, t: torch.Tensor) -> torch.Tensor:
        """(N, T, D) -> (N, H, T, D/H)."""
        return t.reshape(-1, self.tokens, self.heads, self.head_dim).transpose(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Map (N, 64) inputs to (N, 10) logits."""
        h = self.embed(x.reshape(-1, self.tokens, self.features)) + self.pos
        a = self.ln1(h)
        q = self._split_heads(self.q(a))
        k = self._split_heads(self.k(a))
        v = self._split_heads(self.v(a))
        scores = torch.matmul(q, k.transpose(-2, -1)) * (1.0 / math.sqrt(self.head_dim))
        att = torch.matmul(torch.softmax(scores, dim=-1), v)  # (N, H, T, D/H)
        att = att.transpose(1, 2).reshape(-1, self.tokens, self.dim)
        h = h + self.proj(att)
        h = h + self.fc2(self.act(self.fc1(self.ln2(h))))
        # Mean pool over tokens written as sum * (1/T): ``mean`` exports to ReduceMean, whose
        # axes-input form (opset 18) the dynamo exporter cannot down-convert to opset 17;
        # ReduceSum has taken axes as an input since opset 13, so all opsets export alike.
        h = self.ln_f(h).sum(dim=1) * (1.0 / self.tokens)
        return self.head(h)


def build(name: str) -> nn.Module:
    """Return a freshly initialised model for one of :data:`NAMES`."""
    if name.startswith("mlp_"):
        return MLP(name[len("mlp_") :])
    if name == "cnn":
        return SmallCNN()
    if name == "transformer":
        return TinyTransformer()
    raise ValueError(f"unknown model {name!r}; expected one of {', '.join(NAMES)}")


def input_shape(name: str) -> tuple[int, ...]:
    """Return the per-sample input shape of model ``name``: (64,) or (1, 8, 8)."""
    if name not in NAMES:
        raise ValueError(f"unknown model {name!r}; expected one of {', '.join(NAMES)}")
    return (1, 8, 8) if name == "cnn" else (64,)


def load_digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Return (x_train, y_train, x_test, y_test): float32 pixels/16 in [0, 1] of shape (N, 64), int64 labels."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = (np.asarray(data.data, dtype=np.float64) / 16.0).astype(np.float32)
    y = np.asarray(data.target, dtype=np.int64)
    perm = np.random.default_rng(seed).permutation(len(y))
    test, train = perm[:N_TEST], perm[N_TEST:]
    return x[train], y[train], x[test], y[test]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Suppress the exporters' warnings, log records and stdout/stderr progress lines."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    sink = io.StringIO()
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _tidy_without_bn_fusion(model: onnx_ir.Model) -> None:
    """Clean up an unoptimised dynamo export (an ``onnx_ir`` model) in place, keeping BatchNorm.

    ``optimize=True`` would fold BatchNormalization into Conv, so BN models are exported with
    ``optimize=False``; that leaves ``Flatten`` as a Shape -> Squeeze -> Reshape -> Concat
    chain feeding a Reshape.  Materialising the Reshape target from the inferred output shape
    (``[-1, 64]``), dropping the dead chain and lifting Constant nodes to initializers gives
    the same style of graph as the optimised exports of the other models.
    """
    import onnx_ir.passes.common as ir_passes
    from onnxscript.rewriter import rewrite
    from onnxscript.rewriter.rules.common import materialize_reshape_shape_rule

    rewrite(model, pattern_rewrite_rules=[materialize_reshape_shape_rule])
    ir_passes.RemoveUnusedNodesPass()(model)
    ir_passes.LiftConstantsToInitializersPass(lift_all_constants=True, size_limit=0)(model)
    ir_passes.RemoveUnusedNodesPass()(model)


def _strip_stack_traces(model: onnx_ir.Model) -> None:
    """Drop the dynamo exporter's per-node Python stack traces (absolute source paths) in place.

    They make the file depend on where the checkout and the virtualenv live; the remaining
    node metadata (module namespace, FX node) is kept.
    """
    for node in model.graph.all_nodes():
        node.metadata_props.pop("pkg.torch.onnx.stack_trace", None)


def export_onnx(
    module: nn.Module,
    name: str,
    path: str | os.PathLike[str],
    opset: int = 18,
    dynamo: bool = True,
    batch: int | None = None,
) -> None:
    """Export ``module`` (model ``name``) in eval mode to ``path``; input "input", output "logits".

    ``dynamo=True`` uses torch's default torch.export-based exporter, ``dynamo=False`` the
    legacy TorchScript one.  ``batch=None`` makes axis 0 dynamic (named "batch"), otherwise
    the batch size is fixed.  Eval-mode BatchNorm is kept as BatchNormalization nodes (not
    folded into the preceding Conv): legacy via ``TrainingMode.PRESERVE`` and no constant
    folding, dynamo via ``optimize=False`` plus a BN-preserving clean-up; this is checked
    after export.  The file is self-contained (no external data).
    """
    module = module.eval()
    example = torch.zeros((2 if batch is None else batch, *input_shape(name)), dtype=torch.float32)
    keep_bn = any(isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) for m in module.modules())
    path = os.fspath(path)
    with _quiet():
        if dynamo:
            # One entry per positional input of forward(); axis 0 is the batch.
            dynamic_shapes = None if batch is not None else ({0: torch.export.Dim("batch")},)
            program = torch.onnx.export(
                module,
                (example,),
                input_names=["input"],
                output_names=["logits"],
                opset_version=opset,
                dynamo=True,
                dynamic_shapes=dynamic_shapes,
                optimize=not keep_bn,
                verbose=False,
            )
            assert program is not None
            if keep_bn:
                _tidy_without_bn_fusion(program.model)
            _strip_stack_traces(program.model)
            program.save(path, external_data=False)
        else:
            kwargs: dict[str, object] = {}
            if keep_bn:
                kwargs = {"training": torch.onnx.TrainingMode.PRESERVE, "do_constant_folding": False}
            torch.onnx.export(
                module,
                (example,),
                path,
                input_names=["input"],
                output_names=["logits"],
                opset_version=opset,
                dynamo=False,
                dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}} if batch is None else None,
                verbose=False,
                **kwargs,
            )
    if keep_bn:
        import onnx

        if not any(n.op_type == "BatchNormalization" for n in onnx.load(path).graph.node):
            raise RuntimeError(f"{path}: the exporter folded BatchNorm away; no BatchNormalization node left")
