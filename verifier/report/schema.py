"""The report.json contract: `SCHEMA_VERSION`, the JSON Schema, and `validate_report`.

One dict (the content of report.json) feeds every renderer. It is strict JSON (RFC 8259): no
NaN or Infinity floats anywhere; where a value may be non-finite the string "Infinity" (or
"NaN"/"-Infinity" in pass-through dicts) is written, as `verifier.graph.json_safe` does. The
fields are documented in docs/report.md; `validate_report` checks the schema and the few
cross-field rules a schema cannot say (deltas in order, a complete report covers the grid).
"""

from __future__ import annotations

import math
from datetime import datetime

import jsonschema

from verifier.errors import VerifierError

SCHEMA_VERSION = "1.0"
STAGES = ("inspect", "validate", "certify", "attacks", "report")
THRESHOLDS = ("max_risk", "min_certified_accuracy", "min_robust_accuracy")
_SHOWN = 120

_NUMBER = {"type": "number"}
_NONNEG = {"type": "number", "minimum": 0}
_PROB = {"type": "number", "minimum": 0, "maximum": 1}
_STR_LIST = {"type": "array", "items": {"type": "string"}}


def _nullable(schema: dict) -> dict:
    return {"anyOf": [schema, {"type": "null"}]}


def _strict(required: dict, optional: dict | None = None) -> dict:
    """An object with exactly these keys (all of `required` present)."""
    return {"type": "object", "required": list(required), "additionalProperties": False,
            "properties": {**required, **(optional or {})}}


def _open(required: dict) -> dict:
    """An object with at least these keys (pass-through dicts of other modules)."""
    return {"type": "object", "required": list(required), "properties": dict(required)}


_DEFS = {
    "bound": {"title": "a number, \"Infinity\" (a vacuous bound) or null",
              "anyOf": [{"type": ["number", "null"]}, {"const": "Infinity"}]},
    "measure": {"title": "a number or \"NaN\"/\"Infinity\"/\"-Infinity\"",
                "anyOf": [{"type": "number"}, {"enum": ["NaN", "Infinity", "-Infinity"]}]},
    "check": {"title": "\"pass\", \"fail\" or null", "enum": ["pass", "fail", None]},
    "attack": _strict({
        "risk": _NUMBER,
        "robust_accuracy": _nullable(_PROB),
        "transport_cost": _NONNEG,
        "replayed_in_onnxruntime": {"type": ["boolean", "null"]},
        "seconds": _NONNEG,
        "flags": _STR_LIST,
    }),
}

_RESULT = _strict({
    "delta": _NONNEG,
    "clean_risk": _NUMBER,
    "clean_accuracy": _PROB,
    "certificate": {"$ref": "#/$defs/bound"},
    "global_bound": {"$ref": "#/$defs/bound"},
    "first_order_estimate": _nullable(_NUMBER),
    "certified_accuracy": _nullable(_PROB),
    "exact": {"type": ["boolean", "null"]},
    "fallbacks": _STR_LIST,
    "attacks": {"type": "object", "additionalProperties": {"$ref": "#/$defs/attack"}},
    "best_attack": {"type": ["string", "null"]},
    "best_attack_risk": _nullable(_NUMBER),
    "best_attack_accuracy": _nullable(_PROB),
    "tightness": _nullable(_NUMBER),
    "verdict": _strict({name: {"$ref": "#/$defs/check"} for name in THRESHOLDS}),
}, {
    # share of the samples whose decisive growth-curve point came from each route (milp_exact, milp_bound, ...)
    "curve_sources": {"type": "object", "additionalProperties": _PROB},
})

_EXACT_MODE = _strict({
    "mode": {"enum": ["auto", "on", "split", "off"]},
    "active": {"type": "boolean"},
    "reason": {"type": ["string", "null"]},
    "points_solved": {"type": "integer", "minimum": 0},
    "points_optimal": {"type": "integer", "minimum": 0},
    "points_skipped": {"type": "integer", "minimum": 0},
    "seconds": _NONNEG,
}, {"solver": {"enum": ["milp", "split", None]}, "penalised_points": {"type": "integer", "minimum": 0}})

_MODEL = _open({
    "path": {"type": "string"},
    "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
    "opset": {"type": ["integer", "null"]},
    "producer": _open({"name": {"type": "string"}, "version": {"type": "string"}}),
    "inputs": {"type": "array", "items": _open({"name": {"type": "string"}})},
    "outputs": {"type": "array", "items": _open({"name": {"type": "string"}})},
    "node_count": {"type": "integer", "minimum": 0},
    "op_histogram": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}},
    "family": {"type": "string"},
    "activation_counts": {"type": "object", "additionalProperties": {"type": "integer", "minimum": 0}},
    "activation_sites": {"type": "array", "items": _open({
        "index": {"type": "integer"}, "kind": {"type": "string"},
        "nodes": _STR_LIST, "input": {"type": "string"}, "output": {"type": "string"}})},
    "logits": {"type": ["string", "null"]},
})

_CONVERSION = _open({
    "passed": {"type": "boolean"},
    "samples": {"type": "integer", "minimum": 0},
    "max_abs_diff": {"$ref": "#/$defs/measure"},
    "max_rel_diff": {"$ref": "#/$defs/measure"},
    "top1_agreement": _nullable({"$ref": "#/$defs/measure"}),
    "providers": _STR_LIST,
    "atol": _NONNEG,
    "rtol": _NONNEG,
    "outputs": {"type": "array", "items": _open({
        "name": {"type": "string"}, "max_abs_diff": {"$ref": "#/$defs/measure"},
        "within_tolerance": {"type": "boolean"}})},
})

REPORT_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://verifier.invalid/report/1.0",
    "title": "verifier audit report",
    "$defs": _DEFS,
    **_strict({
        "schema_version": {"const": SCHEMA_VERSION},
        "complete": {"type": "boolean"},
        "stopped_at": {"enum": [*STAGES, None]},
        "generated_at": {"type": "string", "pattern": r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}"},
        "producer": _strict({"name": {"const": "verifier"}, "version": {"type": "string"}}),
        "versions": {**_open({name: {"type": ["string", "null"]}
                              for name in ("verifier", "python", "torch", "onnx", "onnxruntime")}),
                     "additionalProperties": {"type": ["string", "null"]}},
        "device": {"type": "string"},
        "seed": {"type": ["integer", "null"]},
        "model": _MODEL,
        "data": _strict({"path": {"type": ["string", "null"]},
                         "sha256": {"type": ["string", "null"], "pattern": "^[0-9a-f]{64}$"},
                         "samples": {"type": "integer", "minimum": 1}}),
        "conversion": _nullable(_CONVERSION),
        "settings": _strict({
            "p": {"anyOf": [{"type": "number", "minimum": 1}, {"const": "Infinity"}]},
            "norm": {"enum": ["inf", "2", "1"]},
            "loss": {"enum": ["ce", "margin", "zero_one", "dlr"]},
            "box": _nullable({"type": "array", "items": _NUMBER, "minItems": 2, "maxItems": 2}),
            "deltas": {"type": "array", "items": _NONNEG, "minItems": 1},
            "attacks": _STR_LIST,
            "samples": {"type": "integer", "minimum": 1},
            "time_limit": _nullable({"type": "number", "exclusiveMinimum": 0}),
            "thresholds": _strict({"max_risk": _nullable(_NUMBER),
                                   "min_certified_accuracy": _nullable(_PROB),
                                   "min_robust_accuracy": _nullable(_PROB)}),
        }, {"exact": {"enum": ["auto", "on", "split", "off"]},
            "optimise_slopes": _nullable({"enum": ["final", "intermediate"]})}),
        "timings": _strict({name: _nullable(_NONNEG) for name in (*STAGES, "total")}),
        "local_slopes": _nullable(_strict({
            "norm": {"enum": ["inf", "2", "1"]},
            "per_sample": {"type": "array", "items": _NONNEG},
            "global": {"anyOf": [_nullable(_NONNEG), {"const": "Infinity"}]},
        })),
        "results": {"type": "array", "items": _RESULT},
        "exact_up_to_delta": _nullable(_NONNEG),
        "warnings": _STR_LIST,
        "verdict": _strict({
            "passed": {"type": ["boolean", "null"]},
            "exit_code": {"enum": [0, 1, 3]},
            "failures": _STR_LIST,
            "summary": {"type": "string"},
        }),
    }, {"exact_mode": _nullable(_EXACT_MODE)}),
}


class ReportSchemaError(VerifierError):
    """A report dict does not follow the report.json schema (a bug in whoever built it)."""

    exit_code = 4

    def __init__(self, where: str, problem: str) -> None:
        super().__init__(f"invalid report at {where or 'the top level'}: {problem}")


def _where(path) -> str:
    """A JSON path as `results[0].attacks.pgd.risk`."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= _SHOWN else text[: _SHOWN - 3] + "..."


def _check_plain(value, path: tuple = ()) -> None:
    """Only JSON values: dicts with string keys, lists, str, finite numbers, bools, None."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, str):
                raise ReportSchemaError(_where(path), f"key {_short(key)} is not a string")
            _check_plain(item, (*path, key))
    elif isinstance(value, (list, tuple)):
        for index, item in enumerate(value):
            _check_plain(item, (*path, index))
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ReportSchemaError(_where(path), f"{value} is not strict JSON (write non-finite numbers "
                                                  "as strings, see verifier.graph.json_safe)")
    elif value is not None and not isinstance(value, (str, int, bool)):
        shown = str(value) if len(str(value)) <= _SHOWN else str(value)[: _SHOWN - 3] + "..."
        raise ReportSchemaError(_where(path), f"{type(value).__module__}.{type(value).__name__} {shown} is not "
                                              "a JSON value (finalize_report converts numpy scalars)")


def _message(error: jsonschema.ValidationError) -> str:
    if error.validator in ("anyOf", "oneOf", "$ref"):
        title = error.schema.get("title")
        if title is None and "$ref" in error.schema:
            title = _DEFS[error.schema["$ref"].rsplit("/", 1)[-1]].get("title")
        if title:
            return f"{_short(error.instance)} is not {title}"
    if error.validator == "additionalProperties":
        return error.message
    return error.message if len(error.message) <= 2 * _SHOWN else (
        f"{_short(error.instance)} fails {error.validator!r}")


def _check_rules(report: dict) -> None:
    """Cross-field rules: the results follow the settings' grid; complete covers all of it."""
    try:
        datetime.fromisoformat(report["generated_at"])
    except ValueError:
        raise ReportSchemaError("generated_at", f"{report['generated_at']!r} is not an ISO 8601 time") from None
    settings = report["settings"]
    grid, methods = settings["deltas"], set(settings["attacks"])
    seen = [r["delta"] for r in report["results"]]
    if any(d not in grid for d in seen) or seen != sorted(seen) or len(set(seen)) != len(seen):
        raise ReportSchemaError("results", f"deltas {seen} must be distinct, ascending and from settings.deltas")
    for index, result in enumerate(report["results"]):
        extra = sorted(set(result["attacks"]) - methods)
        if extra:
            raise ReportSchemaError(f"results[{index}].attacks", f"{extra} not in settings.attacks")
        if report["complete"] and set(result["attacks"]) != methods:
            raise ReportSchemaError(f"results[{index}].attacks", "a complete report has every attack of settings")
    if report["complete"]:
        if seen != sorted(grid):
            raise ReportSchemaError("results", f"a complete report has every delta of settings ({sorted(grid)})")
        if report["stopped_at"] is not None or report["verdict"]["exit_code"] == 3:
            raise ReportSchemaError("stopped_at", "a complete report has stopped_at null and exit_code 0 or 1")
    elif report["stopped_at"] is None or report["verdict"]["exit_code"] == 0:
        raise ReportSchemaError("stopped_at", "a partial report (complete: false) names the stage it stopped at "
                                              "and has exit_code 1 or 3")


def validate_report(report: dict) -> None:
    """Raise `ReportSchemaError` (one line naming the field) unless `report` is a valid report.json."""
    if not isinstance(report, dict):
        raise ReportSchemaError("", f"the report is a {type(report).__name__}, not a dict")
    _check_plain(report)
    validator = jsonschema.Draft202012Validator(REPORT_SCHEMA)
    error = jsonschema.exceptions.best_match(validator.iter_errors(report))
    if error is not None:
        raise ReportSchemaError(_where(error.absolute_path), _message(error))
    _check_rules(report)
