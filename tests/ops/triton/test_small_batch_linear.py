"""The Triton small-batch linear kernel and the `radixc::small_batch_linear` op against float64 references."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from triton.runtime.errors import OutOfResources

from radixc.ops.linear import SMALL_BATCH_MAX_ROWS
from radixc.ops.triton import small_batch_linear
from radixc.ops.triton.gemv import LinearTiles, fastest, time_or_inf, tuned_linear

# float32 accumulation of products rounded to the input dtype: errors relative to the output's scale
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def _case(rows, in_features, out_features, dtype, seed, *, bias=False, row_stride=None):
    gen = torch.Generator().manual_seed(seed)
    wide = torch.randn(rows, row_stride or in_features, generator=gen)
    x = wide[:, :in_features]  # rows further apart than K when row_stride says so
    weight = torch.randn(out_features, in_features, generator=gen) / in_features**0.5
    b = torch.randn(out_features, generator=gen) if bias else None
    expected = x.double() @ weight.double().T
    if b is not None:
        expected += b.double()
    return x.to(dtype), weight.to(dtype), None if b is None else b.to(dtype), expected


def _check(got, expected, dtype):
    scale = expected.abs().max().item()
    torch.testing.assert_close(got.cpu().double(), expected, atol=TOLERANCE[dtype] * scale, rtol=0)


# one row takes the multiply-reduce path, more the tl.dot path (rows padded to 16 or a power of two)
@pytest.mark.parametrize("rows", [1, 3, 8, 15, 16, 27, 32])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_matches_float64_reference_float32(device, rows, bias):
    x, weight, b, expected = _case(rows, 70, 37, torch.float32, rows, bias=bias, row_stride=96)
    out = small_batch_linear(x.to(device), weight.to(device), None if b is None else b.to(device))
    assert out.shape == (rows, 37) and out.dtype == torch.float32
    _check(out, expected, torch.float32)


@pytest.mark.parametrize("rows", [1, 5, 16, 32])
def test_matches_float64_reference_half(device, half_dtype, rows):
    x, weight, b, expected = _case(rows, 256, 96, half_dtype, 100 + rows, bias=True)
    out = small_batch_linear(x.to(device), weight.to(device), b.to(device))
    assert out.dtype == half_dtype
    _check(out, expected, half_dtype)


def _silu_and_mul(product: torch.Tensor) -> torch.Tensor:
    gate, up = product.chunk(2, dim=-1)
    return gate * torch.sigmoid(gate) * up


@pytest.mark.parametrize("rows", [1, 3, 16, 32])
@pytest.mark.parametrize("bias", [False, True], ids=["nobias", "bias"])
def test_gated_is_silu_and_mul_of_the_float64_product(device, rows, bias):
    x, weight, b, expected = _case(rows, 70, 2 * 37, torch.float32, 200 + rows, bias=bias, row_stride=80)
    out = small_batch_linear(x.to(device), weight.to(device), None if b is None else b.to(device), gated=True)
    assert out.shape == (rows, 37)
    _check(out, _silu_and_mul(expected), torch.float32)


@pytest.mark.parametrize("rows", [1, 5])
def test_gated_half(device, half_dtype, rows):
    x, weight, b, expected = _case(rows, 256, 2 * 48, half_dtype, 300 + rows, bias=True)
    out = small_batch_linear(x.to(device), weight.to(device), b.to(device), gated=True)
    assert out.dtype == half_dtype
    _check(out, _silu_and_mul(expected), half_dtype)


# one-row tiles (multiply-reduce) and tl.dot tiles whose float32 operands, gate and up, fit in shared memory
ONE_ROW = [LinearTiles(2, 128, 2, 2), LinearTiles(4, 2048, 4, 2)]
DOT = [LinearTiles(8, 64, 4, 3), LinearTiles(32, 128, 8, 2)]


@pytest.mark.parametrize(
    ("rows", "tiles"),
    [(1, t) for t in ONE_ROW] + [(rows, t) for rows in (2, 20) for t in DOT],
    ids=lambda v: f"n{v.block_n}-k{v.block_k}" if isinstance(v, LinearTiles) else str(v),
)
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_any_tile_shape_gives_the_same_product(device, tiles, rows, gated):
    """K not a multiple of the K step and N not of the column block: the masked edges of every tile shape."""
    x, weight, _, expected = _case(rows, 200, 90 if gated else 45, torch.float32, 7)
    got = small_batch_linear(x.to(device), weight.to(device), tiles=tiles, gated=gated)
    _check(got, _silu_and_mul(expected) if gated else expected, torch.float32)


def test_bad_inputs_name_the_problem(device):
    x, weight, _, _ = _case(2, 16, 8, torch.float32, 0)
    x, weight = x.to(device), weight.to(device)
    with pytest.raises(ValueError, match="expected x \\[M, K\\] and weight \\[N, K\\]"):
        small_batch_linear(x, weight[:, :8])
    with pytest.raises(ValueError, match=f"more than the {SMALL_BATCH_MAX_ROWS}"):
        small_batch_linear(x.new_ones(SMALL_BATCH_MAX_ROWS + 1, 16), weight)
    with pytest.raises(ValueError, match="bias must be \\[8\\]"):
        small_batch_linear(x, weight, x.new_ones(16))
    with pytest.raises(ValueError, match="x must have a unit-stride last dim"):
        small_batch_linear(x.new_ones(16, 2).T, weight)
    with pytest.raises(ValueError, match="gated weight has gate and up halves, got 7 rows"):
        small_batch_linear(x, weight[:7], gated=True)
    with pytest.raises(ValueError, match="bias must be \\[8\\]"):
        small_batch_linear(x, weight, x.new_ones(4), gated=True)  # the bias covers both halves


def test_op_runs_the_kernel_up_to_its_row_limit_and_cublas_above(device):
    from radixc.ops.triton import gemv

    x, weight, b, expected = _case(SMALL_BATCH_MAX_ROWS + 5, 64, 24, torch.float32, 3, bias=True)
    x, weight, b = x.to(device), weight.to(device), b.to(device)
    with mock.patch.object(gemv, "tuned_linear", wraps=gemv.tuned_linear) as tuned:
        above = torch.ops.radixc.small_batch_linear(x, weight, b)
        assert tuned.call_count == 0
        within = torch.ops.radixc.small_batch_linear(x[:SMALL_BATCH_MAX_ROWS], weight, b)
        assert tuned.call_count == 1
    _check(above, expected, torch.float32)
    _check(within, expected[:SMALL_BATCH_MAX_ROWS], torch.float32)


def test_tuning_holds_for_a_row_class_of_one_kernel():
    from radixc.ops.triton.gemv import tuning_key

    weight = torch.empty(8, 4)
    classes = [tuning_key(torch.empty(rows, 4), weight, None)[0] for rows in (1, 2, 16, 17, 32)]
    assert classes == [1, 16, 16, 32, 32]


def test_fastest_is_the_candidate_with_the_least_time_skipping_tiles_that_cannot_run():
    tiles = LinearTiles(4, 512, 2, 4)
    assert fastest({None: lambda: 2.0, tiles: lambda: 1.5}) == tiles
    assert fastest({None: lambda: 1.0, tiles: lambda: 1.5}) is None  # cuBLAS

    def too_large() -> float:
        raise OutOfResources(300_000, 232_448, "shared memory")

    assert fastest({None: lambda: 2.0, tiles: lambda: time_or_inf(too_large)}) is None


def test_tuned_linear_matches_the_reference_and_remembers_its_choice(device):
    """On CUDA each shape is timed once against cuBLAS; elsewhere the untuned tiles run."""
    from radixc.ops.triton import gemv

    for rows in (1, 4, 32):
        x, weight, b, expected = _case(rows, 192, 80, torch.float32, 50 + rows, bias=True)
        x, weight, b = x.to(device), weight.to(device), b.to(device)
        _check(tuned_linear(x, weight, b), expected, torch.float32)
        if device == "cuda":
            assert gemv.tuning_key(x, weight, b) in gemv._fastest
        else:
            assert torch.equal(tuned_linear(x, weight, b), small_batch_linear(x, weight, b))
        _check(tuned_linear(x, weight, b, gated=True), _silu_and_mul(expected), torch.float32)


@pytest.mark.gpu
def test_a_later_process_takes_the_stored_choice_without_timing(monkeypatch, tmp_path):
    from radixc.ops.triton import gemv, tuning_cache

    monkeypatch.setattr(tuning_cache, "cache_dir", lambda: str(tmp_path))
    x, weight, _, expected = _case(1, 256, 96, torch.float32, 61)
    x, weight = x.cuda(), weight.cuda()
    key = gemv.tuning_key(x, weight, None)
    for process in ("first", "later"):  # each starts with nothing tuned in memory
        monkeypatch.setattr(gemv, "_fastest", {})
        monkeypatch.setattr(gemv, "_stored", tuning_cache.TuningCache("small_batch_linear"))
        if process == "later":
            monkeypatch.setattr(gemv, "_timers", lambda *args: pytest.fail("timed a stored shape again"))
        _check(tuned_linear(x, weight), expected, torch.float32)
        if process == "first":
            choice = gemv._fastest[key]
    assert gemv._fastest[key] == choice


@pytest.mark.parametrize("rows", [1, 7])
@pytest.mark.parametrize("cols", [5, 1500])  # within one block, and across two with a masked tail
def test_activation_kernel_is_silu_and_mul_rounded_as_the_graph_rounds(device, rows, cols):
    from radixc.ops.linear import silu_and_mul as twin
    from radixc.ops.triton import silu_and_mul

    gen = torch.Generator().manual_seed(rows * cols)
    gate_up = torch.randn(rows, 2 * cols + 3, generator=gen)[:, : 2 * cols]  # rows further apart than 2N
    expected = _silu_and_mul(gate_up.double())
    got = silu_and_mul(gate_up.to(device))
    _check(got, expected, torch.float32)
    half = silu_and_mul(gate_up.to(device, torch.float16))
    _check(half, expected, torch.float16)
    torch.testing.assert_close(half.cpu(), twin(gate_up.to(torch.float16)), atol=2e-3, rtol=0)


def test_activation_kernel_rejects_an_odd_width(device):
    from radixc.ops.triton import silu_and_mul

    with pytest.raises(ValueError, match="expected gate_up \\[M, 2N\\], got \\[2, 5\\]"):
        silu_and_mul(torch.randn(2, 5, device=device))


def test_gated_op_above_the_row_limit_is_cublas_then_the_activation(device):
    x, weight, b, expected = _case(SMALL_BATCH_MAX_ROWS + 3, 48, 2 * 20, torch.float32, 9, bias=True)
    got = torch.ops.radixc.silu_mul_linear(x.to(device), weight.to(device), b.to(device))
    _check(got, _silu_and_mul(expected), torch.float32)
