"""Helpers to find and rewrite radixc op calls in post-grad FX graphs, with or without functionalization."""

from __future__ import annotations

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
