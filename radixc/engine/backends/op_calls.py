"""Calls of the generic radixc ops from a backend: gather the layer's buffers and the batch's metadata."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from radixc.engine.forward_batch import ForwardBatch

if TYPE_CHECKING:
    from radixc.ops.attention import RadixAttention
    from radixc.ops.linear_attention import RadixLinearAttention


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    return x.view(x.shape[0], num_heads, -1)


def attention(
    backend: str, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, layer: RadixAttention,
    forward_batch: ForwardBatch, save_kv_cache: bool,
) -> torch.Tensor:  # fmt: skip
    """Run `radixc::attention` (or `radixc::encoder_attention`) for one layer; returns `[T, Hq * Dv]`."""
    fb = forward_batch
    mode = fb.forward_mode.value
    q = _heads(q, layer.tp_q_head_num)
    if layer.attn_type == "encoder_only":
        out = torch.ops.radixc.encoder_attention(
            q, _heads(k, layer.tp_k_head_num), _heads(v, layer.tp_v_head_num), fb.extend_start_loc,
            fb.extend_seq_lens, scaling=layer.scaling, logit_cap=layer.logit_cap, backend=backend,
            forward_mode=mode,
        )  # fmt: skip
        return out.view(out.shape[0], -1)
    k_cache, v_cache = fb.token_to_kv_pool.layer_buffers(layer.layer_id)
    if k is not None:
        k, v = _heads(k, layer.tp_k_head_num), _heads(v, layer.tp_v_head_num)
    if layer.is_cross_attention:
        seq_lens, out_cache_loc, kv_start, causal = fb.encoder_lens, fb.encoder_out_cache_loc, None, False
    else:
        seq_lens, out_cache_loc, kv_start = fb.seq_lens, fb.out_cache_loc, fb.encoder_lens
        causal = layer.attn_type == "decoder" or fb.forward_mode.is_decode()
    out = torch.ops.radixc.attention(
        q, k, v, k_cache, v_cache, fb.req_to_token_pool.req_to_token, fb.req_pool_indices, seq_lens,
        fb.extend_prefix_lens, fb.extend_seq_lens, fb.extend_start_loc, out_cache_loc, kv_start,
        scaling=layer.scaling, causal=causal, logit_cap=layer.logit_cap,
        sliding_window=layer.sliding_window_size, save_kv_cache=save_kv_cache, backend=backend,
        forward_mode=mode,
    )  # fmt: skip
    return out.view(out.shape[0], -1)


def gdn(
    backend: str, layer: RadixLinearAttention, forward_batch: ForwardBatch, mixed_qkv: torch.Tensor,
    a: torch.Tensor, b: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """Run `radixc::gdn` for one GDN layer; returns `[T, Hv * Dv]`."""
    fb = forward_batch
    conv_state, ssm_state = fb.gdn_pool.layer_states(layer.gdn_layer_idx)
    return torch.ops.radixc.gdn(
        mixed_qkv, a, b, layer.conv_weight, layer.A_log, layer.dt_bias, conv_state, ssm_state,
        fb.gdn_state_indices, fb.extend_start_loc, fb.extend_seq_lens, fb.extend_prefix_lens,
        num_k_heads=layer.num_k_heads, num_v_heads=layer.num_v_heads, head_k_dim=layer.head_k_dim,
        head_v_dim=layer.head_v_dim, backend=backend, forward_mode=fb.forward_mode.value,
    )  # fmt: skip
