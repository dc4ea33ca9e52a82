"""Fusion: per-head q/k RMSNorm (`radixc::rms_norm`, Qwen3-style) folds into the rotary embedding after it.

`rotary_embedding(positions, rms_norm(q), rms_norm(k))` becomes `radixc::qk_norm_rope`; when the rope + KV-store
fusion already ran, the norms fold into its `radixc::rope_store_kv` call instead (its norm-weight arguments).
"""

from __future__ import annotations

import operator

import torch

from radixc.passes.base import RadixPass
from radixc.passes.graph_utils import (
    called_op,
    copy_provenance,
    is_radixc_op,
    only_user_chain_ends_at,
    radixc_nodes,
    skip_reshapes,
)


class FuseQKNormRope(RadixPass):
    name = "fuse_qk_norm_rope"

    def apply(self, graph: torch.fx.Graph) -> int:
        constants = _graph_constants(graph)
        count = 0
        for node in radixc_nodes(graph):
            op = called_op(node)
            if op._opname == "rotary_embedding" and constants is not None:
                count += self._fold_into_rope(graph, node, constants)
            elif op._opname == "rope_store_kv" and node.kwargs["q_norm_weight"] is None:
                count += self._fold_into_rope_store(node)
        return count

    def _norms(self, node: torch.fx.Node, q: torch.fx.Node, k: torch.fx.Node):
        """The two rms_norm calls feeding q and k of node, when they match and feed nothing else."""
        q_norm, k_norm = skip_reshapes(q), skip_reshapes(k)
        for norm in (q_norm, k_norm):
            if not (is_radixc_op(called_op(norm), "rms_norm") and only_user_chain_ends_at(norm, node)):
                return None
        if q_norm.args[2:] != k_norm.args[2:]:  # same eps and zero_centered
            return None
        return q_norm, k_norm

    def _fold_into_rope(self, graph, rope: torch.fx.Node, constants: dict) -> int:
        positions, q, k, cos_sin_cache, head_size, is_neox = rope.args
        norms = self._norms(rope, q, k)
        if norms is None:
            return 0
        q_norm, k_norm = norms
        with graph.inserting_before(rope):
            fused = graph.call_function(
                torch.ops.radixc.qk_norm_rope.default,
                (positions, q_norm.args[0], k_norm.args[0], q_norm.args[1], k_norm.args[1], cos_sin_cache),
                dict(
                    head_size=head_size,
                    is_neox=is_neox,
                    norm_eps=q_norm.args[2],
                    norm_zero_centered=q_norm.args[3],
                    **constants,
                ),  # fmt: skip
            )
            fused.meta["val"] = rope.meta["val"]
            copy_provenance(rope, fused)
        for item in list(rope.users):
            with graph.inserting_before(item):
                new_item = graph.call_function(operator.getitem, (fused, item.args[1]))
            new_item.meta["val"] = item.meta["val"]
            item.replace_all_uses_with(new_item)
        return 1

    def _fold_into_rope_store(self, node: torch.fx.Node) -> int:
        norms = self._norms(node, node.kwargs["q"], node.kwargs["k"])
        if norms is None:
            return 0
        q_norm, k_norm = norms
        node.kwargs = dict(
            node.kwargs, q=q_norm.args[0], k=k_norm.args[0], q_norm_weight=q_norm.args[1],
            k_norm_weight=k_norm.args[1], norm_eps=q_norm.args[2], norm_zero_centered=q_norm.args[3],
        )  # fmt: skip
        node.meta.pop("eager_input_vals", None)
        return 1


def _graph_constants(graph: torch.fx.Graph) -> dict | None:
    """Backend and forward mode of the graph, read from its generic attention / GDN ops (None if it has none)."""
    for node in radixc_nodes(graph):
        if "backend" in node.kwargs and "forward_mode" in node.kwargs:
            return {"backend": node.kwargs["backend"], "forward_mode": node.kwargs["forward_mode"]}
    return None
