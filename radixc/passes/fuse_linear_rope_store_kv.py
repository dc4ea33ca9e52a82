"""Fusion: an attention layer's qkv GEMV takes the RoPE and KV-cache store after it into its epilogue.

After lowering, a decode graph's attention layer reads q from `triton_rope_store_kv`, whose q, k and v are the
three parts of one `radixc::small_batch_linear` split along its last dim (q heads, k heads, v heads): one kernel
per layer between the qkv projection and attention, rotating q and k and writing k and v into the paged cache.
`radixc::linear_rope_store_kv` does the same in the GEMV's epilogue (radixc.ops.triton.linear_rope). Only where
that kernel can: full rotary, no per-head q/k norm in the rope op (Qwen3's stays), v heads as wide as k heads,
and a product without a residual that nothing else reads. On an H200 it took llama-1b's overlapped decode step
from 0.970 to 0.947 ms at batch 1 and from 1.582 to 1.558 ms at batch 32 (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import torch

import radixc.ops.linear  # noqa: F401  (defines radixc::linear_rope_store_kv)
from radixc.passes.base import RadixPass
from radixc.passes.graph_utils import (
    call,
    called_op,
    is_radixc_op,
    named_args,
    only_user_chain_ends_at,
    skip_reshapes,
    split_of,
)


def qkv_projection_of(rope: torch.fx.Node) -> tuple[torch.fx.Node, int, int] | None:
    """(linear, q heads, kv heads) when the rope op's q, k and v are the three parts, in order, of a split of one
    `small_batch_linear` used by nothing else, with shapes the fused kernel takes."""
    args = named_args(rope)
    if args["q_norm_weight"] is not None or args["k_norm_weight"] is not None:
        return None
    items = [skip_reshapes(args[name]) for name in ("q", "k", "v")]
    split = split_of(items)
    if split is None:
        return None
    linear, sizes = split.args[0], list(split.args[1])
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    if (
        not is_radixc_op(called_op(linear), "small_batch_linear")
        or named_args(linear).get("residual") is not None
    ):
        return None
    if dim not in (-1, 1) or len(linear.users) != 1 or len(split.users) != 3:
        return None
    if not all(only_user_chain_ends_at(item, rope) for item in items):
        return None
    head_size = args["head_size"]
    k_cache, v_cache, cos_sin = (
        args[name].meta.get("val") for name in ("k_cache", "v_cache", "cos_sin_cache")
    )
    if k_cache is None or v_cache is None or cos_sin is None or cos_sin.shape[-1] != head_size:
        return None
    num_kv_heads = k_cache.shape[1]
    kv_width = num_kv_heads * head_size
    if tuple(k_cache.shape[1:]) != tuple(v_cache.shape[1:]) or sizes[1:] != [kv_width, kv_width]:
        return None
    if sizes[0] % head_size:
        return None
    return linear, sizes[0] // head_size, num_kv_heads


class FuseLinearRopeStoreKV(RadixPass):
    name = "fuse_linear_rope_store_kv"

    def apply(self, graph: torch.fx.Graph) -> int:
        count = 0
        ropes = [n for n in graph.nodes if is_radixc_op(called_op(n), "triton_rope_store_kv")]
        for rope in ropes:
            found = qkv_projection_of(rope)
            if found is None:
                continue
            linear, num_q_heads, num_kv_heads = found
            rope_args, linear_args = named_args(rope), named_args(linear)
            kwargs = dict(
                x=linear_args["x"],
                weight=linear_args["weight"],
                bias=linear_args["bias"],
                positions=rope_args["positions"],
                cos_sin_cache=rope_args["cos_sin_cache"],
                k_cache=rope_args["k_cache"],
                v_cache=rope_args["v_cache"],
                out_cache_loc=rope_args["out_cache_loc"],
                num_q_heads=num_q_heads,
                num_kv_heads=num_kv_heads,
                head_size=rope_args["head_size"],
                is_neox=rope_args["is_neox"],
                norm_weight=linear_args.get("norm_weight"),
                norm_eps=linear_args.get("norm_eps", 0.0),
                norm_zero_centered=linear_args.get("norm_zero_centered", False),
            )
            with graph.inserting_before(rope):
                fused = call(
                    graph, torch.ops.radixc.linear_rope_store_kv.default, kwargs, rope.meta["val"], rope
                )
            rope.replace_all_uses_with(fused)
            graph.erase_node(rope)  # it writes the caches, so dead-code elimination would keep it
            count += 1
        return count
