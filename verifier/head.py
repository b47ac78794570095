"""Which graph output is the classifier head, and how its values become logits.

Exporters rarely end a classifier in its logits: scikit-learn (skl2onnx), PaddlePaddle and
others end in `Softmax` (often behind `Identity`, `Reshape`, `Cast`, `Flatten` or a `ZipMap`),
a binary model in one logit or one `Sigmoid` probability. `choose_head` reads that from the
graph structure: it walks back from the chosen output through ops that only move data, cuts a
final `Softmax`, `LogSoftmax`, `Log(Softmax)` or `Sigmoid` (also `Concat(1 - s, s)` of a sigmoid
`s`) and uses its input. The head is then one of:

- `logits`: a tensor (N, C), C >= 2, used as the logits;
- `binary`: one logit z, shape (N,) or (N, 1): the logits are `[0, z]` (so that softmax gives
  `[1 - sigmoid(z), sigmoid(z)]`, class 1 when z > 0);
- `probabilities`: only probabilities exist (a normalisation `a / ReduceSum(a)`): the logits are
  `log(max(p, PROBABILITY_FLOOR))`, whose softmax is p itself wherever p >= the floor;
- `scores`: the scores of an `ai.onnx.ml.LinearClassifier` whose post-transform (SOFTMAX or
  LOGISTIC, often behind skl2onnx's `Normalizer(L1)` and `ZipMap`) made them probabilities, or
  of a binary one (one coefficient row): the logits are the raw scores `s = X W^T + b` before
  a SOFTMAX; `log sigmoid(s)` for LOGISTIC (whose softmax is the one-vs-rest probabilities
  normalised, as scikit-learn's `predict_proba`; skl2onnx writes a binary LogisticRegression
  as two rows `[-s, s]`, whose log-sigmoids have softmax `[1 - sigmoid(s), sigmoid(s)]`
  exactly); `[0, s]` for one coefficient row with two labels.

A head has one row per sample on axis 0: an output that carries the batch on another axis (a
recurrent model's per-time-step outputs exported time first, `(time, batch, C)`) is no
per-sample classifier and is refused in one line saying why and what would work
(`verifier.head_batch`).

`verifier.head_logits.attach_logits` appends the few ONNX nodes that compute those logits, so
that the converted module and the onnxruntime oracle compute the same tensor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from verifier.errors import UsageError
from verifier.graph import OperatorGraph
from verifier.head_batch import BATCH_NOTE, batch_refusal, misplaced_batch, shape_text
from verifier.onnx_io import tensor_spec

PROBABILITY_FLOOR = 1e-12
LOGITS_NAME = "verifier_logits"
HEAD_KINDS = ("logits", "binary", "probabilities", "scores")

STANDARD_DOMAINS = ("", "ai.onnx")
ML_DOMAIN = "ai.onnx.ml"
# Ops that only carry the head's values to the output (their first input is the data).
_PASS_THROUGH = frozenset({"Identity", "Reshape", "Cast", "Flatten", "Squeeze", "Unsqueeze", "Dropout", "CastLike"})
_PASS_THROUGH_NOTE = "a pass-through of the input"
_NOT_FLOAT_NOTE = "not a float tensor (labels?)"
_FLOAT_TYPES = frozenset(
    {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
)


@dataclass(frozen=True)
class OutputCandidate:
    """A graph output as a possible head: its spec and why it is (not) chosen by default."""

    name: str
    shape: tuple[int | str | None, ...] | None
    dtype: str
    usable: bool
    note: str

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"name": self.name, "shape": None if self.shape is None else list(self.shape), "dtype": self.dtype,
                "usable": self.usable, "note": self.note}


@dataclass(frozen=True)
class Head:
    """The chosen output, the tensor read as logits (or one logit, or probabilities), and why."""

    output: str
    tensor: str
    kind: str
    cut: tuple[str, ...]
    reason: str
    chosen_by: str = "default"  # "default" or "--output"

    @property
    def logits(self) -> str:
        """The tensor holding (N, C) logits once `attach_logits` has run."""
        return self.tensor if self.kind == "logits" else LOGITS_NAME

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {"output": self.output, "tensor": self.tensor, "kind": self.kind, "cut": list(self.cut),
                "logits": self.logits, "chosen_by": self.chosen_by, "reason": self.reason}


def family_tensor(graph: OperatorGraph, head: Head) -> str:
    """The tensor whose computation decides the model family: the head's tensor, or for a
    `scores` head the classifier's input (the classifier is affine once its transform is cut)."""
    if head.kind != "scores":
        return head.tensor
    return graph.nodes[graph.producer[head.tensor]].input[0]


def numeric_outputs(graph: OperatorGraph) -> list[str]:
    """Float tensor outputs; an output made by ZipMap (skl2onnx) stands for ZipMap's input."""
    kept: list[str] = []
    for out in graph.model.graph.output:
        name = _through_zipmap(graph, out.name)
        if name == out.name and not _is_float(out):
            continue
        if name not in kept:
            kept.append(name)
    return kept


def output_candidates(graph: OperatorGraph) -> tuple[OutputCandidate, ...]:
    """Every graph output with its spec and whether it can be the head."""
    found = []
    for out in graph.model.graph.output:
        shape, dtype = _spec(out)
        source = _through_zipmap(graph, out.name)
        if source != out.name:
            usable, note = True, f"ZipMap of {source!r}"
        elif not _is_float(out):
            usable, note = False, _NOT_FLOAT_NOTE
        elif (misplaced := misplaced_batch(graph, shape)) is not None:
            usable, note = False, misplaced
        elif graph.is_constant(out.name):
            usable, note = False, "constant: does not depend on the input"
        elif _is_pass_through_of_input(graph, out.name):
            usable, note = True, _PASS_THROUGH_NOTE
        else:
            usable, note = True, "float output"
        found.append(OutputCandidate(out.name, shape, dtype, usable, note))
    return tuple(found)


def choose_head(graph: OperatorGraph, output: str | None = None) -> Head:
    """The head: the named output (`--output`), else the first float output that depends on the
    input through more than data movement (else the first float output)."""
    candidates = output_candidates(graph)
    listed = ", ".join(f"{c.name} ({c.dtype} {shape_text(c.shape)})" for c in candidates)
    if output is not None:
        chosen = next((c for c in candidates if c.name == output), None)
        if chosen is None:
            raise UsageError(f"--output {output!r} is not an output of the model; its outputs: {listed}")
        if chosen.note == _NOT_FLOAT_NOTE:
            raise UsageError(f"--output {output!r} is {chosen.dtype}, not a float tensor; its outputs: {listed}")
        if chosen.note.startswith(BATCH_NOTE):
            raise UsageError(batch_refusal(chosen.name, chosen.note, [c.name for c in candidates if c.usable]))
        return _read(graph, chosen, "--output")
    usable = [c for c in candidates if c.usable and c.note != _PASS_THROUGH_NOTE] or [c for c in candidates
                                                                                   if c.usable]
    if not usable:
        misplaced = next((c for c in candidates if c.note.startswith(BATCH_NOTE)), None)
        if misplaced is not None:
            raise UsageError(batch_refusal(misplaced.name, misplaced.note, []))
        raise UsageError(f"no output can be the classifier head; the model's outputs: {listed}")
    head = _read(graph, usable[0], "default")
    skipped = [f"{c.name} ({c.note})" for c in candidates[:candidates.index(usable[0])]]
    if skipped:
        head = Head(head.output, head.tensor, head.kind, head.cut,
                    f"{head.reason}; skipped {', '.join(skipped)}", head.chosen_by)
    return head


def _read(graph: OperatorGraph, candidate: OutputCandidate, chosen_by: str) -> Head:
    """Walk back from an output through data movement and final probability ops."""
    tensor = _through_zipmap(graph, candidate.name)
    cut: list[str] = ["ZipMap"] if tensor != candidate.name else []
    tensor = _skip_pass_through(graph, tensor, cut)
    node = _producer(graph, tensor)
    kind, source = "logits", "the output's values"
    if node is not None and node.op_type in ("Softmax", "LogSoftmax"):
        cut.append(node.op_type)
        tensor, source = node.input[0], f"the input of the final {node.op_type}"
    elif node is not None and node.op_type == "Log" and _op_behind(graph, node.input[0]) == "Softmax":
        cut.append("Log")
        inner = _producer(graph, _skip_pass_through(graph, node.input[0], cut))
        cut.append("Softmax")
        tensor, source = inner.input[0], "the input of the final Log(Softmax)"
    elif node is not None and node.op_type == "Sigmoid":
        cut.append("Sigmoid")
        tensor, source = node.input[0], "the input of the final Sigmoid"
    elif node is not None and (logit := _sigmoid_pair(graph, node)) is not None:
        cut += ["Concat(1 - s, s)", "Sigmoid"]
        return Head(candidate.name, logit, "binary", tuple(cut),
                    _reason(candidate, "binary", "the input of the Sigmoid behind Concat(1 - s, s)", cut), chosen_by)
    elif (classifier := _linear_classifier_behind(graph, tensor, cut)) is not None:
        post = attribute_text(classifier, "post_transform", "NONE")
        source = f"the raw scores of the LinearClassifier (post_transform {post} not applied)"
        what = "one score s of a binary model, read as logits [0, s]" if is_binary_classifier(classifier) else None
        return Head(candidate.name, classifier.output[1], "scores", tuple(cut),
                    _reason(candidate, "scores", source, cut, what), chosen_by)
    elif node is not None and (written := _written_softmax(graph, node)) is not None:
        cut.append("Exp(a) / ReduceSum(Exp(a))")
        tensor, source = written, "the logits of a softmax written out as Exp(a) / ReduceSum(Exp(a))"
    elif node is not None and _is_normalisation(graph, node):
        return Head(candidate.name, tensor, "probabilities", tuple(cut),
                    _reason(candidate, "probabilities", "normalised scores a / ReduceSum(a)", cut), chosen_by)
    tensor = _skip_pass_through(graph, tensor, cut)
    if _is_single_logit(graph.shape(tensor)):
        kind = "binary"
    return Head(candidate.name, tensor, kind, tuple(cut), _reason(candidate, kind, source, cut), chosen_by)


def _reason(candidate: OutputCandidate, kind: str, source: str, cut: list[str], what: str | None = None) -> str:
    what = what or {"logits": "logits", "binary": "one logit z of a binary classifier, read as logits [0, z]",
            "probabilities": f"probabilities p, read as logits log(max(p, {PROBABILITY_FLOOR:g}))",
            "scores": "logits"}[kind]
    through = f" (cut: {' -> '.join(reversed(cut))})" if cut else ""
    return f"output {candidate.name!r}: {source} as {what}{through}"


def is_binary_classifier(node: onnx.NodeProto) -> bool:
    """Two class labels and one score s: one coefficient row (onnxruntime's scores `[1 - s, s]`),
    or, with LOGISTIC, two opposite rows (skl2onnx's binary LogisticRegression, scores `[-s, s]`):
    either way s is the second column and `[0, s]` are exact logits."""
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    labels = attributes.get("classlabels_ints") or attributes.get("classlabels_strings") or []
    intercepts = np.asarray(attributes.get("intercepts") or [], dtype=np.float64)
    if len(labels) != 2 or len(intercepts) not in (1, 2):
        return False
    if len(intercepts) == 1:
        return True
    rows = np.asarray(attributes.get("coefficients") or [], dtype=np.float64).reshape(2, -1)
    return (attribute_text(node, "post_transform", "NONE") == "LOGISTIC" and bool(np.array_equal(rows[0], -rows[1]))
            and float(intercepts[0]) == -float(intercepts[1]))


def _ml_producer(graph: OperatorGraph, tensor: str, op_type: str) -> onnx.NodeProto | None:
    key = graph.producer.get(tensor)
    node = graph.nodes[key] if key is not None else None
    return node if node is not None and node.domain == ML_DOMAIN and node.op_type == op_type else None


def attribute_text(node: onnx.NodeProto, attribute: str, default: str) -> str:
    for a in node.attribute:
        if a.name == attribute:
            value = onnx.helper.get_attribute_value(a)
            return value.decode() if isinstance(value, bytes) else str(value)
    return default


def _linear_classifier_behind(graph: OperatorGraph, tensor: str, cut: list[str]) -> onnx.NodeProto | None:
    """The ai.onnx.ml LinearClassifier whose scores `tensor` is (through skl2onnx's Normalizer(L1) of
    probabilities) when its scores are probabilities (SOFTMAX/LOGISTIC) or it is binary; else None."""
    seen: list[str] = []
    normalizer = _ml_producer(graph, tensor, "Normalizer")
    if normalizer is not None and attribute_text(normalizer, "norm", "MAX") == "L1":
        seen.append("Normalizer(L1)")
        tensor = normalizer.input[0]
    classifier = _ml_producer(graph, tensor, "LinearClassifier")
    if classifier is None or len(classifier.output) < 2 or classifier.output[1] != tensor:
        return None
    post = attribute_text(classifier, "post_transform", "NONE")
    if post not in ("SOFTMAX", "LOGISTIC") and not is_binary_classifier(classifier):
        return None
    if seen and post not in ("SOFTMAX", "LOGISTIC"):
        return None  # an L1 normalisation of raw scores is no probability: not this pattern
    cut.extend([*seen, f"LinearClassifier.post_transform={post}"])
    return classifier


def _through_zipmap(graph: OperatorGraph, tensor: str) -> str:
    key = graph.producer.get(tensor)
    node = graph.nodes[key] if key is not None else None
    return node.input[0] if node is not None and node.op_type == "ZipMap" and node.domain == ML_DOMAIN else tensor


def _producer(graph: OperatorGraph, tensor: str) -> onnx.NodeProto | None:
    key = graph.producer.get(tensor)
    node = graph.nodes[key] if key is not None else None
    return node if node is not None and node.domain in STANDARD_DOMAINS else None


def _skip_pass_through(graph: OperatorGraph, tensor: str, cut: list[str]) -> str:
    node = _producer(graph, tensor)
    while node is not None and node.op_type in _PASS_THROUGH and node.input and node.input[0]:
        cut.append(node.op_type)
        tensor = node.input[0]
        node = _producer(graph, tensor)
    return tensor


def _op_behind(graph: OperatorGraph, tensor: str) -> str | None:
    node = _producer(graph, _skip_pass_through(graph, tensor, []))
    return node.op_type if node is not None else None


def _sigmoid_pair(graph: OperatorGraph, node: onnx.NodeProto) -> str | None:
    """z when `node` is Concat(1 - s, s) over the last axis with s = Sigmoid(z) of width 1."""
    if node.op_type != "Concat" or len(node.input) != 2:
        return None
    first, second = (_skip_pass_through(graph, t, []) for t in node.input)
    sub, sig = _producer(graph, first), _producer(graph, second)
    if sub is None or sig is None or sub.op_type != "Sub" or sig.op_type != "Sigmoid":
        return None
    one = graph.constant(sub.input[0])
    if one is None or one.size != 1 or float(one.reshape(())) != 1.0:
        return None
    if _skip_pass_through(graph, sub.input[1], []) != second:
        return None
    return sig.input[0] if _is_single_logit(graph.shape(sig.input[0])) else None


def _written_softmax(graph: OperatorGraph, node: onnx.NodeProto) -> str | None:
    """z when `node` is `Exp(a) / ReduceSum(Exp(a))` over the last axis (the sum moved back by
    Reshape/Expand, as jax2tf writes it), with `a = z - max(z)` read through to z (softmax is
    unchanged by the shift); a itself when there is no such shift."""
    if node.op_type != "Div" or len(node.input) != 2:
        return None
    exp, total = _producer(graph, node.input[0]), _producer(graph, _through_broadcast(graph, node.input[1]))
    if exp is None or exp.op_type != "Exp" or total is None or total.op_type != "ReduceSum":
        return None
    if total.input[0] != node.input[0] or not _over_last_axis(graph, total):
        return None
    shifted = _producer(graph, exp.input[0])
    if shifted is not None and shifted.op_type == "Sub":
        peak = _producer(graph, _through_broadcast(graph, shifted.input[1]))
        if peak is not None and peak.op_type == "Max" and len(peak.input) == 2:  # Max(-inf or a constant, m)
            constant = [t for t in peak.input if graph.is_constant(t)]
            peak = _producer(graph, next(t for t in peak.input if t not in constant)) if len(constant) == 1 else None
        if peak is not None and peak.op_type == "ReduceMax" and peak.input[0] == shifted.input[0]:
            return shifted.input[0]
    return exp.input[0]


def _through_broadcast(graph: OperatorGraph, tensor: str) -> str:
    node = _producer(graph, tensor)
    while node is not None and node.op_type in (*_PASS_THROUGH, "Expand") and node.input and node.input[0]:
        tensor = node.input[0]
        node = _producer(graph, tensor)
    return tensor


def _over_last_axis(graph: OperatorGraph, reduce: onnx.NodeProto) -> bool:
    shape = graph.shape(reduce.input[0])
    axes = graph.constant(reduce.input[1]) if len(reduce.input) > 1 and reduce.input[1] else next(
        (np.asarray(onnx.helper.get_attribute_value(a)) for a in reduce.attribute if a.name == "axes"), None)
    if shape is None or axes is None or np.asarray(axes).size != 1:
        return False
    axis = int(np.asarray(axes).reshape(()))
    return axis in (-1, len(shape) - 1)


def _is_normalisation(graph: OperatorGraph, node: onnx.NodeProto) -> bool:
    """`a / ReduceSum(a)` (scores normalised to probabilities)."""
    if node.op_type != "Div" or len(node.input) != 2:
        return False
    total = _producer(graph, node.input[1])
    return total is not None and total.op_type == "ReduceSum" and total.input[0] == node.input[0]


def _is_single_logit(shape: tuple | None) -> bool:
    return shape is not None and (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1))


def _is_pass_through_of_input(graph: OperatorGraph, tensor: str) -> bool:
    keys = graph.ancestors_of_tensors([tensor])
    return all(graph.nodes[k].op_type in _PASS_THROUGH or graph.is_constant(graph.nodes[k].output[0])
               for k in keys)


def _is_float(value_info: onnx.ValueInfoProto) -> bool:
    return value_info.type.HasField("tensor_type") and value_info.type.tensor_type.elem_type in _FLOAT_TYPES


def _spec(value_info: onnx.ValueInfoProto) -> tuple[tuple | None, str]:
    spec = tensor_spec(value_info)
    return spec.shape, spec.dtype
