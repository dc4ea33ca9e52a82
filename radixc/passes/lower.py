"""Lowering: each generic radixc op call becomes the kernel ops of its own backend and forward mode.

The backend and mode are constants of each node, so the choice is made here, at compile time, node by node; in a
hybrid model full-attention and GDN nodes lower to their own backends' kernels and no dispatch is left in the
compiled code. A GDN node becomes its backend's causal-conv1d kernel and delta-rule kernel; with `fuse_gdn_conv`
on, the conv kernel also applies SiLU, otherwise SiLU stays in aten for Inductor; q/k/v are views of its output.
"""

from __future__ import annotations

import torch

from radixc.ops.library import GENERIC_CONSTANTS, OP_KINDS, has_kernel, resolve_kernel
from radixc.passes.base import RadixPass
from radixc.passes.graph_utils import aten_call, call, getitems, named_args, radixc_calls, rewrite_call

_BATCH_ARGS = ("gdn_slots", "extend_start_loc", "extend_seq_lens", "extend_prefix_lens")
_HEAD_ARGS = ("num_k_heads", "num_v_heads", "head_k_dim", "head_v_dim")


class LowerRadixOps(RadixPass):
    name = "lower_radixc_ops"

    def __init__(self, fuse_gdn_conv: bool = True):
        self.fuse_gdn_conv = fuse_gdn_conv

    def apply(self, graph: torch.fx.Graph) -> int:
        count = 0
        for node in radixc_calls(graph):
            kind = node.target._opname
            if kind not in OP_KINDS:
                continue
            args = named_args(node)
            backend, mode = args["backend"], args["forward_mode"]
            node.meta["radixc_lowered_from"] = f"radixc.{kind}"
            kwargs = {k: v for k, v in args.items() if k not in GENERIC_CONSTANTS}
            if kind == "gdn" and has_kernel("gated_delta_rule", backend, mode):
                self._lower_gdn(graph, node, kwargs, backend, mode)
            else:
                rewrite_call(node, kwargs, resolve_kernel(kind, backend, mode))
            count += 1
        return count

    def _lower_gdn(
        self, graph: torch.fx.Graph, node: torch.fx.Node, kw: dict, backend: str, mode: str
    ) -> None:
        """conv1d kernel (+ SiLU and split, fused or in aten) -> delta-rule kernel, each writing its own state."""
        qk_dim = kw["num_k_heads"] * kw["head_k_dim"]
        split_sizes = [qk_dim, qk_dim, kw["num_v_heads"] * kw["head_v_dim"]]
        conv_kwargs = dict(
            x=kw["mixed_qkv"],
            weight=kw["conv_weight"],
            conv_state=kw["conv_state"],
            **{k: kw[k] for k in _BATCH_ARGS},
        )
        x_val = kw["mixed_qkv"].meta["val"]
        with graph.inserting_before(node):
            kind = "causal_conv1d_silu" if self.fuse_gdn_conv else "causal_conv1d"
            conv = call(
                graph, resolve_kernel(kind, backend, mode), conv_kwargs, torch.empty_like(x_val), node
            )
            if not self.fuse_gdn_conv:
                conv = aten_call(
                    graph,
                    torch.ops.aten.mul.Tensor,
                    conv,
                    aten_call(graph, torch.ops.aten.sigmoid.default, conv),
                )
            # views: the delta-rule kernels read q, k, v with the conv output's row stride
            parts = getitems(
                graph, aten_call(graph, torch.ops.aten.split_with_sizes.default, conv, split_sizes, -1)
            )
            out = call(
                graph,
                resolve_kernel("gated_delta_rule", backend, mode),
                dict(
                    q=parts[0],
                    k=parts[1],
                    v=parts[2],
                    a=kw["a"],
                    b=kw["b"],
                    A_log=kw["A_log"],
                    dt_bias=kw["dt_bias"],
                    ssm_state=kw["ssm_state"],
                    **{k: kw[k] for k in _BATCH_ARGS},
                    **{k: kw[k] for k in _HEAD_ARGS},
                ),
                node.meta["val"],
                node,
            )
        node.replace_all_uses_with(out)
        graph.erase_node(node)
