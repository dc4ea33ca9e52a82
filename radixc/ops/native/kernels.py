"""Kernel ops of the native backend: what `radixc::attention` / `encoder_attention` / `gdn` lower to on it."""

from __future__ import annotations

import torch

from radixc.ops.library import define_kernel_op
from radixc.ops.native import gdn
from radixc.ops.native.attention import paged_attention, ragged_attention, store_kv
from radixc.ops.rotary import rotary_embedding


def _native_paged_attention(
    q, k, v, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, extend_prefix_lens, extend_seq_lens,
    extend_start_loc, out_cache_loc, kv_start, *, scaling, causal, logit_cap, sliding_window, save_kv_cache,
):  # fmt: skip
    if save_kv_cache and k is not None:
        store_kv(k, v, k_cache, v_cache, out_cache_loc)
    return paged_attention(
        q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, extend_prefix_lens, extend_seq_lens,
        extend_start_loc, scaling=scaling, causal=causal, logit_cap=logit_cap, sliding_window=sliding_window,
        kv_start=kv_start,
    )  # fmt: skip


def _native_encoder_attention(q, k, v, extend_start_loc, extend_seq_lens, *, scaling, logit_cap):
    return ragged_attention(
        q, k, v, extend_start_loc, extend_seq_lens, scaling=scaling, causal=False, logit_cap=logit_cap
    )


def _gdn_kernel(decode: bool):
    def native_gdn(mixed_qkv, a, b, conv_weight, A_log, dt_bias, conv_state, ssm_state, state_indices,
                   extend_start_loc, extend_seq_lens, extend_prefix_lens, **heads) -> torch.Tensor:  # fmt: skip
        return gdn.gdn_forward(
            mixed_qkv, a, b, conv_weight, A_log, dt_bias, conv_state, ssm_state, state_indices,
            extend_start_loc, extend_seq_lens, extend_prefix_lens, decode=decode, **heads,
        )  # fmt: skip

    return native_gdn


def _native_rope_store_kv(
    positions, q, k, v, cos_sin_cache, k_cache, v_cache, out_cache_loc, *, head_size, is_neox
):
    q, k = rotary_embedding(positions, q, k, cos_sin_cache, head_size, is_neox)
    num_kv_heads = k_cache.shape[1]
    store_kv(
        k.view(k.shape[0], num_kv_heads, -1),
        v.view(v.shape[0], num_kv_heads, -1),
        k_cache,
        v_cache,
        out_cache_loc,
    )
    return q


define_kernel_op(
    "attention",
    "native_paged_attention",
    _native_paged_attention,
    backend="native",
    modes=("extend", "decode"),
)
define_kernel_op(
    "encoder_attention",
    "native_encoder_attention",
    _native_encoder_attention,
    backend="native",
    modes=("extend",),
)
define_kernel_op("gdn", "native_gdn_extend", _gdn_kernel(decode=False), backend="native", modes=("extend",))
define_kernel_op("gdn", "native_gdn_decode", _gdn_kernel(decode=True), backend="native", modes=("decode",))
define_kernel_op(
    "rope_store_kv",
    "native_rope_store_kv",
    _native_rope_store_kv,
    backend="native",
    modes=("extend", "decode"),
)
