"""A VNN-LIB property (the subset VNN-COMP uses), parsed by our own small s-expression reader.

A property declares inputs `X_i` and outputs `Y_j` (`declare-const NAME Real`), bounds every
input by `(assert (<= X_i c))` / `(assert (>= X_i c))` (one box), and states the **unsafe**
outputs: the conjunction of the output assertions, where one assertion may be an
`(or (and ...) ...)` of linear constraints. `X_i` indexes the model's input flattened in C order,
`Y_j` its output flattened. `sat` means some input of the box reaches the unsafe set (a
counterexample), `unsat` that none does (the property is verified).

Every constraint is kept as `c·Y + d <= 0` (`>=` is negated, `<` / `>` are read as `<=` / `>=`,
what sound bounds and float counterexamples can decide); `Property.unsafe` is the disjunction
(a tuple) of conjunctions (an `(K, M)` matrix and `(K,)` offsets). Input-region disjunctions,
output terms with `X` and non-linear terms are refused with one line.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from itertools import product

import numpy as np

from verifier.errors import UsageError

_TOKEN = re.compile(r"\(|\)|[^\s()]+")
_NAME = re.compile(r"^([XY])_(\d+)$")


@dataclass(frozen=True, eq=False)
class Conjunction:
    """`coefficients @ Y + offsets <= 0`, every row at once."""

    coefficients: np.ndarray  # (K, M)
    offsets: np.ndarray  # (K,)

    def holds(self, outputs: np.ndarray) -> np.ndarray:
        """Per row of `outputs` (N, M): whether every constraint holds."""
        return np.all(outputs @ self.coefficients.T + self.offsets <= 0, axis=-1)


@dataclass(frozen=True, eq=False)
class Property:
    """The input box and the unsafe output set (a disjunction of conjunctions)."""

    low: np.ndarray  # (n,)
    high: np.ndarray  # (n,)
    outputs: int
    unsafe: tuple[Conjunction, ...]

    def violated_by(self, outputs: np.ndarray) -> np.ndarray:
        """Per row of `outputs` (N, M): whether it lies in the unsafe set."""
        return np.any([c.holds(outputs) for c in self.unsafe], axis=0)


def read_property(path: str) -> Property:
    """Parse a `.vnnlib` file (one-line `UsageError` on anything outside the subset)."""
    try:
        with open(path, encoding="utf-8") as handle:
            text = handle.read()
    except OSError as err:
        raise UsageError(f"cannot read the property {path}: {err.strerror or err}") from err
    return parse_property(text, path)


def parse_property(text: str, source: str = "the property") -> Property:
    """Parse VNN-LIB text."""
    tokens = _TOKEN.findall("\n".join(line.split(";", 1)[0] for line in text.splitlines()))
    expressions = []
    while tokens:
        expressions.append(_read(tokens, source))
    inputs, outputs = _declared(expressions, source)
    low, high = np.full(inputs, -np.inf), np.full(inputs, np.inf)
    conjunctions: list[list[tuple[np.ndarray, float]]] = [[]]
    for expression in expressions:
        if not isinstance(expression, list) or not expression or expression[0] != "assert":
            continue
        if len(expression) != 2:
            raise UsageError(f"{source}: assert takes one term")
        term = expression[1]
        bound = _input_bound(term, inputs, outputs, source)
        if bound is not None:
            index, value, is_upper = bound
            if is_upper:
                high[index] = min(high[index], value)
            else:
                low[index] = max(low[index], value)
            continue
        options = [_conjunction(option, inputs, outputs, source) for option in _disjuncts(term)]
        conjunctions = [left + right for left, right in product(conjunctions, options)]
    if not np.all(np.isfinite(low) & np.isfinite(high)) or np.any(low > high):
        raise UsageError(f"{source}: every input X_i needs a finite lower and upper bound (low <= high)")
    if conjunctions == [[]]:
        raise UsageError(f"{source}: no output constraint (nothing is unsafe)")
    unsafe = tuple(Conjunction(np.array([c for c, _ in rows]), np.array([d for _, d in rows]))
                   for rows in conjunctions)
    return Property(low=low, high=high, outputs=outputs, unsafe=unsafe)


def _read(tokens: list[str], source: str):
    token = tokens.pop(0)
    if token == ")":
        raise UsageError(f"{source}: unbalanced ')'")
    if token != "(":
        return token
    items = []
    while tokens and tokens[0] != ")":
        items.append(_read(tokens, source))
    if not tokens:
        raise UsageError(f"{source}: unbalanced '('")
    tokens.pop(0)
    return items


def _declared(expressions: list, source: str) -> tuple[int, int]:
    counts = {"X": 0, "Y": 0}
    for expression in expressions:
        if isinstance(expression, list) and expression and expression[0] == "declare-const":
            match = _NAME.match(str(expression[1])) if len(expression) == 3 else None
            if match is None or expression[2] != "Real":
                raise UsageError(f"{source}: only 'declare-const X_i Real' / 'Y_j Real' are supported, got "
                                 f"{_text(expression)}")
            counts[match.group(1)] = max(counts[match.group(1)], int(match.group(2)) + 1)
    if not counts["X"] or not counts["Y"]:
        raise UsageError(f"{source}: declares no X_i inputs or no Y_j outputs")
    return counts["X"], counts["Y"]


def _input_bound(term, inputs: int, outputs: int, source: str) -> tuple[int, float, bool] | None:
    """`(<= X_i c)`, `(>= X_i c)` or mirrored: (index, value, is an upper bound); else None."""
    if not (isinstance(term, list) and len(term) == 3 and term[0] in ("<=", ">=", "<", ">")):
        return None
    left, right = term[1], term[2]
    for variable, number, upper in ((left, right, term[0] in ("<=", "<")), (right, left, term[0] in (">=", ">"))):
        match = _NAME.match(variable) if isinstance(variable, str) else None
        if match and match.group(1) == "X" and _is_number(number):
            index = int(match.group(2))
            if index >= inputs:
                raise UsageError(f"{source}: {variable} is not declared")
            return index, float(number), upper
    return None


def _disjuncts(term) -> list:
    if isinstance(term, list) and term and term[0] == "or":
        return term[1:]
    return [term]


def _conjunction(term, inputs: int, outputs: int, source: str) -> list[tuple[np.ndarray, float]]:
    parts = term[1:] if isinstance(term, list) and term and term[0] == "and" else [term]
    rows = []
    for part in parts:
        if _input_bound(part, inputs, outputs, source) is not None:
            raise UsageError(f"{source}: input bounds inside 'or' (several input regions) are not supported")
        if not (isinstance(part, list) and len(part) == 3 and part[0] in ("<=", ">=", "<", ">")):
            raise UsageError(f"{source}: expected a comparison, got {_text(part)}")
        left = _linear(part[1], outputs, source)
        right = _linear(part[2], outputs, source)
        sign = 1.0 if part[0] in ("<=", "<") else -1.0  # a <= b  <=>  a - b <= 0
        rows.append((sign * (left[0] - right[0]), sign * (left[1] - right[1])))
    return rows


def _linear(term, outputs: int, source: str) -> tuple[np.ndarray, float]:
    """(coefficients over Y, constant) of a linear term."""
    if isinstance(term, str):
        if _is_number(term):
            return np.zeros(outputs), float(term)
        match = _NAME.match(term)
        if match is None or match.group(1) != "Y":
            raise UsageError(f"{source}: output constraints may use Y_j and numbers only, got {term}")
        index = int(match.group(2))
        if index >= outputs:
            raise UsageError(f"{source}: {term} is not declared")
        row = np.zeros(outputs)
        row[index] = 1.0
        return row, 0.0
    if not term:
        raise UsageError(f"{source}: empty term")
    head, args = term[0], [_linear(a, outputs, source) for a in term[1:]]
    if head == "+":
        return sum((a[0] for a in args), np.zeros(outputs)), sum(a[1] for a in args)
    if head == "-" and len(args) == 1:
        return -args[0][0], -args[0][1]
    if head == "-":
        return args[0][0] - sum((a[0] for a in args[1:]), np.zeros(outputs)), args[0][1] - sum(a[1] for a in args[1:])
    if head == "*" and len(args) == 2 and (not args[0][0].any() or not args[1][0].any()):
        scale, other = (args[0], args[1]) if not args[0][0].any() else (args[1], args[0])
        return scale[1] * other[0], scale[1] * other[1]
    raise UsageError(f"{source}: unsupported term {_text(term)} (linear terms only)")


def _is_number(token) -> bool:
    try:
        float(token)
    except (TypeError, ValueError):
        return False
    return isinstance(token, str)


def _text(expression) -> str:
    return expression if isinstance(expression, str) else "(" + " ".join(_text(e) for e in expression) + ")"


def counterexample_text(x: np.ndarray, y: np.ndarray) -> str:
    """VNN-COMP's result format: `sat` then `((X_0 v) ... (Y_0 v) ...)`."""
    pairs = [f"(X_{i} {float(v)!r})" for i, v in enumerate(x.reshape(-1))]
    pairs += [f"(Y_{j} {float(v)!r})" for j, v in enumerate(y.reshape(-1))]
    return "sat\n(" + "\n ".join(pairs) + ")\n"


def read_counterexample(text: str) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) from a VNN-COMP `sat` result file."""
    values = {"X": {}, "Y": {}}
    for name, value in re.findall(r"\(\s*([XY]_\d+)\s+([^\s()]+)\s*\)", text):
        kind, index = name.split("_")
        values[kind][int(index)] = float(value)
    return tuple(np.array([v[i] for i in range(len(v))]) for v in (values["X"], values["Y"]))
