"""Paged decode attention (flash-decoding): one query token per request, keys split across programs.

Stage 1 gives each (request, kv head, split) program all query heads of that kv head (GQA/MQA share one key
load) and writes a partial softmax; stage 2 merges the splits. With one split, stage 1 writes the normalised
output directly and stage 2 is not launched. The split count comes from the batch, heads and context bound (enough
programs to fill the GPU, no split shorter than `MIN_SPLIT_KEYS`), never from the device lengths, so a launch is
capturable; it is a run-time argument of both kernels, not a specialisation, so the decode graphs of every batch
size share two compiles of stage 1 (one split or more) and one of stage 2. Twin: radixc.ops.native.attention.paged_attention with extend_seq_lens = 1 and causal=True.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from radixc.ops.triton._utils import (
    check_last_dim_contiguous,
    dot_precision,
    env_switch,
    kernel_window,
    let_next_kernel_start,
    pdl_launch,
    pow2_block,
    query_group_size,
    soft_cap,
    wait_for_previous_kernel,
)

# Measured on an H200 (bf16, 1,024 keys, llama-1b and qwen3.5 head shapes, kernel time in a CUDA graph): a split
# shorter than about 64 keys costs more in its partial write and merge than it gains; about four programs per SM
# hide the paged-key gather latency best; past 32 splits the merge dominates.
MIN_SPLIT_KEYS = 64
PROGRAMS_PER_SM = 4
MAX_KV_SPLITS = 32

# Under PDL both kernels let the next one start as they begin rather than after their loads, so that the o_proj
# GEMV after the merge is scheduled during the attention and prefetches its weights into L2 there
# (`RADIXC_GEMV_L2_PREFETCH=1`), where at one row the attention leaves HBM mostly idle (llama-1b: ~6 us a layer
# for 2 MB of keys). Safe because what follows each reads nothing before its own wait but weights (the merge
# nothing, a GEMV its weight rows), so nothing it reads early is written in the step. Off unless
# `RADIXC_DECODE_ATTENTION_EARLY_LAUNCH=1`: not yet timed on a GPU.
EARLY_LAUNCH_ENV = "RADIXC_DECODE_ATTENTION_EARLY_LAUNCH"


def launch_options(device: torch.device) -> dict[str, bool]:
    """PDL's launch options (`pdl_launch`) and the kernels' `EARLY_LAUNCH`, on where PDL is and
    `RADIXC_DECODE_ATTENTION_EARLY_LAUNCH=1`."""
    early = env_switch(EARLY_LAUNCH_ENV, False)  # checked wherever it runs
    pdl = pdl_launch(device)
    return dict(pdl, EARLY_LAUNCH=early and pdl["USE_PDL"])


@triton.jit
def _block_slots(ReqToToken, req_row, start_n, split_end, BLOCK_N: tl.constexpr):
    """The cache slots of keys start_n .. start_n + BLOCK_N - 1 (0 from split_end on)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    return tl.load(ReqToToken + req_row + offs_n, mask=offs_n < split_end, other=0).to(tl.int64)


@triton.jit
def _attend_block(
    q,
    K,
    V,
    slots,
    start_n,
    split_end,
    kv_head,
    offs_d,
    offs_dv,
    d_mask,
    dv_mask,
    m_i,
    l_i,
    acc,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    sm_scale,
    logit_cap,
    BLOCK_N: tl.constexpr,
    SOFT_CAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One block of keys (at least one valid) folded into the online softmax: returns (m_i, l_i, acc)."""
    offs_n = start_n + tl.arange(0, BLOCK_N)
    n_mask = offs_n < split_end
    k = tl.load(
        K + slots[None, :] * stride_ks + kv_head * stride_kh + offs_d[:, None],
        mask=n_mask[None, :] & d_mask[:, None],
        other=0.0,
    ).to(q.dtype)
    s = tl.dot(q, k, input_precision=DOT_PRECISION) * sm_scale
    if SOFT_CAP:
        s = soft_cap(s, logit_cap)
    s = tl.where(n_mask[None, :], s * 1.4426950408889634, float("-inf"))
    # the block has at least one valid key, so m_new is finite
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(
        V + slots[:, None] * stride_vs + kv_head * stride_vh + offs_dv[None, :],
        mask=n_mask[:, None] & dv_mask[None, :],
        other=0.0,
    )
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


# the arguments that vary with the split count: none is a specialisation (the LSE scratch's strides are the
# count itself and a multiple of it; the partial outputs' are multiples of the head dim)
SPLIT_DEPENDENT = ["num_splits", "stride_lb", "stride_lh"]


@triton.jit(do_not_specialize=SPLIT_DEPENDENT)
def _decode_partial_kernel(
    Q,  # [B, Hq, D]
    K,  # [S, Hk, D]
    V,  # [S, Hk, Dv]
    ReqToToken,  # [R, max_context_len] int32
    ReqPoolIndices,  # [B]
    SeqLens,  # [B]
    KvStart,  # [B] first req_to_token column of each request's keys (read when HAS_KV_START)
    PartialOut,  # [B, Hq, num_splits, Dv] float32; the output [B, Hq, Dv] itself when not WRITE_LSE
    PartialLse,  # [B, Hq, num_splits] float32, log2 domain (unused when not WRITE_LSE)
    stride_qb,
    stride_qh,
    stride_ks,
    stride_kh,
    stride_vs,
    stride_vh,
    stride_req,
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    sm_scale,
    logit_cap,
    window,  # sliding window W, or UNBOUNDED_WINDOW
    group_size,
    num_splits,
    HEAD_DIM: tl.constexpr,
    V_HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    SOFT_CAP: tl.constexpr,
    HAS_KV_START: tl.constexpr,
    WRITE_LSE: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
    EARLY_LAUNCH: tl.constexpr,
):
    if EARLY_LAUNCH:
        let_next_kernel_start(USE_PDL)
    b = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2) % num_splits
    head_block = tl.program_id(2) // num_splits

    local_heads = head_block * BLOCK_H + tl.arange(0, BLOCK_H)
    head_mask = local_heads < group_size
    q_heads = kv_head * group_size + local_heads
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    d_mask = offs_d < HEAD_DIM
    dv_mask = offs_dv < V_HEAD_DIM

    # the step's inputs (lengths, page table; no kernel of the step writes them) before the PDL wait, with the
    # first block's slots, so that the chain length -> slots -> keys starts while the kernel before drains; each
    # block then loads the next one's slots
    seq_len = tl.load(SeqLens + b).to(tl.int64)
    req_row = tl.load(ReqPoolIndices + b).to(tl.int64) * stride_req
    if HAS_KV_START:
        req_row += tl.load(KvStart + b).to(tl.int64)
    # the query sits at position seq_len - 1; a window of W keeps keys seq_len - W .. seq_len - 1
    kv_start = tl.maximum(seq_len - window, 0)
    split_len = tl.cdiv(seq_len - kv_start, num_splits)
    split_start = kv_start + split * split_len
    split_end = tl.minimum(split_start + split_len, seq_len)
    first_slots = _block_slots(ReqToToken, req_row, split_start, split_end, BLOCK_N)
    wait_for_previous_kernel(USE_PDL)

    q = tl.load(
        Q + b.to(tl.int64) * stride_qb + q_heads[:, None] * stride_qh + offs_d[None, :],
        mask=head_mask[:, None] & d_mask[None, :],
        other=0.0,
    )
    m_i = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_DV], tl.float32)
    slots = first_slots
    for start_n in range(split_start, split_end, BLOCK_N):
        m_i, l_i, acc = _attend_block(
            q,
            K,
            V,
            slots,
            start_n,
            split_end,
            kv_head,
            offs_d,
            offs_dv,
            d_mask,
            dv_mask,
            m_i,
            l_i,
            acc,
            stride_ks,
            stride_kh,
            stride_vs,
            stride_vh,
            sm_scale,
            logit_cap,
            BLOCK_N,
            SOFT_CAP,
            DOT_PRECISION,
        )
        # the next block's slots (none past the split's end), loaded while this block's keys are in use
        slots = _block_slots(ReqToToken, req_row, start_n + BLOCK_N, split_end, BLOCK_N)
    if not EARLY_LAUNCH:
        let_next_kernel_start(USE_PDL)

    has_keys = l_i > 0.0
    out = tl.where(has_keys[:, None], acc / tl.where(has_keys, l_i, 1.0)[:, None], 0.0)
    tl.store(
        PartialOut
        + b.to(tl.int64) * stride_pb
        + q_heads[:, None] * stride_ph
        + split * stride_ps
        + offs_dv[None, :],
        out.to(PartialOut.dtype.element_ty),
        mask=head_mask[:, None] & dv_mask[None, :],
    )
    if WRITE_LSE:
        lse = tl.where(has_keys, m_i + tl.log2(tl.where(has_keys, l_i, 1.0)), float("-inf"))
        tl.store(PartialLse + b.to(tl.int64) * stride_lb + q_heads * stride_lh + split, lse, mask=head_mask)


@triton.jit(do_not_specialize=SPLIT_DEPENDENT)
def _decode_merge_kernel(
    PartialOut,  # [B, Hq, num_splits, Dv] float32
    PartialLse,  # [B, Hq, num_splits] float32, log2 domain
    Out,  # [B, Hq, Dv]
    stride_pb,
    stride_ph,
    stride_ps,
    stride_lb,
    stride_lh,
    stride_ob,
    stride_oh,
    num_splits,
    V_HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,  # at least num_splits
    BLOCK_DV: tl.constexpr,
    USE_PDL: tl.constexpr,
    EARLY_LAUNCH: tl.constexpr,
):
    if EARLY_LAUNCH:
        let_next_kernel_start(USE_PDL)
    wait_for_previous_kernel(USE_PDL)
    b = tl.program_id(0).to(tl.int64)
    head = tl.program_id(1)
    offs_s = tl.arange(0, BLOCK_S)
    offs_dv = tl.arange(0, BLOCK_DV)
    s_mask = offs_s < num_splits
    dv_mask = offs_dv < V_HEAD_DIM

    lse = tl.load(PartialLse + b * stride_lb + head * stride_lh + offs_s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, 0)
    # a request with no keys (seq_len 0, e.g. CUDA-graph padding) has every split at -inf: output zeros
    m = tl.where(m == float("-inf"), 0.0, m)
    weights = tl.exp2(lse - m)
    denom = tl.sum(weights, 0)
    parts = tl.load(
        PartialOut + b * stride_pb + head * stride_ph + offs_s[:, None] * stride_ps + offs_dv[None, :],
        mask=s_mask[:, None] & dv_mask[None, :],
        other=0.0,
    )
    if not EARLY_LAUNCH:
        let_next_kernel_start(USE_PDL)
    out = tl.sum(weights[:, None] * parts, 0) / tl.where(denom > 0.0, denom, 1.0)
    tl.store(Out + b * stride_ob + head * stride_oh + offs_dv, out.to(Out.dtype.element_ty), mask=dv_mask)


@functools.cache
def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device; the interpreter (CPU) counts as one."""
    if device.type != "cuda":
        return 1
    return torch.cuda.get_device_properties(device).multi_processor_count


def _prev_power_of_2(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def choose_num_kv_splits(
    batch: int, num_kv_heads: int, head_blocks: int, max_seq_len: int, num_sms: int
) -> int:
    """KV splits per request: up to `PROGRAMS_PER_SM` (request, kv head, split) programs on every SM, but no
    split shorter than `MIN_SPLIT_KEYS` keys; a power of two, 1 when the grid is already full or the context fits
    one split."""
    programs = max(batch * num_kv_heads * head_blocks, 1)
    wanted = _prev_power_of_2(PROGRAMS_PER_SM * num_sms // programs)
    by_length = _prev_power_of_2(triton.cdiv(max(max_seq_len, 1), MIN_SPLIT_KEYS))
    return max(1, min(wanted, by_length, MAX_KV_SPLITS))


def _keys_per_block(head_block: int, dtype: torch.dtype) -> int:
    """Keys per loop step: the [BLOCK_N, D] K and V tiles stay within an SM's registers (measured on an H200:
    128 keys for head dim 64, 32 for 256, 2-byte dtypes; float32 tiles are twice the bytes)."""
    keys = max(32, 8192 // head_block)
    return min(keys if dtype != torch.float32 else keys // 2, 128)


def _check_scratch(
    partial_out: torch.Tensor | None,
    partial_lse: torch.Tensor | None,
    batch: int,
    num_q_heads: int,
    v_head_dim: int,
) -> int | None:
    """Validate caller-allocated split scratch; returns how many splits it holds (None when not given)."""
    func = "paged_decode_attention"
    if (partial_out is None) != (partial_lse is None):
        raise ValueError(f"{func}: pass partial_out and partial_lse together, or neither")
    if partial_out is None:
        return None
    out_ok = (
        partial_out.dim() == 4
        and partial_out.dtype == torch.float32
        and partial_out.shape[0] >= batch
        and partial_out.shape[1] == num_q_heads
        and partial_out.shape[3] == v_head_dim
        and partial_out.stride(-1) == 1
    )
    if not out_ok:
        raise ValueError(
            f"{func}: expected partial_out float32 [>= {batch}, {num_q_heads}, splits, {v_head_dim}] with a "
            f"unit-stride last dim, got {list(partial_out.shape)} {partial_out.dtype}"
        )
    expected_lse = (num_q_heads, partial_out.shape[2])
    if (
        partial_lse.dim() != 3
        or partial_lse.dtype != torch.float32
        or partial_lse.shape[0] < batch
        or tuple(partial_lse.shape[1:]) != expected_lse
    ):
        raise ValueError(
            f"{func}: expected partial_lse float32 [>= {batch}, {num_q_heads}, {partial_out.shape[2]}], "
            f"got {list(partial_lse.shape)} {partial_lse.dtype}"
        )
    return partial_out.shape[2]


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
    num_kv_splits: int | None = None,
    max_seq_len: int | None = None,
    partial_out: torch.Tensor | None = None,
    partial_lse: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Attention of each request's last token over its paged keys; returns [B, Hq, Dv] in q.dtype.

    q [B, Hq, D], k_cache [S, Hk, D], v_cache [S, Hk, Dv]; request b's keys are slots
    req_to_token[req_pool_indices[b], kv_start[b] + j] for j < seq_lens[b] (kv_start defaults to 0); key j
    sits at position j. num_kv_splits (default: `choose_num_kv_splits` from the batch, heads, SM count and
    max_seq_len, itself defaulting to req_to_token's width) depends on shapes only, so the launch is capturable.
    partial_out [>= B, Hq, splits, Dv] and partial_lse [>= B, Hq, splits] (float32) are optional preallocated
    split scratch (their split dim caps the chosen count); out [B, Hq, Dv] an optional preallocated output.
    """
    func = "paged_decode_attention"
    check_last_dim_contiguous(func, q=q, k_cache=k_cache, v_cache=v_cache)
    batch, num_q_heads, head_dim = q.shape
    num_kv_heads, v_head_dim = k_cache.shape[1], v_cache.shape[2]
    group_size = query_group_size(func, num_q_heads, num_kv_heads)
    scratch_splits = _check_scratch(partial_out, partial_lse, batch, num_q_heads, v_head_dim)
    if out is None:
        out = torch.empty((batch, num_q_heads, v_head_dim), dtype=q.dtype, device=q.device)
    elif tuple(out.shape) != (batch, num_q_heads, v_head_dim) or out.dtype != q.dtype or out.stride(-1) != 1:
        raise ValueError(
            f"{func}: expected out {q.dtype} [{batch}, {num_q_heads}, {v_head_dim}] with a unit-stride last dim, "
            f"got {list(out.shape)} {out.dtype}"
        )
    if batch == 0:
        return out

    block_h = min(pow2_block(group_size), 64)
    head_blocks = triton.cdiv(group_size, block_h)
    if num_kv_splits is None:
        context = req_to_token.shape[1] if max_seq_len is None else max_seq_len
        num_kv_splits = choose_num_kv_splits(batch, num_kv_heads, head_blocks, context, _num_sms(q.device))
        if scratch_splits is not None:
            num_kv_splits = min(num_kv_splits, scratch_splits)
    elif num_kv_splits < 1 or (scratch_splits is not None and num_kv_splits > scratch_splits):
        bound = "" if scratch_splits is None else f" and at most the {scratch_splits} splits of the scratch"
        raise ValueError(f"{func}: num_kv_splits must be at least 1{bound}, got {num_kv_splits}")
    single_split = num_kv_splits == 1
    if single_split:
        # stage 1 normalises and writes the output itself; the split stride is never stepped
        partial_out, partial_lse = out, out
        partial_strides, lse_strides = (out.stride(0), out.stride(1), 0), (0, 0)
    else:
        if partial_out is None:
            partial_out = torch.empty(
                (batch, num_q_heads, num_kv_splits, v_head_dim), dtype=torch.float32, device=q.device
            )
            partial_lse = torch.empty(
                (batch, num_q_heads, num_kv_splits), dtype=torch.float32, device=q.device
            )
        partial_strides, lse_strides = partial_out.stride()[:3], partial_lse.stride()[:2]

    block_d, block_dv = pow2_block(head_dim), pow2_block(v_head_dim)
    block_n = _keys_per_block(max(block_d, block_dv), q.dtype)
    grid = (batch, num_kv_heads, num_kv_splits * head_blocks)
    options = launch_options(q.device)
    _decode_partial_kernel[grid](
        q,
        k_cache,
        v_cache,
        req_to_token,
        req_pool_indices,
        seq_lens,
        req_pool_indices if kv_start is None else kv_start,
        partial_out,
        partial_lse,
        q.stride(0),
        q.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        req_to_token.stride(0),
        *partial_strides,
        *lse_strides,
        scaling,
        logit_cap,
        kernel_window(sliding_window),
        group_size,
        num_kv_splits,
        HEAD_DIM=head_dim,
        V_HEAD_DIM=v_head_dim,
        BLOCK_H=block_h,
        BLOCK_N=block_n,
        BLOCK_D=block_d,
        BLOCK_DV=block_dv,
        SOFT_CAP=logit_cap > 0,
        HAS_KV_START=kv_start is not None,
        WRITE_LSE=not single_split,
        DOT_PRECISION=dot_precision(q.dtype),
        num_warps=4,
        num_stages=2,
        **options,
    )
    if single_split:
        return out
    _decode_merge_kernel[(batch, num_q_heads)](
        partial_out,
        partial_lse,
        out,
        *partial_strides,
        *lse_strides,
        out.stride(0),
        out.stride(1),
        num_kv_splits,
        V_HEAD_DIM=v_head_dim,
        BLOCK_S=max(
            MAX_KV_SPLITS, triton.next_power_of_2(num_kv_splits)
        ),  # one kernel for every chosen count
        BLOCK_DV=block_dv,
        num_warps=4,
        **options,
    )
    return out
