"""Kernel ops of the native backend: what `radixc::attention` / `encoder_attention` / `gdn` lower to on it."""

from __future__ import annotations

import functools

import torch

from radixc.ops.library import define_kernel_op
from radixc.ops.native import gdn
from radixc.ops.native.attention import paged_attention, ragged_attention, store_kv
from radixc.ops.norm import rms_norm_reference
from radixc.ops.rotary import rotary_embedding

# Native kernels size their work on the host (lengths read with .item()), so no CUDA graph may capture them.
_define_native = functools.partial(define_kernel_op, backend="native", cudagraph_safe=False)


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


def _normed_rope(
    positions, q, k, cos_sin_cache, q_norm_weight, k_norm_weight, head_size, is_neox, eps, zero_centered
):
    """Optional per-head RMSNorm of q and k, then rotary embedding; returns q, k as `[T, H * head_size]`."""
    q, k = q.reshape(q.shape[0], -1, head_size), k.reshape(k.shape[0], -1, head_size)
    if q_norm_weight is not None:
        q = rms_norm_reference(q, q_norm_weight, eps, zero_centered)
        k = rms_norm_reference(k, k_norm_weight, eps, zero_centered)
    return rotary_embedding(positions, q.flatten(1), k.flatten(1), cos_sin_cache, head_size, is_neox)


def _native_rope_store_kv(positions, q, k, v, cos_sin_cache, k_cache, v_cache, out_cache_loc, q_norm_weight,
                          k_norm_weight, *, head_size, is_neox, norm_eps, norm_zero_centered):  # fmt: skip
    q, k = _normed_rope(positions, q, k, cos_sin_cache, q_norm_weight, k_norm_weight, head_size, is_neox, norm_eps,
                        norm_zero_centered)  # fmt: skip
    num_kv_heads = k_cache.shape[1]
    store_kv(
        k.view(k.shape[0], num_kv_heads, -1),
        v.view(v.shape[0], num_kv_heads, -1),
        k_cache,
        v_cache,
        out_cache_loc,
    )
    return q


def _native_qk_norm_rope(positions, q, k, q_norm_weight, k_norm_weight, cos_sin_cache, *, head_size, is_neox,
                         norm_eps, norm_zero_centered):  # fmt: skip
    q, k = _normed_rope(positions, q, k, cos_sin_cache, q_norm_weight, k_norm_weight, head_size, is_neox, norm_eps,
                        norm_zero_centered)  # fmt: skip
    return q.clone(), k.clone()  # outputs of an op must not alias its inputs


_define_native(
    "attention",
    "native_paged_attention",
    _native_paged_attention,
    modes=("extend", "decode"),
)
_define_native(
    "encoder_attention",
    "native_encoder_attention",
    _native_encoder_attention,
    modes=("extend",),
)
_define_native("gdn", "native_gdn_extend", _gdn_kernel(decode=False), modes=("extend",))
_define_native("gdn", "native_gdn_decode", _gdn_kernel(decode=True), modes=("decode",))
_define_native(
    "rope_store_kv",
    "native_rope_store_kv",
    _native_rope_store_kv,
    modes=("extend", "decode"),
)
_define_native("qk_norm_rope", "native_qk_norm_rope", _native_qk_norm_rope, modes=("extend", "decode"))


def _conv_kernel(decode: bool):
    def native_causal_conv1d(x, weight, conv_state, state_indices, extend_start_loc, extend_seq_lens,
                             extend_prefix_lens):  # fmt: skip
        return gdn.causal_conv1d(
            x, weight, conv_state, state_indices, extend_start_loc, extend_seq_lens, extend_prefix_lens,
            decode=decode, activation=None,
        )  # fmt: skip

    return native_causal_conv1d


def _conv_silu_split_kernel(decode: bool):
    def native_causal_conv1d_silu_split(x, weight, conv_state, state_indices, extend_start_loc, extend_seq_lens,
                                        extend_prefix_lens, *, split_sizes):  # fmt: skip
        y = gdn.causal_conv1d(
            x, weight, conv_state, state_indices, extend_start_loc, extend_seq_lens, extend_prefix_lens,
            decode=decode, activation="silu",
        )  # fmt: skip
        return tuple(part.contiguous() for part in y.split(split_sizes, dim=-1))

    return native_causal_conv1d_silu_split


def _delta_rule_kernel(decode: bool):
    def native_gated_delta_rule(q, k, v, a, b, A_log, dt_bias, ssm_state, state_indices, extend_start_loc,
                                extend_seq_lens, extend_prefix_lens, **heads):  # fmt: skip
        return gdn.gated_delta_rule(
            q, k, v, a, b, A_log, dt_bias, ssm_state, state_indices, extend_start_loc, extend_seq_lens,
            extend_prefix_lens, decode=decode, **heads,
        )  # fmt: skip

    return native_gated_delta_rule


for _mode in ("extend", "decode"):
    _decode = _mode == "decode"
    _define_native("causal_conv1d", f"native_causal_conv1d_{_mode}", _conv_kernel(_decode),
                     modes=(_mode,))  # fmt: skip
    _define_native("causal_conv1d_silu_split", f"native_causal_conv1d_silu_split_{_mode}",
                     _conv_silu_split_kernel(_decode), modes=(_mode,))  # fmt: skip
    _define_native("gated_delta_rule", f"native_gated_delta_rule_{_mode}", _delta_rule_kernel(_decode), modes=(_mode,))  # fmt: skip
