"""The Triton small-batch linear kernel and the `radixc::small_batch_linear` op against float64 references."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from triton.runtime.errors import OutOfResources

from radixc.ops.linear import SMALL_BATCH_MAX_ROWS
from radixc.ops.triton import small_batch_linear
from radixc.ops.triton.gemv import Fusions, LinearTiles, RMSNormArgs, fastest, time_or_inf, tuned_linear

GATED = Fusions(gated=True)

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
    out = small_batch_linear(
        x.to(device), weight.to(device), None if b is None else b.to(device), fusions=GATED
    )
    assert out.shape == (rows, 37)
    _check(out, _silu_and_mul(expected), torch.float32)


@pytest.mark.parametrize("rows", [1, 5])
def test_gated_half(device, half_dtype, rows):
    x, weight, b, expected = _case(rows, 256, 2 * 48, half_dtype, 300 + rows, bias=True)
    out = small_batch_linear(x.to(device), weight.to(device), b.to(device), fusions=GATED)
    assert out.dtype == half_dtype
    _check(out, _silu_and_mul(expected), half_dtype)


NORM_EPS = 1e-5


def _norm_case(rows, in_features, out_features, dtype, seed, zero_centered):
    """x, weight and norm weight with the float64 norm of x (the reference's formula) and its product."""
    x, weight, _, _ = _case(rows, in_features, out_features, dtype, seed)
    norm_weight = (torch.rand(in_features, generator=torch.Generator().manual_seed(seed)) + 0.5).to(dtype)
    x64 = x.double()
    normed = x64 * torch.rsqrt(x64.pow(2).mean(-1, keepdim=True) + NORM_EPS)
    normed = normed * (1 + norm_weight.double()) if zero_centered else normed * norm_weight.double()
    return x, weight, norm_weight, normed @ weight.double().T


@pytest.mark.parametrize("rows", [1, 3, 20])
@pytest.mark.parametrize("zero_centered", [False, True], ids=["scaled", "zero-centered"])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_norm_prologue_is_the_float64_norm_then_the_product(device, rows, zero_centered, gated):
    x, weight, norm_weight, expected = _norm_case(
        rows, 96, 2 * 40 if gated else 40, torch.float32, rows, zero_centered
    )
    norm = RMSNormArgs(norm_weight.to(device), NORM_EPS, zero_centered)
    got = small_batch_linear(x.to(device), weight.to(device), fusions=Fusions(norm=norm, gated=gated))
    _check(got, _silu_and_mul(expected) if gated else expected, torch.float32)


@pytest.mark.parametrize("rows", [1, 5])
@pytest.mark.parametrize("zero_centered", [False, True], ids=["scaled", "zero-centered"])
def test_norm_prologue_half(device, half_dtype, rows, zero_centered):
    x, weight, norm_weight, expected = _norm_case(rows, 256, 64, half_dtype, 40 + rows, zero_centered)
    norm = RMSNormArgs(norm_weight.to(device), NORM_EPS, zero_centered)
    got = small_batch_linear(x.to(device), weight.to(device), fusions=Fusions(norm=norm))
    assert got.dtype == half_dtype
    _check(got, expected, half_dtype)


@pytest.mark.parametrize("rows", [1, 5, 32])
def test_input_gate_prologue_is_the_gated_x_rounded_then_the_product(device, half_dtype, rows):
    """x * sigmoid(gate) in float32, rounded to the model dtype as the unfused graph's kernel writes it, then the
    product; the same as the unfused path (the gate kernel, then the product) within rounding."""
    from radixc.ops.linear import sigmoid_gate
    from radixc.ops.triton.gemv import _unfused

    x, weight, _, _ = _case(rows, 320, 72, half_dtype, 90 + rows)
    gate = torch.randn(rows, 960, generator=torch.Generator().manual_seed(rows))[:, 320:640].to(half_dtype)
    expected = sigmoid_gate(x, gate).double() @ weight.double().T
    fusions = Fusions(input_gate=gate.to(device))
    got = small_batch_linear(x.to(device), weight.to(device), fusions=fusions)
    assert got.dtype == half_dtype
    _check(got, expected, half_dtype)
    _check(_unfused(x.to(device), weight.to(device), None, fusions), expected, half_dtype)


@pytest.mark.parametrize("rows", [1, 3, 20])
def test_residual_epilogue_adds_before_rounding(device, rows):
    x, weight, b, expected = _case(rows, 80, 48, torch.float32, 60 + rows, bias=True)
    residual = torch.randn(rows, 48, generator=torch.Generator().manual_seed(rows))
    got = small_batch_linear(
        x.to(device), weight.to(device), b.to(device), fusions=Fusions(residual=residual.to(device))
    )
    _check(got, expected + residual.double(), torch.float32)


def _fusion_case(kind: str, rows: int, device: str):
    """(x, weight, fusions, float64 expected) over K = 200, N = 45 for one kind of fusion."""
    gated = "gated" in kind
    x, weight, norm_weight, expected = _norm_case(rows, 200, 90 if gated else 45, torch.float32, 7, False)
    norm = RMSNormArgs(norm_weight.to(device), NORM_EPS, False) if "norm" in kind else None
    if norm is None:
        expected = x.double() @ weight.double().T
    residual = (
        torch.randn(expected.shape, generator=torch.Generator().manual_seed(8))
        if "residual" in kind
        else None
    )
    gate = None
    if "input_gate" in kind:  # rows further apart than K, as a slice of the qkv projection is
        gate = torch.randn(rows, 231, generator=torch.Generator().manual_seed(10))[:, :200]
        expected = (x.double() * torch.sigmoid(gate.double())) @ weight.double().T
    fusions = Fusions(
        norm=norm,
        residual=None if residual is None else residual.to(device),
        gated=gated,
        input_gate=None if gate is None else gate.to(device),
    )
    if residual is not None:
        expected = expected + residual.double()
    return x.to(device), weight.to(device), fusions, _silu_and_mul(expected) if gated else expected


KINDS = ["plain", "gated", "norm+gated", "residual", "input_gate"]
# one-row tiles (multiply-reduce) and tl.dot tiles whose float32 operands, gate and up, fit in shared memory
ONE_ROW = [LinearTiles(2, 128, 2, 2), LinearTiles(4, 2048, 4, 2)]
DOT = [LinearTiles(8, 64, 4, 3), LinearTiles(32, 128, 8, 2)]


@pytest.mark.parametrize(
    ("rows", "tiles"),
    [(1, t) for t in ONE_ROW] + [(rows, t) for rows in (2, 20) for t in DOT],
    ids=lambda v: f"n{v.block_n}-k{v.block_k}" if isinstance(v, LinearTiles) else str(v),
)
@pytest.mark.parametrize("kind", KINDS)
def test_any_tile_shape_gives_the_same_product(device, tiles, rows, kind):
    """K not a multiple of the K step and N not of the column block: the masked edges of every tile shape."""
    x, weight, fusions, expected = _fusion_case(kind, rows, device)
    _check(small_batch_linear(x, weight, tiles=tiles, fusions=fusions), expected, torch.float32)


# K = 200 cut into runs of whole K steps: uneven (split 2 of 64-steps: 128 + 72), and a run with no step at all
# (split 4 of 64-steps: 64 + 64 + 64 + 8), so a program of no keys still arrives
SPLIT_K = [LinearTiles(2, 64, 2, 2, 2), LinearTiles(4, 64, 2, 2, 4)]
SPLIT_K_DOT = [LinearTiles(16, 64, 4, 2, 2), LinearTiles(32, 32, 4, 2, 8)]


@pytest.mark.parametrize(
    ("rows", "tiles"),
    [(1, t) for t in SPLIT_K] + [(rows, t) for rows in (2, 20) for t in SPLIT_K_DOT],
    ids=lambda v: f"n{v.block_n}-k{v.block_k}-s{v.split_k}" if isinstance(v, LinearTiles) else str(v),
)
@pytest.mark.parametrize("kind", ["plain", "residual", "input_gate+residual", "norm"])
def test_split_k_tiles_sum_their_partials_in_the_last_program(device, tiles, rows, kind):
    from radixc.ops.triton import _utils

    x, weight, fusions, expected = _fusion_case(kind, rows, device)
    bias = torch.randn(45, generator=torch.Generator().manual_seed(9))
    for _ in range(2):  # the second launch finds the counters zeroed by the first
        got = small_batch_linear(x, weight, bias.to(device), tiles=tiles, fusions=fusions)
        _check(got, expected + bias.double(), torch.float32)
    assert not any(counters.any() for counters in _utils._arrival_counters.values())


def test_split_k_tiles_take_no_gate_and_are_candidates_above_one_row(device, monkeypatch):
    from radixc.ops.triton import gemv

    for kind in ("norm+gated", "gated"):
        x, weight, fusions, _ = _fusion_case(kind, 1, device)
        with pytest.raises(ValueError, match="split-K tiles take no gated weight"):
            small_batch_linear(x, weight, tiles=SPLIT_K[0], fusions=fusions)
    monkeypatch.delenv(gemv.SPLIT_K_ENV, raising=False)
    assert gemv.tuning_candidates(20, 1024, Fusions()) == gemv.DOT_TILES + gemv.SPLIT_K_TILES
    assert gemv.tuning_candidates(1, 8192, Fusions()) == gemv.ONE_ROW_TILES  # one row: measured slower
    assert gemv.tuning_candidates(20, 8192, GATED) == gemv.DOT_TILES
    norm = Fusions(norm=RMSNormArgs(torch.ones(8192), 1e-6, False))
    assert gemv.tuning_candidates(20, 8192, norm) == gemv.DOT_TILES + gemv.SPLIT_K_TILES
    monkeypatch.setenv(gemv.SPLIT_K_ENV, "0")
    assert gemv.tuning_candidates(20, 1024, Fusions()) == gemv.DOT_TILES
    monkeypatch.setenv(gemv.SPLIT_K_ENV, "yes")
    with pytest.raises(ValueError, match="RADIXC_GEMV_SPLIT_K must be 0 or 1, got 'yes'"):
        gemv.tuning_candidates(20, 1024, Fusions())
    monkeypatch.setenv(gemv.SPLIT_K_ENV, "1")
    # runs of K shorter than one step are not candidates: every split-K tile needs K >= 1,024
    assert gemv.tuning_candidates(20, 1023, Fusions()) == gemv.DOT_TILES


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("rows", [1, SMALL_BATCH_MAX_ROWS + 3])
def test_the_unfused_path_computes_what_the_kernel_does(device, kind, rows):
    """cuBLAS (addmm for a residual) between the norm or gate kernel and the activation kernel: what the op runs
    above its row limit, and where it was timed faster."""
    from radixc.ops.triton.gemv import cublas_linear

    x, weight, fusions, expected = _fusion_case(kind, rows, device)
    _check(cublas_linear(x, weight, None, fusions), expected, torch.float32)


@pytest.mark.parametrize(
    ("rows", "tiles"),
    [(1, ONE_ROW[0]), (1, SPLIT_K[1]), (20, DOT[0]), (20, SPLIT_K_DOT[1]), (SMALL_BATCH_MAX_ROWS + 3, None)],
    ids=["one-row", "one-row-split-k", "dot", "dot-split-k", "cublas"],
)
@pytest.mark.parametrize("kind", ["plain", "residual", "gated"])
def test_widened_output_is_the_rounded_product_widened(device, rows, tiles, kind):
    """out_dtype float32 over float16 inputs: exactly the float16 result cast up (the kernel rounds first)."""
    from radixc.ops.triton.gemv import cublas_linear

    if tiles is not None and tiles.split_k > 1 and kind == "gated":
        pytest.skip("split-K tiles take no gated weight")
    x, weight, fusions, _ = _fusion_case(kind, rows, device)
    residual = None if fusions.residual is None else fusions.residual.half()
    narrow = Fusions(residual=residual, gated=fusions.gated)
    wide = Fusions(residual=residual, gated=fusions.gated, out_dtype=torch.float32)
    x, weight = x.half(), weight.half()
    if tiles is None:
        got, expected = cublas_linear(x, weight, None, wide), cublas_linear(x, weight, None, narrow)
    else:
        got = small_batch_linear(x, weight, tiles=tiles, fusions=wide)
        expected = small_batch_linear(x, weight, tiles=tiles, fusions=narrow)
    assert got.dtype == torch.float32 and expected.dtype == torch.float16
    torch.testing.assert_close(got, expected.float(), atol=0, rtol=0)
    with pytest.raises(ValueError, match="out_dtype torch.float16 does not widen x's torch.float32"):
        small_batch_linear(x.float(), weight.float(), fusions=Fusions(out_dtype=torch.float16))


@pytest.mark.parametrize("zero_centered", [False, True], ids=["scaled", "zero-centered"])
@pytest.mark.parametrize("cols", [40, 1500])  # one block, and two with a masked tail
def test_norm_kernel_matches_the_reference(device, zero_centered, cols):
    from radixc.ops.norm import rms_norm_reference
    from radixc.ops.triton import rms_norm

    gen = torch.Generator().manual_seed(cols)
    x = torch.randn(3, cols + 5, generator=gen)[:, :cols]
    weight = torch.rand(cols, generator=gen) + 0.5
    for dtype, tolerance in ((torch.float32, 1e-5), (torch.float16, 2e-3)):
        got = rms_norm(x.to(device, dtype), weight.to(device, dtype), NORM_EPS, zero_centered)
        expected = rms_norm_reference(x.to(dtype), weight.to(dtype), NORM_EPS, zero_centered)
        torch.testing.assert_close(got.cpu(), expected, atol=tolerance * 4, rtol=tolerance)
    with pytest.raises(ValueError, match="norm weight must be \\[40\\], got \\[3\\]"):
        rms_norm(x[:, :40].to(device), weight[:3].to(device), NORM_EPS)


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
    with pytest.raises(
        ValueError, match="residual must be torch.float32 \\[2, 8\\], got torch.float32 \\[2, 4\\]"
    ):
        small_batch_linear(x, weight, fusions=Fusions(residual=x.new_ones(2, 4)))
    with pytest.raises(ValueError, match="norm weight must be \\[16\\], got \\[8\\]"):
        small_batch_linear(x, weight, fusions=Fusions(norm=RMSNormArgs(x.new_ones(8), 1e-6, False)))
    with pytest.raises(ValueError, match="gated weight has gate and up halves, got 7 rows"):
        small_batch_linear(x, weight[:7], fusions=GATED)
    with pytest.raises(ValueError, match="bias must be \\[8\\]"):
        small_batch_linear(x, weight, x.new_ones(4), fusions=GATED)  # the bias covers both halves
    with pytest.raises(ValueError, match="input_gate must be torch.float32 \\[2, 16\\] like x, got"):
        small_batch_linear(x, weight, fusions=Fusions(input_gate=x[:, :8]))
    with pytest.raises(
        ValueError, match="input_gate must be torch.float32 \\[2, 16\\] like x, got torch.float16"
    ):
        small_batch_linear(x, weight, fusions=Fusions(input_gate=x.half()))
    with pytest.raises(ValueError, match="an RMSNorm or an input gate of x, not both"):
        norm = RMSNormArgs(x.new_ones(16), 1e-6, False)
        small_batch_linear(x, weight, fusions=Fusions(norm=norm, input_gate=x))
    with pytest.raises(ValueError, match="input_gate must have a unit-stride last dim"):
        small_batch_linear(x, weight, fusions=Fusions(input_gate=x.new_ones(16, 2).T))


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
        _check(tuned_linear(x, weight, b, fusions=GATED), _silu_and_mul(expected), torch.float32)


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


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 20])
def test_a_compile_round_compiles_every_candidate_so_that_timing_compiles_nothing(rows):
    from radixc.ops.triton import gemv

    x, weight, _, expected = _case(rows, 384, 112, torch.bfloat16, 70 + rows)
    residual = torch.randn(rows, 112, generator=torch.Generator().manual_seed(rows))
    fusions = Fusions(residual=residual.to("cuda", torch.bfloat16))
    x, weight = x.cuda(), weight.cuda()
    kernels = gemv._small_batch_linear_kernel.device_caches[torch.cuda.current_device()][0]
    job = gemv.TuningJob(x, weight, None, fusions)
    gemv.compile_launches(gemv.warmup_launches([job]), x.device)
    compiled = len(kernels)
    for tiles in job.candidates:
        got = small_batch_linear(x, weight, tiles=tiles, fusions=fusions)
        _check(got, expected + residual.to(torch.bfloat16).double(), torch.bfloat16)
    assert len(kernels) == compiled


def test_a_shapes_first_tuning_compiles_its_row_class_every_smaller_one_and_the_norm_less_product():
    """Decode graphs warm up largest batch first: the first tuning of a shape (at 24 rows here) compiles for
    the 1-row and 2-16-row classes too, and, with a norm folded, for the product without it (the alternative
    it is timed against), all in one round."""
    from radixc.ops.triton import gemv

    x, weight, _, _ = _case(24, 64, 40, torch.float32, 80)
    residual = torch.randn(24, 40, generator=torch.Generator().manual_seed(81))
    norm = RMSNormArgs(torch.randn(64, generator=torch.Generator().manual_seed(82)), 1e-6, False)
    fusions = Fusions(norm=norm, residual=residual)
    jobs = gemv.tuning_group(x, weight, None, fusions)
    got = {(job.key[0], job.fusions.norm is not None): job for job in jobs}
    assert sorted(got) == [(c, n) for c in (1, 16, 32) for n in (False, True)]
    for (row_class, has_norm), job in got.items():
        assert job.x.shape[0] == {1: 1, 16: 2, 32: 24}[row_class]
        assert torch.equal(job.fusions.residual, residual[: job.x.shape[0]])
        expected = x[: job.x.shape[0]] if has_norm else gemv._normalized(x, norm)[: job.x.shape[0]]
        assert torch.equal(job.x, expected)
    assert [job.key[0] for job in gemv.tuning_group(x[:16], weight, None, Fusions())] == [1, 16]
    assert [job.key[0] for job in gemv.tuning_group(x[:1], weight, None, Fusions())] == [1]


@pytest.mark.gpu
def test_tuning_from_the_largest_batch_down_compiles_nothing_after_the_first_round(monkeypatch, tmp_path):
    """After the first tuning (32 rows, norm folded), every smaller batch size, its tuning and the norm-less
    alternative's launch kernels already compiled: the row count is no specialisation of the kernel."""
    from radixc.ops.triton import gemv, tuning_cache

    monkeypatch.setattr(tuning_cache, "cache_dir", lambda: str(tmp_path))
    monkeypatch.setattr(gemv, "_fastest", {})
    monkeypatch.setattr(gemv, "_compiles", {})
    monkeypatch.setattr(gemv, "_stored", tuning_cache.TuningCache("small_batch_linear"))
    x, weight, _, _ = _case(32, 320, 72, torch.bfloat16, 83)
    norm = RMSNormArgs(torch.randn(320, generator=torch.Generator().manual_seed(84)).cuda(), 1e-6, False)
    x, weight = x.cuda(), weight.cuda()
    kernels = gemv._small_batch_linear_kernel.device_caches[torch.cuda.current_device()][0]
    tuned_linear(x, weight, fusions=Fusions(norm=norm))
    compiled = len(kernels)
    for rows in (24, 17, 16, 8, 2, 1):
        expected = (gemv._normalized(x[:rows], norm).double() @ weight.double().T).cpu()
        _check(tuned_linear(x[:rows], weight, fusions=Fusions(norm=norm)), expected, torch.bfloat16)
        _check(gemv._unfused(x[:rows], weight, None, Fusions(norm=norm)), expected, torch.bfloat16)
    assert len(kernels) == compiled


def test_gathered_tuning_gathers_each_new_shape_once_and_compiles_them_all_in_one_round_on_exit(
    monkeypatch, tmp_path
):
    """`gathered_tuning`'s bookkeeping, without a GPU (the device calls stubbed, the compile recorded): within
    it a new shape gets no tiles (the caller runs the unfused path) and its group is gathered; on exit one
    round gets every job of every group once, less those compiled before, its buffers made on this thread and
    its compile on the tuner's compile thread, which `wait_for_compiles` waits for; a nested one and an error
    inside compile nothing."""
    import threading

    from radixc.ops.triton import gemv, tuning_cache

    monkeypatch.setattr(tuning_cache, "cache_dir", lambda: str(tmp_path))
    monkeypatch.setattr(gemv, "_fastest", {})
    monkeypatch.setattr(gemv, "_compiles", {})
    monkeypatch.setattr(gemv, "_compile_threads", {})
    monkeypatch.setattr(gemv, "_stored", tuning_cache.TuningCache("small_batch_linear"))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "test device")
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    rounds, compiles, release = [], [], threading.Event()

    def warmup_launches(jobs):
        rounds.append(([job.key for job in jobs], threading.current_thread().name))
        return [len(rounds)]

    def compile_launches(launches, device):
        release.wait(timeout=60)
        compiles.append((launches, threading.current_thread().name))

    monkeypatch.setattr(gemv, "warmup_launches", warmup_launches)
    monkeypatch.setattr(gemv, "compile_launches", compile_launches)
    gen = torch.Generator().manual_seed(88)
    x, weight, _, _ = _case(24, 64, 40, torch.float32, 89)
    hidden, down = torch.randn(24, 40, generator=gen), torch.randn(24, 40, generator=gen)
    norm = RMSNormArgs(torch.randn(64, generator=gen), 1e-6, False)
    compiled_before = gemv.tuning_key(hidden[:1], down, None)
    gemv._compiles[compiled_before] = done = gemv.Future()
    done.set_result(None)
    with gemv.gathered_tuning():
        for _ in range(2):  # a second step meets the same shapes
            assert gemv.tuned_tiles(x, weight, None, Fusions(norm=norm)) is None
            with gemv.gathered_tuning():
                assert gemv.tuned_tiles(hidden, down, None, Fusions()) is None
        assert rounds == []
    groups = gemv.tuning_group(x, weight, None, Fusions(norm=norm))
    groups += gemv.tuning_group(hidden, down, None, Fusions())
    expected = {job.key for job in groups} - {compiled_before}
    assert len(rounds) == 1 and len(rounds[0][0]) == len(expected) and set(rounds[0][0]) == expected
    assert rounds[0][1] == threading.current_thread().name
    assert expected <= set(gemv._compiles) and not gemv._fastest
    assert not gemv._compiles[next(iter(expected))].done()  # compiling in the background
    release.set()
    gemv.wait_for_compiles(groups)
    assert len(compiles) == 1 and compiles[0][0] == [1] and compiles[0][1].startswith("radixc-gemv-compile")
    gemv.wait_for_compiles(groups)  # nothing compiles twice
    assert len(rounds) == 1 and len(compiles) == 1
    with pytest.raises(RuntimeError, match="step failed"), gemv.gathered_tuning():
        gemv.tuned_tiles(x[:1], weight, None, Fusions())
        raise RuntimeError("step failed")
    assert len(rounds) == 1


def test_an_error_of_a_background_compile_round_is_raised_where_its_shapes_are_waited_for(monkeypatch):
    from radixc.ops.triton import gemv

    monkeypatch.setattr(gemv, "_compiles", {})
    monkeypatch.setattr(gemv, "_compile_threads", {})
    monkeypatch.setattr(gemv, "warmup_launches", lambda jobs: ["launch"] * len(jobs))

    def compile_launches(launches, device):
        raise RuntimeError("ptxas failed")

    monkeypatch.setattr(gemv, "compile_launches", compile_launches)
    x, weight, _, _ = _case(1, 64, 40, torch.float32, 90)
    jobs = gemv.tuning_group(x, weight, None, Fusions())
    gemv.compile_round(jobs, background=True)
    with pytest.raises(RuntimeError, match="ptxas failed"):
        gemv.wait_for_compiles(jobs)


@pytest.mark.gpu
def test_gathered_tuning_runs_new_shapes_unfused_then_compiles_all_of_them_in_one_round(
    monkeypatch, tmp_path
):
    """Under `gathered_tuning` two new shapes (one with a folded norm) give the unfused results and compile
    nothing of the fused kernel; on exit every candidate of both, in every smaller row class, is compiled, so
    that tuning them afterwards (as the CUDA-graph warm-up runs do) compiles nothing more."""
    from radixc.ops.triton import gemv, tuning_cache

    monkeypatch.setattr(tuning_cache, "cache_dir", lambda: str(tmp_path))
    monkeypatch.setattr(gemv, "_fastest", {})
    monkeypatch.setattr(gemv, "_compiles", {})
    monkeypatch.setattr(gemv, "_stored", tuning_cache.TuningCache("small_batch_linear"))
    x, weight, _, _ = _case(24, 448, 96, torch.bfloat16, 85)
    _, down, _, _ = _case(24, 96, 56, torch.bfloat16, 86)
    norm = RMSNormArgs(torch.randn(448, generator=torch.Generator().manual_seed(87)).cuda(), 1e-6, False)
    x, weight, down = x.cuda(), weight.cuda(), down.cuda()
    kernels = gemv._small_batch_linear_kernel.device_caches[torch.cuda.current_device()][0]
    compiled = len(kernels)
    expected = (gemv._normalized(x, norm).double() @ weight.double().T).cpu()
    with gemv.gathered_tuning():
        hidden = tuned_linear(x, weight, fusions=Fusions(norm=norm))
        _check(hidden, expected, torch.bfloat16)
        down_expected = (hidden.double() @ down.double().T).cpu()
        _check(tuned_linear(hidden, down), down_expected, torch.bfloat16)
        assert len(kernels) == compiled and not gemv._fastest
    groups = gemv.tuning_group(x, weight, None, Fusions(norm=norm)) + gemv.tuning_group(
        hidden, down, None, Fusions()
    )
    assert {job.key for job in groups} <= set(gemv._compiles)
    gemv.wait_for_compiles(groups)  # the round compiled on the tuner's compile thread
    compiled = len(kernels)
    for rows in (24, 9, 1):
        _check(tuned_linear(x[:rows], weight, fusions=Fusions(norm=norm)), expected[:rows], torch.bfloat16)
        _check(tuned_linear(hidden[:rows], down), down_expected[:rows], torch.bfloat16)
    assert len(kernels) == compiled


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


@pytest.mark.parametrize("cols", [5, 1500])  # within one block, and across two with a masked tail
def test_gate_kernel_is_x_times_sigmoid_gate_rounded_once(device, cols):
    from radixc.ops.linear import sigmoid_gate as twin
    from radixc.ops.triton import sigmoid_gate

    gen = torch.Generator().manual_seed(cols)
    x = torch.randn(3, cols, generator=gen)
    gate = torch.randn(3, 2 * cols + 1, generator=gen)[:, cols : 2 * cols]  # rows further apart than N
    expected = x.double() * torch.sigmoid(gate.double())
    _check(sigmoid_gate(x.to(device), gate.to(device)), expected, torch.float32)
    half = sigmoid_gate(x.to(device, torch.bfloat16), gate.to(device, torch.bfloat16))
    torch.testing.assert_close(half.cpu(), twin(x.bfloat16(), gate.bfloat16()), atol=0, rtol=1e-2)
    with pytest.raises(ValueError, match="a gate of its shape and dtype, got torch.float32 \\[3, 5\\]"):
        sigmoid_gate(x[:, :5].to(device), gate[:, :4].to(device))


def test_activation_kernel_rejects_an_odd_width(device):
    from radixc.ops.triton import silu_and_mul

    with pytest.raises(ValueError, match="expected gate_up \\[M, 2N\\], got \\[2, 5\\]"):
        silu_and_mul(torch.randn(2, 5, device=device))


def test_gated_op_above_the_row_limit_is_cublas_then_the_activation(device):
    x, weight, b, expected = _case(SMALL_BATCH_MAX_ROWS + 3, 48, 2 * 20, torch.float32, 9, bias=True)
    got = torch.ops.radixc.silu_mul_linear(x.to(device), weight.to(device), b.to(device))
    _check(got, _silu_and_mul(expected), torch.float32)


def test_the_l2_prefetch_is_off_unless_asked_and_only_where_kernels_launch_with_pdl(monkeypatch):
    from radixc.ops.triton import gemv

    x = torch.randn(1, 64)
    monkeypatch.delenv(gemv.L2_PREFETCH_ENV, raising=False)
    assert not gemv.l2_prefetch_enabled()
    monkeypatch.setenv(gemv.L2_PREFETCH_ENV, "1")
    assert gemv.l2_prefetch_enabled()
    assert gemv.tile_options(x, ONE_ROW[0], None)["PREFETCH_L2"] is False  # no PDL on the CPU
    monkeypatch.setattr(gemv, "pdl_launch", lambda device: {"USE_PDL": True, "launch_pdl": True})
    assert gemv.tile_options(x, ONE_ROW[0], None)["PREFETCH_L2"] is True
    monkeypatch.setenv(gemv.L2_PREFETCH_ENV, "0")
    assert gemv.tile_options(x, ONE_ROW[0], None)["PREFETCH_L2"] is False
    monkeypatch.undo()  # the CPU again, where a bad setting is still an error
    monkeypatch.setenv(gemv.L2_PREFETCH_ENV, "on")
    with pytest.raises(ValueError, match="RADIXC_GEMV_L2_PREFETCH must be 0 or 1, got 'on'"):
        gemv.tile_options(x, ONE_ROW[0], None)


@pytest.mark.gpu
@pytest.mark.parametrize(
    ("rows", "tiles"),
    [(1, ONE_ROW[1]), (20, DOT[1]), (20, SPLIT_K_DOT[0]), (20, SPLIT_K_DOT[1])],  # the last: a split past K
    ids=lambda v: f"n{v.block_n}-k{v.block_k}-s{v.split_k}" if isinstance(v, LinearTiles) else str(v),
)
@pytest.mark.parametrize("kind", ["norm+gated", "residual", "input_gate"])
def test_the_l2_prefetch_changes_no_bit_of_the_product(monkeypatch, tiles, rows, kind):
    """The weight rows prefetched into L2 before the PDL wait are a hint: the same bits as without, on a device
    that launches with PDL (elsewhere there is nothing to prefetch before)."""
    from radixc.ops.pdl import pdl_enabled
    from radixc.ops.triton import gemv

    if not pdl_enabled(torch.device("cuda")):
        pytest.skip("PDL needs a Hopper or later GPU")
    if tiles.split_k > 1 and "gated" in kind:
        pytest.skip("split-K tiles take no gated weight")
    x, weight, fusions, expected = _fusion_case(kind, rows, "cuda")
    monkeypatch.setenv(gemv.L2_PREFETCH_ENV, "0")
    plain = small_batch_linear(x, weight, tiles=tiles, fusions=fusions)
    monkeypatch.setenv(gemv.L2_PREFETCH_ENV, "1")
    prefetched = small_batch_linear(x, weight, tiles=tiles, fusions=fusions)
    assert torch.equal(plain, prefetched)
    _check(prefetched, expected, torch.float32)
