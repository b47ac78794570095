"""Deciding a VNN-LIB property (`verifier vnnlib`): sat only with a counterexample onnxruntime
confirms, unsat only from sound bounds.

`check_property` alternates two things over a queue of input boxes (the property's box first,
then halves of undecided boxes, split on their widest coordinate):
- **falsify**: the box's centre, seeded uniform points and a short projected sign-gradient
  descent on `max_k (c_k·Y + d_k)` of each unsafe conjunction (torch, the converted module);
  every candidate is re-run in onnxruntime on the user's model (the torch module must agree on
  each, within 1e-4, or the check stops: the bounds are of the torch module), and only a point whose
  onnxruntime outputs satisfy a whole conjunction is a counterexample (`sat`);
- **prove**: CROWN bounds (`verifier.bounds.propagate`) of every constraint over the box; a
  conjunction with one constraint whose lower bound is > 0 cannot hold there. A box where every
  conjunction is refuted is safe; all boxes safe is `unsat`.
The time limit gives `timeout`; exhausting `max_boxes` (or a model with no bound rules) gives
`unknown`. `Y` are the model's raw output values: a head that cuts ops (a final Softmax) is
refused, since the property speaks of the output the file computes.
"""

from __future__ import annotations

import math
import time
from collections import deque
from dataclasses import dataclass

import numpy as np
import torch

from verifier.bounds.network import BoundNetwork
from verifier.bounds.propagate import InputSet, propagate, upper_bound
from verifier.convert import ConvertedModel
from verifier.deadline import NEVER, Deadline, Stopped, reraise_signal
from verifier.errors import ConversionError, UnsupportedOpsError, UsageError
from verifier.jacobian import prepared_module
from verifier.onnx_io import LoadedModel
from verifier.validate import onnxruntime_session
from verifier.vnnlib import Conjunction, Property

STATUSES = ("sat", "unsat", "unknown", "timeout")
_RANDOM_POINTS = 32
_DESCENT_STEPS = 40
_AGREEMENT = 1e-4  # torch vs onnxruntime on every candidate point, as `validate` checks


@dataclass(frozen=True, eq=False)
class VnnResult:
    """The answer, the counterexample (input, onnxruntime output) for `sat`, and the work done."""

    status: str
    reason: str
    seconds: float
    boxes: int
    counterexample: tuple[np.ndarray, np.ndarray] | None = None

    def to_dict(self) -> dict:
        """JSON-ready form."""
        found = self.counterexample
        return {"status": self.status, "reason": self.reason, "seconds": self.seconds, "boxes": self.boxes,
                "counterexample": None if found is None else {"x": found[0].tolist(), "y": found[1].tolist()}}


class _Oracle:
    """The user's model in onnxruntime: flattened inputs (N, n) -> flattened outputs (N, M)."""

    def __init__(self, loaded: LoadedModel, output: str) -> None:
        spec = loaded.info.data_input
        self.session = onnxruntime_session(loaded.proto, torch.device("cpu"))
        self.name, self.output = spec.name, output
        self.shape = tuple(int(d) for d in spec.shape[1:])
        self.fixed = spec.shape[0] if isinstance(spec.shape[0], int) else None
        self.dtype = np.dtype(spec.dtype)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        rows = x.reshape(len(x), *self.shape).astype(self.dtype)
        step = self.fixed or len(rows)
        parts = []
        for start in range(0, len(rows), step):
            chunk = rows[start:start + step]
            padded = np.concatenate([chunk, np.repeat(chunk[-1:], step - len(chunk), 0)]) if len(chunk) < step \
                else chunk
            parts.append(self.session.run([self.output], {self.name: padded})[0].reshape(step, -1)[:len(chunk)])
        return np.concatenate(parts).astype(np.float64)


def check_property(loaded: LoadedModel, converted: ConvertedModel, prop: Property, deadline: Deadline = NEVER,
                   max_boxes: int = 4096, seed: int = 0) -> VnnResult:
    """Decide `prop` on the model (see the module docstring)."""
    began = time.monotonic()
    shape = _input_shape(loaded, prop)
    head = converted.head
    if head is not None and (head.kind != "logits" or head.cut):
        raise UsageError(f"the property's Y are the model's output values, but its head cuts {' -> '.join(head.cut)}"
                         " (or is not plain logits); give --output NAME of a raw output")
    oracle = _Oracle(loaded, head.output if head is not None else loaded.info.outputs[0].name)
    module = prepared_module(converted, "cpu", torch.float32)  # a kept fixed batch: padded chunks
    rng = np.random.default_rng(seed)
    network, why_not = _network(converted)
    queue = deque([(prop.low.copy(), prop.high.copy())])
    boxes = 0
    try:
        while queue:
            deadline.check("the property check")
            if boxes >= max_boxes:
                return VnnResult("unknown", f"{max_boxes} input boxes examined, none refuted the property",
                                 time.monotonic() - began, boxes)
            low, high = queue.popleft()
            boxes += 1
            found = _falsify(module, oracle, prop, low, high, shape, rng, deadline)
            if found is not None:
                return VnnResult("sat", "a counterexample re-checked in onnxruntime", time.monotonic() - began,
                                 boxes, found)
            if network is None:
                return VnnResult("unknown", f"no counterexample found; no bounds: {why_not}",
                                 time.monotonic() - began, boxes)
            if not _safe(network, prop, low, high, shape, deadline):
                axis = int(np.argmax(high - low))
                middle = (low[axis] + high[axis]) / 2
                left_high, right_low = high.copy(), low.copy()
                left_high[axis], right_low[axis] = middle, middle
                queue.extend([(low, left_high), (right_low, high)])
    except Stopped as err:
        reraise_signal(err)  # a SIGTERM is no time limit
        return VnnResult("timeout", "the time limit was reached", time.monotonic() - began, boxes)
    return VnnResult("unsat", "sound bounds refute every unsafe conjunction on every input box",
                     time.monotonic() - began, boxes)


def _input_shape(loaded: LoadedModel, prop: Property) -> tuple[int, ...]:
    spec = loaded.info.data_input
    if spec.shape is None or any(not isinstance(d, int) for d in spec.shape[1:]):
        raise UsageError(f"input {spec.name!r} needs fixed sizes beyond the batch axis for a VNN-LIB property")
    shape = tuple(int(d) for d in spec.shape[1:])
    if math.prod(shape) != len(prop.low):
        raise UsageError(f"the property declares {len(prop.low)} inputs X_i; the model's input {spec.name!r} has "
                         f"{math.prod(shape)} values per sample")
    return shape


def _network(converted: ConvertedModel) -> tuple[BoundNetwork | None, str]:
    try:
        return BoundNetwork.from_model(converted, torch.float64, torch.device("cpu")), ""
    except UnsupportedOpsError as err:
        return None, str(err)


def _falsify(module, oracle: _Oracle, prop: Property, low: np.ndarray, high: np.ndarray, shape: tuple[int, ...],
             rng: np.random.Generator, deadline: Deadline) -> tuple[np.ndarray, np.ndarray] | None:
    """A point of the box whose onnxruntime outputs are unsafe, or None."""
    points = [(low + high) / 2, *(low + rng.random((_RANDOM_POINTS, len(low))) * (high - low))]
    for conjunction in prop.unsafe:
        deadline.check("the counterexample search")
        points.append(_descend(module, conjunction, low, high, shape, points[0]))
    candidates = np.clip(np.stack(points), low, high)
    outputs = oracle(candidates)
    if outputs.shape[1] != prop.outputs:
        raise UsageError(f"the property declares {prop.outputs} outputs Y_j; the model's output has "
                         f"{outputs.shape[1]} values per sample")
    with torch.no_grad():
        converted = module(torch.as_tensor(candidates, dtype=torch.float32).reshape(-1, *shape)).reshape(
            len(candidates), -1).double().numpy()
    if not np.allclose(converted, outputs, rtol=_AGREEMENT, atol=_AGREEMENT):  # bounds are of the torch module
        raise ConversionError(f"the torch conversion disagrees with onnxruntime on the property's box (max abs diff "
                              f"{float(np.abs(converted - outputs).max()):.3g}): no bound on it would be trustworthy")
    hits = np.flatnonzero(prop.violated_by(outputs))
    return None if len(hits) == 0 else (candidates[hits[0]], outputs[hits[0]])


def _descend(module, conjunction: Conjunction, low: np.ndarray, high: np.ndarray, shape: tuple[int, ...],
             start: np.ndarray) -> np.ndarray:
    """Projected sign-gradient descent on the conjunction's worst constraint `max_k (c_k·Y + d_k)`."""
    coefficients = torch.as_tensor(conjunction.coefficients, dtype=torch.float32)
    offsets = torch.as_tensor(conjunction.offsets, dtype=torch.float32)
    lower, upper = (torch.as_tensor(v, dtype=torch.float32) for v in (low, high))
    x = torch.as_tensor(start, dtype=torch.float32).clone()
    width = upper - lower
    for step in range(_DESCENT_STEPS):
        x.requires_grad_(True)
        outputs = module(x.reshape(1, *shape)).reshape(1, -1)
        objective = (outputs @ coefficients.T + offsets).max()
        (grad,) = torch.autograd.grad(objective, x)
        size = width * 0.25 * (1 - step / _DESCENT_STEPS)
        x = torch.minimum(torch.maximum(x.detach() - size * grad.sign(), lower), upper)
    return x.detach().numpy().astype(np.float64)


def _safe(network: BoundNetwork, prop: Property, low: np.ndarray, high: np.ndarray, shape: tuple[int, ...],
          deadline: Deadline) -> bool:
    """Whether sound bounds refute every unsafe conjunction on the box."""
    centre = torch.as_tensor((low + high) / 2, dtype=torch.float64).reshape(1, *shape)
    flat = centre.reshape(1, -1)
    region = InputSet(center=centre, radius=torch.tensor([math.inf], dtype=torch.float64), norm="inf",
                      lower=torch.as_tensor(low, dtype=torch.float64).reshape(1, -1) - flat,
                      upper=torch.as_tensor(high, dtype=torch.float64).reshape(1, -1) - flat)
    state = propagate(network, region, True, deadline)
    for conjunction in prop.unsafe:
        rows = -torch.as_tensor(conjunction.coefficients, dtype=torch.float64).unsqueeze(0)  # (1, K, M)
        lowest = -upper_bound(network, state, region, network.output, rows, deadline)[0] + \
            torch.as_tensor(conjunction.offsets, dtype=torch.float64)  # lower bound of c·Y + d
        if not bool((lowest > 0).any()):
            return False
    return True
