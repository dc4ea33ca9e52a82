"""Helpers to find and rewrite radixc op calls in post-grad FX graphs."""

from __future__ import annotations

import operator

import torch
from torch._higher_order_ops.auto_functionalize import auto_functionalized, auto_functionalized_v2

AUTO_FUNCTIONALIZED = (auto_functionalized, auto_functionalized_v2)

_RESHAPES = (torch.ops.aten.reshape.default, torch.ops.aten.view.default, torch.ops.aten._unsafe_view.default)


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


def radixc_nodes(graph: torch.fx.Graph, name: str | None = None) -> list[torch.fx.Node]:
    """Calls of radixc ops (of op `name` when given), wrapped in auto_functionalized or not."""
    return [n for n in graph.nodes if is_radixc_op(called_op(n), name)]


def radixc_calls(graph: torch.fx.Graph, name: str | None = None) -> list[torch.fx.Node]:
    """Direct (in-place, not functionalized) calls of radixc ops, of op `name` when given."""
    return [n for n in graph.nodes if n.op == "call_function" and is_radixc_op(n.target, name)]


def skip_reshapes(node: torch.fx.Node) -> torch.fx.Node:
    """The tensor a chain of reshape/view nodes starts from."""
    while isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target in _RESHAPES:
        node = node.args[0]
    return node


def getitem_of(node: torch.fx.Node) -> tuple[torch.fx.Node, int] | None:
    """(producer, index) when node is `producer[index]`."""
    if isinstance(node, torch.fx.Node) and node.op == "call_function" and node.target is operator.getitem:
        return node.args[0], node.args[1]
    return None


def split_of(items: list[torch.fx.Node]) -> torch.fx.Node | None:
    """The `split_with_sizes` node whose outputs 0, 1, ... are `items`, in order, else None."""
    parts = [getitem_of(item) for item in items]
    if any(part is None for part in parts) or [index for _, index in parts] != list(range(len(items))):
        return None
    split = parts[0][0]
    if any(producer is not split for producer, _ in parts):
        return None
    return split if called_op(split) is torch.ops.aten.split_with_sizes.default else None


def only_user_chain_ends_at(node: torch.fx.Node, consumer: torch.fx.Node) -> bool:
    """True when every use of node flows, through single-use reshapes, into consumer alone."""
    users = list(node.users)
    if len(users) != 1:
        return False
    return users[0] is consumer or (
        skip_reshapes(users[0]) is node and only_user_chain_ends_at(users[0], consumer)
    )


def call(
    graph: torch.fx.Graph, op: torch._ops.OpOverload, kwargs: dict, val, source: torch.fx.Node
) -> torch.fx.Node:
    """Insert `op(**kwargs)` with fake value `val` and the provenance of `source`, the node it replaces."""
    node = graph.call_function(op, (), kwargs)
    node.meta["val"] = val
    copy_provenance(source, node)
    return node


def aten_call(graph: torch.fx.Graph, op: torch._ops.OpOverload, *args) -> torch.fx.Node:
    """Insert a post-grad aten node (positional args, as Inductor's lowerings take them) with its fake value."""
    node = graph.call_function(op, args)
    node.meta["val"] = op(*(a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in args))
    return node


def skip_convert(node: object, seen: list[torch.fx.Node]) -> object:
    """The input of a dtype conversion (recorded in seen), else the node itself."""
    if isinstance(node, torch.fx.Node) and called_op(node) is torch.ops.prims.convert_element_type.default:
        seen.append(node)
        return node.args[0]
    return node


def used_only_inside(steps: list[torch.fx.Node], end: torch.fx.Node) -> bool:
    """True when the nodes of a computation that ends at `end` have no use outside it, so that replacing `end`
    leaves them dead."""
    inside = {*steps, end}
    return all(set(node.users) <= inside for node in steps)


def named_args(node: torch.fx.Node) -> dict:
    """A call's arguments by schema name, whether it was given them positionally or by keyword."""
    names = [argument.name for argument in node.target._schema.arguments]
    return {**dict(zip(names, node.args)), **node.kwargs}


def rewrite_call(node: torch.fx.Node, kwargs: dict, target: torch._ops.OpOverload | None = None) -> None:
    """Give a call node all its arguments by keyword (and a new target), dropping its positional arguments and the
    eager input values Inductor recorded for the old call: callers build `kwargs` from `named_args`."""
    if target is not None:
        node.target = target
    node.args = ()
    node.kwargs = kwargs
    node.meta.pop("eager_input_vals", None)


def getitems(graph: torch.fx.Graph, node: torch.fx.Node) -> list[torch.fx.Node]:
    """`node[i]` for each output of a node returning a tuple, with their fake values."""
    items = []
    for index, val in enumerate(node.meta["val"]):
        item = graph.call_function(operator.getitem, (node, index))
        item.meta["val"] = val
        items.append(item)
    return items


_PROVENANCE = ("nn_module_stack", "stack_trace", "radixc_lowered_from")


def copy_provenance(source: torch.fx.Node, node: torch.fx.Node) -> None:
    """Give a node created by a rewrite the module path, stack trace and generic-op origin of what it replaces."""
    for key in _PROVENANCE:
        if key in source.meta:
            node.meta[key] = source.meta[key]
