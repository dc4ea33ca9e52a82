"""Paged extend (prefill) attention: new tokens of each request attend to its keys in the paged cache.

Each program takes BLOCK_M query rows of one request and one query head and streams that request's keys
(prefix and new tokens alike, all read through req_to_token) with an online softmax. Twin:
radixc.ops.native.attention.paged_attention.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixc.ops.triton._utils import (
    check_last_dim_contiguous,
    dot_precision,
    kernel_window,
    lens_block,
    pow2_block,
    query_group_size,
    ragged_block_of,
    ragged_grid_size,
    soft_cap,
)


@triton.jit(do_not_specialize=["num_reqs"])  # one compile for every batch's request count
def _extend_kernel(
    Q,  # [T, Hq, D]
    K,  # [S, Hk, D]
    V,  # [S, Hk, Dv]
    Out,  # [T, Hq, Dv]
    ReqToToken,  # [R, max_context_len] int32
    ReqPoolIndices,  # [B]
    SeqLens,  # [B]
    PrefixLens,  # [B]
    ExtendLens,  # [B]
    StartLoc,  # [B]
    KvStart,  # [B] first req_to_token column of each request's keys (read when HAS_KV_START)
    stride_qt,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_ot,
    stride_oh,
    stride_req,
    sm_scale,
    logit_cap,
    window,  # sliding window W, or UNBOUNDED_WINDOW
    group_size,
    num_reqs,
    HEAD_DIM: tl.constexpr,
    V_HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    CAUSAL: tl.constexpr,
    SOFT_CAP: tl.constexpr,
    HAS_KV_START: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    head = tl.program_id(1)
    b, m_block = ragged_block_of(tl.program_id(0), ExtendLens, num_reqs, BLOCK_M, BLOCK_B, False)
    if b >= num_reqs:
        return
    kv_head = head // group_size

    ext_len = tl.load(ExtendLens + b).to(tl.int64)
    prefix_len = tl.load(PrefixLens + b).to(tl.int64)
    seq_len = tl.load(SeqLens + b).to(tl.int64)
    start_loc = tl.load(StartLoc + b).to(tl.int64)
    req_row = tl.load(ReqPoolIndices + b).to(tl.int64) * stride_req
    if HAS_KV_START:
        req_row += tl.load(KvStart + b).to(tl.int64)

    offs_m = m_block * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < ext_len
    q_pos = prefix_len + offs_m
    rows = start_loc + offs_m
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_mask = offs_d < HEAD_DIM
    dv_mask = offs_dv < V_HEAD_DIM
    q = tl.load(
        Q + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :],
        mask=m_mask[:, None] & d_mask[None, :],
        other=0.0,
    )

    # keys this block can see: [kv_lo, kv_hi); the window keeps q_pos - W < key, causality key <= q_pos
    first_pos = prefix_len + m_block * BLOCK_M
    last_pos = prefix_len + tl.minimum((m_block + 1) * BLOCK_M, ext_len) - 1
    kv_lo = tl.maximum(first_pos - window + 1, 0)
    kv_hi = seq_len
    if CAUSAL:
        kv_hi = tl.minimum(seq_len, last_pos + 1)

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start_n in range(kv_lo, kv_hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < kv_hi
        slots = tl.load(ReqToToken + req_row + offs_n, mask=n_mask, other=0).to(tl.int64)
        k = tl.load(
            K + slots[None, :] * stride_ks + kv_head * stride_kh + offs_d[:, None],
            mask=n_mask[None, :] & d_mask[:, None],
            other=0.0,
        ).to(q.dtype)
        s = tl.dot(q, k, input_precision=DOT_PRECISION) * sm_scale
        if SOFT_CAP:
            s = soft_cap(s, logit_cap)
        allowed = n_mask[None, :] & (q_pos[:, None] - offs_n[None, :] < window)
        if CAUSAL:
            allowed &= offs_n[None, :] <= q_pos[:, None]
        s = tl.where(allowed, s * 1.4426950408889634, float("-inf"))
        # a row can have no allowed key in this block (window, causality): keep its exponents finite
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m_i - m_safe)
        p = tl.exp2(s - m_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(
            V + slots[:, None] * stride_vs + kv_head * stride_vh + offs_dv[None, :],
            mask=n_mask[:, None] & dv_mask[None, :],
            other=0.0,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    # rows without any allowed key (padding) come out as zeros, like the native twin
    has_keys = l_i > 0.0
    out = tl.where(has_keys[:, None], acc / tl.where(has_keys, l_i, 1.0)[:, None], 0.0)
    tl.store(
        Out + rows[:, None] * stride_ot + head * stride_oh + offs_dv[None, :],
        out.to(Out.dtype.element_ty),
        mask=m_mask[:, None] & dv_mask[None, :],
    )


def paged_extend_attention(
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
    """Attention of packed new tokens over each request's paged keys; returns [T, Hq, Dv] in q.dtype.

    q [T, Hq, D], k_cache [S, Hk, D], v_cache [S, Hk, Dv]. Request b's queries are rows extend_start_loc[b] + i
    at positions extend_prefix_lens[b] + i; its keys are the slots req_to_token[req, kv_start[b] + j] for
    j < seq_lens[b] (kv_start defaults to 0), key j at position j.
    """
    check_last_dim_contiguous("paged_extend_attention", q=q, k_cache=k_cache, v_cache=v_cache)
    num_tokens, num_q_heads, head_dim = q.shape
    num_kv_heads, v_head_dim = k_cache.shape[1], v_cache.shape[2]
    group_size = query_group_size("paged_extend_attention", num_q_heads, num_kv_heads)
    # rows of no request stay zero, like the native twin's
    out = torch.zeros((num_tokens, num_q_heads, v_head_dim), dtype=q.dtype, device=q.device)
    num_reqs = seq_lens.shape[0]
    if num_tokens == 0 or num_reqs == 0:
        return out

    block_d, block_dv = pow2_block(head_dim), pow2_block(v_head_dim)
    # 64x64 tiles fit an H100 SM's registers up to head dim 128; halve them for larger heads
    block = 64 if max(block_d, block_dv) <= 128 else 32
    grid = (ragged_grid_size(num_tokens, num_reqs, block), num_q_heads)
    _extend_kernel[grid](
        q,
        k_cache,
        v_cache,
        out,
        req_to_token,
        req_pool_indices,
        seq_lens,
        extend_prefix_lens,
        extend_seq_lens,
        extend_start_loc,
        req_pool_indices if kv_start is None else kv_start,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        out.stride(0),
        out.stride(1),
        req_to_token.stride(0),
        scaling,
        logit_cap,
        kernel_window(sliding_window),
        group_size,
        num_reqs,
        HEAD_DIM=head_dim,
        V_HEAD_DIM=v_head_dim,
        BLOCK_M=block,
        BLOCK_N=block,
        BLOCK_D=block_d,
        BLOCK_DV=block_dv,
        CAUSAL=causal,
        SOFT_CAP=logit_cap > 0,
        HAS_KV_START=kv_start is not None,
        DOT_PRECISION=dot_precision(q.dtype),
        BLOCK_B=lens_block(num_reqs),
        num_warps=8 if max(block_d, block_dv) >= 128 else 4,
        num_stages=2,
    )
    return out
