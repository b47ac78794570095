"""Whether a graph output has one row per sample: where the data input's batch went.

A classifier head is read as `(N, C)`, samples on axis 0. Recurrent models exported time first
give per-time-step outputs `(time, batch, C)`: reading those as `(N, C)` takes time steps for
samples. `batch_axis` finds the batch in an output's shape from the model's own shapes — the
input's symbolic batch name, or, both fixed (e.g. after `--perturb` fixed the batch to 1), axis 0
of another size with the batch's size further on — and `batch_refusal` says in one line why such
an output cannot be the head and what would work. `verifier.head` uses both.
"""

from __future__ import annotations

from verifier.graph import OperatorGraph

BATCH_NOTE = "the batch on axis"


def batch_axis(graph: OperatorGraph, shape: tuple | None) -> int | None:
    """The axis of `shape` that carries the data input's batch, when the shapes say so: the input's
    symbolic batch name, or (both fixed) its size where axis 0 has another size; None: unknown."""
    inputs = [graph.shape(name) for name in graph.inputs]
    if len(inputs) != 1 or not inputs[0] or not shape:
        return None
    batch = inputs[0][0]
    if batch is None or (isinstance(batch, int) and batch <= 0):
        return None
    if shape[0] == batch:
        return 0
    if isinstance(batch, int) and (not isinstance(shape[0], int) or len(shape) < 3):
        return None  # a fixed batch is only told apart from a fixed size by a fixed first axis
    return shape.index(batch) if batch in shape[1:] else None


def misplaced_batch(graph: OperatorGraph, shape: tuple | None) -> str | None:
    """A note for an output whose batch is known to be on an axis other than 0 (else None)."""
    axis = batch_axis(graph, shape)
    if axis is None or axis == 0:
        return None
    return f"{BATCH_NOTE} {axis} of {shape_text(shape)} (time first?), not on axis 0"


def batch_refusal(name: str, note: str, batch_first: list[str]) -> str:
    """One line: why output `name` (with `note`) cannot be the head, and what would work instead
    (`batch_first`: the outputs that could be the head)."""
    instead = (f"name a batch-first output with --output ({', '.join(batch_first)})" if batch_first else
               "this model has no batch-first float output: export a head that keeps one row per sample "
               "(e.g. the last time step, batch first), or cut the graph at a batch-first tensor "
               "(onnx.utils.Extractor) and audit that model")
    return (f"output {name!r} has {note}: it gives values per position (e.g. per time step), not one row "
            f"of class scores per sample as the classifier head (N, C) needs; {instead}")


def shape_text(shape: tuple | None) -> str:
    """`(time, batch, 4)`; `?` for an unknown axis or shape."""
    return "?" if shape is None else "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"
