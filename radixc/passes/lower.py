"""Lowering pass: each generic radixc op node becomes the kernel ops of its backend and forward mode.

The backend and mode are constants of the node, so the choice is made here, at compile time; for hybrid models
full-attention and GDN nodes lower independently and no backend dispatch is left in the compiled code. A GDN
node lowers to its causal conv1d kernel, SiLU and the q/k/v split in plain aten (for Inductor to fuse), and its
delta-rule kernel, when the backend has those kernels; otherwise to its one GDN kernel.
"""

from __future__ import annotations

import operator

import torch

from radixc.ops.library import GENERIC_CONSTANTS, OP_KINDS, has_kernel, resolve_kernel
from radixc.passes.base import RadixPass
from radixc.passes.graph_utils import (
    called_op,
    functionalized_call,
    mutated_bases,
    radixc_nodes,
    set_called_op,
)

_CONV_ARGS = ("state_indices", "extend_start_loc", "extend_seq_lens", "extend_prefix_lens")


class LowerRadixOps(RadixPass):
    name = "lower_radixc_ops"

    def apply(self, graph: torch.fx.Graph) -> int:
        count = 0
        for node in radixc_nodes(graph):
            kind = called_op(node)._opname
            if kind not in OP_KINDS:
                continue
            backend, mode = node.kwargs["backend"], node.kwargs["forward_mode"]
            node.meta["radixc_lowered_from"] = f"radixc.{kind}"
            if (
                kind == "gdn"
                and has_kernel("causal_conv1d", backend, mode)
                and has_kernel("gated_delta_rule", backend, mode)
            ):
                _decompose_gdn(graph, node, backend, mode)
            else:
                set_called_op(node, resolve_kernel(kind, backend, mode), drop_kwargs=GENERIC_CONSTANTS)
            count += 1
        return count


def _decompose_gdn(graph: torch.fx.Graph, node: torch.fx.Node, backend: str, mode: str) -> None:
    """conv1d kernel -> aten silu + split -> delta-rule kernel, each kernel mutating its own state buffer."""
    kw = node.kwargs
    conv_state, ssm_state = mutated_bases(node, ("conv_state", "ssm_state"))
    qk_dim = kw["num_k_heads"] * kw["head_k_dim"]
    split_sizes = [qk_dim, qk_dim, kw["num_v_heads"] * kw["head_v_dim"]]
    x_val = kw["mixed_qkv"].meta["val"]
    with graph.inserting_before(node):
        conv, (conv_out, new_conv_state) = functionalized_call(
            graph, node.target, resolve_kernel("causal_conv1d", backend, mode),
            dict(x=kw["mixed_qkv"], weight=kw["conv_weight"], **{k: kw[k] for k in _CONV_ARGS}),
            {"conv_state": conv_state}, torch.empty_like(x_val, memory_format=torch.contiguous_format), node,
        )  # fmt: skip
        # silu as x * sigmoid(x): post-grad graphs hold decomposed aten only
        gate = graph.call_function(torch.ops.aten.sigmoid.default, (conv_out,))
        gate.meta["val"] = torch.ops.aten.sigmoid.default(conv_out.meta["val"])
        activated = graph.call_function(torch.ops.aten.mul.Tensor, (conv_out, gate))
        activated.meta["val"] = torch.ops.aten.mul.Tensor(conv_out.meta["val"], gate.meta["val"])
        split = graph.call_function(torch.ops.aten.split_with_sizes.default, (activated, split_sizes, -1))
        split.meta["val"] = torch.ops.aten.split_with_sizes.default(activated.meta["val"], split_sizes, -1)
        parts = []
        for index in range(3):
            part = graph.call_function(operator.getitem, (split, index))
            part.meta["val"] = split.meta["val"][index]
            parts.append(part)
        heads = {k: kw[k] for k in ("num_k_heads", "num_v_heads", "head_k_dim", "head_v_dim")}
        _, (out, new_ssm_state) = functionalized_call(
            graph, node.target, resolve_kernel("gated_delta_rule", backend, mode),
            dict(q=parts[0], k=parts[1], v=parts[2], a=kw["a"], b=kw["b"], A_log=kw["A_log"],
                 dt_bias=kw["dt_bias"], **{k: kw[k] for k in _CONV_ARGS}, **heads),
            {"ssm_state": ssm_state}, node.meta["val"][0], node,
        )  # fmt: skip
    replacements = {0: out, 1: new_conv_state, 2: new_ssm_state}
    for item in list(node.users):
        item.replace_all_uses_with(replacements[item.args[1]])
        graph.erase_node(item)
    graph.erase_node(node)
