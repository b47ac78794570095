"""The logits path of a converted model as a list of bound-propagation nodes.

`BoundNetwork.from_model` walks the fx graph of `ConvertedModel.logits_module` in order and
gives every node a rule from `verifier.bounds.ops`: an `Affine` map, an `Activation` (one per
site found by `verifier.graph`, decomposed patterns included, or an elementary convex/concave
kind), a `bilinear.Product` of two variables, or an `Interval`-only rule. Softmax, LayerNorm and
Div by a variable become several nodes (`verifier.bounds.decompose`; part `s` of fx node `n` is
named `n.s`, the last one `n`). The ONNX node (op type, attributes, constants) decides the rule;
the converted module is reused only to execute structural ops. Every node without a rule is
listed in one error. Nodes around a tensor that holds the batch off axis 0 are re-laid out to act
per sample, or the network is refused naming the first node where that fails
(`verifier.bounds.batch_axis`).
"""

from __future__ import annotations

import math
import operator
from collections.abc import Callable
from dataclasses import dataclass, replace

import onnx
import torch
from torch import fx

from verifier.bounds import bilinear, decompose, ops
from verifier.bounds.batch_axis import batch_first
from verifier.bounds.ops import Activation
from verifier.convert import ConvertedModel
from verifier.convert.compat import import_onnx2torch
from verifier.errors import UnsupportedOpsError
from verifier.graph import ActivationSite, OperatorGraph
from verifier.jacobian import as_module_input

import_onnx2torch()
from onnx2torch.onnx_graph import OnnxGraph  # noqa: E402


Rule = ops.Affine | ops.Interval | Activation  # bilinear.Product is an Interval with planes


@dataclass(frozen=True)
class BoundNode:
    """One node: its name (fx), what it is (ONNX op or site kind), variable inputs, and rule."""

    name: str
    op: str
    onnx_node: str
    inputs: tuple[str, ...]
    rule: Rule


@dataclass(frozen=True)
class BoundNetwork:
    """Nodes in topological order from the input to the logits."""

    input: str
    output: str
    nodes: tuple[BoundNode, ...]
    classes: int | None = None  # width of the logits, when the input shape is known at build time

    @classmethod
    def from_model(cls, model: ConvertedModel, dtype: torch.dtype = torch.float64,
                   device: torch.device | str = "cpu") -> BoundNetwork:
        """Build the bound network of a converted model (constants cast to `dtype` on `device`)."""
        if model.module_batch is not None:
            raise UnsupportedOpsError("bounds", [("<input>", model.input_spec.name,
                                                  f"fixed batch of {model.module_batch} kept: {model.batch.reason}")])
        return _Builder(model, dtype, torch.device(device)).build()

    def evaluate(self, x: torch.Tensor) -> torch.Tensor:
        """Forward pass through the rules (a check that the network matches the model)."""
        return self._values(x)[self.output]

    def values(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Every node's value (and the input's) on concrete inputs, by name."""
        return self._values(x)

    def units(self, x: torch.Tensor) -> int:
        """Values per sample over every node and the input (what one interval pass stores twice)."""
        return sum(self.value_sizes(x).values())

    def value_sizes(self, x: torch.Tensor) -> dict[str, int]:
        """Values per sample of the input and of every node, by name."""
        return {name: value[0].numel() for name, value in self._values(x[:1]).items()}

    def widest_backward(self, sizes: dict[str, int]) -> int:
        """Values per sample of the widest tensor a backward pass over the nodes holds, from
        `value_sizes`: a node's value, a MaxPool's value per tap of its windows, or what an affine
        op's transpose holds per row (`ops.Affine.workspace`: a convolution's unfolded input)."""
        widest = max(sizes.values())
        for node in self.nodes:
            if isinstance(node.rule, ops.Affine) and node.rule.workspace and node.name in sizes:
                widest = max(widest, math.ceil(sizes[node.name] * node.rule.workspace))
            if isinstance(node.rule, Activation) and node.rule.kind == "max_pool" and node.name in sizes:
                kernel = node.rule.params.get("kernel_shape") or [1]
                taps = math.prod(int(k) for k in (kernel if isinstance(kernel, (list, tuple)) else [kernel]))
                widest = max(widest, sizes[node.name] * taps)
        return widest

    def _values(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        values = {self.input: x}
        for node in self.nodes:
            values[node.name] = forward(node, [values[i] for i in node.inputs])
        return values


def forward(node: BoundNode, inputs: list[torch.Tensor]) -> torch.Tensor:
    """Evaluate one node on concrete tensors."""
    rule = node.rule
    if isinstance(rule, ops.Affine):
        return rule(*inputs)
    return rule.forward(*inputs)


class _Builder:
    def __init__(self, model: ConvertedModel, dtype: torch.dtype, device: torch.device) -> None:
        self.model, self.dtype, self.device = model, dtype, device
        self.module = model.logits_module
        self.graph = OperatorGraph(model.normalized)
        by_target = {n.unique_name: n for n in OnnxGraph(model.normalized.graph).nodes.values()}
        self.onnx_of_target = {target: self.graph.nodes.get(n.name) for target, n in by_target.items()}
        self.key_of_node = {id(node): key for key, node in self.graph.nodes.items()}
        self.tensor_of_fx = {fx_name: tensor for tensor, fx_name in model.tensor_nodes.items()}
        self.sites_by_output = {s.output: s for s in model.logit_sites}
        self.inner = {key for s in model.logit_sites for key in s.nodes}
        self.problems: list[tuple[str, str, str]] = []
        # a -inf attention mask (Add or Where of a constant) feeding a Softmax: its kept entries, by tensor
        self.softmax_masks: dict[str, torch.Tensor] = {}
        self._probe: dict[str, torch.Tensor] | None = None  # the model's values on a random input (probe_value)

    def constant(self, tensor: str) -> torch.Tensor | None:
        value = self.graph.constant(tensor)
        return None if value is None else torch.tensor(value, device=self.device, dtype=self.dtype)

    def build(self) -> BoundNetwork:
        nodes: list[BoundNode] = []
        input_name = output_name = ""
        for fx_node in self.module.graph.nodes:
            if fx_node.op == "placeholder":
                input_name = fx_node.name
            elif fx_node.op == "output":
                output_name = fx_node.args[0].name
            elif fx_node.op == "call_module":
                nodes += self._module_nodes(fx_node)
            elif fx_node.op == "call_function" and fx_node.target is operator.getitem:
                owner, index = fx_node.args
                nodes.append(BoundNode(fx_node.name, "getitem", owner.name, (owner.name,),
                                       ops.structural(lambda u, i=index: u[i])))
        if self.problems:
            raise UnsupportedOpsError("bounds", self.problems)
        network = BoundNetwork(input=input_name, output=output_name, nodes=tuple(_drop_unused(nodes, output_name)))
        shape = self.model.input_spec.shape or ()
        if len(shape) > 1 and all(isinstance(d, int) for d in shape[1:]):
            network, moved = batch_first(network, tuple(shape[1:]), self.dtype, self.device)
            if moved is not None:
                raise UnsupportedOpsError("bounds", [moved])
            probe = torch.zeros(1, *shape[1:], dtype=self.dtype, device=self.device)
            network = replace(network, classes=int(network.evaluate(probe).shape[-1]))
        return network

    def _fx_name(self, tensor: str) -> str:
        return self.model.tensor_nodes[tensor]

    def _module_nodes(self, fx_node: fx.Node) -> list[BoundNode]:
        onnx_node = self.onnx_of_target.get(fx_node.target)
        key = self.key_of_node.get(id(onnx_node), fx_node.target)
        tensor = self.tensor_of_fx.get(fx_node.name)
        site = self.sites_by_output.get(tensor)
        if site is not None:
            inputs = (self._fx_name(site.input),)
            parts = self._softmax_parts(site) if site.kind == "softmax" else None
            if parts is not None:
                return _expand(fx_node.name, key, inputs, parts)
            if site.input in self.softmax_masks:  # (never: softmax_mask takes only what the parts can drop)
                self.problems.append((key, "Softmax", "a -inf mask this Softmax's rule cannot drop"))
                return []
            return [BoundNode(fx_node.name, site.kind, key, inputs, self._activation(site))]
        if key in self.inner:
            return []  # inside a decomposed activation: covered by the site's node
        variables = [t for t in onnx_node.input if t and not self.graph.is_constant(t)]
        try:
            rule = self._rule(onnx_node, variables, fx_node)
        except (KeyError, ValueError, TypeError, NotImplementedError, RuntimeError) as err:
            rule = None
            self.problems.append((key, onnx_node.op_type, f"{type(err).__name__}: {err}"))
        if rule is None:
            if not any(p[0] == key for p in self.problems):
                self.problems.append((key, onnx_node.op_type, "no bound rule"))
            return []
        inputs = tuple(self._fx_name(t) for t in variables)
        if isinstance(rule, list):
            return _expand(fx_node.name, key, inputs, rule)
        return [BoundNode(fx_node.name, onnx_node.op_type, key, inputs, rule)]

    def probe_value(self, tensor: str) -> torch.Tensor | None:
        """`tensor`'s value (on the CPU) when the model runs on a seeded random normal input of two
        samples; None when the input shape is not static, the run fails or the tensor is not kept."""
        if self._probe is None:
            self._probe = self._probe_values()
        fx_name = self.model.tensor_nodes.get(tensor)
        return self._probe.get(fx_name) if fx_name is not None else None

    def _probe_values(self) -> dict[str, torch.Tensor]:
        shape = self.model.input_spec.shape or ()
        if len(shape) < 2 or not all(isinstance(d, int) for d in shape[1:]):
            return {}
        x = as_module_input(torch.randn(2, *shape[1:], generator=torch.Generator().manual_seed(0)), self.module)
        interpreter = fx.Interpreter(self.module, garbage_collect_values=False)
        try:
            with torch.no_grad():
                interpreter.run(x)
        except Exception:  # noqa: BLE001 - a model that cannot run on the probe gets no probe
            return {}
        return {node.name: value.detach().cpu() for node, value in interpreter.env.items() if torch.is_tensor(value)}

    def _softmax_parts(self, site: ActivationSite) -> list[decompose.Part] | None:
        try:
            dims = self._shape(site.input)
        except KeyError:
            return None
        shape = [d.dim_value if d.HasField("dim_value") else None for d in dims[1:]]
        return decompose.softmax(int(site.params.get("axis", -1)), bool(site.params.get("coerce_2d", False)),
                                 shape, keep=self.softmax_masks.get(site.input))

    def softmax_mask(self, output: str, keep: torch.Tensor) -> torch.Tensor | None:
        """`keep` (False: a -inf entry of a constant mask) broadcast to `output`'s per-sample shape, and
        recorded for the Softmax that reads it — when a Softmax (opset >= 13, over one axis) is the only
        reader of `output` and no row of it is masked whole; else None (the mask is not taken)."""
        sites = [s for s in self.model.logit_sites if s.kind == "softmax" and s.input == output]
        readers = self.graph.consumers.get(output, [])
        if len(sites) != 1 or len(readers) != 1 or readers[0] not in sites[0].nodes:
            return None
        if sites[0].params.get("coerce_2d", False):
            return None
        try:
            dims = self._shape(output)
        except KeyError:
            return None
        shape = [d.dim_value if d.HasField("dim_value") else None for d in dims[1:]]
        if any(d is None for d in shape):
            return None
        try:
            kept = torch.broadcast_to(keep.to(torch.bool), (1, *shape))
        except RuntimeError:
            return None  # the mask carries a batch of its own
        axis = int(sites[0].params.get("axis", -1)) % (len(shape) + 1)
        if axis == 0 or shape[axis - 1] > decompose.PAIRWISE_LIMIT:
            return None  # the Softmax keeps its interval rule, which knows no mask
        if not bool(kept.any(axis).all()):
            return None  # a row with no kept entry is NaN in the model itself
        self.softmax_masks[output] = kept
        return kept

    def _activation(self, site: ActivationSite) -> Activation:
        slope = None
        if site.kind == "prelu":
            slope = self.constant(self.graph.nodes[site.nodes[0]].input[1])
        function = _site_function(site, slope, self)
        return Activation(site.kind, dict(site.params), slope, function)

    def _rule(self, node: onnx.NodeProto, variables: list[str], fx_node: fx.Node) -> Rule | None:
        rule = RULES.get(node.op_type)
        if rule is None:
            return None
        context = _NodeContext(
            node=node,
            attributes={a.name: onnx.helper.get_attribute_value(a) for a in node.attribute},
            consts=[self.constant(t) if t else None for t in node.input],
            variables=variables,
            fx_node=fx_node,
            builder=self,
        )
        return rule(context)

    def _shape(self, tensor: str) -> list:
        infos = {vi.name: vi for vi in list(self.model.normalized.graph.value_info)
                 + list(self.model.normalized.graph.input) + list(self.model.normalized.graph.output)}
        if tensor not in infos:
            inferred = onnx.shape_inference.infer_shapes(self.model.normalized)
            infos = {vi.name: vi for vi in inferred.graph.value_info}
        return list(infos[tensor].type.tensor_type.shape.dim)

    def _module_call(self, fx_node: fx.Node, variables: list[str]) -> Callable[..., torch.Tensor]:
        """Call the converted module with constants in place and variables in ONNX input order."""
        module = self.module.get_submodule(fx_node.target)
        slots = []
        for arg in fx_node.args:
            if isinstance(arg, fx.Node) and arg.op == "get_attr":
                value = _fetch(self.module, arg.target)
                slots.append(("const", value))
            elif isinstance(arg, fx.Node):
                slots.append(("var", variables.index(self.tensor_of_fx[arg.name])))
            else:
                slots.append(("const", arg))
        kwargs = dict(fx_node.kwargs)

        def call(*inputs: torch.Tensor) -> torch.Tensor:
            args = [inputs[v] if kind == "var" else v for kind, v in slots]
            return module(*args, **kwargs)

        return call


@dataclass(frozen=True)
class _NodeContext:
    """What a rule may look at: the ONNX node, its attributes and constants, its variable inputs."""

    node: onnx.NodeProto
    attributes: dict
    consts: list
    variables: list[str]
    fx_node: fx.Node
    builder: _Builder

    @property
    def single(self) -> bool:
        """Exactly one variable input."""
        return len(self.variables) == 1

    def variable_at(self, position: int) -> bool:
        """Whether input `position` is the (single) variable input."""
        return self.single and self.node.input[position] == self.variables[0]

    def const(self, position: int):
        """The constant at input `position`, or None."""
        return self.consts[position] if len(self.consts) > position else None


def _gemm(c: _NodeContext) -> Rule | None:
    if c.variable_at(0) and not c.attributes.get("transA", 0):
        return ops.gemm(c.attributes, c.const(1), c.const(2))
    return None


def _matmul(c: _NodeContext) -> Rule | None:
    if c.single:
        first = c.variable_at(0)
        return ops.matmul(c.const(1) if first else c.const(0), first)
    if len(c.variables) != 2:
        return None
    return bilinear.product(True) if decompose.same_rank(c, 2) else ops.matrix_product()


def _conv(c: _NodeContext) -> Rule | None:
    return ops.conv(c.attributes, c.const(1), c.const(2)) if c.variable_at(0) else None


def _batch_norm(c: _NodeContext) -> Rule | None:
    return ops.batch_norm(c.attributes, *c.consts[1:5]) if c.variable_at(0) else None


def _add_sub(c: _NodeContext) -> Rule | None:
    subtract = c.node.op_type == "Sub"
    if len(c.variables) == 2:
        return ops.add_variables([1.0, -1.0 if subtract else 1.0])
    if not c.single:
        return None
    first = c.variable_at(0)
    other = c.const(1) if first else c.const(0)
    masked = None if subtract else _masked_constant(c, other, torch.zeros((), dtype=torch.bool))
    if masked is not None:
        return ops.shift(masked)
    if not bool(torch.isfinite(other).all()):  # back-substitution would meet 0 * inf
        raise ValueError("an infinite constant (other than a -inf mask that only a Softmax reads) has no "
                         "linear bound here")
    if not subtract:
        return ops.shift(other)
    return ops.shift(-other) if first else ops.shift(other, sign=-1.0)  # x - c, or c - x


def _mul(c: _NodeContext) -> Rule | list[decompose.Part] | None:
    if c.single:
        return ops.scale(c.const(1) if c.variable_at(0) else c.const(0))
    if len(c.variables) != 2:
        return None
    if c.variables[0] == c.variables[1]:  # x * x: one input
        return [decompose.Part("", "square", (0,), decompose.unary("square", {}))]
    if not decompose.same_rank(c, 1):
        return ops.product()
    return decompose.flax_layer_norm_parts(c) or bilinear.product(False)


def _masked_constant(c: _NodeContext, constant: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor | None:
    """A constant that masks attention scores with -inf where the node's output takes it (`chosen`:
    where the output is the variable's, whatever the constant), its -inf entries replaced by 0 — when
    only a Softmax reads the output, which then drops those entries (the builder records the mask);
    else None."""
    if not bool(torch.isneginf(constant).any()) or bool((torch.isnan(constant) | torch.isposinf(constant)).any()):
        return None
    try:
        keep = chosen | ~torch.isneginf(constant)
    except RuntimeError:
        return None
    if c.builder.softmax_mask(c.node.output[0], keep) is None:
        return None
    return torch.where(torch.isneginf(constant), torch.zeros_like(constant), constant)


def _where(c: _NodeContext) -> Rule | None:
    """Where with a constant condition (a mask); a condition that depends on the input is no affine map."""
    condition = c.const(0)
    if condition is None:
        return None
    if len(c.variables) == 2 and c.node.input[0] not in c.variables:
        return ops.select(condition)
    if c.variable_at(1) or c.variable_at(2):
        true_branch = c.variable_at(1)
        constant = c.const(2 if true_branch else 1)
        chosen = (condition != 0) if true_branch else (condition == 0)
        masked = _masked_constant(c, constant, chosen)
        return ops.select_constant(condition, constant if masked is None else masked, variable_when=true_branch)
    return None


def _neg(c: _NodeContext) -> Rule | None:
    return ops.scale(-1.0)


def _layer_norm(c: _NodeContext) -> list[decompose.Part] | None:
    axis = int(c.attributes.get("axis", -1))
    rank = len(c.builder._shape(c.node.input[0]))
    if not c.variable_at(0):
        return None
    eps = float(c.attributes.get("epsilon", 1e-5))
    return decompose.layer_norm(rank - axis if axis >= 0 else -axis, eps, c.const(1), c.const(2))


def _monotone(c: _NodeContext) -> Rule | None:
    return ops.monotone(ops.MONOTONE_UNARY[c.node.op_type]) if c.single else None


_FLOAT_ELEMS = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                          onnx.TensorProto.BFLOAT16})
_INTEGER_ELEMS = frozenset({onnx.TensorProto.INT8, onnx.TensorProto.INT16, onnx.TensorProto.INT32,
                            onnx.TensorProto.INT64, onnx.TensorProto.UINT8, onnx.TensorProto.UINT16,
                            onnx.TensorProto.UINT32, onnx.TensorProto.UINT64})


def _cast(c: _NodeContext) -> Rule | None:
    """Cast to a float type is the identity on the reals the bounds work in; to an integer type it
    truncates towards zero (onnxruntime, torch), a non-decreasing map (exact on held integers)."""
    to = int(c.attributes.get("to", 0))
    if to in _FLOAT_ELEMS:
        return ops.scale(1.0)
    return ops.monotone(torch.trunc) if to in _INTEGER_ELEMS and c.single else None


def _monotone_call(c: _NodeContext) -> Rule | None:
    """Max/Min with constants, ReduceMax/ReduceMin: non-decreasing in their one variable input."""
    return ops.monotone(c.builder._module_call(c.fx_node, c.variables)) if c.single else None


def _structural(c: _NodeContext) -> Rule | None:
    return ops.structural(c.builder._module_call(c.fx_node, c.variables),
                          reshape=c.node.op_type in ("Reshape", "Flatten") and c.single)


def _expand(name: str, key: str, inputs: tuple[str, ...], parts: list[decompose.Part]) -> list[BoundNode]:
    """BoundNodes of a decomposed op: part `s` is named `name.s`, the last one `name`."""
    def resolve(ref: int | str) -> str:
        return inputs[ref] if isinstance(ref, int) else f"{name}.{ref}"

    return [BoundNode(f"{name}.{p.suffix}" if p.suffix else name, p.op, key, tuple(resolve(r) for r in p.inputs),
                      p.rule) for p in parts]


# One rule per ONNX op family; an op missing here is "unsupported for bounds". Softmax and the
# activation kinds never reach this table: they are sites (see verifier.graph).
RULES: dict[str, Callable[[_NodeContext], Rule | list[decompose.Part] | None]] = {
    "Gemm": _gemm, "MatMul": _matmul, "Conv": _conv, "BatchNormalization": _batch_norm,
    "Add": _add_sub, "Sub": _add_sub, "Mul": _mul, "Neg": _neg, "Where": _where,
    "LayerNormalization": _layer_norm, "Cast": _cast,
    **{op: _monotone for op in ops.MONOTONE_UNARY},
    **{op: _monotone_call for op in ("Max", "Min", "ReduceMax", "ReduceMin")},
    **decompose.RULES,
    **{op: _structural for op in ops.STRUCTURAL_OPS},
}


def _fetch(module: torch.nn.Module, target: str) -> torch.Tensor:
    owner = module
    for part in target.split("."):
        owner = getattr(owner, part)
    return owner


def _site_function(site: ActivationSite, slope, builder: _Builder) -> Callable[[torch.Tensor], torch.Tensor]:
    kind, params = site.kind, site.params
    functions: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
        "relu": torch.relu,
        "leaky_relu": lambda u: torch.nn.functional.leaky_relu(u, float(params.get("alpha", 0.01))),
        "prelu": lambda u: torch.where(u >= 0, u, u * slope),
        "abs": torch.abs,
        "clip": lambda u: torch.clamp(u, params.get("min"), params.get("max")),
        "gelu": lambda u: torch.nn.functional.gelu(u, approximate=str(params.get("approximate", "none"))),
        "silu": torch.nn.functional.silu,
        "sigmoid": torch.sigmoid,
        "tanh": torch.tanh,
        "softplus": torch.nn.functional.softplus,
        "hard_swish": torch.nn.functional.hardswish,
    }
    if kind in functions:
        return functions[kind]
    if kind == "max_pool":
        fx_name = builder.model.tensor_nodes[site.output]
        fx_node = next(n for n in builder.module.graph.nodes if n.name == fx_name)
        return builder.module.get_submodule(fx_node.target)
    if kind == "softmax":
        return ops.softmax(int(params.get("axis", -1)), bool(params.get("coerce_2d", False))).forward
    raise NotImplementedError(kind)


def _drop_unused(nodes: list[BoundNode], output: str) -> list[BoundNode]:
    needed = {output}
    kept: list[BoundNode] = []
    for node in reversed(nodes):
        if node.name in needed:
            kept.append(node)
            needed.update(node.inputs)
    return list(reversed(kept))
