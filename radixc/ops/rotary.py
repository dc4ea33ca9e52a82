"""Rotary position embedding as the op `radixc::rotary_embedding`, so passes can fuse it with its neighbours."""

from __future__ import annotations

import torch

from radixc.ops.library import define_op
from radixc.ops.native.attention import store_kv
from radixc.ops.norm import grouped_rms_norm


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, is_neox: bool) -> torch.Tensor:
    """Rotate the leading `2 * cos.shape[-1]` dims of each head of x `[T, H, D]` by cos/sin `[T, rot/2]`."""
    rotary_dim = 2 * cos.shape[-1]
    rot, passthrough = x[..., :rotary_dim].float(), x[..., rotary_dim:]
    cos, sin = cos[:, None, :], sin[:, None, :]
    if is_neox:
        x1, x2 = rot.chunk(2, dim=-1)
        rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
    else:
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
        rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
    return torch.cat((rotated.to(x.dtype), passthrough), dim=-1)


def rotary_embedding_native(positions, q, k, cos_sin_cache, head_size, is_neox):
    """Plain-torch rotary embedding (the op's implementation): new q, k in the shapes given."""
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)
    q_rot = rotate(q.view(q.shape[0], -1, head_size), cos, sin, is_neox=is_neox)
    k_rot = rotate(k.view(k.shape[0], -1, head_size), cos, sin, is_neox=is_neox)
    return q_rot.view(q.shape), k_rot.view(k.shape)


def _rotary_embedding_fake(positions, q, k, cos_sin_cache, head_size, is_neox):
    return torch.empty_like(q), torch.empty_like(k)


define_op(
    "rotary_embedding",
    "Tensor positions, Tensor q, Tensor k, Tensor cos_sin_cache, int head_size, bool is_neox",
    "(Tensor, Tensor)",
    rotary_embedding_native,
    _rotary_embedding_fake,
)


def qk_norm_rope_native(
    positions,
    q,
    k,
    q_norm_weight,
    k_norm_weight,
    cos_sin_cache,
    head_size,
    is_neox,
    norm_eps,
    norm_zero_centered,
):
    """Per-head RMSNorm of q and k, then the rotary embedding (what the q/k-norm fusion makes of the two)."""
    q = grouped_rms_norm(q, q_norm_weight, norm_eps, norm_zero_centered)
    k = grouped_rms_norm(k, k_norm_weight, norm_eps, norm_zero_centered)
    return rotary_embedding_native(positions, q, k, cos_sin_cache, head_size, is_neox)


define_op(
    "qk_norm_rope",
    "Tensor positions, Tensor q, Tensor k, Tensor q_norm_weight, Tensor k_norm_weight, Tensor cos_sin_cache, "
    "int head_size, bool is_neox, float norm_eps, bool norm_zero_centered",
    "(Tensor, Tensor)",
    qk_norm_rope_native,
    lambda positions, q, k, *args: (q.new_empty(q.shape), k.new_empty(k.shape)),
)


def rotary_embedding(
    positions: torch.Tensor,
    q: torch.Tensor,
    k: torch.Tensor,
    cos_sin_cache: torch.Tensor,
    head_size: int,
    is_neox: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply rotary embedding to q `[T, Hq*head_size]` and k `[T, Hk*head_size]` at `positions` `[T]`.

    cos_sin_cache `[max_positions, rotary_dim]` is cat(cos, sin) of the rotary_dim/2 frequencies; only the first
    rotary_dim dims of each head rotate (partial rotary when rotary_dim < head_size).
    """
    return torch.ops.radixc.rotary_embedding(positions, q, k, cos_sin_cache, head_size, is_neox)


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
    """RMS-normalise q and k per head when norm weights are given, rotate them, write rotated k and v
    `[T, Hk, Dv]` into the caches at out_cache_loc, return rotated q.

    The native twin of the Triton kernel `radixc.ops.triton.rotary_and_store_kv`.
    """
    if q_norm_weight is not None:
        q = grouped_rms_norm(q.flatten(1), q_norm_weight, norm_eps, norm_zero_centered)
    if k_norm_weight is not None:
        k = grouped_rms_norm(k.flatten(1), k_norm_weight, norm_eps, norm_zero_centered)
    q, k = rotary_embedding_native(positions, q, k, cos_sin_cache, head_size, is_neox)
    num_kv_heads = k_cache.shape[1]
    store_kv(
        k.view(k.shape[0], num_kv_heads, -1),
        v.view(v.shape[0], num_kv_heads, -1),
        k_cache,
        v_cache,
        out_cache_loc,
    )
    return q
