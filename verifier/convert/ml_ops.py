"""ai.onnx.ml operators written as standard ONNX operators (scikit-learn exports via skl2onnx).

skl2onnx writes linear models and pre-processing with the `ai.onnx.ml` domain, which onnx2torch
does not convert and the bounds have no rule for. Each differentiable one is an affine map (or
a normalisation) that standard ops express exactly, so `lower_ml_ops` replaces it before
conversion and every later stage (torch, bounds, Jacobians) applies with no new rule:

- `LinearClassifier`: scores `X W^T + b` (`Gemm`), then the post-transform (`Softmax` for
  SOFTMAX, `Sigmoid` for LOGISTIC). One coefficient row with two class labels (a binary
  model) gives two columns `[1 - t, t]` with `t` the transformed score (what onnxruntime
  computes for NONE and LOGISTIC; SOFTMAX over one score is the score itself there too);
- `LinearRegressor`: `X W^T + b` (post-transform NONE only);
- `Scaler`: `(X - offset) * scale`;
- `Normalizer`: `X / ||X||` per row for L1 and L2, `X / max(X)` for MAX;
- `ArrayFeatureExtractor` with constant indices: `Gather` on the last axis;
- `OneHotEncoder` with integer categories `c`: `Clip(2t + 1.5, 0, 1) - Clip(2t - 0.5, 0, 1)`
  with `t = x - c` on a new last axis, a trapezoid equal to 1 on `|t| <= 1/4` and 0 on
  `|t| >= 3/4`: exact on integers (1 iff `x = c`, all zeros for an unknown value as `zeros=1`
  asks) and constant near each of them, so a held integer input (`--perturb` another input,
  `verifier.perturb`) sits on no kink. A float input is truncated to an integer first, as
  onnxruntime casts it. String categories are not lowered (no string is ever held), nor
  an encoder below opset 11.
- `FeatureVectorizer` (skl2onnx joins the one-column inputs of a Titanic-style export with it):
  every input cast to float and flattened to `(N, d)`, then `Concat` on the last axis;
- `Imputer` that replaces NaN (scikit-learn's `SimpleImputer`): the identity, exactly, on the
  finite inputs every command requires (`verifier.finite`); one that replaces a number is a jump
  and is refused.

The label output of a classifier (`ArgMax` over the scores, mapped to its labels) is written
only when something uses it. Piecewise-constant ops (trees, SVM kernels' sign, binarising,
label encoding) have no gradient and no Lipschitz bound: `refusal_reason` says so in one line.
`ZipMap` never reaches this module: normalisation keeps its float input instead.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from verifier.convert.rewrite import NodeWriter

ML_DOMAIN = "ai.onnx.ml"
_POST_TRANSFORMS = ("NONE", "SOFTMAX", "LOGISTIC")
_TREES = "a tree ensemble is piecewise constant: its gradient is zero almost everywhere and no Lipschitz bound holds"
_REFUSED = {
    "TreeEnsembleClassifier": _TREES,
    "TreeEnsembleRegressor": _TREES,
    "TreeEnsemble": _TREES,
    "Binarizer": "a threshold is piecewise constant: no gradient, no Lipschitz bound",
    "LabelEncoder": "label encoding maps discrete values: nothing continuous to perturb",
    "OneHotEncoder": ("one-hot encoding is lowered for integer categories (|c| <= 2^22, exact in float32) from "
                      "opset 11; this one has string categories, larger integers or an older opset"),
    "Imputer": "an Imputer of a finite value jumps at that value (no Lipschitz bound); one of NaN is lowered",
    "CategoryMapper": "category mapping maps discrete values: nothing continuous to perturb",
    "DictVectorizer": "takes a map, not a tensor",
    "SVMClassifier": "kernel SVMs are not lowered yet (a linear SVM exports as LinearClassifier)",
    "SVMRegressor": "kernel SVMs are not lowered yet (a linear SVM exports as LinearRegressor)",
}


def refusal_reason(op_type: str) -> str | None:
    """Why an ai.onnx.ml op cannot be analysed (None: it is lowered, or not an ML op we know)."""
    return _REFUSED.get(op_type)


def lower_ml_ops(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` with every lowerable ai.onnx.ml node written as standard ops (others
    are left in place, for the support check to list)."""
    lowered = onnx.ModelProto()
    lowered.CopyFrom(model)
    graph = lowered.graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    used = {t for n in graph.node for t in n.input} | {o.name for o in graph.output}
    opset = next((o.version for o in lowered.opset_import if o.domain in ("", "ai.onnx")), 0)
    nodes: list[onnx.NodeProto] = []
    changed = False
    for position, node in enumerate(graph.node):
        rule = _RULES.get(node.op_type) if node.domain == ML_DOMAIN else None
        replacement = rule(_Builder(node, position, graph, constants, used, opset)) if rule else None
        if replacement is None:
            nodes.append(node)
            continue
        nodes.extend(replacement)
        changed = True
    if not changed:
        return lowered
    del graph.node[:]
    graph.node.extend(nodes)
    if not any(n.domain == ML_DOMAIN for n in graph.node):
        kept = [o for o in lowered.opset_import if o.domain != ML_DOMAIN]
        del lowered.opset_import[:]
        lowered.opset_import.extend(kept)
    return lowered


class _Builder(NodeWriter):
    """The replacement of one ML node: `NodeWriter` plus the node, its attributes and what is used."""

    def __init__(self, node: onnx.NodeProto, position: int, graph: onnx.GraphProto,
                 constants: dict[str, np.ndarray], used: set[str], opset: int) -> None:
        super().__init__(f"verifier_ml{position}_{node.op_type}", graph, constants, opset)
        self.node, self.used = node, used
        self.attributes = {a.name: helper.get_attribute_value(a) for a in node.attribute}

    def text(self, name: str, default: str) -> str:
        value = self.attributes.get(name, default)
        return value.decode() if isinstance(value, bytes) else str(value)

    def wanted(self, index: int) -> str | None:
        """The node's output `index` when something uses it."""
        outputs = self.node.output
        return outputs[index] if len(outputs) > index and outputs[index] in self.used else None


def _affine(b: _Builder, rows_hint: int | None = None) -> tuple[str, int]:
    """`X W^T + intercepts` from the node's coefficients; returns (tensor, number of rows)."""
    coefficients = np.asarray(b.attributes["coefficients"], dtype=np.float32)
    intercepts = np.asarray(b.attributes.get("intercepts", []), dtype=np.float32)
    rows = rows_hint or (len(intercepts) if len(intercepts) else 1)
    weight = coefficients.reshape(rows, -1)
    bias = intercepts if len(intercepts) else np.zeros(rows, dtype=np.float32)
    data = b.add("Cast", [b.node.input[0]], to=onnx.TensorProto.FLOAT)
    return b.add("Gemm", [data, b.constant("W", weight), b.constant("b", bias)], transB=1), rows


def _transform(b: _Builder, scores: str, post: str) -> str:
    if post == "SOFTMAX":
        return b.add("Softmax", [scores], axis=-1)
    if post == "LOGISTIC":
        return b.add("Sigmoid", [scores])
    return scores


def _linear_classifier(b: _Builder) -> list[onnx.NodeProto] | None:
    post = b.text("post_transform", "NONE")
    labels = b.attributes.get("classlabels_ints") or b.attributes.get("classlabels_strings") or []
    if post not in _POST_TRANSFORMS or b.wanted(0) is not None and "classlabels_strings" in b.attributes:
        return None
    intercepts = b.attributes.get("intercepts", [])
    rows = len(intercepts) if intercepts else max(1, len(b.attributes["coefficients"]) // _width(b))
    scores, rows = _affine(b, rows)
    binary = rows == 1 and len(labels) == 2
    target = b.wanted(1)
    if binary:
        transformed = scores if post == "SOFTMAX" else _transform(b, scores, post)
        complement = b.add("Sub", [b.constant("one", np.ones((1, 1), np.float32)), transformed])
        final = b.add("Concat", [complement, transformed], target, axis=-1)
    else:
        final = b.add("Identity", [_transform(b, scores, post)], target)
    label = b.wanted(0)
    if label is not None:
        chosen = b.add("ArgMax", [final], axis=-1, keepdims=0)
        b.add("Gather", [b.constant("labels", np.asarray(labels, dtype=np.int64)), chosen], label)
    return b.nodes


def _width(b: _Builder) -> int:
    """Input features, from the classifier's input shape when inference knows it."""
    for vi in [*b.graph.input, *b.graph.value_info]:
        if vi.name == b.node.input[0] and vi.type.tensor_type.shape.dim:
            last = vi.type.tensor_type.shape.dim[-1]
            if last.HasField("dim_value") and last.dim_value > 0:
                return int(last.dim_value)
    return len(b.attributes["coefficients"])


def _linear_regressor(b: _Builder) -> list[onnx.NodeProto] | None:
    if b.text("post_transform", "NONE") != "NONE":
        return None
    targets = int(b.attributes.get("targets", 1))
    scores, _ = _affine(b, targets)
    b.add("Identity", [scores], b.node.output[0])
    return b.nodes


def _scaler(b: _Builder) -> list[onnx.NodeProto]:
    offset = np.asarray(b.attributes.get("offset", [0.0]), dtype=np.float32)
    scale = np.asarray(b.attributes.get("scale", [1.0]), dtype=np.float32)
    data = b.add("Cast", [b.node.input[0]], to=onnx.TensorProto.FLOAT)
    shifted = b.add("Sub", [data, b.constant("offset", offset)])
    b.add("Mul", [shifted, b.constant("scale", scale)], b.node.output[0])
    return b.nodes


def _normalizer(b: _Builder) -> list[onnx.NodeProto] | None:
    norm = b.text("norm", "MAX")
    reduce = {"L1": "ReduceL1", "L2": "ReduceL2", "MAX": "ReduceMax"}.get(norm)
    if reduce is None:
        return None
    data = b.add("Cast", [b.node.input[0]], to=onnx.TensorProto.FLOAT)
    scale = b.with_axes(reduce, data, [-1])
    b.add("Div", [data, scale], b.node.output[0])
    return b.nodes


def _array_feature_extractor(b: _Builder) -> list[onnx.NodeProto] | None:
    indices = b.constants.get(b.node.input[1])
    if indices is None:
        return None
    flat = b.constant("indices", np.asarray(indices, dtype=np.int64).reshape(-1))
    b.add("Gather", [b.node.input[0], flat], b.node.output[0], axis=-1)
    return b.nodes


_EXACT_FLOAT32_INTEGERS = 2 ** 22  # 2c + 1.5 stays exact in float32 up to here


def _one_hot_encoder(b: _Builder) -> list[onnx.NodeProto] | None:
    categories = np.asarray(b.attributes.get("cats_int64s") or [], dtype=np.int64)
    if categories.size == 0 or np.abs(categories).max() > _EXACT_FLOAT32_INTEGERS or b.opset < 11:
        return None  # below opset 11 Unsqueeze takes no negative axis and Clip no input bounds
    whole = b.add("Cast", [b.node.input[0]], to=onnx.TensorProto.INT64)  # onnxruntime truncates a float input
    data = b.add("Cast", [whole], to=onnx.TensorProto.FLOAT)
    # 2x spread over the categories by the Mul (an Add of a wider constant would broadcast instead)
    twos = np.full(categories.shape, 2.0, dtype=np.float32)
    doubled = b.add("Mul", [b.with_axes("Unsqueeze", data, [-1]), b.constant("two", twos)])
    twice = 2.0 * categories.astype(np.float32)
    ramps = [b.add("Add", [doubled, b.constant("shift", (shift - twice).astype(np.float32))]) for shift in (1.5, -0.5)]
    up, down = (_clip01(b, ramp) for ramp in ramps)
    b.add("Sub", [up, down], b.node.output[0])
    return b.nodes


def _feature_vectorizer(b: _Builder) -> list[onnx.NodeProto]:
    columns = [b.add("Flatten", [b.add("Cast", [name], to=onnx.TensorProto.FLOAT)], axis=1) for name in b.node.input]
    b.add("Concat", columns, b.node.output[0], axis=-1)
    return b.nodes


def _imputer(b: _Builder) -> list[onnx.NodeProto] | None:
    replaced = b.attributes.get("replaced_value_float", 0.0)
    if "replaced_value_int64" in b.attributes or not np.isnan(replaced):
        return None
    b.add("Identity", [b.node.input[0]], b.node.output[0])  # finite inputs have nothing to impute
    return b.nodes


def _clip01(b: _Builder, data: str) -> str:
    return b.add("Clip", [data, b.constant("zero", np.float32(0.0)), b.constant("one", np.float32(1.0))])


_RULES: dict[str, Callable[[_Builder], list[onnx.NodeProto] | None]] = {
    "LinearClassifier": _linear_classifier,
    "LinearRegressor": _linear_regressor,
    "Scaler": _scaler,
    "Normalizer": _normalizer,
    "ArrayFeatureExtractor": _array_feature_extractor,
    "OneHotEncoder": _one_hot_encoder,
    "Imputer": _imputer,
    "FeatureVectorizer": _feature_vectorizer,
}
