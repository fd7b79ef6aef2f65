"""Graph IR: construction, producer/users queries, clone, verify."""

from __future__ import annotations

import pytest

from slimc.compiler.ir.graph import Graph, Node, Value


def _chain() -> Graph:
    g = Graph()
    x = Value("x", (2, 4))
    w = Value("w", (3, 4), param="lin.weight")
    g.inputs.append(x)
    g.params["lin.weight"] = w
    y = Value("y", (2, 3))
    z = Value("z", (2, 3))
    g.add_node(Node("linear", [x, w, None], [y], {"w_out_axis": 0, "w_in_axis": 1}, "lin", "aten.linear.default", "linear"))
    g.add_node(Node("unary", [y], [z], {"fn": "relu"}, "", "aten.relu.default", "relu"))
    g.outputs.append(z)
    return g


def test_producer_and_users_are_wired():
    g = _chain()
    g.verify()
    lin, relu = g.nodes
    y = lin.outputs[0]
    assert g.producer(y) is lin and g.users(y) == [relu]
    assert g.users(g.params["lin.weight"]) == [lin] and g.producer(g.inputs[0]) is None
    assert g.nodes_of("unary") == [relu]


def test_clone_is_independent_and_verifies():
    g = _chain()
    c = g.clone()
    c.verify()
    assert [n.op for n in c.nodes] == [n.op for n in g.nodes]
    assert c.params["lin.weight"] is not g.params["lin.weight"]
    assert c.params["lin.weight"].param == "lin.weight"
    c.nodes[1].attrs["fn"] = "gelu"
    assert g.nodes[1].attrs["fn"] == "relu"
    assert c.nodes[0].outputs[0].users == [c.nodes[1]]


def test_verify_rejects_out_of_order_nodes():
    g = _chain()
    g.nodes.reverse()
    with pytest.raises(ValueError, match="before it is defined"):
        g.verify()


def test_verify_rejects_inconsistent_users():
    g = _chain()
    g.nodes[0].outputs[0].users.clear()
    with pytest.raises(ValueError, match="users"):
        g.verify()


def test_verify_rejects_undefined_output():
    g = _chain()
    g.outputs.append(Value("ghost", (1,)))
    with pytest.raises(ValueError, match="never defined"):
        g.verify()
