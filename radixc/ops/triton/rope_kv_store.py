"""Rotary embedding of q and k fused with the KV-cache store: one pass over the new tokens' q, k and v.

Optionally RMS-normalises each q and k head first (Qwen3 / Qwen3.5 q/k norms), so those models' decode runs no
separate norm kernels. Twin: radixc.ops.rotary.rotary_and_store_kv.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixc.ops.triton._utils import (
    check_last_dim_contiguous,
    let_next_kernel_start,
    pdl_launch,
    wait_for_previous_kernel,
)


@triton.jit
def _scaled(x, rstd, weight_ptrs, ZERO_CENTERED: tl.constexpr):
    """x * rstd scaled by the norm weight, rounded to x's dtype where the torch RMSNorm rounds."""
    normed = x.to(tl.float32) * rstd
    weight = tl.load(weight_ptrs).to(tl.float32)
    if ZERO_CENTERED:
        return (normed * (1.0 + weight)).to(x.dtype)
    return (weight * normed.to(x.dtype).to(tl.float32)).to(x.dtype)


@triton.jit
def _rotate_heads(
    Src,  # first element of this token's [H, head_size] rows
    Dst,
    stride_src_h,
    stride_dst_h,
    cos,  # [1, BLOCK_HALF] float32
    sin,
    num_heads,
    NormW,  # [head_size] per-head RMSNorm weight (read when HAS_NORM)
    eps,
    HEAD_SIZE: tl.constexpr,
    ROT_HALF: tl.constexpr,
    IS_NEOX: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
    HAS_NORM: tl.constexpr,
    ZERO_CENTERED: tl.constexpr,
):
    """RMS-normalise each head first when HAS_NORM (as radixc.ops.norm.rms_norm_reference rounds), then rotate
    the first 2 * ROT_HALF dims of each head from Src into Dst (in Dst's dtype); copy the rest."""
    offs_h = tl.arange(0, BLOCK_H)
    h_mask = offs_h < num_heads
    offs_half = tl.arange(0, BLOCK_HALF)
    if IS_NEOX:
        # rotate halves: pair (i, i + ROT_HALF)
        first, second = offs_half, offs_half + ROT_HALF
    else:
        # GPT-J: pair (2i, 2i + 1)
        first, second = 2 * offs_half, 2 * offs_half + 1
    mask = h_mask[:, None] & (offs_half < ROT_HALF)[None, :]
    src = Src + offs_h[:, None] * stride_src_h
    dst = Dst + offs_h[:, None] * stride_dst_h
    x1 = tl.load(src + first[None, :], mask=mask, other=0.0)
    x2 = tl.load(src + second[None, :], mask=mask, other=0.0)
    if BLOCK_PASS > 0:
        offs_pass = 2 * ROT_HALF + tl.arange(0, BLOCK_PASS)
        pass_mask = h_mask[:, None] & (offs_pass < HEAD_SIZE)[None, :]
        x = tl.load(src + offs_pass[None, :], mask=pass_mask, other=0.0)
    if HAS_NORM:
        squares = tl.sum(x1.to(tl.float32) * x1.to(tl.float32), 1) + tl.sum(
            x2.to(tl.float32) * x2.to(tl.float32), 1
        )
        if BLOCK_PASS > 0:
            squares += tl.sum(x.to(tl.float32) * x.to(tl.float32), 1)
        rstd = tl.rsqrt(squares / HEAD_SIZE + eps)[:, None]
        x1 = _scaled(x1, rstd, NormW + first[None, :], ZERO_CENTERED)
        x2 = _scaled(x2, rstd, NormW + second[None, :], ZERO_CENTERED)
        if BLOCK_PASS > 0:
            x = _scaled(x, rstd, NormW + offs_pass[None, :], ZERO_CENTERED)
    # round to the source dtype first, as the unfused rotary op does before the cache store casts
    out1 = (x1.to(tl.float32) * cos - x2.to(tl.float32) * sin).to(x1.dtype)
    out2 = (x2.to(tl.float32) * cos + x1.to(tl.float32) * sin).to(x1.dtype)
    tl.store(dst + first[None, :], out1.to(Dst.dtype.element_ty), mask=mask)
    tl.store(dst + second[None, :], out2.to(Dst.dtype.element_ty), mask=mask)
    if BLOCK_PASS > 0:
        tl.store(dst + offs_pass[None, :], x.to(Dst.dtype.element_ty), mask=pass_mask)


@triton.jit
def _rope_kv_store_kernel(
    Positions,  # [T]
    Q,  # [T, Hq, head_size]
    K,  # [T, Hk, head_size]
    V,  # [T, Hk, Dv]
    CosSin,  # [max_positions, rotary_dim] float32: cos | sin
    KCache,  # [S, Hk, head_size]
    VCache,  # [S, Hk, Dv]
    OutCacheLoc,  # [T]
    QOut,  # [T, Hq, head_size]
    QNormW,  # [head_size] (read when HAS_NORM)
    KNormW,
    norm_eps,
    stride_qt,
    stride_qh,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cos,
    stride_kcs,
    stride_kch,
    stride_vcs,
    stride_vch,
    stride_qot,
    stride_qoh,
    num_q_heads,
    num_kv_heads,
    HEAD_SIZE: tl.constexpr,
    V_HEAD_DIM: tl.constexpr,
    ROT_HALF: tl.constexpr,
    IS_NEOX: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_PASS: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HAS_NORM: tl.constexpr,
    ZERO_CENTERED: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    # the token's position, slot and rotation before the PDL wait: the step's inputs and a constant table, which
    # no kernel of the step writes
    pos = tl.load(Positions + t).to(tl.int64)
    slot = tl.load(OutCacheLoc + t).to(tl.int64)
    offs_half = tl.arange(0, BLOCK_HALF)
    half_mask = offs_half < ROT_HALF
    cos = tl.load(CosSin + pos * stride_cos + offs_half, mask=half_mask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(CosSin + pos * stride_cos + ROT_HALF + offs_half, mask=half_mask, other=0.0)
    sin = sin.to(tl.float32)[None, :]
    wait_for_previous_kernel(USE_PDL)

    _rotate_heads(
        Q + t * stride_qt,
        QOut + t * stride_qot,
        stride_qh,
        stride_qoh,
        cos,
        sin,
        num_q_heads,
        QNormW,
        norm_eps,
        HEAD_SIZE,
        ROT_HALF,
        IS_NEOX,
        BLOCK_HQ,
        BLOCK_HALF,
        BLOCK_PASS,
        HAS_NORM,
        ZERO_CENTERED,
    )
    _rotate_heads(
        K + t * stride_kt,
        KCache + slot * stride_kcs,
        stride_kh,
        stride_kch,
        cos,
        sin,
        num_kv_heads,
        KNormW,
        norm_eps,
        HEAD_SIZE,
        ROT_HALF,
        IS_NEOX,
        BLOCK_HK,
        BLOCK_HALF,
        BLOCK_PASS,
        HAS_NORM,
        ZERO_CENTERED,
    )

    offs_h = tl.arange(0, BLOCK_HK)
    offs_dv = tl.arange(0, BLOCK_DV)
    v_mask = (offs_h < num_kv_heads)[:, None] & (offs_dv < V_HEAD_DIM)[None, :]
    v = tl.load(V + t * stride_vt + offs_h[:, None] * stride_vh + offs_dv[None, :], mask=v_mask)
    let_next_kernel_start(USE_PDL)
    tl.store(
        VCache + slot * stride_vcs + offs_h[:, None] * stride_vch + offs_dv[None, :],
        v.to(VCache.dtype.element_ty),
        mask=v_mask,
    )


def rotary_and_store_kv(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    out_cache_loc: torch.Tensor,
    q_norm_weight: torch.Tensor | None = None,
    k_norm_weight: torch.Tensor | None = None,
    *,
    head_size: int,
    is_neox: bool,
    norm_eps: float = 1e-6,
    norm_zero_centered: bool = False,
) -> torch.Tensor:
    """Rotate q and k at `positions`, write rotated k and v to the caches at out_cache_loc; return rotated q.

    q [T, Hq*head_size] or [T, Hq, head_size], k likewise with Hk heads, v [T, Hk*Dv] or [T, Hk, Dv];
    cos_sin_cache [max_positions, rotary_dim] = cat(cos, sin), rotating the first rotary_dim dims of each head.
    k_cache [S, Hk, head_size], v_cache [S, Hk, Dv]. The returned q has q's shape and dtype. With norm weights
    `[head_size]` (both or neither), each q and k head is RMS-normalised first (radixc.ops.norm.rms_norm_reference).
    """
    func = "rotary_and_store_kv"
    num_tokens = q.shape[0]
    num_kv_heads, v_head_dim = v_cache.shape[1:]
    q3 = q.view(num_tokens, -1, head_size)
    k3 = k.view(num_tokens, num_kv_heads, head_size)
    v3 = v.view(num_tokens, num_kv_heads, v_head_dim)
    check_last_dim_contiguous(func, q=q3, k=k3, v=v3, cos_sin_cache=cos_sin_cache, k_cache=k_cache)
    check_last_dim_contiguous(func, v_cache=v_cache)
    if (q_norm_weight is None) != (k_norm_weight is None):
        raise ValueError(f"{func}: pass q_norm_weight and k_norm_weight together, or neither")
    for name, weight in (("q_norm_weight", q_norm_weight), ("k_norm_weight", k_norm_weight)):
        if weight is not None and tuple(weight.shape) != (head_size,):
            raise ValueError(f"{func}: expected {name} [{head_size}], got {list(weight.shape)}")
    rotary_dim = cos_sin_cache.shape[1]
    if rotary_dim % 2 != 0 or rotary_dim > head_size:
        raise ValueError(f"{func}: rotary_dim {rotary_dim} must be even and at most head_size {head_size}")
    q_out = torch.empty(q3.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return q_out.view(q.shape)
    num_q_heads = q3.shape[1]
    rot_half = rotary_dim // 2
    pass_dim = head_size - rotary_dim
    _rope_kv_store_kernel[(num_tokens,)](
        positions,
        q3,
        k3,
        v3,
        cos_sin_cache,
        k_cache,
        v_cache,
        out_cache_loc,
        q_out,
        q_out if q_norm_weight is None else q_norm_weight,
        q_out if k_norm_weight is None else k_norm_weight,
        norm_eps,
        q3.stride(0),
        q3.stride(1),
        k3.stride(0),
        k3.stride(1),
        v3.stride(0),
        v3.stride(1),
        cos_sin_cache.stride(0),
        k_cache.stride(0),
        k_cache.stride(1),
        v_cache.stride(0),
        v_cache.stride(1),
        q_out.stride(0),
        q_out.stride(1),
        num_q_heads,
        num_kv_heads,
        HEAD_SIZE=head_size,
        V_HEAD_DIM=v_head_dim,
        ROT_HALF=rot_half,
        IS_NEOX=is_neox,
        BLOCK_HQ=triton.next_power_of_2(num_q_heads),
        BLOCK_HK=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=triton.next_power_of_2(rot_half),
        BLOCK_PASS=triton.next_power_of_2(pass_dim) if pass_dim > 0 else 0,
        BLOCK_DV=triton.next_power_of_2(v_head_dim),
        HAS_NORM=q_norm_weight is not None,
        ZERO_CENTERED=norm_zero_centered,
        num_warps=4,
        **pdl_launch(q.device),
    )
    return q_out.view(q.shape)
