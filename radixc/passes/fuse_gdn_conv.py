"""Fusion: GDN's causal conv1d kernel, its SiLU and the q/k/v split become one kernel op.

Runs after lowering, on `causal_conv1d` kernel calls whose output feeds only `x * sigmoid(x)` and a
`split_with_sizes`; they become the backend's `causal_conv1d_silu_split` kernel for the same forward mode.
"""

from __future__ import annotations

import operator

import torch

from radixc.ops.library import has_kernel, kernel_identity, resolve_kernel
from radixc.passes.base import RadixPass
from radixc.passes.graph_utils import called_op, functionalized_call, getitem_of, mutated_bases


class FuseGDNConv(RadixPass):
    name = "fuse_gdn_conv"

    def apply(self, graph: torch.fx.Graph) -> int:
        count = 0
        for node in list(graph.nodes):
            op = called_op(node)
            identity = kernel_identity(op) if op is not None else None
            if identity is not None and identity[0] == "causal_conv1d" and self._fuse(graph, node, identity):
                count += 1
        return count

    def _fuse(self, graph: torch.fx.Graph, conv: torch.fx.Node, identity) -> bool:
        _, backend, modes = identity
        if len(modes) != 1 or not has_kernel("causal_conv1d_silu_split", backend, modes[0]):
            return False
        outputs = {getitem_of(user)[1]: user for user in conv.users}
        conv_out = outputs.get(0)
        match = _silu_split(conv_out) if conv_out is not None else None
        if match is None:
            return False
        gate, activated, split, split_sizes = match
        parts = {item.args[1]: item for item in split.users}
        kwargs = {k: v for k, v in conv.kwargs.items() if not k.startswith("_") and k not in ("conv_state",)}
        (conv_state,) = mutated_bases(conv, ("conv_state",))
        with graph.inserting_before(conv):
            _, (q, k, v, new_conv_state) = functionalized_call(
                graph, conv.target, resolve_kernel("causal_conv1d_silu_split", backend, modes[0]),
                dict(kwargs, split_sizes=split_sizes), {"conv_state": conv_state},
                tuple(torch.empty_like(val, memory_format=torch.contiguous_format) for val in split.meta["val"]),
                conv,
            )  # fmt: skip
        for index, new in enumerate((q, k, v)):
            if index in parts:
                parts[index].replace_all_uses_with(new)
        if 1 in outputs:
            outputs[1].replace_all_uses_with(new_conv_state)
        for dead in (*parts.values(), split, activated, gate, *outputs.values(), conv):
            graph.erase_node(dead)
        return True


def _silu_split(x: torch.fx.Node):
    """(sigmoid, mul, split, sizes) when x's only uses are `split(x * sigmoid(x))` and nothing else."""
    users = list(x.users)
    gate = next((u for u in users if u.target is torch.ops.aten.sigmoid.default), None)
    mul = next((u for u in users if u.target is torch.ops.aten.mul.Tensor), None)
    if (
        len(users) != 2
        or gate is None
        or mul is None
        or set(mul.args) != {x, gate}
        or list(gate.users) != [mul]
    ):
        return None
    mul_users = list(mul.users)
    if len(mul_users) != 1 or mul_users[0].target is not torch.ops.aten.split_with_sizes.default:
        return None
    split = mul_users[0]
    if split.args[2:] not in ((-1,), (1,)) or any(u.target is not operator.getitem for u in split.users):
        return None
    return gate, mul, split, list(split.args[1])
