"""`inspect_model`: what a model is, at a glance (specs, ops, head, activation sites, family).

The summary also says which output is the classifier head and why (`verifier.head`), and lists
every node the other commands would refuse (the same check `convert_model` runs), first.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

from verifier.graph import ActivationSite, OperatorGraph, json_safe
from verifier.head import Head, OutputCandidate, choose_head, family_tensor, output_candidates
from verifier.onnx_io import LoadedModel, ModelInfo, TensorSpec, load_model

if TYPE_CHECKING:
    from verifier.convert.batch import BatchAxis


@dataclass(frozen=True)
class ModelSummary:
    """Specs, op histogram, head, activation sites, family, and what blocks the analysis."""

    info: ModelInfo
    op_histogram: dict[str, int]
    sites: tuple[ActivationSite, ...]
    family: str
    logits: str | None  # the user's tensor the logits are read from (one logit for a binary head)
    head: Head | None = None
    candidates: tuple[OutputCandidate, ...] = ()
    unsupported: tuple[tuple[str, str, str], ...] = ()  # (node, op, why), as UnsupportedOpsError lists them
    unsupported_message: str | None = None  # the other commands' one-line error, when there is one
    batch: BatchAxis | None = None  # how the data input's batch axis is handled (None: not normalisable)
    perturb_candidates: tuple[str, ...] = ()  # tensors for --perturb (a model with several or integer inputs)
    perturb_needed: str | None = None  # why the other commands need --perturb (None: they do not)

    @property
    def activation_counts(self) -> dict[str, int]:
        """Number of sites of each kind."""
        return dict(sorted(Counter(site.kind for site in self.sites).items()))

    def to_dict(self) -> dict:
        """JSON-ready form (the keys documented in docs/cli.md; non-finite numbers as strings)."""
        return json_safe({
            **self.info.to_dict(),
            "node_count": sum(self.op_histogram.values()),
            "op_histogram": dict(self.op_histogram),
            "family": self.family,
            "activation_counts": self.activation_counts,
            "activation_sites": [site.to_dict() for site in self.sites],
            "logits": self.logits,
            "head": None if self.head is None else self.head.to_dict(),
            "output_candidates": [c.to_dict() for c in self.candidates],
            "unsupported_ops": [{"node": n, "op": op, "reason": why} for n, op, why in self.unsupported],
            "batch": None if self.batch is None else self.batch.to_dict(),
            "perturb_candidates": list(self.perturb_candidates),
            "perturb_needed": self.perturb_needed,
        })

    def to_text(self) -> str:
        """A short human-readable report (unsupported ops first)."""
        info = self.info
        opsets = ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in sorted(info.opsets.items()))
        lines = [f"UNSUPPORTED {op} at node {name!r}: {why}" for name, op, why in self.unsupported]
        lines += [
            f"model      {info.path} ({info.size_bytes} bytes, sha256 {info.sha256[:12]}…)",
            f"producer   {info.producer_name or '?'} {info.producer_version}".rstrip(),
            f"format     IR {info.ir_version}; opsets: {opsets}",
            *(f"input      {_spec(s)}" for s in info.inputs),
            *(f"output     {_spec(s)}  [{_role(c, self.head)}]" for s, c in zip(info.outputs, self._by_output())),
            f"head       {self.head.reason if self.head else 'none'}"
            + (" (chosen by --output)" if self.head and self.head.chosen_by == "--output" else ""),
            f"logits     {self.logits or 'none (no output can be the head)'}",
            f"family     {self.family}",
            *([f"batch      {self.batch.describe()}"] if self.batch is not None else []),
            *(f"warning    constant with infinite values: {where}" for where in info.infinite_constants),
            "ops        " + ", ".join(f"{op} {n}" for op, n in self.op_histogram.items()),
            "sites      " + (", ".join(f"{k} {n}" for k, n in self.activation_counts.items()) or "none"),
        ]
        lines += [f"  #{s.index:<3} {s.kind:<11} {s.input} -> {s.output}  [{', '.join(s.nodes)}]" for s in self.sites]
        if self.perturb_needed:
            lines.append(f"perturb    {self.perturb_needed}")
        if self.perturb_candidates:
            lines.append("candidates " + ", ".join(self.perturb_candidates) + "  (for --perturb)")
        return "\n".join(lines)

    def _by_output(self) -> list[OutputCandidate | None]:
        found = {c.name: c for c in self.candidates}
        return [found.get(spec.name) for spec in self.info.outputs]


def _role(candidate: OutputCandidate | None, head: Head | None) -> str:
    if candidate is None:
        return "?"
    if head is not None and candidate.name == head.output:
        return f"head: {head.kind}"
    return candidate.note


def _spec(spec: TensorSpec) -> str:
    shape = "?" if spec.shape is None else "(" + ", ".join("?" if d is None else str(d) for d in spec.shape) + ")"
    return f"{spec.name}: {spec.dtype} {shape}"


def inspect_model(path: str | os.PathLike[str], output: str | None = None,
                  memory_limit_bytes: int | None = None) -> ModelSummary:
    """Load and check a model, then summarise its graph; `output` names the head (`--output`)."""
    return summarize_model(load_model(path, memory_limit_bytes, any_inputs=True), output)


def summarize_model(loaded: LoadedModel, output: str | None = None) -> ModelSummary:
    """The summary of a model already loaded and checked by `load_model`."""
    from verifier.convert import conversion_check  # the conversion check the other commands run (torch)

    from verifier.perturb import perturbation_candidates

    graph = OperatorGraph(loaded.proto)
    sites = graph.find_activations()
    candidates = output_candidates(graph)
    head = choose_head(graph, output) if output is not None or any(c.usable for c in candidates) else None
    needed = _perturb_needed(loaded.info)
    normalized, blocked = (None, None) if needed or head is None else conversion_check(loaded, output)
    return ModelSummary(
        info=loaded.info,
        op_histogram=graph.op_histogram(),
        sites=tuple(sites),
        family=graph.model_family(sites, family_tensor(graph, head) if head else None),
        logits=head.tensor if head else None,
        head=head,
        candidates=candidates,
        unsupported=() if blocked is None else blocked.nodes,
        unsupported_message=None if blocked is None else str(blocked),
        batch=None if normalized is None else normalized.batch,
        perturb_candidates=tuple(perturbation_candidates(loaded.proto)),
        perturb_needed=needed,
    )


def _perturb_needed(info: ModelInfo) -> str | None:
    """Why the other commands need `--perturb`: several inputs, or one that is not float."""
    if len(info.inputs) > 1:
        return (f"{len(info.inputs)} inputs: name the perturbed one (or a float tensor inside the graph) with "
                "--perturb; the others are held fixed, read per sample from the data file by name")
    if info.inputs and info.inputs[0].dtype not in ("float32", "float64", "float16", "bfloat16"):
        return (f"input {info.inputs[0].name!r} is {info.inputs[0].dtype}: perturb a float tensor inside the graph "
                "with --perturb TENSOR (the model is cut there)")
    return None
