"""A decode step's qkv projection with the rotary embedding and the KV-cache store in its epilogue: one kernel.

A llama-style attention layer runs its qkv GEMV (radixc.ops.triton.gemv), then a kernel that rotates q and k and
writes k and v into the paged cache (radixc.ops.triton.rope_kv_store). Here each program owns matching column
pairs of one head of the qkv weight, (i, i + D/2) for NeoX rotation or (2i, 2i + 1) for GPT-J, so it rotates
its products in registers: q heads go out rotated, k heads rotated and v heads as they are into the caches at
each row's slot, rounded where the unfused graph rounds (the product to the model dtype, the rotation in
float32 then to the model dtype). An RMSNorm of x folds in as in the GEMV (its `weight_pass`). Full rotary only,
without per-head q/k norms, v heads as wide as q/k heads. Its tiles come from the ones tuned for the plain qkv
product (radixc.ops.triton.gemv.tuned_tiles), with half their column block where that keeps a valid tile
(`paired_tiles`), so that a program reads as many weight rows as the tuned plain program does; where those do not
fit a head's pairs, the unfused path runs: the tuned product, then the rotary + store kernel. Twin: the unfused
path with radixc.ops.rotary.rotary_and_store_kv.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from radixc.ops.linear import SMALL_BATCH_MAX_ROWS as MAX_ROWS
from radixc.ops.triton._utils import (
    check_last_dim_contiguous,
    let_next_kernel_start,
    wait_for_previous_kernel,
)
from radixc.ops.triton.gemv import (
    Fusions,
    LinearTiles,
    RMSNormArgs,
    candidate_tiles,
    cublas_linear,
    prefetch_weight_rows,
    tile_options,
    tuned_linear,
    tuned_tiles,
    weight_pass,
)
from radixc.ops.triton.norm import check_norm_weight
from radixc.ops.triton.rope_kv_store import rotary_and_store_kv


@triton.jit(do_not_specialize=["M"])  # one kernel for every row count of a row class
def _linear_rope_store_kernel(
    X,  # [M, K]
    W,  # [(Hq + 2 Hk) * D, K]: q heads, k heads, v heads
    Bias,  # [(Hq + 2 Hk) * D] (read when HAS_BIAS)
    NormWeight,  # [K] (read when HAS_NORM)
    Positions,  # [M]
    CosSin,  # [max_positions, D] float32: cos | sin
    KCache,  # [S, Hk, D]
    VCache,  # [S, Hk, D]
    Slots,  # [M] cache slot of each row
    QOut,  # [M, Hq * D]
    M,
    K,
    stride_xm,
    stride_wn,
    stride_cos,
    stride_kcs,
    stride_kch,
    stride_vcs,
    stride_vch,
    stride_qm,
    norm_eps,
    NUM_Q_HEADS: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    IS_NEOX: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_NORM: tl.constexpr,
    NORM_ZERO_CENTERED: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
    PREFETCH_L2: tl.constexpr,
):
    HALF: tl.constexpr = HEAD_SIZE // 2
    # BLOCK_N divides HALF, so all of a program's pairs lie in one head
    first_pair = tl.program_id(0) * BLOCK_N
    head = first_pair // HALF
    # the weight rows of the program's pairs: two runs of BLOCK_N rows (NeoX), or one of 2 * BLOCK_N (GPT-J)
    if IS_NEOX:
        first_row = head * HEAD_SIZE + first_pair % HALF
        prefetch_weight_rows(W, first_row, BLOCK_N, stride_wn, 0, K, BLOCK_N, True, PREFETCH_L2)
        prefetch_weight_rows(W, first_row + HALF, BLOCK_N, stride_wn, 0, K, BLOCK_N, True, PREFETCH_L2)
    else:
        first_row = head * HEAD_SIZE + 2 * (first_pair % HALF)
        prefetch_weight_rows(W, first_row, 2 * BLOCK_N, stride_wn, 0, K, BLOCK_N, True, PREFETCH_L2)
    wait_for_previous_kernel(USE_PDL)
    pair = first_pair % HALF + tl.arange(0, BLOCK_N)
    if IS_NEOX:
        col1, col2 = pair, pair + HALF
    else:
        col1, col2 = 2 * pair, 2 * pair + 1
    offs_m = tl.arange(0, BLOCK_M)
    m_mask = offs_m < M
    pair_mask = pair < HALF
    rows1, rows2 = head * HEAD_SIZE + col1, head * HEAD_SIZE + col2
    # the epilogue's loads issued before the weight loop, so that their latency hides behind it: each row's
    # rotation (q and k heads) and cache slot (k and v heads); the head as a row mask (a scalar condition does not
    # combine with a tensor mask)
    mask = m_mask[:, None] & pair_mask[None, :]
    head_of_row = head + tl.zeros_like(offs_m)
    rotates = head_of_row < NUM_Q_HEADS + NUM_KV_HEADS
    pos = tl.load(Positions + offs_m, mask=m_mask & rotates, other=0).to(tl.int64)
    cos_sin = CosSin + pos[:, None] * stride_cos + pair[None, :]
    cos = tl.load(cos_sin, mask=mask & rotates[:, None], other=0.0).to(tl.float32)
    sin = tl.load(cos_sin + HALF, mask=mask & rotates[:, None], other=0.0).to(tl.float32)
    slots = tl.load(Slots + offs_m, mask=m_mask & (head_of_row >= NUM_Q_HEADS), other=0).to(tl.int64)[:, None]
    acc1, acc2, squares = weight_pass(
        X,
        W,
        NormWeight,
        X,  # no input gate
        rows1,
        rows2,
        offs_m,
        m_mask,
        pair_mask,
        0,
        K,
        stride_xm,
        stride_wn,
        0,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
        HAS_NORM,
        NORM_ZERO_CENTERED,
        False,
        True,
        USE_DOT,
        DOT_PRECISION,
    )
    let_next_kernel_start(USE_PDL)
    if HAS_NORM:
        rstd = tl.rsqrt(squares / K + norm_eps)[:, None]
        acc1 *= rstd
        acc2 *= rstd
    if HAS_BIAS:
        acc1 += tl.load(Bias + head * HEAD_SIZE + col1).to(tl.float32)[None, :]
        acc2 += tl.load(Bias + head * HEAD_SIZE + col2).to(tl.float32)[None, :]
    dtype = QOut.dtype.element_ty
    # the product leaves its linear layer in the model dtype
    x1 = acc1.to(dtype).to(tl.float32)
    x2 = acc2.to(dtype).to(tl.float32)
    if head < NUM_Q_HEADS + NUM_KV_HEADS:  # q and k rotate; v does not
        x1, x2 = x1 * cos - x2 * sin, x2 * cos + x1 * sin
    out1 = x1.to(dtype)
    out2 = x2.to(dtype)
    # which of q, k, v this program's head is, as masks (a scalar condition does not combine with a tensor mask)
    head_of_pair = head + tl.zeros_like(pair)
    is_q = head_of_pair < NUM_Q_HEADS
    is_k = (head_of_pair >= NUM_Q_HEADS) & (head_of_pair < NUM_Q_HEADS + NUM_KV_HEADS)
    is_v = head_of_pair >= NUM_Q_HEADS + NUM_KV_HEADS
    q_out = QOut + offs_m.to(tl.int64)[:, None] * stride_qm + head * HEAD_SIZE
    tl.store(q_out + col1[None, :], out1, mask=mask & is_q[None, :])
    tl.store(q_out + col2[None, :], out2, mask=mask & is_q[None, :])
    kv_head = head - NUM_Q_HEADS
    k_out = KCache + slots * stride_kcs + kv_head * stride_kch
    tl.store(k_out + col1[None, :], out1.to(KCache.dtype.element_ty), mask=mask & is_k[None, :])
    tl.store(k_out + col2[None, :], out2.to(KCache.dtype.element_ty), mask=mask & is_k[None, :])
    v_out = VCache + slots * stride_vcs + (kv_head - NUM_KV_HEADS) * stride_vch
    tl.store(v_out + col1[None, :], out1.to(VCache.dtype.element_ty), mask=mask & is_v[None, :])
    tl.store(v_out + col2[None, :], out2.to(VCache.dtype.element_ty), mask=mask & is_v[None, :])


def paired_tiles(plain: LinearTiles, rows: int) -> LinearTiles:
    """The fused kernel's tiles for the tiles tuned for the plain product: each program loads two weight rows per
    pair it owns, so half the plain block's pairs read the plain program's rows (one row: any block of at least
    2; more rows: tl.dot needs blocks of at least 16). With the plain tiles (2x the rows per program, half the
    programs) the fused qkv kernel of llama-1b ran 7.4 µs a layer on an H200, for a 12.6 MB weight."""
    smallest = 1 if rows == 1 else 16
    if plain.block_n // 2 < smallest:
        return plain
    return dataclasses.replace(plain, block_n=plain.block_n // 2)


def fits(tiles: LinearTiles, head_size: int) -> bool:
    """Whether the kernel can run with these tiles: one K walk, and column blocks of pairs within one head."""
    return tiles.split_k == 1 and (head_size // 2) % tiles.block_n == 0


def _check(
    x: torch.Tensor,
    weight: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    num_q_heads: int,
    num_kv_heads: int,
    head_size: int,
) -> None:
    func = "linear_rope_store_kv"
    rows = (num_q_heads + 2 * num_kv_heads) * head_size
    if x.dim() != 2 or tuple(weight.shape) != (rows, x.shape[1]):
        raise ValueError(
            f"{func}: expected x [M, K] and weight [{rows}, K] (q, k and v heads of {head_size}), got "
            f"{list(x.shape)} and {list(weight.shape)}"
        )
    if head_size % 2 or cos_sin_cache.shape[1] != head_size:
        raise ValueError(
            f"{func}: rotates whole heads: head_size {head_size} must be even and the cos | sin cache "
            f"{head_size} wide, got {cos_sin_cache.shape[1]}"
        )
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.dim() != 3 or tuple(cache.shape[1:]) != (num_kv_heads, head_size):
            raise ValueError(
                f"{func}: expected {name} [S, {num_kv_heads}, {head_size}], got {list(cache.shape)}"
            )
    check_last_dim_contiguous(func, x=x, weight=weight, cos_sin_cache=cos_sin_cache, k_cache=k_cache)
    check_last_dim_contiguous(func, v_cache=v_cache)


def linear_rope_store_kv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out_cache_loc: torch.Tensor,
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_size: int,
    is_neox: bool,
    norm: RMSNormArgs | None = None,
    tiles: LinearTiles,
) -> torch.Tensor:
    """q, k, v = x W^T (+ bias), of x RMS-normalised first with `norm`; k and v written into the caches at
    out_cache_loc, q and k rotated at `positions`; returns rotated q `[M, num_q_heads * head_size]`. For at most
    `SMALL_BATCH_MAX_ROWS` rows, with tiles that `fits`."""
    func = "linear_rope_store_kv"
    _check(x, weight, cos_sin_cache, k_cache, v_cache, num_q_heads, num_kv_heads, head_size)
    if norm is not None:
        check_norm_weight(func, x, norm.weight)
    rows = x.shape[0]
    if rows > MAX_ROWS:
        raise ValueError(f"{func}: {rows} rows, more than the {MAX_ROWS} it serves")
    if not fits(tiles, head_size):
        raise ValueError(
            f"{func}: {tiles} do not fit heads of {head_size} (pairs per head a multiple of block_n)"
        )
    q = torch.empty(rows, num_q_heads * head_size, dtype=x.dtype, device=x.device)
    if rows == 0:
        return q
    pairs = (num_q_heads + 2 * num_kv_heads) * head_size // 2
    _linear_rope_store_kernel[(pairs // tiles.block_n,)](
        x,
        weight,
        weight if bias is None else bias,
        weight if norm is None else norm.weight,
        positions,
        cos_sin_cache,
        k_cache,
        v_cache,
        out_cache_loc,
        q,
        rows,
        x.shape[1],
        x.stride(0),
        weight.stride(0),
        cos_sin_cache.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        q.stride(0),
        0.0 if norm is None else norm.eps,
        NUM_Q_HEADS=num_q_heads,
        NUM_KV_HEADS=num_kv_heads,
        HEAD_SIZE=head_size,
        IS_NEOX=is_neox,
        HAS_BIAS=bias is not None,
        **tile_options(x, tiles, norm),
    )
    return q


def unfused_linear_rope_store_kv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out_cache_loc: torch.Tensor,
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_size: int,
    is_neox: bool,
    norm: RMSNormArgs | None = None,
) -> torch.Tensor:
    """What `linear_rope_store_kv` computes, as the graph computed it before the fusion: the (tuned) product,
    then the rotary + store kernel."""
    fusions = Fusions(norm=norm)
    if x.shape[0] <= MAX_ROWS:
        qkv = tuned_linear(x, weight, bias, fusions)
    else:
        qkv = cublas_linear(x, weight, bias, fusions)
    q, k, v = qkv.split([num_q_heads * head_size, num_kv_heads * head_size, num_kv_heads * head_size], dim=-1)
    return rotary_and_store_kv(
        positions,
        q,
        k,
        v,
        cos_sin_cache,
        k_cache,
        v_cache,
        out_cache_loc,
        head_size=head_size,
        is_neox=is_neox,
    )


def tuned_linear_rope_store_kv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    positions: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out_cache_loc: torch.Tensor,
    *,
    num_q_heads: int,
    num_kv_heads: int,
    head_size: int,
    is_neox: bool,
    norm: RMSNormArgs | None = None,
) -> torch.Tensor:
    """`linear_rope_store_kv` with the `paired_tiles` of those tuned for the plain qkv product (untuned off CUDA:
    of the first candidate whose pairing fits), or the unfused path where those do not fit, cuBLAS was faster,
    or there are more rows than the kernel serves."""
    _check(x, weight, cos_sin_cache, k_cache, v_cache, num_q_heads, num_kv_heads, head_size)
    args = (x, weight, bias, positions, cos_sin_cache, k_cache, v_cache, out_cache_loc)
    kwargs = dict(
        num_q_heads=num_q_heads, num_kv_heads=num_kv_heads, head_size=head_size, is_neox=is_neox, norm=norm
    )
    rows = x.shape[0]
    tiles = None
    if 0 < rows <= MAX_ROWS:
        if x.is_cuda:
            plain = tuned_tiles(x, weight, bias, Fusions(norm=norm))
            tiles = None if plain is None else paired_tiles(plain, rows)
        else:
            pairings = (paired_tiles(t, rows) for t in candidate_tiles(rows))
            tiles = next((t for t in pairings if fits(t, head_size)), None)
    if tiles is None or not fits(tiles, head_size):
        return unfused_linear_rope_store_kv(*args, **kwargs)
    return linear_rope_store_kv(*args, **kwargs, tiles=tiles)
