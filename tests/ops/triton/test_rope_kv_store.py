"""Triton fused rotary embedding + KV-cache store against a float64 reference and the unfused ops."""

from __future__ import annotations

import pytest
import torch

from radixc.ops.native.attention import store_kv
from radixc.ops.rotary import rotary_embedding
from radixc.ops.triton import rotary_and_store_kv


def _cos_sin_cache(rotary_dim, max_positions=64, base=10000.0):
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float64) / rotary_dim)
    angles = torch.arange(max_positions, dtype=torch.float64)[:, None] * inv_freq
    return torch.cat([angles.cos(), angles.sin()], dim=-1).float()


def _reference_rotate(x, positions, cos_sin_cache, is_neox):
    """float64 rotary of x [T, H, D]: pairs (i, i + r/2) for neox, (2i, 2i + 1) for GPT-J; dims >= r kept."""
    x, cache = x.double(), cos_sin_cache.double()
    half = cache.shape[1] // 2
    cos, sin = cache[positions, :half][:, None, :], cache[positions, half:][:, None, :]
    first = torch.arange(half) if is_neox else 2 * torch.arange(half)
    second = first + half if is_neox else first + 1
    out = x.clone()
    out[..., first] = x[..., first] * cos - x[..., second] * sin
    out[..., second] = x[..., second] * cos + x[..., first] * sin
    return out


def _case(num_tokens, num_q_heads, num_kv_heads, head_size, v_head_dim, dtype, seed):
    """q, k, v as column slices of one fused qkv projection, plus scattered cache slots."""
    gen = torch.Generator().manual_seed(seed)
    sizes = [num_q_heads * head_size, num_kv_heads * head_size, num_kv_heads * v_head_dim]
    qkv = torch.randn(num_tokens, sum(sizes), generator=gen).to(dtype)
    q, k, v = qkv.split(sizes, dim=-1)
    num_slots = 3 * num_tokens
    k_cache = torch.randn(num_slots, num_kv_heads, head_size, generator=gen).to(dtype)
    v_cache = torch.randn(num_slots, num_kv_heads, v_head_dim, generator=gen).to(dtype)
    positions = torch.randint(0, 64, (num_tokens,), generator=gen)
    out_cache_loc = torch.randperm(num_slots, generator=gen)[:num_tokens]
    return positions, q, k, v, k_cache, v_cache, out_cache_loc


@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize(
    "num_q_heads, num_kv_heads, head_size, rotary_dim, v_head_dim",
    [(4, 2, 16, 16, 16), (2, 1, 24, 8, 24), (4, 4, 32, 16, 16)],
    ids=["full-rotary", "partial-rotary-d24", "partial-rotary-dv16"],
)
def test_rotates_q_and_k_and_stores_k_and_v_at_their_slots(
    device, is_neox, num_q_heads, num_kv_heads, head_size, rotary_dim, v_head_dim
):
    positions, q, k, v, k_cache, v_cache, loc = _case(
        5, num_q_heads, num_kv_heads, head_size, v_head_dim, torch.float32, 0
    )
    cos_sin_cache = _cos_sin_cache(rotary_dim)
    expected_k_cache, expected_v_cache = k_cache.double().clone(), v_cache.double().clone()
    expected_k_cache[loc] = _reference_rotate(
        k.view(5, num_kv_heads, head_size), positions, cos_sin_cache, is_neox
    )
    expected_v_cache[loc] = v.reshape(5, num_kv_heads, v_head_dim).double()
    expected_q = _reference_rotate(q.view(5, num_q_heads, head_size), positions, cos_sin_cache, is_neox)

    k_cache_dev, v_cache_dev = k_cache.to(device, copy=True), v_cache.to(device, copy=True)
    q_rot = rotary_and_store_kv(
        positions.to(device),
        q.to(device),
        k.to(device),
        v.to(device),
        cos_sin_cache.to(device),
        k_cache_dev,
        v_cache_dev,
        loc.to(device),
        head_size=head_size,
        is_neox=is_neox,
    )
    assert q_rot.shape == q.shape
    torch.testing.assert_close(q_rot.cpu().double().view_as(expected_q), expected_q, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(k_cache_dev.cpu().double(), expected_k_cache, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(v_cache_dev.cpu().double(), expected_v_cache, atol=0, rtol=0)


# no tl.dot here, so the interpreter handles bfloat16 too (rounding to it may differ by one ulp)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_matches_unfused_rotary_op_and_store_for_three_dim_heads(device, dtype):
    positions, q, k, v, k_cache, v_cache, loc = _case(6, 4, 2, 32, 32, dtype, 1)
    q, k, v = (t.unflatten(-1, (-1, 32)) for t in (q, k, v))
    cos_sin_cache = _cos_sin_cache(32)
    expected_q, expected_k = rotary_embedding(positions, q.flatten(1), k.flatten(1), cos_sin_cache, 32, True)
    expected_k_cache, expected_v_cache = k_cache.clone(), v_cache.clone()
    store_kv(expected_k.view_as(k), v, expected_k_cache, expected_v_cache, loc)

    k_cache_dev, v_cache_dev = k_cache.to(device, copy=True), v_cache.to(device, copy=True)
    q_rot = rotary_and_store_kv(
        positions.to(device),
        q.to(device),
        k.to(device),
        v.to(device),
        cos_sin_cache.to(device),
        k_cache_dev,
        v_cache_dev,
        loc.to(device),
        head_size=32,
        is_neox=True,
    )
    assert q_rot.shape == q.shape and q_rot.dtype == dtype
    torch.testing.assert_close(q_rot.cpu(), expected_q.view_as(q), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(k_cache_dev.cpu(), expected_k_cache, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(v_cache_dev.cpu(), expected_v_cache, atol=0, rtol=0)


def test_rejects_rotary_dim_wider_than_the_head():
    positions, q, k, v, k_cache, v_cache, loc = _case(2, 2, 1, 16, 16, torch.float32, 2)
    with pytest.raises(ValueError, match="rotary_dim"):
        rotary_and_store_kv(
            positions, q, k, v, _cos_sin_cache(32), k_cache, v_cache, loc, head_size=16, is_neox=True
        )


def _reference_rms_norm(x, weight, eps, zero_centered):
    """float64 per-head RMSNorm of x [T, H, D]: (1 + w) when zero-centred, else w."""
    x = x.double()
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return normed * ((1.0 + weight.double()) if zero_centered else weight.double())


@pytest.mark.parametrize("zero_centered", [True, False], ids=["zero-centered", "plain"])
@pytest.mark.parametrize("is_neox, rotary_dim", [(True, 8), (False, 24)], ids=["neox-partial", "gptj-full"])
def test_normalises_each_q_and_k_head_before_rotating(device, zero_centered, is_neox, rotary_dim):
    positions, q, k, v, k_cache, v_cache, loc = _case(5, 4, 2, 24, 16, torch.float32, 3)
    gen = torch.Generator().manual_seed(4)
    q_weight, k_weight = torch.randn(24, generator=gen), torch.randn(24, generator=gen)
    cos_sin_cache = _cos_sin_cache(rotary_dim)
    q_normed = _reference_rms_norm(q.view(5, 4, 24), q_weight, 1e-6, zero_centered)
    k_normed = _reference_rms_norm(k.view(5, 2, 24), k_weight, 1e-6, zero_centered)
    expected_q = _reference_rotate(q_normed, positions, cos_sin_cache, is_neox)
    expected_k_cache = k_cache.double().clone()
    expected_k_cache[loc] = _reference_rotate(k_normed, positions, cos_sin_cache, is_neox)

    k_cache_dev, v_cache_dev = k_cache.to(device, copy=True), v_cache.to(device, copy=True)
    q_rot = rotary_and_store_kv(
        *(t.to(device) for t in (positions, q, k, v, cos_sin_cache)),
        k_cache_dev,
        v_cache_dev,
        loc.to(device),
        q_weight.to(device),
        k_weight.to(device),
        head_size=24,
        is_neox=is_neox,
        norm_eps=1e-6,
        norm_zero_centered=zero_centered,
    )
    torch.testing.assert_close(q_rot.cpu().double().view_as(expected_q), expected_q, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_cache_dev.cpu().double(), expected_k_cache, atol=1e-5, rtol=1e-5)


def test_one_norm_weight_alone_is_refused():
    positions, q, k, v, k_cache, v_cache, loc = _case(2, 2, 1, 16, 16, torch.float32, 5)
    with pytest.raises(ValueError, match="pass q_norm_weight and k_norm_weight together"):
        rotary_and_store_kv(
            positions,
            q,
            k,
            v,
            _cos_sin_cache(16),
            k_cache,
            v_cache,
            loc,
            torch.ones(16),
            head_size=16,
            is_neox=True,
        )
