"""Defunctionalization: every radixc op that mutates a pool buffer runs in place again.

A mutating custom op reaches the post-grad graph as `auto_functionalized(_v2)(op, ...)`, which returns new
copies of the buffers it writes; Inductor then either re-inplaces it or clones each buffer first. Torch 2.11 does
not re-inplace the radixc ops, and a clone of a KV pool every layer and step costs more than the model. So this
pass turns each wrapper back into the direct in-place call on the buffer (what vLLM calls fixing
functionalization) and points every use of a "new" buffer at the buffer itself. The later radixc passes rewrite
these in-place calls, which is simpler than editing the wrappers' bookkeeping.

The rewrite is exact when no node reads the old value of a buffer after the op writes it; a wrapper whose buffer
is read that way is left for Inductor (correct, with a copy) and logged.
"""

from __future__ import annotations

import logging
import operator

import torch
from torch._higher_order_ops.auto_functionalize import auto_functionalized_v2

from radixc.passes.base import RadixPass
from radixc.passes.graph_utils import (
    AUTO_FUNCTIONALIZED,
    call,
    called_op,
    copy_provenance,
    getitems,
    is_radixc_op,
)

logger = logging.getLogger("radixc.passes")


class Defunctionalize(RadixPass):
    name = "defunctionalize"

    def apply(self, graph: torch.fx.Graph) -> int:
        order = {node: index for index, node in enumerate(graph.nodes)}
        count = 0
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target not in AUTO_FUNCTIONALIZED:
                continue
            if not is_radixc_op(called_op(node)):
                continue
            mutated = _mutated_args(graph, node)
            if mutated is None or not all(_written_last(base, node, order) for _, base in mutated.values()):
                logger.warning(
                    "radixc: %s keeps its functional form (a buffer it writes is read afterwards)", node
                )
                continue
            _make_inplace(graph, node, mutated)
            count += 1
        return count


def _mutated_args(
    graph: torch.fx.Graph, node: torch.fx.Node
) -> dict[str, tuple[torch.fx.Node, torch.fx.Node]] | None:
    """Mutable arg name -> (node to pass in place, the buffer it belongs to); None if not expressible."""
    op = node.args[0]
    names = [a.name for a in op._schema.arguments if a.alias_info is not None and a.alias_info.is_write]
    if node.target is not auto_functionalized_v2:
        return {name: (node.kwargs[name], node.kwargs[name]) for name in names}
    bases = node.kwargs["_all_bases"]
    mutated = {}
    for name in names:
        index = node.kwargs[f"_{name}_base_index"]
        if index is None:
            return None
        base = bases[index]
        if f"_{name}_storage_offset" in node.kwargs:
            view_args = (base, node.kwargs[f"_{name}_size"], node.kwargs[f"_{name}_stride"])
            view_args += (node.kwargs[f"_{name}_storage_offset"],)
            mutated[name] = (_view(graph, node, torch.ops.aten.as_strided.default, view_args), base)
        elif f"_{name}_slice_dim" in node.kwargs:
            dim, start, end = (node.kwargs[f"_{name}_slice_{k}"] for k in ("dim", "start", "end"))
            mutated[name] = (_view(graph, node, torch.ops.aten.slice.Tensor, (base, dim, start, end)), base)
        else:  # the argument is the base itself (or an alias of it)
            mutated[name] = (base, base)
    return mutated


def _view(graph: torch.fx.Graph, node: torch.fx.Node, op, args: tuple) -> torch.fx.Node:
    with graph.inserting_before(node):
        view = graph.call_function(op, args)
    view.meta["val"] = op(*(a.meta["val"] if isinstance(a, torch.fx.Node) else a for a in args))
    return view


def _written_last(base: torch.fx.Node, node: torch.fx.Node, order: dict[torch.fx.Node, int]) -> bool:
    """True when nothing but `node` and copies back into the buffer reads `base` after `node` writes it."""
    for user in base.users:
        if user is node or user not in order or user.target is torch.ops.aten.copy_.default:
            continue
        if order.get(user, len(order)) > order[node]:
            return False
    return True


def _make_inplace(
    graph: torch.fx.Graph, node: torch.fx.Node, mutated: dict[str, tuple[torch.fx.Node, torch.fx.Node]]
) -> None:
    """Replace `wrapper(op, ...)` by `op(...)` writing the buffers in place; outputs past the op's own returns
    (the new buffers) become the buffers themselves."""
    op = node.args[0]
    kwargs = {}
    for argument in op._schema.arguments:
        if argument.name in mutated:
            kwargs[argument.name] = mutated[argument.name][0]
        else:
            kwargs[argument.name] = node.kwargs.get(argument.name, argument.default_value)
    num_returns = len(op._schema.returns)
    out_val = node.meta["val"][:num_returns]
    with graph.inserting_before(node):
        inplace = call(graph, op, kwargs, out_val[0] if num_returns == 1 else tuple(out_val), node)
        outputs = [inplace] if num_returns == 1 else getitems(graph, inplace)
    # the new value of each buffer: v2 returns every base in _all_bases order, v1 each mutable arg in order
    new_buffers = [base for _, base in mutated.values()]
    if node.target is auto_functionalized_v2:
        new_buffers = node.kwargs["_all_bases"]
    for item in list(node.users):
        if item.target is not operator.getitem:
            raise AssertionError(f"radixc: unexpected use {item} of {node}")
        index = item.args[1]
        replacement = outputs[index] if index < num_returns else new_buffers[index - num_returns]
        item.replace_all_uses_with(replacement)
        graph.erase_node(item)
    copy_provenance(node, inplace)
    graph.erase_node(node)
