"""Torch-native paged attention: the eager reference and the CPU path of every attention kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _padded_token_rows(
    start_loc: torch.Tensor, lens: torch.Tensor, max_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row of each (request, offset) in a packed token dim, and which of them are real: `[B, max_len]` each."""
    offsets = torch.arange(max_len, device=lens.device)
    valid = offsets[None, :] < lens[:, None]
    rows = torch.where(valid, start_loc[:, None] + offsets[None, :], 0)
    return rows, valid


def _masked_softmax_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    allowed: torch.Tensor,
    *,
    scaling: float,
    logit_cap: float,
) -> torch.Tensor:
    """Softmax attention of padded batches in float32.

    q `[B, Lq, Hq, D]`, k `[B, Lk, Hk, D]`, v `[B, Lk, Hk, Dv]`, allowed `[B, Lq, Lk]` -> `[B, Lq, Hq, Dv]`.
    Rows with no allowed key (padding) come out as zeros.
    """
    batch, len_q, num_q_heads, head_dim = q.shape
    num_kv_heads = k.shape[2]
    if logit_cap <= 0:  # torch's fused SDPA (GQA-aware); padding rows come out as NaN, zeroed here
        out = F.scaled_dot_product_attention(
            q.float().transpose(1, 2),
            k.float().transpose(1, 2),
            v.float().transpose(1, 2),
            attn_mask=allowed[:, None],
            scale=scaling,
            enable_gqa=num_q_heads != num_kv_heads,
        )
        return out.transpose(1, 2).nan_to_num(0.0)
    group = num_q_heads // num_kv_heads
    q = q.float().view(batch, len_q, num_kv_heads, group, head_dim)
    scores = torch.einsum("bqhgd,bkhd->bhgqk", q, k.float()) * scaling
    if logit_cap > 0:
        scores = logit_cap * torch.tanh(scores / logit_cap)
    mask = allowed[:, None, None, :, :]
    scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)
    out = torch.einsum("bhgqk,bkhd->bqhgd", probs, v.float())
    return out.reshape(batch, len_q, num_q_heads, v.shape[-1])


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    extend_prefix_lens: torch.Tensor,
    extend_seq_lens: torch.Tensor,
    extend_start_loc: torch.Tensor,
    *,
    scaling: float,
    causal: bool,
    logit_cap: float,
    sliding_window: int,
    kv_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of packed new tokens over each request's keys in a paged cache.

    q `[T, Hq, D]`; k_cache `[S, Hk, D]`; v_cache `[S, Hk, Dv]` -> `[T, Hq, Dv]` in q.dtype. Request b's queries
    are rows extend_start_loc[b] + i at positions extend_prefix_lens[b] + i; its keys are the slots
    req_to_token[req, kv_start[b] + j] for j < seq_lens[b] (kv_start defaults to 0).
    """
    out = q.new_zeros(q.shape[0], q.shape[1], v_cache.shape[-1])
    if q.shape[0] == 0 or seq_lens.numel() == 0:
        return out
    max_q = int(extend_seq_lens.max())
    max_kv = int(seq_lens.max())
    q_rows, q_valid = _padded_token_rows(extend_start_loc, extend_seq_lens, max_q)
    kv_pos = torch.arange(max_kv, device=q.device)
    kv_valid = kv_pos[None, :] < seq_lens[:, None]
    kv_cols = kv_pos[None, :] if kv_start is None else kv_start[:, None] + kv_pos[None, :]
    kv_cols = torch.where(kv_valid, kv_cols, 0)
    slots = req_to_token[req_pool_indices[:, None], kv_cols].long()
    slots = torch.where(kv_valid, slots, 0)
    q_pos = extend_prefix_lens[:, None] + torch.arange(max_q, device=q.device)[None, :]
    allowed = kv_valid[:, None, :] & q_valid[:, :, None]
    if causal:
        allowed = allowed & (kv_pos[None, None, :] <= q_pos[:, :, None])
    if sliding_window > 0:
        allowed = allowed & (q_pos[:, :, None] - kv_pos[None, None, :] < sliding_window)
    # masked keys weigh 0, but 0 x NaN is NaN: whatever stands in the slot a masked key reads never reaches a row
    key_valid = kv_valid[:, :, None, None]
    keys = torch.where(key_valid, k_cache[slots], 0)
    values = torch.where(key_valid, v_cache[slots], 0)
    padded = _masked_softmax_attention(q[q_rows], keys, values, allowed, scaling=scaling, logit_cap=logit_cap)
    out[q_rows[q_valid]] = padded[q_valid].to(q.dtype)
    return out


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    *,
    scaling: float,
    logit_cap: float,
    sliding_window: int,
    kv_start: torch.Tensor | None = None,
) -> torch.Tensor:
    """One query per request `[B, Hq, D]` at position seq_lens - 1 over its keys: `paged_attention` of a batch
    whose extend lengths are all one (the twin of the Triton decode kernel)."""
    ones = torch.ones_like(seq_lens)
    return paged_attention(
        q,
        k_cache,
        v_cache,
        req_to_token,
        req_pool_indices,
        seq_lens,
        seq_lens - 1,
        ones,
        torch.arange(seq_lens.shape[0], device=seq_lens.device),
        scaling=scaling,
        causal=True,
        logit_cap=logit_cap,
        sliding_window=sliding_window,
        kv_start=kv_start,
    )


def ragged_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    extend_start_loc: torch.Tensor,
    extend_seq_lens: torch.Tensor,
    *,
    scaling: float,
    causal: bool,
    logit_cap: float,
) -> torch.Tensor:
    """Attention within each request's packed tokens, no cache (encoder-only layers).

    q `[T, Hq, D]`, k `[T, Hk, D]`, v `[T, Hk, Dv]` -> `[T, Hq, Dv]` in q.dtype.
    """
    out = q.new_zeros(q.shape[0], q.shape[1], v.shape[-1])
    if q.shape[0] == 0 or extend_seq_lens.numel() == 0:
        return out
    max_len = int(extend_seq_lens.max())
    rows, valid = _padded_token_rows(extend_start_loc, extend_seq_lens, max_len)
    allowed = valid[:, :, None] & valid[:, None, :]
    if causal:
        allowed = allowed & torch.ones(max_len, max_len, dtype=torch.bool, device=q.device).tril()
    padded = _masked_softmax_attention(
        q[rows], k[rows], v[rows], allowed, scaling=scaling, logit_cap=logit_cap
    )
    out[rows[valid]] = padded[valid].to(q.dtype)
    return out


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out_cache_loc: torch.Tensor,
) -> None:
    """Write new keys and values `[T, Hk, D]` / `[T, Hk, Dv]` into their cache slots."""
    k_cache[out_cache_loc] = k.to(k_cache.dtype)
    v_cache[out_cache_loc] = v.to(v_cache.dtype)
