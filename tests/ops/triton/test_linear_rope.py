"""The qkv GEMV with RoPE and the KV-cache store in its epilogue against a float64 reference, and its unfused
path (the tuned product, then the rotary + store kernel) against the same."""

from __future__ import annotations

import pytest
import torch

from radixc.ops.triton.gemv import LinearTiles, RMSNormArgs
from radixc.ops.triton.linear_rope import (
    linear_rope_store_kv,
    paired_tiles,
    tuned_linear_rope_store_kv,
    unfused_linear_rope_store_kv,
)

HQ, HK, D, K = 4, 2, 32, 48  # K not a multiple of any K step: the masked tail of every tile
SLOTS = 40
EPS = 1e-5


def _case(rows: int, is_neox: bool, bias: bool, norm: bool, seed: int):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, K, generator=gen)
    weight = torch.randn((HQ + 2 * HK) * D, K, generator=gen) / K**0.5
    b = torch.randn(weight.shape[0], generator=gen) if bias else None
    norm_weight = torch.rand(K, generator=gen) + 0.5 if norm else None
    positions = torch.randint(0, 64, (rows,), generator=gen)
    angles = torch.rand(64, D // 2, generator=gen) * 6.3
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=1)
    slots = torch.randperm(SLOTS, generator=gen)[:rows]
    caches = torch.randn(SLOTS, HK, D, generator=gen), torch.randn(SLOTS, HK, D, generator=gen)

    x64 = x.double()
    if norm:
        x64 = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + EPS) * norm_weight.double()
    qkv = x64 @ weight.double().T + (b.double() if bias else 0)
    q, k, v = qkv.split([HQ * D, HK * D, HK * D], dim=-1)
    cos, sin = cos_sin.double()[positions].chunk(2, dim=-1)

    def rotate(t, heads):
        t = t.view(rows, heads, D)
        if is_neox:
            t1, t2 = t[..., : D // 2], t[..., D // 2 :]
            return torch.cat(
                [t1 * cos[:, None] - t2 * sin[:, None], t2 * cos[:, None] + t1 * sin[:, None]], -1
            )
        t1, t2 = t[..., 0::2], t[..., 1::2]
        return torch.stack(
            [t1 * cos[:, None] - t2 * sin[:, None], t2 * cos[:, None] + t1 * sin[:, None]], -1
        ).flatten(-2)

    k_expected, v_expected = caches[0].double().clone(), caches[1].double().clone()
    k_expected[slots] = rotate(k, HK)
    v_expected[slots] = v.view(rows, HK, D)
    inputs = dict(
        x=x,
        weight=weight,
        bias=b,
        positions=positions,
        cos_sin_cache=cos_sin,
        out_cache_loc=slots,
        caches=caches,
    )
    norm_args = None if norm_weight is None else (norm_weight, EPS)
    return inputs, norm_args, (rotate(q, HQ).flatten(1), k_expected, v_expected)


def _run(fn, inputs, norm_args, device, is_neox, dtype=torch.float32, **kwargs):
    k_cache, v_cache = (c.to(device, dtype) for c in inputs["caches"])
    norm = None if norm_args is None else RMSNormArgs(norm_args[0].to(device, dtype), norm_args[1], False)
    q = fn(
        inputs["x"].to(device, dtype),
        inputs["weight"].to(device, dtype),
        None if inputs["bias"] is None else inputs["bias"].to(device, dtype),
        inputs["positions"].to(device),
        inputs["cos_sin_cache"].to(device),
        k_cache,
        v_cache,
        inputs["out_cache_loc"].to(device),
        num_q_heads=HQ,
        num_kv_heads=HK,
        head_size=D,
        is_neox=is_neox,
        norm=norm,
        **kwargs,
    )
    return q.cpu(), k_cache.cpu(), v_cache.cpu()


def _check(got, expected, atol):
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g.double(), e, atol=atol * e.abs().max().item(), rtol=0)


TILES = [
    (1, LinearTiles(1, 2048, 2, 2)),
    (1, LinearTiles(2, 32, 2, 2)),
    (1, LinearTiles(16, 2048, 4, 2)),
    (5, LinearTiles(16, 32, 4, 2)),
]


@pytest.mark.parametrize(("rows", "tiles"), TILES, ids=["one-row-n1", "one-row-n2", "one-row-n16", "dot-n16"])
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
@pytest.mark.parametrize("norm", [False, True], ids=["plain", "norm"])
def test_fused_kernel_is_the_float64_product_rotated_and_stored(device, rows, tiles, is_neox, bias, norm):
    inputs, norm_args, expected = _case(rows, is_neox, bias, norm, seed=rows + 2 * is_neox + 4 * bias)
    got = _run(linear_rope_store_kv, inputs, norm_args, device, is_neox, tiles=tiles)
    _check(got, expected, 1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize(("rows", "tiles"), TILES[1:], ids=["one-row-n2", "one-row-n16", "dot-n16"])
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "gptj"])
def test_the_l2_prefetch_changes_no_bit_of_q_or_the_caches(monkeypatch, rows, tiles, is_neox):
    """The weight rows prefetched into L2 before the PDL wait (`RADIXC_GEMV_L2_PREFETCH=1`) are a hint: the same
    q and caches as without, on a device that launches with PDL."""
    from radixc.ops.pdl import pdl_enabled
    from radixc.ops.triton import gemv

    if not pdl_enabled(torch.device("cuda")):
        pytest.skip("PDL needs a Hopper or later GPU")
    inputs, norm_args, expected = _case(rows, is_neox, True, True, seed=21 + rows)
    monkeypatch.setenv(gemv.L2_PREFETCH_ENV, "0")
    plain = _run(linear_rope_store_kv, inputs, norm_args, "cuda", is_neox, tiles=tiles)
    monkeypatch.setenv(gemv.L2_PREFETCH_ENV, "1")
    prefetched = _run(linear_rope_store_kv, inputs, norm_args, "cuda", is_neox, tiles=tiles)
    assert all(torch.equal(p, q) for p, q in zip(plain, prefetched, strict=True))
    _check(prefetched, expected, 1e-5)


@pytest.mark.parametrize("rows", [1, 3, 40])  # the kernel's tiles, and more rows than it serves (cuBLAS)
def test_unfused_and_tuned_paths_compute_the_same(device, rows):
    inputs, norm_args, expected = _case(rows, True, True, True, seed=11 + rows)
    for fn in (unfused_linear_rope_store_kv, tuned_linear_rope_store_kv):
        _check(_run(fn, inputs, norm_args, device, True), expected, 1e-5)


def test_paired_tiles_read_the_rows_of_the_tuned_plain_program():
    """Half the plain column block (two weight rows per pair), as far as one row's multiply-reduce (a block of
    1) and tl.dot (16) allow."""
    assert paired_tiles(LinearTiles(4, 2048, 4, 2), rows=1) == LinearTiles(2, 2048, 4, 2)
    assert paired_tiles(LinearTiles(2, 512, 2, 2), rows=1) == LinearTiles(1, 512, 2, 2)
    assert paired_tiles(LinearTiles(64, 256, 4, 4), rows=20) == LinearTiles(32, 256, 4, 4)
    assert paired_tiles(LinearTiles(16, 256, 4, 4), rows=20) == LinearTiles(16, 256, 4, 4)


def test_half_precision_rounds_as_the_unfused_graph(device, half_dtype):
    inputs, norm_args, expected = _case(1, True, True, False, seed=5)
    fused = _run(linear_rope_store_kv, inputs, norm_args, device, True, half_dtype, tiles=TILES[0][1])
    unfused = _run(unfused_linear_rope_store_kv, inputs, norm_args, device, True, half_dtype)
    _check(fused, expected, 1e-2)
    for f, u in zip(fused, unfused, strict=True):
        torch.testing.assert_close(f, u, atol=2e-2 * u.abs().max().item(), rtol=0)


def test_bad_inputs_are_named(device):
    inputs, _, _ = _case(2, True, False, False, seed=1)
    tiles = LinearTiles(2, 32, 2, 2)
    args = lambda **change: {**dict(num_q_heads=HQ, num_kv_heads=HK, head_size=D, is_neox=True), **change}  # noqa: E731
    x, w, pos, cs, slots = (
        inputs[n].to(device) for n in ("x", "weight", "positions", "cos_sin_cache", "out_cache_loc")
    )
    k_cache, v_cache = (c.to(device) for c in inputs["caches"])
    with pytest.raises(ValueError, match="weight \\[256, K\\]"):
        linear_rope_store_kv(x, w[:-2], None, pos, cs, k_cache, v_cache, slots, **args(), tiles=tiles)
    with pytest.raises(ValueError, match="rotates whole heads"):
        linear_rope_store_kv(x, w, None, pos, cs[:, :16], k_cache, v_cache, slots, **args(), tiles=tiles)
    with pytest.raises(ValueError, match="k_cache \\[S, 2, 32\\]"):
        linear_rope_store_kv(x, w, None, pos, cs, k_cache[:, :1], v_cache, slots, **args(), tiles=tiles)
    with pytest.raises(ValueError, match="do not fit heads of 32"):
        linear_rope_store_kv(
            x, w, None, pos, cs, k_cache, v_cache, slots, **args(), tiles=LinearTiles(32, 32, 4, 2)
        )
    with pytest.raises(ValueError, match="do not fit heads of 32"):
        linear_rope_store_kv(
            x, w, None, pos, cs, k_cache, v_cache, slots, **args(), tiles=LinearTiles(2, 32, 2, 2, 2)
        )
