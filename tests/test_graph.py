"""Activation sites and model family, on hand-built graphs and on every shipped model."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import SHIPPED, const, float_io, make_model, shipped_model
from onnx import helper

from verifier.graph import OperatorGraph, find_activations
from verifier.head import choose_head
from verifier.onnx_io import load_model

N = helper.make_node
SQRT2 = math.sqrt(2.0)


def family_of(graph: OperatorGraph, sites) -> str:
    """The family judged on the default head's logits, as `inspect` does."""
    return graph.model_family(sites, choose_head(graph).logits)


def _wrap(act_nodes, act_inits=(), opset: int = 17, out: str = "a"):
    """x -> Gemm(transB=1) -> [activation: h -> a] -> MatMul + Add -> y."""
    nodes = [N("Gemm", ["x", "w1", "b1"], ["h"], name="fc1", transB=1), *act_nodes,
             N("MatMul", [out, "w2"], ["m"], name="fc2"), N("Add", ["m", "b2"], ["y"], name="bias2")]
    inits = [const("w1", np.ones((5, 4))), const("b1", np.zeros(5)), const("w2", np.ones((5, 3))),
             const("b2", np.zeros(3)), *act_inits]
    return make_model(nodes, [float_io("x", ["n", 4])], [float_io("y", ["n", 3])], inits, opset)


GELU_ERF_VARIANTS = {
    "div_then_x_half": ([N("Div", ["h", "s2"], ["d"]), N("Erf", ["d"], ["e"]), N("Add", ["e", "one"], ["p"]),
                         N("Mul", ["h", "p"], ["q"]), N("Mul", ["q", "half"], ["a"])],
                        [const("s2", SQRT2), const("one", 1.0), const("half", 0.5)]),
    "mul_inv_sqrt2_half_first": ([N("Mul", ["inv", "h"], ["d"]), N("Erf", ["d"], ["e"]),
                                  N("Add", ["one", "e"], ["p"]), N("Mul", ["half", "h"], ["hh"]),
                                  N("Mul", ["p", "hh"], ["a"])],
                                 [const("inv", 1 / SQRT2), const("one", 1.0), const("half", 0.5)]),
    "half_times_p_then_x": ([N("Div", ["h", "s2"], ["d"]), N("Erf", ["d"], ["e"]), N("Add", ["e", "one"], ["p"]),
                             N("Mul", ["p", "half"], ["q"]), N("Mul", ["q", "h"], ["a"])],
                            [const("s2", SQRT2), const("one", 1.0), const("half", 0.5)]),
    "div_by_two": ([N("Div", ["h", "s2"], ["d"]), N("Erf", ["d"], ["e"]), N("Add", ["e", "one"], ["p"]),
                    N("Mul", ["h", "p"], ["q"]), N("Div", ["q", "two"], ["a"])],
                   [const("s2", SQRT2), const("one", 1.0), const("two", 2.0)]),
}

GELU_TANH_VARIANTS = {
    "pow": ([N("Pow", ["h", "three"], ["c"]), N("Mul", ["c", "k"], ["ck"]), N("Add", ["h", "ck"], ["inner"]),
             N("Mul", ["inner", "s"], ["t_in"]), N("Tanh", ["t_in"], ["t"]), N("Add", ["t", "one"], ["p"]),
             N("Mul", ["h", "half"], ["hh"]), N("Mul", ["hh", "p"], ["a"])],
            [const("three", 3.0), const("k", 0.044715), const("s", math.sqrt(2 / math.pi)), const("one", 1.0),
             const("half", 0.5)]),
    "x_x_x": ([N("Mul", ["h", "h"], ["h2"]), N("Mul", ["h2", "h"], ["c"]), N("Mul", ["c", "k"], ["ck"]),
               N("Add", ["h", "ck"], ["inner"]), N("Mul", ["inner", "s"], ["t_in"]), N("Tanh", ["t_in"], ["t"]),
               N("Add", ["t", "one"], ["p"]), N("Mul", ["h", "p"], ["q"]), N("Mul", ["q", "half"], ["a"])],
              [const("k", 0.044715), const("s", math.sqrt(2 / math.pi)), const("one", 1.0), const("half", 0.5)]),
}


def _sites(model):
    return OperatorGraph(model).find_activations()


@pytest.mark.parametrize("variant", sorted(GELU_ERF_VARIANTS))
def test_decomposed_gelu_erf(variant):
    nodes, inits = GELU_ERF_VARIANTS[variant]
    model = _wrap(nodes, inits)
    (site,) = _sites(model)
    assert site.kind == "gelu" and site.params == {"approximate": "none"}
    assert site.input == "h" and site.output == "a"
    assert len(site.nodes) == len(nodes)
    assert family_of(OperatorGraph(model), [site]) == "smooth"


@pytest.mark.parametrize("variant", sorted(GELU_TANH_VARIANTS))
def test_decomposed_gelu_tanh(variant):
    nodes, inits = GELU_TANH_VARIANTS[variant]
    (site,) = _sites(_wrap(nodes, inits))
    assert (site.kind, site.params, site.input, site.output) == ("gelu", {"approximate": "tanh"}, "h", "a")
    assert len(site.nodes) == len(nodes)  # the Tanh inside is not also a `tanh` site


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_gelu_op_opset20(approximate):
    model = _wrap([N("Gelu", ["h"], ["a"], name="g", approximate=approximate)], opset=20)
    (site,) = _sites(model)
    assert site.kind == "gelu" and site.params == {"approximate": approximate} and site.nodes == ("g",)


@pytest.mark.parametrize("order", [("h", "sig"), ("sig", "h")])
def test_silu_either_operand_order(order):
    model = _wrap([N("Sigmoid", ["h"], ["sig"], name="s"), N("Mul", list(order), ["a"], name="m")])
    (site,) = _sites(model)
    assert site.kind == "silu" and site.nodes == ("s", "m") and site.input == "h"


def test_hard_swish_op_and_decomposed():
    (op_site,) = _sites(_wrap([N("HardSwish", ["h"], ["a"], name="hs")]))
    assert op_site.kind == "hard_swish"
    nodes = [N("HardSigmoid", ["h"], ["hs"], name="hsig", alpha=1 / 6, beta=0.5), N("Mul", ["h", "hs"], ["a"])]
    (site,) = _sites(_wrap(nodes))
    assert site.kind == "hard_swish" and len(site.nodes) == 2


def test_sigmoid_gate_is_not_silu():
    """Mul(h, Sigmoid(g)) with g != h is a plain sigmoid followed by a product."""
    nodes = [N("Neg", ["h"], ["g"], name="neg"), N("Sigmoid", ["g"], ["sig"], name="s"),
             N("Mul", ["h", "sig"], ["a"], name="m")]
    model = _wrap(nodes)
    sites = _sites(model)
    assert [s.kind for s in sites] == ["sigmoid"]
    assert family_of(OperatorGraph(model), sites) == "smooth"


@pytest.mark.parametrize("scale", [1.0, 2.0])
def test_erf_that_is_not_gelu(scale):
    """x * (1 + erf(x / sqrt2)) is 2 * GELU, and erf(x) alone is no activation site."""
    nodes = [N("Div", ["h", "s2"], ["d"]), N("Erf", ["d"], ["e"]), N("Add", ["e", "one"], ["p"]),
             N("Mul", ["h", "p"], ["q"]), N("Mul", ["q", "c"], ["a"])]
    model = _wrap(nodes, [const("s2", SQRT2), const("one", 1.0), const("c", scale)])
    sites = _sites(model)
    assert sites == []
    assert family_of(OperatorGraph(model), sites) == "smooth"  # Erf is still a smooth nonlinearity


def test_gelu_with_non_scalar_constant_is_refused():
    nodes, inits = GELU_ERF_VARIANTS["div_then_x_half"]
    inits = [i for i in inits if i.name != "half"] + [const("half", np.array([0.5, 0.5, 0.5, 0.5, 0.6]))]
    assert _sites(_wrap(nodes, inits)) == []


def test_piecewise_linear_sites_with_params():
    nodes = [N("LeakyRelu", ["h"], ["l"], name="leaky", alpha=0.2), N("PRelu", ["l", "slope"], ["p"], name="prelu"),
             N("Abs", ["p"], ["ab"], name="abs"), N("Clip", ["ab", "lo", "hi"], ["a"], name="relu6")]
    model = _wrap(nodes, [const("slope", np.full(5, 0.1)), const("lo", 0.0), const("hi", 6.0)])
    sites = _sites(model)
    assert [s.kind for s in sites] == ["leaky_relu", "prelu", "abs", "clip"]
    assert sites[0].params == {"alpha": pytest.approx(0.2)}
    assert sites[3].params == {"min": 0.0, "max": 6.0}
    assert family_of(OperatorGraph(model), sites) == "piecewise-linear"


def test_linear_model_family():
    model = _wrap([N("Identity", ["h"], ["a"])])
    assert _sites(model) == []
    assert family_of(OperatorGraph(model), []) == "linear"


def test_conv_bn_relu_maxpool_flatten_gemm_softmax():
    """A CNN-shaped graph: sites in topological order; the final Softmax does not make it smooth."""
    nodes = [N("Conv", ["x", "cw", "cb"], ["c"], name="conv", pads=[1, 1, 1, 1], kernel_shape=[3, 3]),
             N("BatchNormalization", ["c", "g", "bb", "mu", "var"], ["bn"], name="bn"),
             N("Relu", ["bn"], ["r"], name="relu"),
             N("MaxPool", ["r"], ["mp"], name="pool", kernel_shape=[2, 2], strides=[2, 2]),
             N("Flatten", ["mp"], ["f"], name="flat"),
             N("Gemm", ["f", "w", "b"], ["logits"], name="fc", transB=1),
             N("Softmax", ["logits"], ["probs"], name="softmax", axis=1)]
    inits = [const("cw", np.ones((2, 1, 3, 3))), const("cb", np.zeros(2)), const("g", np.ones(2)),
             const("bb", np.zeros(2)), const("mu", np.zeros(2)), const("var", np.ones(2)),
             const("w", np.ones((3, 32))), const("b", np.zeros(3))]
    model = make_model(nodes, [float_io("x", ["n", 1, 8, 8])], [float_io("probs", ["n", 3])], inits)
    graph = OperatorGraph(model)
    sites = graph.find_activations()
    assert [s.kind for s in sites] == ["relu", "max_pool", "softmax"]
    assert choose_head(graph).logits == "logits"
    assert family_of(graph, sites) == "piecewise-linear"
    assert graph.topological_order() == ["conv", "bn", "relu", "pool", "flat", "fc", "softmax"]
    assert graph.nx.edges["conv", "bn"]["tensors"] == ["c"]
    assert graph.is_constant("cw") and not graph.is_constant("c")


def test_attention_product_is_smooth():
    nodes = [N("MatMul", ["x", "xt"], ["s"], name="scores"), N("Relu", ["s"], ["y"], name="relu")]
    pre = [N("Transpose", ["x"], ["xt"], name="t", perm=[1, 0])]
    model = make_model(pre + nodes, [float_io("x", [3, 3])], [float_io("y", [3, 3])])
    graph = OperatorGraph(model)
    assert family_of(graph, graph.find_activations()) == "mixed"


EXPECTED_SHIPPED = {
    "mlp_relu": ({"relu": 2}, "piecewise-linear"),
    "mlp_gelu": ({"gelu": 2}, "smooth"),
    "mlp_silu": ({"silu": 2}, "smooth"),
    "cnn": ({"relu": 2, "max_pool": 2}, "piecewise-linear"),
    "transformer": ({"gelu": 1, "softmax": 1}, "smooth"),
}


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_models(name):
    model = load_model(shipped_model(name)).proto
    graph = OperatorGraph(model)
    sites = find_activations(model)
    counts: dict[str, int] = {}
    for site in sites:
        counts[site.kind] = counts.get(site.kind, 0) + 1
    expected_counts, family = EXPECTED_SHIPPED[name]
    assert counts == expected_counts
    assert family_of(graph, sites) == family
    covered = [key for site in sites for key in site.nodes]
    assert len(covered) == len(set(covered))


def test_repeated_names_never_take_another_nodes_name():
    """Nodes `a`, `a`, `a_1`: the second `a` must not become `a_1` (the Relu would vanish)."""
    nodes = [N("Relu", ["x"], ["r1"], name="a"), N("Relu", ["x"], ["r2"], name="a"),
             N("Abs", ["r1"], ["r3"], name="a_1"), N("Add", ["r2", "r3"], ["y"], name="sum")]
    model = make_model(nodes, [float_io("x", ["n", 4])], [float_io("y", ["n", 4])])
    graph = OperatorGraph(model)
    assert len(graph.nodes) == 4 and [n.op_type for n in graph.nodes.values()] == ["Relu", "Relu", "Abs", "Add"]
    assert sorted(s.kind for s in graph.find_activations()) == ["abs", "relu", "relu"]
    assert len(graph.topological_order()) == 4


def test_log_of_softmax_exposes_the_logits():
    model = _wrap([N("Relu", ["h"], ["a"])])
    model.graph.node.extend([N("Softmax", ["y"], ["p"], axis=1), N("Log", ["p"], ["lp"])])
    model.graph.output[0].name = "lp"
    assert choose_head(OperatorGraph(model)).logits == "y"


def test_hard_sigmoid_is_piecewise_linear():
    model = _wrap([N("HardSigmoid", ["h"], ["a"])])
    graph = OperatorGraph(model)
    assert family_of(graph, graph.find_activations()) == "piecewise-linear"


def test_activations_of_constants_are_not_sites():
    """A Relu of the weights, a Sigmoid of a shape: constants, neither a site nor the family."""
    nodes = [N("Relu", ["w0"], ["w"]), N("MatMul", ["x", "w"], ["m"]),
             N("Shape", ["x"], ["s"]), N("Cast", ["s"], ["sf"], to=1), N("Sigmoid", ["sf"], ["g"]),
             N("ReduceSum", ["g"], ["gs"], keepdims=0), N("Mul", ["m", "gs"], ["y"])]
    model = make_model(nodes, [float_io("x", ["n", 4])], [float_io("y", ["n", 3])],
                       [const("w0", np.ones((4, 3)))], opset=13)
    graph = OperatorGraph(model)
    assert graph.find_activations() == []
    assert family_of(graph, []) == "linear"


def test_broadcasting_constant_is_not_absorbed_into_a_decomposed_activation():
    """x * sigmoid(x) * ones((2, 1, 5)) changes x's shape: the SiLU ends before the last Mul."""
    nodes = [N("Sigmoid", ["x"], ["s"]), N("Mul", ["x", "s"], ["a"]), N("Mul", ["a", "ones"], ["y"])]
    model = make_model(nodes, [float_io("x", ["n", 5])], [float_io("y", [2, "n", 5])],
                       [const("ones", np.ones((2, 1, 5)))])
    (site,) = _sites(model)
    assert site.kind == "silu" and site.output == "a" and len(site.nodes) == 2


def test_non_standard_domain_arithmetic_is_not_part_of_a_pattern():
    nodes, inits = GELU_ERF_VARIANTS["div_then_x_half"]
    nodes = [N("Div", ["h", "s2"], ["d"], domain="com.acme"), *nodes[1:]]
    model = _wrap(nodes, inits)
    model.opset_import.append(helper.make_opsetid("com.acme", 1))
    assert all(s.kind != "gelu" for s in _sites(model))


@pytest.mark.parametrize("bounds", [[], ["", ""], ["lo", "hi"]])
def test_clip_without_finite_bounds_is_identity(bounds):
    inits = [const("lo", -np.inf), const("hi", np.inf)]
    graph = OperatorGraph(_wrap([N("Clip", ["h", *bounds], ["a"])], inits))
    sites = graph.find_activations()
    assert sites == [] and family_of(graph, sites) == "linear"


@pytest.mark.parametrize("opset,axis", [(11, 1), (13, -1)])
def test_softmax_records_its_default_axis(opset, axis):
    model = make_model([N("Softmax", ["x"], ["y"])], [float_io("x", ["n", 3])], [float_io("y", ["n", 3])], opset=opset)
    (site,) = _sites(model)
    assert site.params == {"axis": axis}


def test_softmax_before_opset_13_flags_its_2d_coercion():
    model = make_model([N("Softmax", ["x"], ["y"], axis=1)], [float_io("x", ["n", 3, 4])],
                       [float_io("y", ["n", 3, 4])], opset=11)
    (site,) = _sites(model)
    assert site.params == {"axis": 1, "coerce_2d": True}


def test_square_of_a_tensor_is_one_edge_entry():
    nodes = [N("Relu", ["x"], ["h"], name="r"), N("Mul", ["h", "h"], ["y"], name="sq")]
    graph = OperatorGraph(make_model(nodes, [float_io("x", ["n", 3])], [float_io("y", ["n", 3])]))
    assert graph.nx.edges["r", "sq"]["tensors"] == ["h"]


def test_non_finite_params_are_strict_json():
    import json

    sites = _sites(_wrap([N("LeakyRelu", ["h"], ["a"], alpha=math.inf)]))
    text = json.dumps(sites[0].to_dict(), allow_nan=False)
    assert json.loads(text)["params"]["alpha"] == "Infinity"
