"""Kernel ops of a backend, defined from its primitive kernels: what the generic radixc ops lower to.

A backend supplies paged attention for each mode, a ragged (cache-free) attention, a rotary + KV-store kernel
and the four GDN primitives (as a module with the native twins' names); this module wraps them into kernel ops
named `radixc::<backend>_<kernel>` and registers them for lowering. One composition serves every backend.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from types import ModuleType

import torch

from radixc.ops.library import define_kernel_op
from radixc.ops.native import gdn
from radixc.ops.native.attention import store_kv
from radixc.ops.norm import rms_norm_reference
from radixc.ops.rotary import rotary_embedding_native

MODES = ("extend", "decode")


@dataclasses.dataclass(frozen=True)
class BackendKernels:
    """The primitive kernels of one backend (signatures of their native twins)."""

    name: str
    extend_attention: Callable  # radixc.ops.native.attention.paged_attention
    decode_attention: Callable  # same, one query token per request (extend lengths all one)
    ragged_attention: (
        Callable | None
    )  # radixc.ops.native.attention.ragged_attention, None if the backend has none
    rotary_and_store_kv: Callable  # (positions, q, k, v, cos_sin_cache, k_cache, v_cache, out_cache_loc, ...)
    gdn_kernels: ModuleType  # causal_conv1d_extend/_decode, chunk_/recurrent_gated_delta_rule
    cudagraph_safe: bool  # False when the kernels read sizes on the host


def define_backend_kernels(kernels: BackendKernels) -> None:
    """Define and register every kernel op of one backend."""
    define = functools.partial(define_kernel_op, backend=kernels.name, cudagraph_safe=kernels.cudagraph_safe)
    for mode in MODES:
        decode = mode == "decode"
        attend = kernels.decode_attention if decode else kernels.extend_attention
        define("attention", f"{kernels.name}_{mode}_attention", _paged_attention(attend), modes=(mode,))
        define("gdn", f"{kernels.name}_gdn_{mode}", _gdn(kernels.gdn_kernels, decode), modes=(mode,))
        define("causal_conv1d", f"{kernels.name}_causal_conv1d_{mode}", _conv(kernels.gdn_kernels, decode, False),
               modes=(mode,))  # fmt: skip
        define("causal_conv1d_silu_split", f"{kernels.name}_causal_conv1d_silu_split_{mode}",
               _conv(kernels.gdn_kernels, decode, True), modes=(mode,))  # fmt: skip
        define("gated_delta_rule", f"{kernels.name}_gated_delta_rule_{mode}", _delta_rule(kernels.gdn_kernels, decode),
               modes=(mode,))  # fmt: skip
    if kernels.ragged_attention is not None:
        define("encoder_attention", f"{kernels.name}_encoder_attention", _encoder_attention(kernels.ragged_attention),
               modes=("extend",))  # fmt: skip
    define(
        "rope_store_kv",
        f"{kernels.name}_rope_store_kv",
        _rope_store_kv(kernels.rotary_and_store_kv),
        modes=MODES,
    )
    define("qk_norm_rope", f"{kernels.name}_qk_norm_rope", _qk_norm_rope, modes=MODES)


def _paged_attention(attend: Callable) -> Callable:
    def paged_attention(q, k, v, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, extend_prefix_lens,
                        extend_seq_lens, extend_start_loc, out_cache_loc, kv_start, *, scaling, causal, logit_cap,
                        sliding_window, save_kv_cache):  # fmt: skip
        if save_kv_cache and k is not None:
            store_kv(k, v, k_cache, v_cache, out_cache_loc)
        return attend(
            q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens, extend_prefix_lens, extend_seq_lens,
            extend_start_loc, scaling=scaling, causal=causal, logit_cap=logit_cap, sliding_window=sliding_window,
            kv_start=kv_start,
        )  # fmt: skip

    return paged_attention


def _encoder_attention(ragged: Callable) -> Callable:
    def encoder_attention(q, k, v, extend_start_loc, extend_seq_lens, *, scaling, logit_cap):
        return ragged(
            q, k, v, extend_start_loc, extend_seq_lens, scaling=scaling, causal=False, logit_cap=logit_cap
        )

    return encoder_attention


def _gdn(kernels: ModuleType, decode: bool) -> Callable:
    def gdn_op(mixed_qkv, a, b, conv_weight, A_log, dt_bias, conv_state, ssm_state, state_indices,
               extend_start_loc, extend_seq_lens, extend_prefix_lens, **heads) -> torch.Tensor:  # fmt: skip
        return gdn.gdn_forward(
            mixed_qkv, a, b, conv_weight, A_log, dt_bias, conv_state, ssm_state, state_indices, extend_start_loc,
            extend_seq_lens, extend_prefix_lens, decode=decode, kernels=kernels, **heads,
        )  # fmt: skip

    return gdn_op


def _conv(kernels: ModuleType, decode: bool, silu_split: bool) -> Callable:
    def conv(x, weight, conv_state, state_indices, extend_start_loc, extend_seq_lens, extend_prefix_lens,
             split_sizes=None):  # fmt: skip
        y = gdn.causal_conv1d(
            x, weight, conv_state, state_indices, extend_start_loc, extend_seq_lens, extend_prefix_lens,
            decode=decode, activation="silu" if silu_split else None, kernels=kernels,
        )  # fmt: skip
        if not silu_split:
            return y
        return tuple(
            part.clone(memory_format=torch.contiguous_format) for part in y.split(split_sizes, dim=-1)
        )

    return conv


def _delta_rule(kernels: ModuleType, decode: bool) -> Callable:
    def delta_rule(q, k, v, a, b, A_log, dt_bias, ssm_state, state_indices, extend_start_loc, extend_seq_lens,
                   extend_prefix_lens, **heads):  # fmt: skip
        return gdn.gated_delta_rule(
            q, k, v, a, b, A_log, dt_bias, ssm_state, state_indices, extend_start_loc, extend_seq_lens,
            extend_prefix_lens, decode=decode, kernels=kernels, **heads,
        )  # fmt: skip

    return delta_rule


def _per_head_norms(q, k, head_size, q_norm_weight, k_norm_weight, eps, zero_centered):
    """q, k as `[T, H, head_size]`, RMS-normed per head when norm weights are given."""
    q, k = q.reshape(q.shape[0], -1, head_size), k.reshape(k.shape[0], -1, head_size)
    if q_norm_weight is not None:
        q = rms_norm_reference(q, q_norm_weight, eps, zero_centered)
        k = rms_norm_reference(k, k_norm_weight, eps, zero_centered)
    return q, k


def _rope_store_kv(rotary_and_store_kv: Callable) -> Callable:
    def rope_store_kv(positions, q, k, v, cos_sin_cache, k_cache, v_cache, out_cache_loc, q_norm_weight,
                      k_norm_weight, *, head_size, is_neox, norm_eps, norm_zero_centered):  # fmt: skip
        q, k = _per_head_norms(q, k, head_size, q_norm_weight, k_norm_weight, norm_eps, norm_zero_centered)
        v = v.reshape(v.shape[0], k_cache.shape[1], -1)
        return rotary_and_store_kv(
            positions, q.flatten(1), k.flatten(1), v, cos_sin_cache, k_cache, v_cache, out_cache_loc,
            head_size=head_size, is_neox=is_neox,
        )  # fmt: skip

    return rope_store_kv


def _qk_norm_rope(positions, q, k, q_norm_weight, k_norm_weight, cos_sin_cache, *, head_size, is_neox, norm_eps,
                  norm_zero_centered):  # fmt: skip
    """Per-head norms and rope in torch ops (no host syncs: the same for every backend)."""
    q, k = _per_head_norms(q, k, head_size, q_norm_weight, k_norm_weight, norm_eps, norm_zero_centered)
    return rotary_embedding_native(positions, q.flatten(1), k.flatten(1), cos_sin_cache, head_size, is_neox)
