"""Gated delta rule over packed prefill requests in chunked (WY / UT-transform) form (GDN extend).

Within a chunk of C tokens with cumulative log-decay G (from the chunk start) and chunk-start state S0, the
delta-rule updates u solve (I + A) U = beta V - beta exp(G) K S0, A = tril(beta_i exp(G_i - G_j) k_i.k_j, -1).
With T = (I + A)^-1, U = U_v - W S0 where U_v = T beta V and W = T beta exp(G) K depend on the chunk alone;
o = exp(G) Q S0 + (decay * Q K^T) U and S_end = exp(G_last) S0 + (exp(G_last - G) K)^T U.

Three kernels:
- `_chunk_prepare_kernel` (every chunk in parallel): T by block forward substitution over 16-row sub-blocks, so
  a 64-token chunk never holds a [64, 64] float32 tile or its products; writes W, U_v and G.
- `_chunk_state_kernel` (each request's chunks in order): the only serial part, two products with the carried
  state per chunk (W S0 and the update); writes U = U_v - W S0 over U_v and each chunk's start state S0.
- `_chunk_output_kernel` (every chunk in parallel): o from the chunk's start state and U.
Twin: radixc.ops.native.gdn.chunk_gated_delta_rule.
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
    ragged_block_starts,
)

# rows of a solve sub-block: the smallest tile tl.dot accepts
SUB_BLOCK = 16
# The solve's chained [16, 16] products run as float32 FMAs, not in 3xTF32 on tensor cores: at least as precise,
# ~1,500 FMAs a thread, and the prepare kernel compiles for sm90 in 5 s instead of 15 on a 2-core host (triton
# 3.6; the tensor-core form's cost in `TritonGPUAccelerateMatmul` grows with the square of its chained dots).
SOLVE_PRECISION = tl.constexpr("ieee")


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
def _load_rows(X, rows, head, t_mask, stride_t, stride_h, DIM, BLOCK, L2NORM, eps):
    """Rows of one head as float32 [rows, BLOCK], optionally L2-normalised over the head dim."""
    offs = tl.arange(0, BLOCK)
    x = tl.load(
        X + rows[:, None] * stride_t + head * stride_h + offs[None, :],
        mask=t_mask[:, None] & (offs < DIM)[None, :],
        other=0.0,
    ).to(tl.float32)
    if L2NORM:
        x = l2_normalize(x, eps)
    return x


@triton.jit
def _sub_block(
    K,
    G,
    Beta,
    GCum,
    g_chunk,
    start,
    length,
    chunk_start,
    index,
    k_head,
    v_head,
    num_v_heads,
    stride_kt,
    stride_kh,
    stride_gt,
    stride_betat,
    eps,
    K_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    USE_L2NORM: tl.constexpr,
):
    """Sub-block `index` (16 rows) of a chunk: k [16, BLOCK_K], G from the chunk start, beta, token rows, mask.

    Also stores the block's G, which the later kernels read. Padded rows get g = beta = 0: no decay, no update.
    """
    offs = chunk_start + index * 16 + tl.arange(0, 16)
    t_mask = offs < length
    rows = start + offs
    k = _load_rows(K, rows, k_head, t_mask, stride_kt, stride_kh, K_DIM, BLOCK_K, USE_L2NORM, eps)
    g = tl.load(G + rows * stride_gt + v_head, mask=t_mask, other=0.0).to(tl.float32)
    beta = tl.load(Beta + rows * stride_betat + v_head, mask=t_mask, other=0.0).to(tl.float32)
    before = tl.arange(0, BLOCK_T) < index * 16
    g_cum = tl.cumsum(g, 0) + tl.sum(tl.where(before, g_chunk, 0.0), 0)
    tl.store(GCum + rows * num_v_heads + v_head, g_cum, mask=t_mask)
    return k, g_cum, beta, rows, t_mask


@triton.jit
def _a_block(k_i, k_j, g_i, g_j, beta_i, DIAGONAL: tl.constexpr, PRECISION: tl.constexpr):
    """Block (i, j) of A = tril(beta_i exp(G_i - G_j) k_i.k_j, -1), for sub-blocks i >= j."""
    kk = tl.dot(k_i, tl.trans(k_j), input_precision=PRECISION)
    exponent = g_i[:, None] - g_j[None, :]
    if DIAGONAL:
        offs = tl.arange(0, 16)
        # masking the exponent (not the result) keeps the upper triangle from overflowing
        exponent = tl.where(offs[:, None] > offs[None, :], exponent, float("-inf"))
    return beta_i[:, None] * kk * tl.exp(exponent)


@triton.jit
def _solve_term(
    t,
    k_j,
    g_j,
    beta_j,
    V,
    rows_j,
    t_mask_j,
    v_head,
    stride_vt,
    stride_vh,
    V_DIM: tl.constexpr,
    BLOCK_V: tl.constexpr,
    PRECISION: tl.constexpr,
):
    """Sub-block j's share of one row of W = T beta exp(G) K and U_v = T beta V: T_ij @ (those rows of j)."""
    w = tl.dot(t, k_j * (beta_j * tl.exp(g_j))[:, None], input_precision=PRECISION)
    v = _load_rows(V, rows_j, v_head, t_mask_j, stride_vt, stride_vh, V_DIM, BLOCK_V, False, 0.0)
    return w, tl.dot(t, v * beta_j[:, None], input_precision=PRECISION)


@triton.jit
def _store_wu(
    W,
    Uv,
    w,
    u,
    rows,
    t_mask,
    v_head,
    num_v_heads,
    K_DIM: tl.constexpr,
    V_DIM: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    out_rows = rows * num_v_heads + v_head
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.arange(0, BLOCK_V)
    tl.store(
        W + out_rows[:, None] * K_DIM + offs_k[None, :], w, mask=t_mask[:, None] & (offs_k < K_DIM)[None, :]
    )
    tl.store(
        Uv + out_rows[:, None] * V_DIM + offs_v[None, :], u, mask=t_mask[:, None] & (offs_v < V_DIM)[None, :]
    )


@triton.jit(do_not_specialize=["num_reqs"])  # one compile for every batch's request count
def _chunk_prepare_kernel(
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
    GCum,  # [T, Hv] float32 out: G
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_gt,
    stride_betat,
    eps,
    group_size,
    num_reqs,
    num_v_heads,
    K_DIM: tl.constexpr,
    V_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
    USE_L2NORM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    GRAM_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    v_head = tl.program_id(1)
    b = tl.load(BlockReq + pid)
    if b >= num_reqs:
        return
    start = tl.load(StartLoc + b).to(tl.int64)
    length = tl.load(ExtendLens + b).to(tl.int64)
    chunk_start = tl.load(BlockIdx + pid).to(tl.int64) * BLOCK_T
    k_head = v_head // group_size
    offs_c = chunk_start + tl.arange(0, BLOCK_T)
    g_chunk = tl.load(G + (start + offs_c) * stride_gt + v_head, mask=offs_c < length, other=0.0).to(
        tl.float32
    )
    # T is block lower-triangular over 16-row sub-blocks: T_ii = (I + A_ii)^-1 and, for j < i,
    # T_ij = -T_ii sum_{j <= m < i} A_im T_mj; each row of T gives that sub-block's rows of W and U_v at once.
    k0, g0, b0, r0, m0 = _sub_block(
        K,
        G,
        Beta,
        GCum,
        g_chunk,
        start,
        length,
        chunk_start,
        0,
        k_head,
        v_head,
        num_v_heads,
        stride_kt,
        stride_kh,
        stride_gt,
        stride_betat,
        eps,
        K_DIM,
        BLOCK_T,
        BLOCK_K,
        USE_L2NORM,
    )
    t00 = _invert_unit_lower(_a_block(k0, k0, g0, g0, b0, True, GRAM_PRECISION), 16, 4, SOLVE_PRECISION)
    w, u = _solve_term(
        t00, k0, g0, b0, V, r0, m0, v_head, stride_vt, stride_vh, V_DIM, BLOCK_V, DOT_PRECISION
    )
    _store_wu(W, Uv, w, u, r0, m0, v_head, num_v_heads, K_DIM, V_DIM, BLOCK_K, BLOCK_V)
    if BLOCK_T > 16:
        k1, g1, b1, r1, m1 = _sub_block(
            K,
            G,
            Beta,
            GCum,
            g_chunk,
            start,
            length,
            chunk_start,
            1,
            k_head,
            v_head,
            num_v_heads,
            stride_kt,
            stride_kh,
            stride_gt,
            stride_betat,
            eps,
            K_DIM,
            BLOCK_T,
            BLOCK_K,
            USE_L2NORM,
        )
        t11 = _invert_unit_lower(_a_block(k1, k1, g1, g1, b1, True, GRAM_PRECISION), 16, 4, SOLVE_PRECISION)
        a10 = _a_block(k1, k0, g1, g0, b1, False, GRAM_PRECISION)
        t10 = -tl.dot(t11, tl.dot(a10, t00, input_precision=SOLVE_PRECISION), input_precision=SOLVE_PRECISION)
        w, u = _solve_term(
            t10, k0, g0, b0, V, r0, m0, v_head, stride_vt, stride_vh, V_DIM, BLOCK_V, DOT_PRECISION
        )
        w1, u1 = _solve_term(
            t11, k1, g1, b1, V, r1, m1, v_head, stride_vt, stride_vh, V_DIM, BLOCK_V, DOT_PRECISION
        )
        _store_wu(W, Uv, w + w1, u + u1, r1, m1, v_head, num_v_heads, K_DIM, V_DIM, BLOCK_K, BLOCK_V)
    if BLOCK_T > 32:
        k2, g2, b2, r2, m2 = _sub_block(
            K,
            G,
            Beta,
            GCum,
            g_chunk,
            start,
            length,
            chunk_start,
            2,
            k_head,
            v_head,
            num_v_heads,
            stride_kt,
            stride_kh,
            stride_gt,
            stride_betat,
            eps,
            K_DIM,
            BLOCK_T,
            BLOCK_K,
            USE_L2NORM,
        )
        t22 = _invert_unit_lower(_a_block(k2, k2, g2, g2, b2, True, GRAM_PRECISION), 16, 4, SOLVE_PRECISION)
        a20 = _a_block(k2, k0, g2, g0, b2, False, GRAM_PRECISION)
        a21 = _a_block(k2, k1, g2, g1, b2, False, GRAM_PRECISION)
        t21 = -tl.dot(t22, tl.dot(a21, t11, input_precision=SOLVE_PRECISION), input_precision=SOLVE_PRECISION)
        t20 = tl.dot(a20, t00, input_precision=SOLVE_PRECISION) + tl.dot(
            a21, t10, input_precision=SOLVE_PRECISION
        )
        t20 = -tl.dot(t22, t20, input_precision=SOLVE_PRECISION)
        w, u = _solve_term(
            t20, k0, g0, b0, V, r0, m0, v_head, stride_vt, stride_vh, V_DIM, BLOCK_V, DOT_PRECISION
        )
        w1, u1 = _solve_term(
            t21, k1, g1, b1, V, r1, m1, v_head, stride_vt, stride_vh, V_DIM, BLOCK_V, DOT_PRECISION
        )
        w2, u2 = _solve_term(
            t22, k2, g2, b2, V, r2, m2, v_head, stride_vt, stride_vh, V_DIM, BLOCK_V, DOT_PRECISION
        )
        _store_wu(
            W, Uv, w + w1 + w2, u + u1 + u2, r2, m2, v_head, num_v_heads, K_DIM, V_DIM, BLOCK_K, BLOCK_V
        )

        k3, g3, b3, r3, m3 = _sub_block(
            K,
            G,
            Beta,
            GCum,
            g_chunk,
            start,
            length,
            chunk_start,
            3,
            k_head,
            v_head,
            num_v_heads,
            stride_kt,
            stride_kh,
            stride_gt,
            stride_betat,
            eps,
            K_DIM,
            BLOCK_T,
            BLOCK_K,
            USE_L2NORM,
        )
        t33 = _invert_unit_lower(_a_block(k3, k3, g3, g3, b3, True, GRAM_PRECISION), 16, 4, SOLVE_PRECISION)
        a30 = _a_block(k3, k0, g3, g0, b3, False, GRAM_PRECISION)
        a31 = _a_block(k3, k1, g3, g1, b3, False, GRAM_PRECISION)
        a32 = _a_block(k3, k2, g3, g2, b3, False, GRAM_PRECISION)
        t32 = -tl.dot(t33, tl.dot(a32, t22, input_precision=SOLVE_PRECISION), input_precision=SOLVE_PRECISION)
        t31 = tl.dot(a31, t11, input_precision=SOLVE_PRECISION) + tl.dot(
            a32, t21, input_precision=SOLVE_PRECISION
        )
        t31 = -tl.dot(t33, t31, input_precision=SOLVE_PRECISION)
        t30 = tl.dot(a30, t00, input_precision=SOLVE_PRECISION) + tl.dot(
            a31, t10, input_precision=SOLVE_PRECISION
        )
        t30 = -tl.dot(
            t33, t30 + tl.dot(a32, t20, input_precision=SOLVE_PRECISION), input_precision=SOLVE_PRECISION
        )
        w, u = _solve_term(
            t30, k0, g0, b0, V, r0, m0, v_head, stride_vt, stride_vh, V_DIM, BLOCK_V, DOT_PRECISION
        )
        w1, u1 = _solve_term(
            t31, k1, g1, b1, V, r1, m1, v_head, stride_vt, stride_vh, V_DIM, BLOCK_V, DOT_PRECISION
        )
        w2, u2 = _solve_term(
            t32, k2, g2, b2, V, r2, m2, v_head, stride_vt, stride_vh, V_DIM, BLOCK_V, DOT_PRECISION
        )
        w3, u3 = _solve_term(
            t33, k3, g3, b3, V, r3, m3, v_head, stride_vt, stride_vh, V_DIM, BLOCK_V, DOT_PRECISION
        )
        _store_wu(
            W,
            Uv,
            w + w1 + w2 + w3,
            u + u1 + u2 + u3,
            r3,
            m3,
            v_head,
            num_v_heads,
            K_DIM,
            V_DIM,
            BLOCK_K,
            BLOCK_V,
        )


@triton.jit
def _chunk_state_kernel(
    K,  # [T, Hk, Dk]
    W,  # [T, Hv, Dk] float32
    Uv,  # [T, Hv, Dv] float32 in: T beta V; out: U = T beta V - W S0
    GCum,  # [T, Hv] float32
    ChunkStates,  # [P, Hv, Dk, Dv] out: each chunk's start state S0, at its ragged_block_map program id
    SsmState,  # [S, Hv, Dk, Dv] float32
    GdnSlots,  # [B]
    StartLoc,  # [B]
    ExtendLens,  # [B]
    HasInitialState,  # [B] bool (or any int: nonzero = true)
    ChunkStarts,  # [B] program id of each request's first chunk
    stride_kt,
    stride_kh,
    stride_ss,
    stride_sh,
    stride_sk,
    stride_cp,
    stride_ch,
    stride_ck,
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
    first_chunk = tl.load(ChunkStarts + b).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    offs_c = tl.arange(0, BLOCK_T)
    k_mask = offs_k < K_DIM
    v_mask = offs_v < V_DIM
    state_mask = k_mask[:, None] & v_mask[None, :]

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
    chunk_state_ptrs = ChunkStates + v_head * stride_ch + offs_k[:, None] * stride_ck + offs_v[None, :]

    for chunk in range(0, tl.cdiv(length, BLOCK_T)):
        tl.store(
            chunk_state_ptrs + (first_chunk + chunk) * stride_cp,
            state.to(ChunkStates.dtype.element_ty),
            mask=state_mask,
        )
        offs_t = chunk * BLOCK_T + offs_c
        t_mask = offs_t < length
        rows = start + offs_t
        head_rows = rows * num_v_heads + v_head
        w = tl.load(
            W + head_rows[:, None] * K_DIM + offs_k[None, :],
            mask=t_mask[:, None] & k_mask[None, :],
            other=0.0,
        )
        u_ptrs = Uv + head_rows[:, None] * V_DIM + offs_v[None, :]
        u_mask = t_mask[:, None] & v_mask[None, :]
        u = tl.load(u_ptrs, mask=u_mask, other=0.0) - tl.dot(w, state, input_precision=DOT_PRECISION)
        tl.store(u_ptrs, u, mask=u_mask)
        k = _load_rows(K, rows, k_head, t_mask, stride_kt, stride_kh, K_DIM, BLOCK_K, USE_L2NORM, eps)
        g_cum = tl.load(GCum + head_rows, mask=t_mask, other=0.0)
        last = tl.minimum(length - chunk * BLOCK_T, BLOCK_T) - 1
        g_last = tl.sum(tl.where(offs_c == last, g_cum, 0.0), 0)
        k_to_end = k * tl.exp(g_last - g_cum)[:, None]
        state = state * tl.exp(g_last) + tl.dot(tl.trans(k_to_end), u, input_precision=DOT_PRECISION)

    tl.store(state_ptrs, state, mask=state_mask)


@triton.jit(do_not_specialize=["num_reqs"])  # one compile for every batch's request count
def _chunk_output_kernel(
    Q,  # [T, Hk, Dk]
    K,  # [T, Hk, Dk]
    U,  # [T, Hv, Dv] float32: T beta V - W S0
    GCum,  # [T, Hv] float32
    ChunkStates,  # [P, Hv, Dk, Dv]
    StartLoc,  # [B]
    ExtendLens,  # [B]
    BlockReq,  # [P]
    BlockIdx,  # [P]
    Out,  # [T, Hv, Dv]
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_cp,
    stride_ch,
    stride_ck,
    stride_ot,
    stride_oh,
    scale,
    eps,
    group_size,
    num_reqs,
    num_v_heads,
    K_DIM: tl.constexpr,
    V_DIM: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
    USE_L2NORM: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    v_head = tl.program_id(1)
    b = tl.load(BlockReq + pid)
    if b >= num_reqs:
        return
    k_head = v_head // group_size
    start = tl.load(StartLoc + b).to(tl.int64)
    length = tl.load(ExtendLens + b).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_T)
    offs_t = tl.load(BlockIdx + pid).to(tl.int64) * BLOCK_T + offs_c
    t_mask = offs_t < length
    rows = start + offs_t
    head_rows = rows * num_v_heads + v_head
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    v_mask = offs_v < V_DIM

    q = _load_rows(Q, rows, k_head, t_mask, stride_qt, stride_qh, K_DIM, BLOCK_K, USE_L2NORM, eps) * scale
    k = _load_rows(K, rows, k_head, t_mask, stride_kt, stride_kh, K_DIM, BLOCK_K, USE_L2NORM, eps)
    g_cum = tl.load(GCum + head_rows, mask=t_mask, other=0.0)
    causal = offs_c[:, None] >= offs_c[None, :]
    decay = tl.exp(tl.where(causal, g_cum[:, None] - g_cum[None, :], float("-inf")))
    scores = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * decay
    u = tl.load(
        U + head_rows[:, None] * V_DIM + offs_v[None, :], mask=t_mask[:, None] & v_mask[None, :], other=0.0
    )
    state = tl.load(
        ChunkStates
        + pid.to(tl.int64) * stride_cp
        + v_head * stride_ch
        + offs_k[:, None] * stride_ck
        + offs_v[None, :],
        mask=(offs_k < K_DIM)[:, None] & v_mask[None, :],
        other=0.0,
    )
    q_decayed = (q * tl.exp(g_cum)[:, None]).to(state.dtype)
    out = tl.dot(q_decayed, state, input_precision=DOT_PRECISION)
    out += tl.dot(scores, u, input_precision=DOT_PRECISION)
    tl.store(
        Out + rows[:, None] * stride_ot + v_head * stride_oh + offs_v[None, :],
        out.to(Out.dtype.element_ty),
        mask=t_mask[:, None] & v_mask[None, :],
    )


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
    chunk_size: int = 64,
) -> torch.Tensor:
    """Gated delta rule over packed requests, chunk by chunk; float32 state and scratch.

    q, k [T, Hk, Dk], v [T, Hv, Dv], g (log-decay), beta [T, Hv]; ssm_state [S, Hv, Dk, Dv] float32, each
    request's final state written to its slot. Returns o [T, Hv, Dv] in v.dtype. chunk_size (16, 32 or 64, the
    native twin's default) changes only rounding and the length of the serial state walk.
    """
    func = "chunk_gated_delta_rule"
    check_gdn_inputs(func, q=q, k=k, v=v, g=g, beta=beta, ssm_state=ssm_state)
    if chunk_size not in (16, 32, 64):
        raise ValueError(f"{func}: chunk_size must be 16, 32 or 64, got {chunk_size}")
    num_tokens, num_k_heads, k_dim = q.shape
    num_v_heads, v_dim = v.shape[1:]
    num_reqs = gdn_slots.shape[0]
    out = torch.zeros_like(
        v
    )  # rows of no request (a captured step's padding) stay zero, like the native twin's
    if num_reqs == 0:
        return out

    device = q.device
    w = torch.empty((num_tokens, num_v_heads, k_dim), dtype=torch.float32, device=device)
    u = torch.empty((num_tokens, num_v_heads, v_dim), dtype=torch.float32, device=device)
    g_cum = torch.empty((num_tokens, num_v_heads), dtype=torch.float32, device=device)
    chunk_req, chunk_idx = ragged_block_map(extend_seq_lens, chunk_size, num_tokens)
    chunk_starts = ragged_block_starts(extend_seq_lens, chunk_size)
    # each chunk's start state, read once by the output kernel: half precision when the inputs are (as q is)
    state_dtype = q.dtype if q.dtype in (torch.float16, torch.bfloat16) else torch.float32
    chunk_states = torch.empty(
        (max(chunk_req.shape[0], 1), num_v_heads, k_dim, v_dim), dtype=state_dtype, device=device
    )
    block_k, block_dv = pow2_block(k_dim), pow2_block(v_dim)
    group_size = num_v_heads // num_k_heads
    precision = dot_precision(v.dtype)
    # A's key products feed the solve, which compounds rounding: near-fp32 3xTF32 on tensor cores unless the
    # inputs are fp32
    gram_precision = "ieee" if v.dtype == torch.float32 else "tf32x3"
    wide = max(block_k, block_dv) >= 128

    if num_tokens > 0:
        _chunk_prepare_kernel[(chunk_req.shape[0], num_v_heads)](
            k,
            v,
            g,
            beta,
            extend_start_loc,
            extend_seq_lens,
            chunk_req,
            chunk_idx,
            w,
            u,
            g_cum,
            k.stride(0),
            k.stride(1),
            v.stride(0),
            v.stride(1),
            g.stride(0),
            beta.stride(0),
            L2NORM_EPS,
            group_size,
            num_reqs,
            num_v_heads,
            K_DIM=k_dim,
            V_DIM=v_dim,
            BLOCK_T=chunk_size,
            BLOCK_K=block_k,
            BLOCK_V=block_dv,
            USE_L2NORM=use_qk_l2norm,
            DOT_PRECISION=precision,
            GRAM_PRECISION=gram_precision,
            num_warps=4,
            num_stages=1,
        )

    # the walk carries a [BLOCK_K, BLOCK_V] float32 state in registers: narrow V tiles for wide K
    block_v = min(block_dv, 4096 // block_k)
    _chunk_state_kernel[(num_reqs, num_v_heads, triton.cdiv(v_dim, block_v))](
        k,
        w,
        u,
        g_cum,
        chunk_states,
        ssm_state,
        gdn_slots,
        extend_start_loc,
        extend_seq_lens,
        has_initial_state,
        chunk_starts,
        k.stride(0),
        k.stride(1),
        ssm_state.stride(0),
        ssm_state.stride(1),
        ssm_state.stride(2),
        chunk_states.stride(0),
        chunk_states.stride(1),
        chunk_states.stride(2),
        L2NORM_EPS,
        group_size,
        num_v_heads,
        K_DIM=k_dim,
        V_DIM=v_dim,
        BLOCK_T=chunk_size,
        BLOCK_K=block_k,
        BLOCK_V=block_v,
        USE_L2NORM=use_qk_l2norm,
        DOT_PRECISION=precision,
        num_warps=8 if wide else 4,
        # each pipeline stage buffers a chunk of k and W (float32) in shared memory
        num_stages=2 if block_k <= 128 else 1,
    )

    if num_tokens > 0:
        block_v_out = min(block_dv, 64)
        _chunk_output_kernel[(chunk_req.shape[0], num_v_heads, triton.cdiv(v_dim, block_v_out))](
            q,
            k,
            u,
            g_cum,
            chunk_states,
            extend_start_loc,
            extend_seq_lens,
            chunk_req,
            chunk_idx,
            out,
            q.stride(0),
            q.stride(1),
            k.stride(0),
            k.stride(1),
            chunk_states.stride(0),
            chunk_states.stride(1),
            chunk_states.stride(2),
            out.stride(0),
            out.stride(1),
            scale,
            L2NORM_EPS,
            group_size,
            num_reqs,
            num_v_heads,
            K_DIM=k_dim,
            V_DIM=v_dim,
            BLOCK_T=chunk_size,
            BLOCK_K=block_k,
            BLOCK_V=block_v_out,
            USE_L2NORM=use_qk_l2norm,
            DOT_PRECISION=precision,
            num_warps=8 if wide else 4,
            num_stages=2,
        )
    return out
