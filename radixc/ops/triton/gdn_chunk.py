"""Gated delta rule over packed prefill requests in chunked (WY / UT-transform) form (GDN extend).

Within a chunk of C tokens with cumulative log-decay G (from the chunk start) and chunk-start state S0, the
delta-rule updates u solve (I + A) U = beta V - beta exp(G) K S0, A = tril(beta_i exp(G_i - G_j) k_i.k_j, -1).
With T = (I + A)^-1, U = U_v - W S0 where U_v = T beta V and W = T beta exp(G) K depend on the chunk alone;
o = exp(G) Q S0 + (decay * Q K^T) U and S_end = exp(G_last) S0 + (exp(G_last - G) K)^T U.

Two kernels: `_chunk_prepare_kernel` builds T, W, U_v and the intra-chunk scores for every chunk in parallel;
`_chunk_scan_kernel` walks each request's chunks in order carrying S. Twin:
radixc.ops.native.gdn.chunk_gated_delta_rule.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixc.ops.triton._utils import (
    L2NORM_EPS,
    check_gdn_inputs,
    dot_precision,
    l2_normalize,
    pow2_block,
    ragged_block_map,
)


@triton.jit
def _invert_unit_lower(a, BLOCK_T: tl.constexpr, LOG2_T: tl.constexpr, PRECISION: tl.constexpr):
    """(I + a)^-1 for strictly lower-triangular a [BLOCK_T, BLOCK_T].

    Doubles the diagonal block size s = 1, 2, 4, ...: with X the inverse of the s-blocks and L the lower-left
    s-block of each 2s-block, the 2s-block inverse is X - X L X (block forward substitution, all in tl.dot).
    """
    offs = tl.arange(0, BLOCK_T)
    inv = tl.where(offs[:, None] == offs[None, :], 1.0, 0.0)
    for level in tl.static_range(LOG2_T):
        s = 1 << level
        same_pair = offs[:, None] // (2 * s) == offs[None, :] // (2 * s)
        across = offs[:, None] // s != offs[None, :] // s
        lower_left = tl.where(same_pair & across, a, 0.0)
        inv -= tl.dot(tl.dot(inv, lower_left, input_precision=PRECISION), inv, input_precision=PRECISION)
    return inv


@triton.jit
def _load_qk(
    Q,
    K,
    rows,
    k_head,
    t_mask,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    scale,
    eps,
    K_DIM,
    BLOCK_K,
    USE_L2NORM,
):
    """q, k rows of one k head as float32 [BLOCK_T, BLOCK_K], optionally L2-normalised, q scaled."""
    offs_k = tl.arange(0, BLOCK_K)
    mask = t_mask[:, None] & (offs_k < K_DIM)[None, :]
    q = tl.load(Q + rows[:, None] * stride_qt + k_head * stride_qh + offs_k[None, :], mask=mask, other=0.0)
    k = tl.load(K + rows[:, None] * stride_kt + k_head * stride_kh + offs_k[None, :], mask=mask, other=0.0)
    q, k = q.to(tl.float32), k.to(tl.float32)
    if USE_L2NORM:
        q, k = l2_normalize(q, eps), l2_normalize(k, eps)
    return q * scale, k


@triton.jit
def _chunk_prepare_kernel(
    Q,  # [T, Hk, Dk]
    K,  # [T, Hk, Dk]
    V,  # [T, Hv, Dv]
    G,  # [T, Hv] log-decay
    Beta,  # [T, Hv]
    StartLoc,  # [B]
    ExtendLens,  # [B]
    BlockReq,  # [P] request of each program, B past the last chunk
    BlockIdx,  # [P] which chunk of that request
    W,  # [T, Hv, Dk] float32 out: T beta exp(G) K
    Uv,  # [T, Hv, Dv] float32 out: T beta V
    Scores,  # [T, Hv, C] float32 out: (q_i . k_j) exp(G_i - G_j) for j <= i within the chunk
    GCum,  # [T, Hv] float32 out: G
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_gt,
    stride_betat,
    scale,
    eps,
    group_size,
    num_reqs,
    num_v_heads,
    K_DIM: tl.constexpr,
    V_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    LOG2_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
    USE_L2NORM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    SOLVE_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    v_head = tl.program_id(1)
    b = tl.load(BlockReq + pid)
    if b >= num_reqs:
        return
    chunk = tl.load(BlockIdx + pid)
    start = tl.load(StartLoc + b).to(tl.int64)
    length = tl.load(ExtendLens + b).to(tl.int64)
    offs_t = chunk * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < length
    rows = start + offs_t
    # rows of this head in the [T, Hv, ...] scratch buffers
    out_rows = rows * num_v_heads + v_head

    q, k = _load_qk(
        Q, K, rows, v_head // group_size, t_mask, stride_qt, stride_qh, stride_kt, stride_kh, scale, eps,
        K_DIM, BLOCK_K, USE_L2NORM,
    )  # fmt: skip
    # padded rows get g = beta = 0: no decay, no update, so they leave the state untouched
    g = tl.load(G + rows * stride_gt + v_head, mask=t_mask, other=0.0).to(tl.float32)
    beta = tl.load(Beta + rows * stride_betat + v_head, mask=t_mask, other=0.0).to(tl.float32)
    g_cum = tl.cumsum(g, 0)
    offs_c = tl.arange(0, BLOCK_T)
    causal = offs_c[:, None] >= offs_c[None, :]
    # masking the exponent (not the result) keeps the upper triangle from overflowing
    decay = tl.exp(tl.where(causal, g_cum[:, None] - g_cum[None, :], float("-inf")))

    # computed in an order that retires q, k and decay early: the [BLOCK_T, BLOCK_K] tiles are what spill
    offs_k = tl.arange(0, BLOCK_K)
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * decay
    tl.store(Scores + out_rows[:, None] * BLOCK_T + offs_c[None, :], scores, mask=t_mask[:, None])
    kk = tl.dot(k, tl.trans(k), input_precision=DOT_PRECISION)
    a = tl.where(offs_c[:, None] > offs_c[None, :], beta[:, None] * kk * decay, 0.0)
    k_scaled = k * (beta * tl.exp(g_cum))[:, None]
    t_inv = _invert_unit_lower(a, BLOCK_T, LOG2_T, SOLVE_PRECISION)
    w = tl.dot(t_inv, k_scaled, input_precision=DOT_PRECISION)
    tl.store(
        W + out_rows[:, None] * K_DIM + offs_k[None, :], w, mask=t_mask[:, None] & (offs_k < K_DIM)[None, :]
    )

    offs_v = tl.arange(0, BLOCK_V)
    v_mask = t_mask[:, None] & (offs_v < V_DIM)[None, :]
    v = tl.load(V + rows[:, None] * stride_vt + v_head * stride_vh + offs_v[None, :], mask=v_mask, other=0.0)
    u = tl.dot(t_inv, v.to(tl.float32) * beta[:, None], input_precision=DOT_PRECISION)
    tl.store(Uv + out_rows[:, None] * V_DIM + offs_v[None, :], u, mask=v_mask)
    tl.store(GCum + out_rows, g_cum, mask=t_mask)


@triton.jit
def _chunk_scan_kernel(
    Q,  # [T, Hk, Dk]
    K,  # [T, Hk, Dk]
    W,  # [T, Hv, Dk] float32
    Uv,  # [T, Hv, Dv] float32
    Scores,  # [T, Hv, C] float32
    GCum,  # [T, Hv] float32
    SsmState,  # [S, Hv, Dk, Dv] float32
    GdnSlots,  # [B]
    StartLoc,  # [B]
    ExtendLens,  # [B]
    HasInitialState,  # [B] bool (or any int: nonzero = true)
    Out,  # [T, Hv, Dv]
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_ss,
    stride_sh,
    stride_sk,
    stride_ot,
    stride_oh,
    scale,
    eps,
    group_size,
    num_v_heads,
    K_DIM: tl.constexpr,
    V_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
    USE_L2NORM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    v_head = tl.program_id(1)
    k_head = v_head // group_size
    start = tl.load(StartLoc + b).to(tl.int64)
    length = tl.load(ExtendLens + b).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_c = tl.arange(0, BLOCK_T)
    k_mask = offs_k < K_DIM
    v_mask = offs_v < V_DIM

    state_ptrs = (
        SsmState
        + tl.load(GdnSlots + b).to(tl.int64) * stride_ss
        + v_head * stride_sh
        + offs_k[:, None] * stride_sk
        + offs_v[None, :]
    )
    # without an initial state the slot's contents are ignored: no k row is in range
    init_k_dim = (tl.load(HasInitialState + b) != 0).to(tl.int32) * K_DIM
    state = tl.load(state_ptrs, mask=(offs_k < init_k_dim)[:, None] & v_mask[None, :], other=0.0)

    for chunk in range(0, tl.cdiv(length, BLOCK_T)):
        offs_t = chunk * BLOCK_T + offs_c
        t_mask = offs_t < length
        rows = start + offs_t
        head_rows = rows * num_v_heads + v_head
        q, k = _load_qk(
            Q, K, rows, k_head, t_mask, stride_qt, stride_qh, stride_kt, stride_kh, scale, eps,
            K_DIM, BLOCK_K, USE_L2NORM,
        )  # fmt: skip
        g_cum = tl.load(GCum + head_rows, mask=t_mask, other=0.0)
        w = tl.load(
            W + head_rows[:, None] * K_DIM + offs_k[None, :],
            mask=t_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        u = tl.load(
            Uv + head_rows[:, None] * V_DIM + offs_v[None, :],
            mask=t_mask[:, None] & v_mask[None, :],
            other=0.0,
        )
        scores = tl.load(
            Scores + head_rows[:, None] * BLOCK_T + offs_c[None, :], mask=t_mask[:, None], other=0.0
        )
        u -= tl.dot(w, state, input_precision=DOT_PRECISION)
        out = tl.dot(q * tl.exp(g_cum)[:, None], state, input_precision=DOT_PRECISION)
        out += tl.dot(scores, u, input_precision=DOT_PRECISION)
        tl.store(
            Out + rows[:, None] * stride_ot + v_head * stride_oh + offs_v[None, :],
            out.to(Out.dtype.element_ty),
            mask=t_mask[:, None] & v_mask[None, :],
        )
        last = tl.minimum(length - chunk * BLOCK_T, BLOCK_T) - 1
        g_last = tl.sum(tl.where(offs_c == last, g_cum, 0.0), 0)
        k_to_end = k * tl.exp(g_last - g_cum)[:, None]
        state = state * tl.exp(g_last) + tl.dot(tl.trans(k_to_end), u, input_precision=DOT_PRECISION)

    tl.store(state_ptrs, state, mask=k_mask[:, None] & v_mask[None, :])


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    ssm_state: torch.Tensor,
    gdn_slots: torch.Tensor,
    extend_start_loc: torch.Tensor,
    extend_seq_lens: torch.Tensor,
    has_initial_state: torch.Tensor,
    *,
    scale: float,
    use_qk_l2norm: bool = True,
    chunk_size: int = 32,
) -> torch.Tensor:
    """Gated delta rule over packed requests, chunk by chunk; float32 state and scratch.

    q, k [T, Hk, Dk], v [T, Hv, Dv], g (log-decay), beta [T, Hv]; ssm_state [S, Hv, Dk, Dv] float32, each
    request's final state written to its slot. Returns o [T, Hv, Dv] in v.dtype. chunk_size (16, 32 or 64)
    changes only rounding; it defaults to 32, not the native twin's 64, because at 64 the solve's [64, 64]
    float32 tiles spill registers on an H100 (ptxas, Dk = 128), and 128 overflows shared memory.
    """
    func = "chunk_gated_delta_rule"
    check_gdn_inputs(func, q=q, k=k, v=v, g=g, beta=beta, ssm_state=ssm_state)
    if chunk_size not in (16, 32, 64):
        raise ValueError(f"{func}: chunk_size must be 16, 32 or 64, got {chunk_size}")
    num_tokens, num_k_heads, k_dim = q.shape
    num_v_heads, v_dim = v.shape[1:]
    num_reqs = gdn_slots.shape[0]
    out = torch.empty_like(v)
    if num_reqs == 0:
        return out

    device = q.device
    w = torch.empty((num_tokens, num_v_heads, k_dim), dtype=torch.float32, device=device)
    u = torch.empty((num_tokens, num_v_heads, v_dim), dtype=torch.float32, device=device)
    scores = torch.empty((num_tokens, num_v_heads, chunk_size), dtype=torch.float32, device=device)
    g_cum = torch.empty((num_tokens, num_v_heads), dtype=torch.float32, device=device)
    block_k, block_dv = pow2_block(k_dim), pow2_block(v_dim)
    group_size = num_v_heads // num_k_heads
    precision = dot_precision(v.dtype)
    # the triangular solve compounds rounding: near-fp32 3xTF32 on tensor cores unless inputs are fp32
    solve_precision = "ieee" if v.dtype == torch.float32 else "tf32x3"
    num_warps = 8 if max(block_k, block_dv) >= 128 else 4

    if num_tokens > 0:
        chunk_req, chunk_idx = ragged_block_map(extend_seq_lens, chunk_size, num_tokens)
        _chunk_prepare_kernel[(chunk_req.shape[0], num_v_heads)](
            q, k, v, g, beta, extend_start_loc, extend_seq_lens, chunk_req, chunk_idx, w, u, scores, g_cum,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), g.stride(0),
            beta.stride(0), scale, L2NORM_EPS, group_size, num_reqs, num_v_heads,
            K_DIM=k_dim, V_DIM=v_dim, BLOCK_T=chunk_size, LOG2_T=chunk_size.bit_length() - 1, BLOCK_K=block_k,
            BLOCK_V=block_dv,
            USE_L2NORM=use_qk_l2norm, DOT_PRECISION=precision, SOLVE_PRECISION=solve_precision,
            num_warps=num_warps, num_stages=1,
        )  # fmt: skip

    # the scan carries a [BLOCK_K, BLOCK_V] float32 state in registers: narrow V tiles for wide K
    block_v = min(block_dv, 4096 // block_k)
    _chunk_scan_kernel[(num_reqs, num_v_heads, triton.cdiv(v_dim, block_v))](
        q, k, w, u, scores, g_cum, ssm_state, gdn_slots, extend_start_loc, extend_seq_lens,
        has_initial_state, out,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), ssm_state.stride(0), ssm_state.stride(1),
        ssm_state.stride(2), out.stride(0), out.stride(1), scale, L2NORM_EPS, group_size, num_v_heads,
        K_DIM=k_dim, V_DIM=v_dim, BLOCK_T=chunk_size, BLOCK_K=block_k, BLOCK_V=block_v,
        USE_L2NORM=use_qk_l2norm, DOT_PRECISION=precision, num_warps=8,
        # each pipeline stage buffers a chunk of q, k, W (float32), U_v and scores in shared memory
        num_stages=2 if block_k <= 128 else 1,
    )  # fmt: skip
    return out
