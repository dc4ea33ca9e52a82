"""Causal depthwise conv1d with a carried conv state (Gated DeltaNet's short convolution), prefill and decode.

conv_state [S, C, K-1] holds each request's last K-1 inputs, oldest first. Twins:
radixc.ops.native.gdn.causal_conv1d_extend / causal_conv1d_decode.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixc.ops.triton._utils import (
    check_last_dim_contiguous,
    lens_block,
    let_next_kernel_start,
    pdl_launch,
    pow2_block,
    ragged_block_of,
    ragged_grid_size,
    wait_for_previous_kernel,
)

# the carried state must fit in one BLOCK_T tile of the extend kernel, whose first block alone reads it
_MAX_KERNEL_SIZE = 33


def conv_weight_2d(func: str, weight: torch.Tensor, channels: int) -> torch.Tensor:
    """Depthwise conv weight as contiguous [C, K] (2 <= K <= 33), accepting nn.Conv1d's [C, 1, K]."""
    if weight.dim() == 3 and weight.shape[1] == 1:
        weight = weight.squeeze(1)
    if weight.dim() != 2 or weight.shape[0] != channels or not 2 <= weight.shape[1] <= _MAX_KERNEL_SIZE:
        raise ValueError(
            f"{func}: expected weight [C={channels}, K] or [C, 1, K] with 2 <= K <= {_MAX_KERNEL_SIZE}, "
            f"got {list(weight.shape)}"
        )
    return weight.contiguous()


def _check_activation(func: str, activation: str | None) -> None:
    if activation not in (None, "silu"):
        raise ValueError(f"{func}: activation must be None or 'silu', got {activation!r}")


@triton.jit(do_not_specialize=["num_reqs"])  # one compile for every batch's request count
def _conv1d_extend_kernel(
    X,  # [T, C]
    Weight,  # [C, K] contiguous
    ConvState,  # [S, C, K-1]
    GdnSlots,  # [B]
    StartLoc,  # [B]
    ExtendLens,  # [B]
    HasInitialState,  # [B] bool (or any int: nonzero = true)
    Out,  # [T, C]
    stride_xt,
    stride_ss,
    stride_sc,
    stride_ot,
    num_channels,
    num_reqs,
    KERNEL_SIZE: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HIST: tl.constexpr,
    SILU: tl.constexpr,
    BLOCK_B: tl.constexpr,
):
    b, t_block = ragged_block_of(tl.program_id(0), ExtendLens, num_reqs, BLOCK_T, BLOCK_B, True)
    if b >= num_reqs:
        return
    start = tl.load(StartLoc + b).to(tl.int64)
    length = tl.load(ExtendLens + b).to(tl.int64)
    state = ConvState + tl.load(GdnSlots + b).to(tl.int64) * stride_ss
    # how many trailing state entries are real inputs: K-1 with an initial state, none without
    num_hist = (tl.load(HasInitialState + b) != 0).to(tl.int32) * (KERNEL_SIZE - 1)

    offs_t = t_block * BLOCK_T + tl.arange(0, BLOCK_T)
    t_mask = offs_t < length
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < num_channels

    acc = tl.zeros([BLOCK_T, BLOCK_C], tl.float32)
    for j in tl.static_range(KERNEL_SIZE):
        # tap j of output row t reads input t + j - (K-1); negative rows come from the carried state
        src = offs_t + j - (KERNEL_SIZE - 1)
        x = tl.load(
            X + (start + src)[:, None] * stride_xt + offs_c[None, :],
            mask=(t_mask & (src >= 0))[:, None] & c_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        hist = tl.load(
            state + offs_c[None, :] * stride_sc + (src + KERNEL_SIZE - 1)[:, None],
            mask=(t_mask & (src < 0) & (src >= -num_hist))[:, None] & c_mask[None, :],
            other=0.0,
        ).to(tl.float32)
        w = tl.load(Weight + offs_c * KERNEL_SIZE + j, mask=c_mask, other=0.0).to(tl.float32)
        acc += (x + hist) * w[None, :]
    if SILU:
        acc = acc * tl.sigmoid(acc)
    tl.store(
        Out + (start + offs_t)[:, None] * stride_ot + offs_c[None, :],
        acc.to(Out.dtype.element_ty),
        mask=t_mask[:, None] & c_mask[None, :],
    )

    # The request's first block alone reads the old state, so it alone writes the new one: the last K-1
    # inputs of (old state ++ new tokens).
    if t_block == 0:
        offs_h = tl.arange(0, BLOCK_HIST)
        h_mask = offs_h < KERNEL_SIZE - 1
        # position of each kept input relative to the request's first new token
        tail = length - (KERNEL_SIZE - 1) + offs_h
        x_tail = tl.load(
            X + (start + tail)[None, :] * stride_xt + offs_c[:, None],
            mask=c_mask[:, None] & (h_mask & (tail >= 0))[None, :],
            other=0.0,
        )
        kept = tl.load(
            state + offs_c[:, None] * stride_sc + (tail + KERNEL_SIZE - 1)[None, :],
            mask=c_mask[:, None] & (h_mask & (tail < 0) & (tail >= -num_hist))[None, :],
            other=0.0,
        )
        new_state = x_tail.to(ConvState.dtype.element_ty) + kept
        # every thread must have read the old state before any overwrites it
        tl.debug_barrier()
        tl.store(
            state + offs_c[:, None] * stride_sc + offs_h[None, :],
            new_state,
            mask=c_mask[:, None] & h_mask[None, :],
        )


@triton.jit
def conv_decode_step(
    X,  # one token's row of inputs
    Weight,  # [C, K] contiguous
    State,  # one request's [C, K-1] history
    offs_c,
    c_mask,
    stride_sc,
    KERNEL_SIZE: tl.constexpr,
    BLOCK_HIST: tl.constexpr,
    SILU: tl.constexpr,
    WAIT_FOR_X: tl.constexpr = False,
):
    """(y, x) for channels offs_c of one token: y = the conv over the history and x (+ SiLU), float32; x as
    loaded, for `shift_conv_state`. WAIT_FOR_X (a kernel launched under PDL): the wait for the kernel before
    comes after the history and weight loads, just before x's (only this layer's kernels of earlier steps write
    the history, so it streams during that kernel's tail)."""
    offs_h = tl.arange(0, BLOCK_HIST)
    mask = c_mask[:, None] & (offs_h < KERNEL_SIZE - 1)[None, :]
    hist = tl.load(State + offs_c[:, None] * stride_sc + offs_h[None, :], mask=mask, other=0.0)
    w_hist = tl.load(Weight + offs_c[:, None] * KERNEL_SIZE + offs_h[None, :], mask=mask, other=0.0)
    w_last = tl.load(Weight + offs_c * KERNEL_SIZE + KERNEL_SIZE - 1, mask=c_mask, other=0.0)
    wait_for_previous_kernel(WAIT_FOR_X)
    x = tl.load(X + offs_c, mask=c_mask, other=0.0)
    y = tl.sum(hist.to(tl.float32) * w_hist.to(tl.float32), 1) + x.to(tl.float32) * w_last.to(tl.float32)
    if SILU:
        y = y * tl.sigmoid(y)
    return y, x


@triton.jit
def shift_conv_state(
    State, x, offs_c, c_mask, stride_sc, KERNEL_SIZE: tl.constexpr, BLOCK_HIST: tl.constexpr
):
    """Shift channels offs_c of one request's history left by one and append x (all reads before any write)."""
    offs_h = tl.arange(0, BLOCK_HIST)
    state = State + offs_c[:, None] * stride_sc + offs_h[None, :]
    shifted = tl.load(state + 1, mask=c_mask[:, None] & (offs_h < KERNEL_SIZE - 2)[None, :], other=0.0)
    new_state = tl.where(offs_h[None, :] == KERNEL_SIZE - 2, x.to(State.dtype.element_ty)[:, None], shifted)
    tl.debug_barrier()
    tl.store(state, new_state, mask=c_mask[:, None] & (offs_h < KERNEL_SIZE - 1)[None, :])


@triton.jit
def _conv1d_decode_kernel(
    X,  # [B, C]
    Weight,  # [C, K] contiguous
    ConvState,  # [S, C, K-1]
    GdnSlots,  # [B]
    Out,  # [B, C]
    stride_xb,
    stride_ss,
    stride_sc,
    stride_ob,
    num_channels,
    KERNEL_SIZE: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_HIST: tl.constexpr,
    SILU: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    c_mask = offs_c < num_channels
    state = ConvState + tl.load(GdnSlots + b).to(tl.int64) * stride_ss  # the slots: the step's inputs
    y, x = conv_decode_step(
        X + b * stride_xb, Weight, state, offs_c, c_mask, stride_sc, KERNEL_SIZE, BLOCK_HIST, SILU, USE_PDL
    )
    tl.store(Out + b * stride_ob + offs_c, y.to(Out.dtype.element_ty), mask=c_mask)
    let_next_kernel_start(USE_PDL)
    shift_conv_state(state, x, offs_c, c_mask, stride_sc, KERNEL_SIZE, BLOCK_HIST)


def causal_conv1d_extend(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_state: torch.Tensor,
    gdn_slots: torch.Tensor,
    extend_start_loc: torch.Tensor,
    extend_seq_lens: torch.Tensor,
    has_initial_state: torch.Tensor,
    *,
    activation: str | None = "silu",
) -> torch.Tensor:
    """Causal depthwise conv1d over packed requests, continuing each request's conv state (updated in place).

    x [T, C], weight [C, K] or [C, 1, K], conv_state [S, C, K-1]; returns [T, C] in x.dtype.
    """
    func = "causal_conv1d_extend"
    _check_activation(func, activation)
    check_last_dim_contiguous(func, x=x, conv_state=conv_state)
    num_tokens, channels = x.shape
    weight = conv_weight_2d(func, weight, channels)
    kernel_size = weight.shape[1]
    out = torch.zeros_like(
        x
    )  # rows of no request (a captured step's padding) stay zero, like the native twin's
    num_reqs = gdn_slots.shape[0]
    if num_reqs == 0:
        return out
    block_t, block_c = _MAX_KERNEL_SIZE - 1, 64
    # empty requests get a block too: a request without initial state still has its state reset
    grid = (
        ragged_grid_size(num_tokens, num_reqs, block_t, at_least_one=True),
        triton.cdiv(channels, block_c),
    )
    _conv1d_extend_kernel[grid](
        x,
        weight,
        conv_state,
        gdn_slots,
        extend_start_loc,
        extend_seq_lens,
        has_initial_state,
        out,
        x.stride(0),
        conv_state.stride(0),
        conv_state.stride(1),
        out.stride(0),
        channels,
        num_reqs,
        KERNEL_SIZE=kernel_size,
        BLOCK_T=block_t,
        BLOCK_C=block_c,
        BLOCK_HIST=pow2_block(kernel_size - 1, minimum=1),
        SILU=activation == "silu",
        BLOCK_B=lens_block(num_reqs),
        num_warps=4,
    )
    return out


def causal_conv1d_decode(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_state: torch.Tensor,
    gdn_slots: torch.Tensor,
    *,
    activation: str | None = "silu",
) -> torch.Tensor:
    """One conv1d step per request: x [B, C]; shifts x into conv_state [S, C, K-1]; returns [B, C] in x.dtype."""
    func = "causal_conv1d_decode"
    _check_activation(func, activation)
    check_last_dim_contiguous(func, x=x, conv_state=conv_state)
    batch, channels = x.shape
    weight = conv_weight_2d(func, weight, channels)
    kernel_size = weight.shape[1]
    out = torch.empty_like(x)
    if batch == 0:
        return out
    block_c = 128
    _conv1d_decode_kernel[(batch, triton.cdiv(channels, block_c))](
        x,
        weight,
        conv_state,
        gdn_slots,
        out,
        x.stride(0),
        conv_state.stride(0),
        conv_state.stride(1),
        out.stride(0),
        channels,
        KERNEL_SIZE=kernel_size,
        BLOCK_C=block_c,
        BLOCK_HIST=pow2_block(kernel_size - 1, minimum=1),
        SILU=activation == "silu",
        num_warps=4,
        **pdl_launch(x.device),
    )
    return out
