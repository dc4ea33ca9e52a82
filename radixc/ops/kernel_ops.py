"""Kernel ops of a backend, composed from its primitive kernels: what the generic radixc ops lower to.

A backend declares its primitive kernels once (`BackendKernels`: paged extend and decode attention, an optional
cache-free attention, an optional rotary + KV-store kernel and the four GDN primitives); `define_backend_kernels`
wraps them into kernel ops named `radixc::<backend>_<kernel>` and registers them for lowering. One composition
serves every backend, so a backend supplies kernels, never glue.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
from collections.abc import Callable

import torch

from radixc.ops.library import define_kernel_op
from radixc.ops.native.attention import store_kv
from radixc.ops.native.gdn import gdn_gating
from radixc.ops.rotary import rotary_and_store_kv

MODES = ("extend", "decode")


def lazy(path: str) -> Callable:
    """The function `module:name`, imported on its first call (keeps optional kernel packages unimported)."""
    module_name, name = path.split(":")

    @functools.cache
    def resolve() -> Callable:
        return getattr(importlib.import_module(module_name), name)

    def call(*args, **kwargs):
        return resolve()(*args, **kwargs)

    call.__name__ = call.__qualname__ = name
    return call


@dataclasses.dataclass(frozen=True)
class GDNKernels:
    """The four Gated DeltaNet primitives (signatures of the native twins in radixc.ops.native.gdn), and
    optionally a decode step that computes the gates itself (`gated_recurrent_step(q, k, v, a, b, A_log,
    dt_bias, ssm_state, gdn_slots, *, scale)`; None: the gates are computed in torch first)."""

    causal_conv1d_extend: Callable
    causal_conv1d_decode: Callable
    chunk_gated_delta_rule: Callable
    recurrent_gated_delta_rule: Callable
    gated_recurrent_step: Callable | None = None


@dataclasses.dataclass(frozen=True)
class BackendKernels:
    """The primitive kernels of one backend; the native twins (radixc.ops.native) define their signatures.

    extend_attention: `native.attention.paged_attention`; decode_attention: `native.attention.paged_decode_attention`;
    ragged_attention: `native.attention.ragged_attention` (None: no encoder-only attention); rotary_and_store_kv:
    `rotary.rotary_and_store_kv` (None: that torch version); gdn: None when the backend has no GDN kernels.
    cudagraph_safe: False when the kernels read sizes on the host (Inductor's partitions then leave them out).
    """

    extend_attention: Callable
    decode_attention: Callable
    ragged_attention: Callable | None = None
    rotary_and_store_kv: Callable | None = None
    gdn: GDNKernels | None = None
    cudagraph_safe: bool = True


def define_backend_kernels(name: str, kernels: BackendKernels) -> None:
    """Define and register every kernel op of backend `name`."""
    define = functools.partial(define_kernel_op, backend=name, cudagraph_safe=kernels.cudagraph_safe)
    define(
        "attention",
        f"{name}_extend_attention",
        _extend_attention(kernels.extend_attention),
        modes=("extend",),
    )
    define(
        "attention",
        f"{name}_decode_attention",
        _decode_attention(kernels.decode_attention),
        modes=("decode",),
    )
    if kernels.ragged_attention is not None:
        define(
            "encoder_attention",
            f"{name}_encoder_attention",
            _encoder_attention(kernels.ragged_attention),
            modes=("extend",),
        )
    rope_and_store = kernels.rotary_and_store_kv or rotary_and_store_kv
    define("rope_store_kv", f"{name}_rope_store_kv", _rope_store_kv(rope_and_store), modes=MODES)
    if kernels.gdn is None:
        return
    for mode in MODES:
        decode = mode == "decode"
        define("gdn", f"{name}_gdn_{mode}", _gdn(kernels.gdn, decode), modes=(mode,))
        define("causal_conv1d", f"{name}_causal_conv1d_{mode}", _conv(kernels.gdn, decode), modes=(mode,))
        define(
            "causal_conv1d_silu",
            f"{name}_causal_conv1d_silu_{mode}",
            _conv(kernels.gdn, decode, activation="silu"),
            modes=(mode,),
        )
        define(
            "gated_delta_rule",
            f"{name}_gated_delta_rule_{mode}",
            _delta_rule(kernels.gdn, decode),
            modes=(mode,),
        )


def _store_new_kv(k, v, k_cache, v_cache, out_cache_loc, save_kv_cache: bool) -> None:
    if save_kv_cache and k is not None:
        store_kv(k, v, k_cache, v_cache, out_cache_loc)


def _extend_attention(attend: Callable) -> Callable:
    def extend_attention(
        q,
        k,
        v,
        k_cache,
        v_cache,
        req_to_token,
        req_pool_indices,
        seq_lens,
        extend_prefix_lens,
        extend_seq_lens,
        extend_start_loc,
        out_cache_loc,
        kv_start,
        *,
        scaling,
        causal,
        logit_cap,
        sliding_window,
        save_kv_cache,
    ):
        _store_new_kv(k, v, k_cache, v_cache, out_cache_loc, save_kv_cache)
        return attend(
            q,
            k_cache,
            v_cache,
            req_to_token,
            req_pool_indices,
            seq_lens,
            extend_prefix_lens,
            extend_seq_lens,
            extend_start_loc,
            scaling=scaling,
            causal=causal,
            logit_cap=logit_cap,
            sliding_window=sliding_window,
            kv_start=kv_start,
        )

    return extend_attention


def _decode_attention(attend: Callable) -> Callable:
    # one query per request at position seq_lens - 1: causal or not, it sees every key of its request
    def decode_attention(
        q,
        k,
        v,
        k_cache,
        v_cache,
        req_to_token,
        req_pool_indices,
        seq_lens,
        extend_prefix_lens,
        extend_seq_lens,
        extend_start_loc,
        out_cache_loc,
        kv_start,
        *,
        scaling,
        causal,
        logit_cap,
        sliding_window,
        save_kv_cache,
    ):
        _store_new_kv(k, v, k_cache, v_cache, out_cache_loc, save_kv_cache)
        return attend(
            q,
            k_cache,
            v_cache,
            req_to_token,
            req_pool_indices,
            seq_lens,
            scaling=scaling,
            logit_cap=logit_cap,
            sliding_window=sliding_window,
            kv_start=kv_start,
        )

    return decode_attention


def _encoder_attention(ragged: Callable) -> Callable:
    def encoder_attention(q, k, v, extend_start_loc, extend_seq_lens, *, scaling, logit_cap):
        return ragged(
            q, k, v, extend_start_loc, extend_seq_lens, scaling=scaling, causal=False, logit_cap=logit_cap
        )

    return encoder_attention


def causal_conv1d(
    kernels: GDNKernels,
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_state: torch.Tensor,
    gdn_slots: torch.Tensor,
    extend_start_loc: torch.Tensor,
    extend_seq_lens: torch.Tensor,
    extend_prefix_lens: torch.Tensor,
    *,
    decode: bool,
    activation: str | None,
) -> torch.Tensor:
    """Causal conv1d of a batch in either forward mode: the single-step update for decode, the ragged extend
    (starting from the stored window where extend_prefix_lens > 0) otherwise."""
    if decode:
        return kernels.causal_conv1d_decode(x, weight, conv_state, gdn_slots, activation=activation)
    return kernels.causal_conv1d_extend(
        x,
        weight,
        conv_state,
        gdn_slots,
        extend_start_loc,
        extend_seq_lens,
        extend_prefix_lens > 0,
        activation=activation,
    )


def gated_delta_rule(
    kernels: GDNKernels,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    ssm_state: torch.Tensor,
    gdn_slots: torch.Tensor,
    extend_start_loc: torch.Tensor,
    extend_seq_lens: torch.Tensor,
    extend_prefix_lens: torch.Tensor,
    *,
    num_k_heads: int,
    num_v_heads: int,
    head_k_dim: int,
    head_v_dim: int,
    decode: bool,
) -> torch.Tensor:
    """Gating, then the chunked rule (extend) or one recurrent step (decode) over the conv outputs q, k
    `[T, Hk * Dk]` and v `[T, Hv * Dv]`; returns `[T, Hv * Dv]` in v.dtype and updates ssm_state."""
    T = v.shape[0]
    q = q.reshape(T, num_k_heads, head_k_dim)
    k = k.reshape(T, num_k_heads, head_k_dim)
    v = v.reshape(T, num_v_heads, head_v_dim)
    scale = head_k_dim**-0.5
    if decode and kernels.gated_recurrent_step is not None:
        o = kernels.gated_recurrent_step(q, k, v, a, b, A_log, dt_bias, ssm_state, gdn_slots, scale=scale)
        return o.reshape(T, num_v_heads * head_v_dim)
    g = gdn_gating(A_log, a, dt_bias)
    beta = torch.sigmoid(b.float())
    if decode:
        o = kernels.recurrent_gated_delta_rule(q, k, v, g, beta, ssm_state, gdn_slots, scale=scale)
    else:
        o = kernels.chunk_gated_delta_rule(
            q,
            k,
            v,
            g,
            beta,
            ssm_state,
            gdn_slots,
            extend_start_loc,
            extend_seq_lens,
            extend_prefix_lens > 0,
            scale=scale,
        )
    return o.reshape(T, num_v_heads * head_v_dim)


def gdn_forward(
    kernels: GDNKernels,
    mixed_qkv: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    conv_weight: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    conv_state: torch.Tensor,
    ssm_state: torch.Tensor,
    gdn_slots: torch.Tensor,
    extend_start_loc: torch.Tensor,
    extend_seq_lens: torch.Tensor,
    extend_prefix_lens: torch.Tensor,
    *,
    num_k_heads: int,
    num_v_heads: int,
    head_k_dim: int,
    head_v_dim: int,
    decode: bool,
) -> torch.Tensor:
    """The Gated DeltaNet core (Qwen3-Next / Qwen3.5): conv1d + SiLU with state, q/k/v split, gating, then the
    delta rule. mixed_qkv `[T, conv_dim]` -> `[T, num_v_heads * head_v_dim]`; conv_state and ssm_state updated."""
    qk_dim, v_dim = num_k_heads * head_k_dim, num_v_heads * head_v_dim
    expected = {"mixed_qkv": (mixed_qkv, 2 * qk_dim + v_dim), "a": (a, num_v_heads), "b": (b, num_v_heads)}
    for name, (tensor, width) in expected.items():
        if tensor.dim() != 2 or tuple(tensor.shape) != (mixed_qkv.shape[0], width):
            raise ValueError(
                f"gdn_forward: expected {name} [T={mixed_qkv.shape[0]}, {width}], got {list(tensor.shape)}"
            )
    x = causal_conv1d(
        kernels,
        mixed_qkv,
        conv_weight,
        conv_state,
        gdn_slots,
        extend_start_loc,
        extend_seq_lens,
        extend_prefix_lens,
        decode=decode,
        activation="silu",
    )
    q, k, v = x.split([qk_dim, qk_dim, v_dim], dim=-1)
    return gated_delta_rule(
        kernels,
        q,
        k,
        v,
        a,
        b,
        A_log,
        dt_bias,
        ssm_state,
        gdn_slots,
        extend_start_loc,
        extend_seq_lens,
        extend_prefix_lens,
        num_k_heads=num_k_heads,
        num_v_heads=num_v_heads,
        head_k_dim=head_k_dim,
        head_v_dim=head_v_dim,
        decode=decode,
    )


def _gdn(kernels: GDNKernels, decode: bool) -> Callable:
    return functools.partial(gdn_forward, kernels, decode=decode)


def _conv(kernels: GDNKernels, decode: bool, activation: str | None = None) -> Callable:
    return functools.partial(causal_conv1d, kernels, decode=decode, activation=activation)


def _delta_rule(kernels: GDNKernels, decode: bool) -> Callable:
    return functools.partial(gated_delta_rule, kernels, decode=decode)


def _rope_store_kv(rotary_and_store: Callable) -> Callable:
    def rope_store_kv(
        positions,
        q,
        k,
        v,
        cos_sin_cache,
        k_cache,
        v_cache,
        out_cache_loc,
        q_norm_weight,
        k_norm_weight,
        *,
        head_size,
        is_neox,
        norm_eps,
        norm_zero_centered,
    ):
        v = v.reshape(v.shape[0], k_cache.shape[1], -1)
        return rotary_and_store(
            positions,
            q.flatten(1),
            k.flatten(1),
            v,
            cos_sin_cache,
            k_cache,
            v_cache,
            out_cache_loc,
            q_norm_weight,
            k_norm_weight,
            head_size=head_size,
            is_neox=is_neox,
            norm_eps=norm_eps,
            norm_zero_centered=norm_zero_centered,
        )

    return rope_store_kv
