"""Fusion: rotary embedding of q/k and the KV-cache store become one kernel op (`radixc::rope_store_kv`).

Matches `q', k' = rotary_embedding(positions, q, k)` feeding `attention(q', k', v, save_kv_cache=True)` where
the rotated k has no other use. The fused op rotates q and k, writes k and v into the cache and returns q';
the attention then reads every key from the cache (k = v = None, save_kv_cache=False).
"""

from __future__ import annotations

import torch

from radixc.passes.base import RadixPass
from radixc.passes.graph_utils import (
    functionalized_call,
    getitem_of,
    is_radixc_op,
    mutated_bases,
    only_user_chain_ends_at,
    radixc_nodes,
    skip_reshapes,
)


class FuseRopeKVStore(RadixPass):
    name = "fuse_rope_kv_store"

    def apply(self, graph: torch.fx.Graph) -> int:
        count = 0
        for attention in radixc_nodes(graph, "attention"):
            if self._fuse(graph, attention):
                count += 1
        return count

    def _fuse(self, graph: torch.fx.Graph, attention: torch.fx.Node) -> bool:
        kw = attention.kwargs
        if not kw["save_kv_cache"] or kw["k"] is None:
            return False
        q_item, k_item = getitem_of(skip_reshapes(kw["q"])), getitem_of(skip_reshapes(kw["k"]))
        if q_item is None or k_item is None or q_item[0] is not k_item[0] or (q_item[1], k_item[1]) != (0, 1):
            return False
        rope = q_item[0]
        if not is_radixc_op(rope.target, "rotary_embedding"):
            return False
        k_rotated, q_rotated = skip_reshapes(kw["k"]), skip_reshapes(kw["q"])
        if not (
            only_user_chain_ends_at(k_rotated, attention) and only_user_chain_ends_at(q_rotated, attention)
        ):
            return False
        positions, q, k, cos_sin_cache, head_size, is_neox = rope.args
        k_cache, v_cache = mutated_bases(attention, ("k_cache", "v_cache"))
        with graph.inserting_before(attention):
            _, (new_q, new_k_cache, new_v_cache) = functionalized_call(
                graph,
                attention.target,
                torch.ops.radixc.rope_store_kv.default,
                dict(
                    positions=positions,
                    q=q,
                    k=k,
                    v=kw["v"],
                    cos_sin_cache=cos_sin_cache,
                    out_cache_loc=kw["out_cache_loc"],
                    q_norm_weight=None,
                    k_norm_weight=None,
                    head_size=head_size,
                    is_neox=is_neox,
                    norm_eps=0.0,
                    norm_zero_centered=False,
                    backend=kw["backend"],
                    forward_mode=kw["forward_mode"],
                ),
                {"k_cache": k_cache, "v_cache": v_cache},
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
        new_kwargs = dict(kw, k=None, v=None, save_kv_cache=False)
        if "_all_bases" in new_kwargs:
            new_kwargs["_all_bases"] = [new_k_cache, new_v_cache]
        else:
            new_kwargs.update(k_cache=new_k_cache, v_cache=new_v_cache)
        attention.kwargs = new_kwargs
        attention.meta.pop("eager_input_vals", None)  # its recorded inputs no longer match the call
        return True
