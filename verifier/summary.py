"""`inspect_model`: what a model is, at a glance (specs, ops, activation sites, family)."""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass

from verifier.graph import ActivationSite, OperatorGraph, json_safe
from verifier.onnx_io import ModelInfo, TensorSpec, load_model


@dataclass(frozen=True)
class ModelSummary:
    """Specs, op histogram, activation sites and family of a checked model."""

    info: ModelInfo
    op_histogram: dict[str, int]
    sites: tuple[ActivationSite, ...]
    family: str
    logits: str | None

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
        })

    def to_text(self) -> str:
        """A short human-readable report."""
        info = self.info
        opsets = ", ".join(f"{d or 'ai.onnx'} {v}" for d, v in sorted(info.opsets.items()))
        lines = [
            f"model      {info.path} ({info.size_bytes} bytes, sha256 {info.sha256[:12]}…)",
            f"producer   {info.producer_name or '?'} {info.producer_version}".rstrip(),
            f"format     IR {info.ir_version}; opsets: {opsets}",
            *(f"input      {_spec(s)}" for s in info.inputs),
            *(f"output     {_spec(s)}" for s in info.outputs),
            f"logits     {self.logits or 'none (no float output)'}",
            f"family     {self.family}",
            *(f"warning    constant with infinite values: {where}" for where in info.infinite_constants),
            "ops        " + ", ".join(f"{op} {n}" for op, n in self.op_histogram.items()),
            "sites      " + (", ".join(f"{k} {n}" for k, n in self.activation_counts.items()) or "none"),
        ]
        lines += [f"  #{s.index:<3} {s.kind:<11} {s.input} -> {s.output}  [{', '.join(s.nodes)}]" for s in self.sites]
        return "\n".join(lines)


def _spec(spec: TensorSpec) -> str:
    shape = "?" if spec.shape is None else "(" + ", ".join("?" if d is None else str(d) for d in spec.shape) + ")"
    return f"{spec.name}: {spec.dtype} {shape}"


def inspect_model(path: str | os.PathLike[str], memory_limit_bytes: int | None = None) -> ModelSummary:
    """Load and check a model, then summarise its graph."""
    loaded = load_model(path, memory_limit_bytes)
    graph = OperatorGraph(loaded.proto)
    sites = graph.find_activations()
    return ModelSummary(
        info=loaded.info,
        op_histogram=graph.op_histogram(),
        sites=tuple(sites),
        family=graph.model_family(sites),
        logits=graph.logits_tensor(),
    )
