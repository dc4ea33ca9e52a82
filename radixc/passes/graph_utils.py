"""Helpers to find and rewrite radixc op calls in post-grad FX graphs, with or without functionalization."""

from __future__ import annotations

import operator

import torch
from torch._higher_order_ops.auto_functionalize import auto_functionalized, auto_functionalized_v2

AUTO_FUNCTIONALIZED = (auto_functionalized, auto_functionalized_v2)


def called_op(node: torch.fx.Node) -> torch._ops.OpOverload | None:
    """The op a call node runs: its target, or the op wrapped by auto_functionalized(_v2)."""
    if node.op != "call_function":
        return None
    if node.target in AUTO_FUNCTIONALIZED:
        return node.args[0]
    return node.target if isinstance(node.target, torch._ops.OpOverload) else None


def is_radixc_op(op: torch._ops.OpOverload | None, name: str | None = None) -> bool:
    if not isinstance(op, torch._ops.OpOverload) or op.namespace != "radixc":
        return False
    return name is None or op._opname == name


def set_called_op(node: torch.fx.Node, op: torch._ops.OpOverload, drop_kwargs: tuple[str, ...] = ()) -> None:
    """Point a call (wrapped or not) at another op of compatible schema, dropping the named kwargs."""
    kwargs = {k: v for k, v in node.kwargs.items() if k not in drop_kwargs}
    if node.target in AUTO_FUNCTIONALIZED:
        node.args = (op, *node.args[1:])
    else:
        node.target = op
    node.kwargs = kwargs
    if "eager_input_vals" in node.meta:  # Inductor's record of the call's fake inputs must match the new call
        args, eager_kwargs = node.meta["eager_input_vals"]
        args = (op, *args[1:]) if node.target in AUTO_FUNCTIONALIZED else args
        node.meta["eager_input_vals"] = (
            args,
            {k: v for k, v in eager_kwargs.items() if k not in drop_kwargs},
        )


def radixc_nodes(graph: torch.fx.Graph, name: str | None = None) -> list[torch.fx.Node]:
    return [n for n in graph.nodes if is_radixc_op(called_op(n), name)]


def skip_reshapes(node: torch.fx.Node) -> torch.fx.Node:
    """The tensor a chain of reshape/view nodes starts from."""
    reshapes = (
        torch.ops.aten.reshape.default,
        torch.ops.aten.view.default,
        torch.ops.aten._unsafe_view.default,
    )
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in reshapes:
        node = node.args[0]
    return node


def getitem_of(node: torch.fx.Node) -> tuple[torch.fx.Node, int] | None:
    """(producer, index) when node is `producer[index]`."""
    if isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is operator.getitem:
        return node.args[0], node.args[1]
    return None


def only_user_chain_ends_at(node: torch.fx.Node, consumer: torch.fx.Node) -> bool:
    """True when every use of node flows, through single-use reshapes, into consumer alone."""
    users = list(node.users)
    if len(users) != 1:
        return False
    return users[0] is consumer or (
        skip_reshapes(users[0]) is node and only_user_chain_ends_at(users[0], consumer)
    )


def mutated_bases(node: torch.fx.Node, arg_names: tuple[str, ...]) -> list[torch.fx.Node]:
    """The tensors an auto_functionalized(_v2) node mutates, for the op's mutable args in schema order."""
    if node.target is auto_functionalized_v2:
        return [node.kwargs["_all_bases"][node.kwargs[f"_{name}_base_index"]] for name in arg_names]
    return [node.kwargs[name] for name in arg_names]


def functionalized_call(
    graph: torch.fx.Graph,
    wrapper,
    op: torch._ops.OpOverload,
    kwargs: dict,
    bases: dict[str, torch.fx.Node],
    out_val,
    source: torch.fx.Node,
) -> tuple[torch.fx.Node, list[torch.fx.Node]]:
    """Insert `wrapper(op, **kwargs)` mutating `bases` (arg name -> tensor); return the node and its outputs.

    Outputs are the op's results (out_val: one fake tensor, or a tuple for ops returning several) followed by
    the new value of each base, each with its fake value for Inductor. The node inherits the provenance
    metadata (module path, stack trace, generic op) of `source`, the node it replaces.
    """
    kwargs = dict(kwargs)
    if wrapper is auto_functionalized_v2:
        for index, name in enumerate(bases):
            kwargs[f"_{name}_base_index"] = index
        kwargs["_all_bases"] = list(bases.values())
    else:
        kwargs.update(bases)
    node = graph.call_function(wrapper, (op,), kwargs)
    copy_provenance(source, node)
    base_vals = [b.meta["val"] for b in bases.values()]
    out_vals = out_val if isinstance(out_val, tuple) else (out_val,)
    node.meta["val"] = (*out_vals, *base_vals)
    outputs = []
    for index, val in enumerate(node.meta["val"]):
        item = graph.call_function(operator.getitem, (node, index))
        item.meta["val"] = val
        outputs.append(item)
    return node, outputs


_PROVENANCE = ("nn_module_stack", "stack_trace", "radixc_lowered_from")


def copy_provenance(source: torch.fx.Node, node: torch.fx.Node) -> None:
    """Give a node created by a rewrite the module path, stack trace and generic-op origin of what it replaces."""
    for key in _PROVENANCE:
        if key in source.meta:
            node.meta[key] = source.meta[key]
