"""y = x W^T (+ bias) for the few rows of a decode batch: a weight-streaming GEMV/skinny-GEMM kernel.

At decode a linear layer reads its whole weight to produce a handful of rows, so it is bound by memory, and what
matters is keeping every SM streaming weight bytes. cuBLAS's choice for some of these shapes leaves most of the
bandwidth unused (on an H200, 12.7 us for `[1, 2048] x [2048, 1024]`, 4 MB); for others it is as good as a
kernel gets. Here each program owns BLOCK_N output columns for all M rows and walks K once, so every weight byte
is read once: a broadcast multiply-reduce for one row, tl.dot with the rows padded to 16 for more. What the
graph computes around the product folds in (`Fusions`): an RMSNorm of x (x scaled by the norm weight goes into
the product and its squares into each row's sum in the same pass over K; the product is scaled by the row's
1/rms at the end, so the norm costs no pass of its own; exact, but x is not rounded where the unfused norm rounds
it) or x times sigmoid(input gate) (a gated attention's output gate, applied as x is loaded), a residual added in
the epilogue, and, gated, silu(gate) * up (a program owns the matching gate and up columns of a gate-up weight),
so none costs a kernel of its own. Split-K tiles (`LinearTiles.split_k`) cut K into runs for more programs where
K is long and the columns few: each program stores a float32 partial, and the last of a column block to arrive
(an atomic counter, released after a barrier, the partials read back from L2) sums them and runs the epilogue, so
the reduction costs no kernel either; they are tuning candidates for more than one row (at one row they made
llama-1b's step slower on an H200), unless `RADIXC_GEMV_SPLIT_K=0`. `tuned_linear` times this kernel's candidate
tiles against the unfused path (cuBLAS, and a kernel per fusion) once per shape and row class on the device and
keeps the fastest; the row count is not a specialisation of the kernel (one compile serves a row class), and a
shape's smaller row classes compile with its first, so a cold start compiles in one round per shape. With
`RADIXC_GEMV_L2_PREFETCH=1` a program launched with PDL prefetches its weight rows into L2 before its wait.
Twin: `cublas_linear` (radixc.ops.norm.rms_norm_reference, F.linear / torch.addmm, radixc.ops.linear.silu_and_mul,
radixc.ops.linear.sigmoid_gate).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.runtime.errors import OutOfResources

from radixc.ops.linear import SMALL_BATCH_MAX_ROWS as MAX_ROWS
from radixc.ops.linear import sigmoid_gate, silu_and_mul
from radixc.ops.norm import rms_norm_reference
from radixc.ops.triton._utils import (
    arrival_counters,
    check_last_dim_contiguous,
    dot_precision,
    env_switch,
    let_next_kernel_start,
    pdl_launch,
    prefetch_to_l2,
    wait_for_previous_kernel,
)
from radixc.ops.triton.activation import sigmoid_gate as triton_sigmoid_gate
from radixc.ops.triton.activation import silu_and_mul as triton_silu_and_mul
from radixc.ops.triton.norm import check_norm_weight
from radixc.ops.triton.norm import rms_norm as triton_rms_norm
from radixc.ops.triton.tuning_cache import TuningCache

logger = logging.getLogger("radixc.ops")


@dataclasses.dataclass(frozen=True)
class LinearTiles:
    """Launch shape: output columns per program, K per step, warps and pipeline stages."""

    block_n: int
    block_k: int
    num_warps: int
    num_stages: int
    split_k: int = 1


@triton.jit
def _partial_product(x, w, USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """x `[BLOCK_M, BLOCK_K]` times w `[BLOCK_N, BLOCK_K]`^T in float32: tl.dot, or a multiply-reduce for one row."""
    if USE_DOT:
        return tl.dot(x, tl.trans(w), input_precision=DOT_PRECISION)
    return tl.sum(x.to(tl.float32)[:, None, :] * w.to(tl.float32)[None, :, :], axis=2)


@triton.jit
def weight_pass(
    X,  # [M, K]
    W,  # [*, K]
    NormWeight,  # [K] (read when HAS_NORM)
    InputGate,  # [M, K] (read when HAS_INPUT_GATE)
    rows,  # [BLOCK_N] weight rows of the first product
    paired_rows,  # [BLOCK_N] weight rows of the second product (read when PAIRED)
    offs_m,
    m_mask,
    n_mask,
    k_begin,
    k_end,
    stride_xm,
    stride_wn,
    stride_gm,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_NORM: tl.constexpr,
    NORM_ZERO_CENTERED: tl.constexpr,
    HAS_INPUT_GATE: tl.constexpr,
    PAIRED: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One walk over K in [k_begin, k_end): x times the weight rows `rows` (and `paired_rows`) in float32, with
    x scaled by the norm weight when HAS_NORM, or by sigmoid(input gate) when HAS_INPUT_GATE (in float32, rounded
    to x's dtype as the unfused graph writes it); returns (product, paired product, each row's sum of squares of
    x). Every load comes after the caller's PDL wait: the first weight tiles loaded before it (a peeled first K
    step) made llama-1b's step 3% slower on an H200."""
    x_rows = X + offs_m.to(tl.int64)[:, None] * stride_xm
    gate_rows = InputGate + offs_m.to(tl.int64)[:, None] * stride_gm
    w_rows = W + rows.to(tl.int64)[:, None] * stride_wn
    w_paired_rows = W + paired_rows.to(tl.int64)[:, None] * stride_wn
    squares = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    paired = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k_start in range(k_begin, k_end, BLOCK_K):
        offs_k = k_start + tl.arange(0, BLOCK_K)
        k_mask = offs_k < k_end
        w_mask = n_mask[:, None] & k_mask[None, :]
        x_mask = m_mask[:, None] & k_mask[None, :]
        x = tl.load(x_rows + offs_k[None, :], mask=x_mask, other=0.0)
        if HAS_INPUT_GATE:
            gate = tl.load(gate_rows + offs_k[None, :], mask=x_mask, other=0.0).to(tl.float32)
            x = (x.to(tl.float32) * tl.sigmoid(gate)).to(X.dtype.element_ty)
        if HAS_NORM:
            # one pass: x scaled by the norm weight goes into the product, its squares into the row's sum
            x = x.to(tl.float32)
            squares += tl.sum(x * x, 1)
            norm_weight = tl.load(NormWeight + offs_k, mask=k_mask, other=0.0).to(tl.float32)[None, :]
            if NORM_ZERO_CENTERED:
                norm_weight += 1.0
            x = x * norm_weight
            if USE_DOT:
                x = x.to(X.dtype.element_ty)
        w = tl.load(w_rows + offs_k[None, :], mask=w_mask, other=0.0)
        acc += _partial_product(x, w, USE_DOT, DOT_PRECISION)
        if PAIRED:
            w_paired = tl.load(w_paired_rows + offs_k[None, :], mask=w_mask, other=0.0)
            paired += _partial_product(x, w_paired, USE_DOT, DOT_PRECISION)
    return acc, paired, squares


@triton.jit
def prefetch_weight_rows(
    W,
    first_row,
    num_rows,
    stride_wn,
    k_begin,
    k_end,
    BLOCK_N: tl.constexpr,
    WHOLE_ROWS: tl.constexpr,
    ENABLED: tl.constexpr,
):
    """Where ENABLED: the weight rows [first_row, first_row + num_rows), K in [k_begin, k_end), brought into L2
    before the PDL wait (a weight is no kernel's output): one request when the program walks whole rows (its
    bytes are one run), else one per row."""
    if ENABLED:
        itemsize = W.dtype.element_ty.primitive_bitwidth // 8
        if WHOLE_ROWS:
            span = (num_rows - 1) * stride_wn + k_end
            prefetch_to_l2(W + first_row.to(tl.int64) * stride_wn, span * itemsize)
        elif k_end > k_begin:  # a split past K's end walks nothing
            for r in tl.static_range(BLOCK_N):
                if r < num_rows:
                    row = W + (first_row + r).to(tl.int64) * stride_wn + k_begin
                    prefetch_to_l2(row, (k_end - k_begin) * itemsize)


# one kernel for every row count of a row class: no compile per batch size
@triton.jit(do_not_specialize=["M"])
def _small_batch_linear_kernel(
    X,  # [M, K]
    W,  # [N, K], or [2N, K] (gate rows, then up rows) when GATED
    Bias,  # [N] or [2N] (read when HAS_BIAS)
    Residual,  # [M, N] added to the product (read when HAS_RESIDUAL)
    NormWeight,  # [K]: x is RMS-normalised with it first (read when HAS_NORM)
    InputGate,  # [M, K]: x is multiplied by its sigmoid first (read when HAS_INPUT_GATE)
    Out,  # [M, N]
    Partials,  # float32 [SPLIT_K, M, N], then (HAS_NORM) [column blocks, SPLIT_K, M] (used when SPLIT_K > 1)
    Arrivals,  # [>= cdiv(N, BLOCK_N)] int32, zero between launches (used when SPLIT_K > 1)
    M,
    N,
    K,
    stride_xm,
    stride_wn,
    stride_rm,
    stride_gm,
    stride_om,
    norm_eps,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_NORM: tl.constexpr,
    NORM_ZERO_CENTERED: tl.constexpr,
    HAS_INPUT_GATE: tl.constexpr,
    GATED: tl.constexpr,
    SPLIT_K: tl.constexpr,
    USE_DOT: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    USE_PDL: tl.constexpr,
    PREFETCH_L2: tl.constexpr,
):
    pid_n = tl.program_id(0)
    if SPLIT_K == 1:
        k_begin, k_end = 0, K
    else:
        # program (n, s) walks the s-th of SPLIT_K runs of K, each a whole number of BLOCK_K steps
        k_per_split = tl.cdiv(tl.cdiv(K, SPLIT_K), BLOCK_K) * BLOCK_K
        k_begin = tl.program_id(1) * k_per_split
        k_end = tl.minimum(k_begin + k_per_split, K)
    block_rows = tl.minimum(N - pid_n * BLOCK_N, BLOCK_N)
    prefetch_weight_rows(
        W, pid_n * BLOCK_N, block_rows, stride_wn, k_begin, k_end, BLOCK_N, SPLIT_K == 1, PREFETCH_L2
    )
    if GATED:  # the up rows
        prefetch_weight_rows(
            W, pid_n * BLOCK_N + N, block_rows, stride_wn, k_begin, k_end, BLOCK_N, SPLIT_K == 1, PREFETCH_L2
        )
    wait_for_previous_kernel(USE_PDL)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    out_mask = m_mask[:, None] & n_mask[None, :]
    if HAS_RESIDUAL:
        # loaded before the weight loop so that its latency hides behind it
        residual_rows = Residual + offs_m.to(tl.int64)[:, None] * stride_rm + offs_n[None, :]
        residual = tl.load(residual_rows, mask=out_mask, other=0.0).to(tl.float32)
    acc, up, squares = weight_pass(
        X,
        W,
        NormWeight,
        InputGate,
        offs_n,
        offs_n + N,  # the up rows of a gate-up weight
        offs_m,
        m_mask,
        n_mask,
        k_begin,
        k_end,
        stride_xm,
        stride_wn,
        stride_gm,
        BLOCK_M,
        BLOCK_N,
        BLOCK_K,
        HAS_NORM,
        NORM_ZERO_CENTERED,
        HAS_INPUT_GATE,
        GATED,
        USE_DOT,
        DOT_PRECISION,
    )
    let_next_kernel_start(USE_PDL)
    is_last = True
    if SPLIT_K > 1:
        # "the last program reduces": each program of a column block stores its float32 partial, and the one
        # that arrives last (counted atomically) sums them and finishes the block; the others are done
        # with a norm, each run's sums of squares too (the rows' 1/rms scales the summed product at the end)
        partials = Partials + offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
        split_squares = Partials + SPLIT_K * M * N + pid_n * SPLIT_K * M + offs_m
        tl.store(partials + tl.program_id(1).to(tl.int64) * M * N, acc, mask=out_mask)
        if HAS_NORM:
            tl.store(split_squares + tl.program_id(1) * M, squares, mask=m_mask)
        tl.debug_barrier()  # all of the program's stores come before its arrival is released
        arrived = tl.atomic_add(Arrivals + pid_n, 1, sem="acq_rel", scope="gpu")
        is_last = arrived == SPLIT_K - 1
        if is_last:
            acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
            squares = tl.zeros([BLOCK_M], dtype=tl.float32)
            for split in range(SPLIT_K):
                # from L2 (.cg): this SM's L1 may hold another launch's partials
                part = tl.load(partials + split * M * N, mask=out_mask, other=0.0, cache_modifier=".cg")
                acc += part
                if HAS_NORM:
                    squares += tl.load(
                        split_squares + split * M, mask=m_mask, other=0.0, cache_modifier=".cg"
                    )
            tl.atomic_xchg(Arrivals + pid_n, 0)  # zero again for the next launch
    if is_last:
        _finish(
            acc,
            up,
            squares,
            residual if HAS_RESIDUAL else acc,
            Bias,
            X,
            Out,
            offs_m,
            offs_n,
            n_mask,
            out_mask,
            N,
            K,
            stride_om,
            norm_eps,
            HAS_BIAS,
            HAS_RESIDUAL,
            HAS_NORM,
            GATED,
        )


@triton.jit
def _finish(
    acc,
    up,
    squares,
    residual,
    Bias,
    X,
    Out,
    offs_m,
    offs_n,
    n_mask,
    out_mask,
    N,
    K,
    stride_om,
    norm_eps,
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_NORM: tl.constexpr,
    GATED: tl.constexpr,
):
    """The GEMV's epilogue: the norm's 1/rms, bias, residual and activation applied to the float32 product, then
    the rows rounded to x's dtype (the product's) and written in Out's (the same, or wider)."""
    if HAS_NORM:
        rstd = tl.rsqrt(squares / K + norm_eps)[:, None]
        acc *= rstd
        up *= rstd
    if HAS_BIAS:
        acc += tl.load(Bias + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if GATED:
            up += tl.load(Bias + N + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_RESIDUAL:
        acc += residual  # before rounding, as addmm adds its input matrix
    if GATED:
        # rounded where the unfused graph rounds: gate and up leave their linear layer in the output dtype,
        # SiLU is computed in float32 and rounded before the product
        dtype = X.dtype.element_ty
        gate = acc.to(dtype).to(tl.float32)
        acc = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32) * up.to(dtype).to(tl.float32)
    out = Out + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(X.dtype.element_ty).to(Out.dtype.element_ty), mask=out_mask)


# Candidate tiles, from sweeps on an H200 over the linear shapes of llama-1b and qwen3.5-0.8b (the fastest tile of
# every shape is among them): for one row, narrow column blocks with K steps of 512 (short K) or 2048 (long K: the
# loop's plain loads are not pipelined, so only a long step keeps enough bytes in flight); 16-64 columns for tl.dot.
ONE_ROW_TILES = tuple(
    LinearTiles(n, k, w, s)
    for n, k, w, s in (
        (2, 512, 2, 2),
        (4, 512, 2, 4),
        (8, 512, 2, 2),
        (2, 2048, 2, 2),
        (2, 2048, 4, 2),
        (4, 2048, 4, 2),
    )
)
DOT_TILES = tuple(
    LinearTiles(n, k, 4, s) for n, k, s in ((16, 256, 4), (32, 256, 4), (64, 128, 3), (64, 256, 4))
)


# Split-K candidates for 2-32 rows (K cut into 4 or 8 runs, the programs of a column block summing their partials
# in the last one to finish): more programs streaming weight bytes where K is long and the columns few (down_proj:
# K = 8,192), in place of cuBLAS's split-K GEMM, its reduction kernel and the residual's copy. Timed on an H200
# (llama-1b, overlapped decode step): batch 32 1.523-1.550 ms against 1.568-1.582 without. One-row split-K tiles
# made batch 1 slower there (0.996-0.999 against 0.968-0.970 ms), so one row has none.
SPLIT_K_ENV = "RADIXC_GEMV_SPLIT_K"
SPLIT_K_TILES = tuple(
    LinearTiles(n, k, 4, stages, split)
    for n, k, stages, split in ((32, 256, 4, 4), (64, 256, 4, 4), (64, 128, 3, 8))
)


def candidate_tiles(rows: int) -> tuple[LinearTiles, ...]:
    return ONE_ROW_TILES if rows == 1 else DOT_TILES


def split_k_enabled() -> bool:
    """Whether the tuner also times split-K tiles: `RADIXC_GEMV_SPLIT_K` unset or `1` (the default), not `0`."""
    return env_switch(SPLIT_K_ENV, True)


# Each program's weight rows prefetched into L2 (one bulk request) before its PDL wait, so that they stream in
# while the kernel before drains: a GEMV of a few MB spends ~2.5 us of its 4.7 us (llama-1b's o_proj at one row,
# an H200) ramping up and draining rather than streaming. Off unless `RADIXC_GEMV_L2_PREFETCH=1`: not yet timed on
# a GPU (weight tiles loaded into registers before the wait made llama-1b's step 3% slower there). Not part of
# the tuning key: the tuner times each kernel alone after an L2 flush, where no kernel before it drains.
L2_PREFETCH_ENV = "RADIXC_GEMV_L2_PREFETCH"


def l2_prefetch_enabled() -> bool:
    """Whether the GEMV kernels launched with PDL prefetch their weight rows into L2 before its wait."""
    return env_switch(L2_PREFETCH_ENV, False)


def tuning_candidates(rows: int, in_features: int, fusions: Fusions) -> tuple[LinearTiles, ...]:
    """The tiles the tuner times for a shape: `candidate_tiles`, and for more than one row, where enabled, the
    split-K tiles whose runs of K are at least a step long (not gated: the activation would need both halves'
    partials)."""
    tiles = candidate_tiles(rows)
    if rows == 1 or not split_k_enabled() or fusions.gated:
        return tiles
    return tiles + tuple(t for t in SPLIT_K_TILES if in_features >= t.split_k * t.block_k)


def linear_tiles(rows: int) -> LinearTiles:
    """Untuned tiles for `rows` rows (the first candidate): what runs where nothing was timed (the CPU)."""
    return candidate_tiles(rows)[0]


class RMSNormArgs(NamedTuple):
    """An RMSNorm of x folded into the GEMV's prologue (radixc.ops.norm.rms_norm_reference's arguments)."""

    weight: torch.Tensor
    eps: float
    zero_centered: bool


@dataclasses.dataclass(frozen=True)
class Fusions:
    """What the GEMV computes around x W^T (+ bias): an RMSNorm of x, or x times sigmoid(input_gate) `[M, K]`
    (a gated attention's output gate), before it; then a residual added (before rounding, as addmm adds), then
    silu(gate) * up of the product's halves when gated; the result rounded to x's dtype, then written widened to
    out_dtype when given (the LM head's float32 logits: the cast's kernel gone, its values the same)."""

    norm: RMSNormArgs | None = None
    residual: torch.Tensor | None = None
    gated: bool = False
    out_dtype: torch.dtype | None = None
    input_gate: torch.Tensor | None = None

    def key(self) -> tuple:
        """The fusions' part of a tuning key: which are folded in, the norm's form and the output dtype."""
        norm_form = None if self.norm is None else self.norm.zero_centered
        return (norm_form, self.residual is not None, self.gated, self.out_dtype, self.input_gate is not None)

    def leading_rows(self, rows: int) -> Fusions:
        """The same fusions for the first `rows` rows of x."""
        sliced = {name: getattr(self, name) for name in ("residual", "input_gate")}
        return dataclasses.replace(self, **{k: None if v is None else v[:rows] for k, v in sliced.items()})

    def output(self, x: torch.Tensor, cols: int) -> torch.Tensor:
        """The product's output buffer for x's rows."""
        return torch.empty(x.shape[0], cols, dtype=self.out_dtype or x.dtype, device=x.device)


NO_FUSIONS = Fusions()


def _check(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fusions: Fusions) -> int:
    """Validate the inputs of the fused product; returns its output columns."""
    op = "small_batch_linear"
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{op}: expected x [M, K] and weight [N, K], got {list(x.shape)} and {list(weight.shape)}"
        )
    rows, weight_rows = x.shape[0], weight.shape[0]
    if fusions.gated and weight_rows % 2:
        raise ValueError(f"{op}: a gated weight has gate and up halves, got {weight_rows} rows")
    if bias is not None and tuple(bias.shape) != (weight_rows,):
        raise ValueError(f"{op}: bias must be [{weight_rows}], got {list(bias.shape)}")
    cols = weight_rows // 2 if fusions.gated else weight_rows
    residual = fusions.residual
    if residual is not None and (tuple(residual.shape) != (rows, cols) or residual.dtype != x.dtype):
        raise ValueError(
            f"{op}: residual must be {x.dtype} [{rows}, {cols}], got {residual.dtype} {list(residual.shape)}"
        )
    if fusions.norm is not None:
        check_norm_weight(op, x, fusions.norm.weight)
    gate = fusions.input_gate
    if gate is not None:
        if tuple(gate.shape) != tuple(x.shape) or gate.dtype != x.dtype:
            raise ValueError(
                f"{op}: input_gate must be {x.dtype} {list(x.shape)} like x, got {gate.dtype} {list(gate.shape)}"
            )
        if fusions.norm is not None:
            raise ValueError(f"{op}: takes an RMSNorm or an input gate of x, not both")
        check_last_dim_contiguous(op, input_gate=gate)
    if fusions.out_dtype is not None and (
        not fusions.out_dtype.is_floating_point or fusions.out_dtype.itemsize < x.dtype.itemsize
    ):
        raise ValueError(f"{op}: out_dtype {fusions.out_dtype} does not widen x's {x.dtype}")
    check_last_dim_contiguous(op, x=x, weight=weight, **({} if residual is None else {"residual": residual}))
    return cols


def small_batch_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    tiles: LinearTiles | None = None,
    fusions: Fusions = NO_FUSIONS,
) -> torch.Tensor:
    """x `[M, K]` @ weight `[N, K]`^T (+ bias `[N]`) for M <= MAX_ROWS, accumulated in float32, with `fusions`:
    x RMS-normalised first, a residual `[M, N]` added, or (gated) weight and bias holding a gate half and an up
    half (`[2N, K]`) and the result silu(gate) * up `[M, N]` (`silu_and_mul` of the plain product)."""
    cols = _check(x, weight, bias, fusions)
    rows = x.shape[0]
    if rows > MAX_ROWS:
        raise ValueError(f"small_batch_linear: {rows} rows, more than the {MAX_ROWS} it serves")
    out = fusions.output(x, cols)
    if rows == 0:
        return out
    grid, args, options = _launch(x, weight, bias, out, tiles or linear_tiles(rows), fusions)
    _small_batch_linear_kernel[grid](*args, **options)
    return out


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    tiles: LinearTiles,
    fusions: Fusions,
) -> tuple[tuple[int], tuple, dict]:
    """(grid, arguments, constexprs and launch options) of the kernel computing `out`."""
    rows, cols = out.shape
    norm, residual, gate = fusions.norm, fusions.residual, fusions.input_gate
    column_blocks = triton.cdiv(cols, tiles.block_n)
    if tiles.split_k > 1:
        if fusions.gated:
            raise ValueError("small_batch_linear: split-K tiles take no gated weight")
        squares = 0 if norm is None else column_blocks * tiles.split_k * rows
        partials = torch.empty(tiles.split_k * rows * cols + squares, dtype=torch.float32, device=x.device)
        arrivals = arrival_counters(x.device, column_blocks, "small_batch_linear")
    else:
        partials = arrivals = out
    args = (
        x,
        weight,
        weight if bias is None else bias,
        out if residual is None else residual,
        weight if norm is None else norm.weight,
        x if gate is None else gate,
        out,
        partials,
        arrivals,
        rows,
        cols,
        x.shape[1],
        x.stride(0),
        weight.stride(0),
        out.stride(0) if residual is None else residual.stride(0),
        x.stride(0) if gate is None else gate.stride(0),
        out.stride(0),
        0.0 if norm is None else norm.eps,
    )
    options = dict(
        **tile_options(x, tiles, norm),
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
        HAS_INPUT_GATE=gate is not None,
        GATED=fusions.gated,
        SPLIT_K=tiles.split_k,
    )
    return (column_blocks, tiles.split_k), args, options


def tile_options(x: torch.Tensor, tiles: LinearTiles, norm: RMSNormArgs | None) -> dict:
    """The constexprs and launch options every kernel built on `weight_pass` takes for x's rows: the tiles, the
    row block (one row: the multiply-reduce path; more: tl.dot over rows padded to 16 or a power of two), the
    norm, PDL and the weights' L2 prefetch before its wait (`l2_prefetch_enabled`)."""
    rows = x.shape[0]
    use_dot = rows > 1
    pdl = pdl_launch(x.device)
    return dict(
        BLOCK_M=max(16, triton.next_power_of_2(rows)) if use_dot else 1,
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        HAS_NORM=norm is not None,
        NORM_ZERO_CENTERED=norm is not None and norm.zero_centered,
        USE_DOT=use_dot,
        DOT_PRECISION=dot_precision(x.dtype),
        num_warps=tiles.num_warps,
        num_stages=tiles.num_stages,
        PREFETCH_L2=l2_prefetch_enabled() and pdl["USE_PDL"],  # the setting checked wherever it runs
        **pdl,
    )


@dataclasses.dataclass(frozen=True)
class TuningJob:
    """One tuning key's inputs: x and the fusions at a row count of its class, and the candidate tiles."""

    x: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None
    fusions: Fusions

    @property
    def key(self) -> tuple:
        return tuning_key(self.x, self.weight, self.bias, self.fusions)

    @property
    def candidates(self) -> tuple[LinearTiles, ...]:
        return tuning_candidates(self.x.shape[0], self.x.shape[1], self.fusions)


def warmup_launches(jobs: Sequence[TuningJob]) -> list[tuple[tuple[int, int], tuple, dict]]:
    """The launch (grid, arguments, options) of every candidate tile of every job, its buffers allocated here, on
    the calling thread: a compile on another thread then touches no device memory."""
    launches = []
    for job in jobs:
        cols = _check(job.x, job.weight, job.bias, job.fusions)
        out = job.fusions.output(job.x, cols)
        launches += [
            _launch(job.x, job.weight, job.bias, out, tiles, job.fusions) for tiles in job.candidates
        ]
    return launches


def compile_launches(launches: Sequence[tuple[tuple[int, int], tuple, dict]], device: torch.device) -> None:
    """Compile the kernels of `launches` at once, in threads (Triton's compiler does much of its work outside the
    GIL), without launching them, so that a cold start waits for about one round of compiles per shape, not one
    per candidate. CUDA only (the interpreter compiles nothing)."""
    if not launches:
        return
    workers = min(len(launches), os.cpu_count() or 1)
    with (
        torch.cuda.device(device),
        ThreadPoolExecutor(workers) as executor,
        triton.AsyncCompileMode(executor),
    ):
        for grid, args, options in launches:
            _small_batch_linear_kernel.warmup(*args, grid=grid, **options)


def row_class(rows: int) -> int:
    """The row class of a row count (1, 2-16 or 17-32 rows): one kernel each, its rows padded to 1, 16 or 32."""
    return 1 if rows == 1 else 16 if rows <= 16 else 32


def tuning_group(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fusions: Fusions
) -> list[TuningJob]:
    """The `TuningJob`s that tuning this shape leads to, for `compile_round` in one round: x's row class and every
    smaller one (decode graphs are warmed up largest batch first, so the smaller classes come next), each with
    x's leading rows, and with a prologue also without it (the unfused alternative, the prologue's kernel then
    the plain product, is tuned too: `prologue_unfused`)."""
    variants = [(x, fusions)]
    unfused = prologue_unfused(x, fusions)
    if unfused is not None:
        variants.append(unfused)
    jobs = []
    for fewest in (1, 2, 17):  # the fewest rows of each row class
        if row_class(fewest) > row_class(x.shape[0]):
            break
        rows = x.shape[0] if row_class(fewest) == row_class(x.shape[0]) else fewest
        jobs += [TuningJob(vx[:rows], weight, bias, variant.leading_rows(rows)) for vx, variant in variants]
    return jobs


@dataclasses.dataclass
class TuningStats:
    """What the tuner cost this process: shapes timed, seconds of its compile rounds (wherever they ran), of them
    the seconds the tuning waited for (a compile round in the background overlaps other start-up work), and
    seconds timing (a cold start's share; a warm one takes stored choices and spends none)."""

    shapes: int = 0
    compile_seconds: float = 0.0
    compile_wait_seconds: float = 0.0
    timing_seconds: float = 0.0


tuning_stats = TuningStats()
_stats_lock = threading.Lock()  # background compile rounds add their seconds too


# tuning_key -> the fastest tiles, or None where the unfused path (cuBLAS) is faster
_fastest: dict[tuple, LinearTiles | None] = {}
# tuning key -> the compile of its candidates (`compile_round`): done, or running on the tuner's compile thread
_compiles: dict[tuple, Future] = {}
# device -> the thread that compiles `gathered_tuning`'s rounds in the background, its CUDA device set once when
# it starts (then it makes no device call: it may run while the engine's thread captures a CUDA graph)
_compile_threads: dict[torch.device, ThreadPoolExecutor] = {}
# the same choices on disk, for the next process on this kind of device: tiles as a list, or "cublas"
_stored = TuningCache("small_batch_linear")
# tuning key -> its `tuning_group`, gathered by `gathered_tuning` instead of compiled at once; None outside it
_gathered: dict[tuple, list[TuningJob]] | None = None


@contextlib.contextmanager
def gathered_tuning() -> Iterator[None]:
    """Run a step under this to compile the tuning candidates of every shape it meets in one round: within it, a
    shape with no choice yet runs unfused and its `tuning_group` is gathered; on a clean exit all of them start
    compiling at once, in the background (`compile_round`), and the first tuning of each shape waits for its
    compile. A cold start then waits for one round of compiles, not one per shape in the order the graph meets
    them, and less where other work (the next graph's compile, the warm-up runs of shapes already compiled)
    runs meanwhile."""
    global _gathered
    if _gathered is not None:  # nested: the outer one compiles
        yield
        return
    gathered = _gathered = {}
    try:
        yield
    finally:
        _gathered = None
    compile_round([job for group in gathered.values() for job in group], background=True)


def compile_round(jobs: Sequence[TuningJob], background: bool) -> None:
    """Compile the candidates of the jobs whose keys have no compile yet, each key once, in one round
    (`compile_launches`): here, or on the device's compile thread (`background`; the launches' buffers are
    allocated here first); an error of a background round is raised where its keys are waited for
    (`wait_for_compiles`)."""
    new = {job.key: job for job in jobs if job.key not in _compiles}
    if not new:
        return
    launches = warmup_launches(list(new.values()))
    device = next(iter(new.values())).x.device

    def compile_all() -> None:
        started = time.perf_counter()
        compile_launches(launches, device)
        with _stats_lock:
            tuning_stats.compile_seconds += time.perf_counter() - started

    if background:
        future = _compile_thread(device).submit(compile_all)
    else:
        compile_all()
        future = Future()
        future.set_result(None)
    _compiles.update(dict.fromkeys(new, future))


def _compile_thread(device: torch.device) -> ThreadPoolExecutor:
    if device not in _compile_threads:
        initializer = torch.cuda.set_device if device.type == "cuda" else None
        _compile_threads[device] = ThreadPoolExecutor(
            1, thread_name_prefix="radixc-gemv-compile", initializer=initializer, initargs=(device,)
        )
    return _compile_threads[device]


def wait_for_compiles(jobs: Sequence[TuningJob]) -> None:
    """Return once the candidates of every job are compiled: compiled now where no round has them, else waited
    for; the waiting goes to `tuning_stats`."""
    started = time.perf_counter()
    compile_round(jobs, background=False)
    for future in {_compiles[job.key] for job in jobs}:
        future.result()
    with _stats_lock:
        tuning_stats.compile_wait_seconds += time.perf_counter() - started


def tuning_key(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fusions: Fusions = NO_FUSIONS
) -> tuple:
    """What a tuned choice holds for: the `row_class`, the weight's shape, dtype, bias or not, the fusions, whether split-K tiles are candidates, and
    device. Classes rather than row counts keep the tuning to three per shape when an uncaptured decode meets
    every batch size."""
    return (
        row_class(x.shape[0]),
        *weight.shape,
        x.dtype,
        bias is not None,
        *fusions.key(),
        split_k_enabled(),
        x.device,
    )


def fastest(candidates: dict[LinearTiles | None, Callable[[], float]]) -> LinearTiles | None:
    """The candidate (None: the unfused path) whose timing function returns the least time."""
    return min(candidates, key=lambda tiles: candidates[tiles]())


def _normalized(x: torch.Tensor, norm: RMSNormArgs) -> torch.Tensor:
    if x.is_cuda:
        return triton_rms_norm(x, norm.weight, norm.eps, norm.zero_centered)
    return rms_norm_reference(x, norm.weight, norm.eps, norm.zero_centered)


def _gated(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return triton_sigmoid_gate(x, gate) if x.is_cuda else sigmoid_gate(x, gate)


def prologue_unfused(x: torch.Tensor, fusions: Fusions) -> tuple[torch.Tensor, Fusions] | None:
    """(x, fusions) of the product without its prologue, the norm or the input gate applied to x by a kernel of
    its own first; None when the fusions have no prologue."""
    if fusions.norm is not None:
        return _normalized(x, fusions.norm), dataclasses.replace(fusions, norm=None)
    if fusions.input_gate is not None:
        return _gated(x, fusions.input_gate), dataclasses.replace(fusions, input_gate=None)
    return None


def cublas_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fusions: Fusions = NO_FUSIONS
) -> torch.Tensor:
    """What `small_batch_linear` computes, with cuBLAS for the product (a residual as addmm's input) and one
    kernel for each other fusion: the norm or the input gate before, the activation and the widening cast after."""
    if fusions.norm is not None:
        x = _normalized(x, fusions.norm)
    if fusions.input_gate is not None:
        x = _gated(x, fusions.input_gate)
    residual = fusions.residual
    if residual is not None and bias is None:
        product = torch.addmm(residual, x, weight.t())
    else:
        product = F.linear(x, weight, bias)
        if residual is not None:
            product = product + residual
    if fusions.gated:
        product = triton_silu_and_mul(product) if product.is_cuda else silu_and_mul(product)
    return product if fusions.out_dtype is None else product.to(fusions.out_dtype)


def _unfused(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fusions: Fusions
) -> torch.Tensor:
    """The alternative to the fused tiles: with a prologue (norm or input gate), its kernel then the product tuned
    without it; otherwise cuBLAS (`cublas_linear`)."""
    unfused = prologue_unfused(x, fusions)
    if unfused is None:
        return cublas_linear(x, weight, bias, fusions)
    return tuned_linear(unfused[0], weight, bias, unfused[1])


def tuned_linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, fusions: Fusions = NO_FUSIONS
) -> torch.Tensor:
    """`small_batch_linear` with the tiles, or the unfused path (cuBLAS, after the norm kernel when there is a
    norm), that ran fastest for this shape on this device (`tuned_tiles`). Off CUDA the untuned tiles run."""
    if not x.is_cuda:
        return small_batch_linear(x, weight, bias, fusions=fusions)
    tiles = tuned_tiles(x, weight, bias, fusions)
    if tiles is None:
        return _unfused(x, weight, bias, fusions)
    return small_batch_linear(x, weight, bias, tiles, fusions)


def tuned_tiles(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fusions: Fusions
) -> LinearTiles | None:
    """The tiles that ran fastest for this CUDA shape, or None where the unfused path did.

    The first call of a shape compiles the candidates of its row class, of every smaller class and of the
    prologue-less alternative at once (`tuning_group`, `wait_for_compiles`), then times its own
    (`time_in_graph`): the CUDA-graph warm-up calls do this before any capture (after a run under
    `gathered_tuning` has started the compile of every shape's candidates in one round, which they wait for;
    within that run a new shape runs unfused). The choice is stored on
    disk (`TuningCache`), so that later processes on this kind of device take it without timing. A shape first
    seen while a stream captures cannot be timed and runs unfused."""
    key = tuning_key(x, weight, bias, fusions)
    if key not in _fastest:
        stored_key = ":".join(map(str, key[:-1]))  # every field but the device, whose kind names the file
        device_kind = torch.cuda.get_device_name(x.device)
        stored = _stored.get(device_kind, stored_key)
        if stored is not None:
            _fastest[key] = None if stored == "cublas" else LinearTiles(*stored)
        elif torch.cuda.is_current_stream_capturing():
            logger.warning(
                "small_batch_linear: %s first seen during CUDA-graph capture; it runs unfused", key
            )
            return None
        elif _gathered is not None:
            if key not in _gathered:
                _gathered[key] = tuning_group(x, weight, bias, fusions)
            return None
        else:
            wait_for_compiles(tuning_group(x, weight, bias, fusions))
            unfused = prologue_unfused(x, fusions)
            if unfused is not None:  # the unfused alternative's product, tuned first (its own stats)
                tuned_tiles(unfused[0], weight, bias, unfused[1])
            started = time.perf_counter()
            tiles = _fastest[key] = fastest(_timers(x, weight, bias, fusions))
            _stored.put(device_kind, stored_key, "cublas" if tiles is None else dataclasses.astuple(tiles))
            tuning_stats.shapes += 1
            tuning_stats.timing_seconds += time.perf_counter() - started
        logger.debug("small_batch_linear %s: %s", key, _fastest[key] or "unfused")
    return _fastest[key]


def time_or_inf(measure: Callable[[], float]) -> float:
    """measure(), or infinity for a tile this device cannot run (float32 doubles a tile's shared memory)."""
    try:
        return measure()
    except OutOfResources:
        return math.inf


def _timers(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, fusions: Fusions) -> dict:
    flush = torch.empty(
        2 * torch.cuda.get_device_properties(x.device).L2_cache_size, dtype=torch.int8, device=x.device
    )

    def timer(fn: Callable[[], object]) -> Callable[[], float]:
        return lambda: time_or_inf(lambda: time_in_graph(fn, flush))

    timers = {None: timer(lambda: _unfused(x, weight, bias, fusions))}
    for tiles in tuning_candidates(x.shape[0], x.shape[1], fusions):
        timers[tiles] = timer(lambda tiles=tiles: small_batch_linear(x, weight, bias, tiles, fusions))
    return timers


def graph_replay_ms(calls: Sequence[Callable[[], object]], replays: int = 5) -> float:
    """Median milliseconds of one replay of a CUDA graph that runs `calls` in order (captured here; their kernels
    must be compiled already)."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    times = []
    for _ in range(replays):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[replays // 2]


def time_in_graph(fn: Callable[[], object], flush: torch.Tensor, calls: int = 8) -> float:
    """Milliseconds of one call of fn replayed from a CUDA graph, as a decode step runs it: no launch overhead
    (which would hide a few-microsecond kernel when timed from the host) and L2 flushed before each call (the
    step finds its weights in HBM), the flushes' own time subtracted."""
    fn()  # compile and pick kernels outside the capture
    torch.cuda.synchronize()
    with_fn = graph_replay_ms([lambda: (flush.zero_(), fn())] * calls)
    return (with_fn - graph_replay_ms([flush.zero_] * calls)) / calls
