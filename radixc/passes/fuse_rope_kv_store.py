"""Fusion: rotary embedding of q/k and the KV-cache store become one op (`radixc::rope_store_kv`).

Runs on the in-place graph (after defunctionalization). Matches `q', k' = rotary_embedding(positions, q, k)`
(or `qk_norm_rope`, whose norm weights come along) feeding `attention(q', k', v, save_kv_cache=True)` where the
rotated q and k have no other use. The fused op rotates q and k, writes k and v into the layer's cache and returns
q'; the attention then reads every key from the cache (k = v = None, save_kv_cache=False).
"""

from __future__ import annotations

import torch

from radixc.passes.base import RadixPass
from radixc.passes.graph_utils import (
    call,
    getitem_of,
    is_radixc_op,
    named_args,
    only_user_chain_ends_at,
    radixc_calls,
    rewrite_call,
    skip_reshapes,
)


class FuseRopeKVStore(RadixPass):
    name = "fuse_rope_kv_store"

    def apply(self, graph: torch.fx.Graph) -> int:
        return sum(self._fuse(graph, attention) for attention in radixc_calls(graph, "attention"))

    def _fuse(self, graph: torch.fx.Graph, attention: torch.fx.Node) -> bool:
        kw = named_args(attention)
        if not kw["save_kv_cache"] or kw["k"] is None:
            return False
        q_rotated, k_rotated = skip_reshapes(kw["q"]), skip_reshapes(kw["k"])
        q_item, k_item = getitem_of(q_rotated), getitem_of(k_rotated)
        if q_item is None or k_item is None or q_item[0] is not k_item[0] or (q_item[1], k_item[1]) != (0, 1):
            return False
        rope = q_item[0]
        if not (is_radixc_op(rope.target, "rotary_embedding") or is_radixc_op(rope.target, "qk_norm_rope")):
            return False
        if not (
            only_user_chain_ends_at(k_rotated, attention) and only_user_chain_ends_at(q_rotated, attention)
        ):
            return False
        rope_args = named_args(rope)
        with graph.inserting_before(attention):
            new_q = call(
                graph,
                torch.ops.radixc.rope_store_kv.default,
                dict(
                    positions=rope_args["positions"],
                    q=rope_args["q"],
                    k=rope_args["k"],
                    v=kw["v"],
                    cos_sin_cache=rope_args["cos_sin_cache"],
                    k_cache=kw["k_cache"],
                    v_cache=kw["v_cache"],
                    out_cache_loc=kw["out_cache_loc"],
                    q_norm_weight=rope_args.get("q_norm_weight"),
                    k_norm_weight=rope_args.get("k_norm_weight"),
                    head_size=rope_args["head_size"],
                    is_neox=rope_args["is_neox"],
                    norm_eps=rope_args.get("norm_eps", 0.0),
                    norm_zero_centered=rope_args.get("norm_zero_centered", False),
                    backend=kw["backend"],
                    forward_mode=kw["forward_mode"],
                ),
                q_rotated.meta["val"],
                attention,
            )
        q_rotated.replace_all_uses_with(new_q)
        chain, reshape = [], kw["q"]
        while reshape is not new_q:  # the reshapes of q now read new_q: move them after it, in order
            chain.append(reshape)
            reshape = reshape.args[0]
        for reshape in reversed(chain):
            attention.prepend(reshape)
        rewrite_call(attention, dict(kw, k=None, v=None, save_kv_cache=False))
        return True
