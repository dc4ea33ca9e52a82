"""A Gated DeltaNet layer's decode step in one kernel: conv1d + SiLU, gates, the delta rule, gated RMSNorm.

Unfused, a GDN layer's decode step is three launches after its input projection: the conv kernel
(radixc.ops.triton.causal_conv1d), the recurrent step (radixc.ops.triton.gdn_recurrent) and Inductor's kernel
for the gated RMSNorm norm(o) * silu(z) before out_proj. Here one program owns a request's k head and the v heads
that read it: it steps the conv of their q, k and v channels (so no other program reads the conv history it shifts),
then each v head's whole [Dk, Dv] state, and normalises that head's output in registers, which needs the whole
head in one program. Twins: the native conv, recurrent step and radixc.models.layers.GatedRMSNorm in sequence.
"""

from __future__ import annotations

import dataclasses

import torch
import triton
import triton.language as tl

from radixc.ops.gdn_decode import MAX_STATE_TILE, fits_gdn_decode_step
from radixc.ops.triton._utils import (
    L2NORM_EPS,
    check_last_dim_contiguous,
    l2_normalize,
    let_next_kernel_start,
    pdl_launch,
    pow2_block,
    wait_for_previous_kernel,
)
from radixc.ops.triton.causal_conv1d import conv_decode_step, conv_weight_2d, shift_conv_state
from radixc.ops.triton.gdn_recurrent import delta_rule_update, gdn_gates


@dataclasses.dataclass(frozen=True)
class GatedNormArgs:
    """The gated RMSNorm applied to the step's output: norm(o) * weight * silu(gate), per v head; gate
    `[B, Hv * Dv]`, weight `[Dv]` (scaled by 1 + weight when zero_centered)."""

    gate: torch.Tensor
    weight: torch.Tensor
    eps: float
    zero_centered: bool


@triton.jit
def _gdn_decode_kernel(
    X,  # [B, C] mixed_qkv: [q heads | k heads | v heads]
    ConvWeight,  # [C, KERNEL_SIZE] contiguous
    ConvState,  # [S, C, KERNEL_SIZE - 1]
    A,  # [B, Hv]
    Beta,  # [B, Hv] (the projection b)
    ALog,  # [Hv]
    DtBias,  # [Hv]
    SsmState,  # [S, Hv, Dk, Dv] float32
    GdnSlots,  # [B]
    Gate,  # [B, Hv * Dv] (read when NORM)
    NormWeight,  # [Dv] (read when NORM)
    Out,  # [B, Hv * Dv]
    stride_xb,
    stride_cs,
    stride_cc,
    stride_ab,
    stride_betab,
    stride_ss,
    stride_sh,
    stride_sk,
    stride_gb,
    stride_ob,
    scale,
    l2_eps,
    norm_eps,
    NUM_K_HEADS: tl.constexpr,
    GROUP: tl.constexpr,
    K_DIM: tl.constexpr,
    V_DIM: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
    KERNEL_SIZE: tl.constexpr,
    BLOCK_HIST: tl.constexpr,
    USE_L2NORM: tl.constexpr,
    NORM: tl.constexpr,
    ZERO_CENTERED: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    wait_for_previous_kernel(USE_PDL)
    b = tl.program_id(0).to(tl.int64)
    k_head = tl.program_id(1)
    slot = tl.load(GdnSlots + b).to(tl.int64)
    x_row = X + b * stride_xb
    conv_state = ConvState + slot * stride_cs
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.arange(0, BLOCK_V)
    k_mask = offs_k < K_DIM
    v_mask = offs_v < V_DIM
    q_channels = k_head * K_DIM + offs_k
    k_channels = NUM_K_HEADS * K_DIM + q_channels
    q, q_in = conv_decode_step(
        x_row, ConvWeight, conv_state, q_channels, k_mask, stride_cc, KERNEL_SIZE, BLOCK_HIST, True
    )
    k, k_in = conv_decode_step(
        x_row, ConvWeight, conv_state, k_channels, k_mask, stride_cc, KERNEL_SIZE, BLOCK_HIST, True
    )
    # q, k as [1, BLOCK_K] rows so the tile helpers apply
    q, k = q[None, :], k[None, :]
    if USE_L2NORM:
        q, k = l2_normalize(q, l2_eps), l2_normalize(k, l2_eps)
    q = tl.reshape(q * scale, [BLOCK_K])
    k = tl.reshape(k, [BLOCK_K])

    state_mask = k_mask[:, None] & v_mask[None, :]
    for i in tl.static_range(GROUP):
        v_head = k_head * GROUP + i
        v_channels = 2 * NUM_K_HEADS * K_DIM + v_head * V_DIM + offs_v
        state_ptrs = (
            SsmState + slot * stride_ss + v_head * stride_sh + offs_k[:, None] * stride_sk + offs_v[None, :]
        )
        state = tl.load(state_ptrs, mask=state_mask, other=0.0)
        v, v_in = conv_decode_step(
            x_row, ConvWeight, conv_state, v_channels, v_mask, stride_cc, KERNEL_SIZE, BLOCK_HIST, True
        )
        a = tl.load(A + b * stride_ab + v_head).to(tl.float32)
        beta = tl.load(Beta + b * stride_betab + v_head).to(tl.float32)
        if NORM:
            gate = tl.load(Gate + b * stride_gb + v_head * V_DIM + offs_v, mask=v_mask, other=0.0)
            weight = tl.load(NormWeight + offs_v, mask=v_mask, other=0.0).to(tl.float32)
        if i == 0:
            # after the first state tile's load is issued: the shifts' barriers would hold it back
            shift_conv_state(conv_state, q_in, q_channels, k_mask, stride_cc, KERNEL_SIZE, BLOCK_HIST)
            shift_conv_state(conv_state, k_in, k_channels, k_mask, stride_cc, KERNEL_SIZE, BLOCK_HIST)
        if i == GROUP - 1:
            let_next_kernel_start(USE_PDL)
        shift_conv_state(conv_state, v_in, v_channels, v_mask, stride_cc, KERNEL_SIZE, BLOCK_HIST)
        g, beta = gdn_gates(a, beta, ALog, DtBias, v_head)
        state, out = delta_rule_update(state, q, k, v, g, beta)
        tl.store(state_ptrs, state, mask=state_mask)
        if NORM:
            out = out * tl.rsqrt(tl.sum(out * out, 0) / V_DIM + norm_eps)
            if ZERO_CENTERED:
                weight = weight + 1.0
            gate = gate.to(tl.float32)
            out = out * weight * gate * tl.sigmoid(gate)
        tl.store(Out + b * stride_ob + v_head * V_DIM + offs_v, out.to(Out.dtype.element_ty), mask=v_mask)


def _check_shapes(
    mixed_qkv, a, b, A_log, dt_bias, ssm_state, num_k_heads, num_v_heads, head_k_dim, head_v_dim
) -> None:
    func = "gdn_decode_step"
    batch = mixed_qkv.shape[0]
    channels = 2 * num_k_heads * head_k_dim + num_v_heads * head_v_dim
    if num_k_heads <= 0 or num_v_heads % num_k_heads:
        raise ValueError(f"{func}: {num_v_heads} v heads are not a multiple of {num_k_heads} k heads")
    if not fits_gdn_decode_step(head_k_dim, head_v_dim):
        raise ValueError(
            f"{func}: a [{head_k_dim}, {head_v_dim}] state per v head is more than one program holds "
            f"({MAX_STATE_TILE} elements); run the conv and recurrent kernels apart"
        )
    expected = {
        "mixed_qkv": (mixed_qkv, (batch, channels)),
        "a": (a, (batch, num_v_heads)),
        "b": (b, (batch, num_v_heads)),
        "A_log": (A_log, (num_v_heads,)),
        "dt_bias": (dt_bias, (num_v_heads,)),
    }
    for name, (tensor, shape) in expected.items():
        if tuple(tensor.shape) != shape:
            raise ValueError(f"{func}: expected {name} {list(shape)}, got {list(tensor.shape)}")
    if ssm_state.dtype != torch.float32 or tuple(ssm_state.shape[1:]) != (
        num_v_heads,
        head_k_dim,
        head_v_dim,
    ):
        raise ValueError(
            f"{func}: expected ssm_state float32 [S, {num_v_heads}, {head_k_dim}, {head_v_dim}], "
            f"got {list(ssm_state.shape)} {ssm_state.dtype}"
        )


def gdn_decode_step(
    mixed_qkv: torch.Tensor,
    conv_weight: torch.Tensor,
    conv_state: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    ssm_state: torch.Tensor,
    gdn_slots: torch.Tensor,
    *,
    num_k_heads: int,
    num_v_heads: int,
    head_k_dim: int,
    head_v_dim: int,
    norm: GatedNormArgs | None = None,
    use_qk_l2norm: bool = True,
) -> torch.Tensor:
    """One GDN decode step per request: mixed_qkv `[B, C]` through the conv (conv_state `[S, C, K-1]` shifted in
    place), SiLU, the gates from a, b `[B, Hv]`, one delta-rule step (ssm_state `[S, Hv, Dk, Dv]` float32
    updated in place at gdn_slots); returns o `[B, Hv * Dv]` in mixed_qkv's dtype, gated-normed when `norm`."""
    _check_shapes(
        mixed_qkv, a, b, A_log, dt_bias, ssm_state, num_k_heads, num_v_heads, head_k_dim, head_v_dim
    )
    check_last_dim_contiguous(
        "gdn_decode_step", mixed_qkv=mixed_qkv, a=a, b=b, conv_state=conv_state, ssm_state=ssm_state
    )
    batch, channels = mixed_qkv.shape
    weight = conv_weight_2d("gdn_decode_step", conv_weight, channels)
    kernel_size = weight.shape[1]
    if tuple(conv_state.shape[1:]) != (channels, kernel_size - 1):
        raise ValueError(
            f"gdn_decode_step: expected conv_state [S, {channels}, {kernel_size - 1}], "
            f"got {list(conv_state.shape)}"
        )
    value_dim = num_v_heads * head_v_dim
    if norm is not None:
        if tuple(norm.gate.shape) != (batch, value_dim) or norm.gate.stride(-1) != 1:
            raise ValueError(
                f"gdn_decode_step: expected a gate [{batch}, {value_dim}] with unit-stride rows, "
                f"got {list(norm.gate.shape)} strides {norm.gate.stride()}"
            )
        if tuple(norm.weight.shape) != (head_v_dim,):
            raise ValueError(
                f"gdn_decode_step: expected a norm weight [{head_v_dim}], got {list(norm.weight.shape)}"
            )
    out = mixed_qkv.new_empty(batch, value_dim)
    if batch == 0:
        return out
    block_k, block_v = pow2_block(head_k_dim), pow2_block(head_v_dim)
    gate, norm_weight = (norm.gate, norm.weight) if norm is not None else (out, out)
    _gdn_decode_kernel[(batch, num_k_heads)](
        mixed_qkv,
        weight,
        conv_state,
        a,
        b,
        A_log,
        dt_bias,
        ssm_state,
        gdn_slots,
        gate,
        norm_weight,
        out,
        mixed_qkv.stride(0),
        conv_state.stride(0),
        conv_state.stride(1),
        a.stride(0),
        b.stride(0),
        ssm_state.stride(0),
        ssm_state.stride(1),
        ssm_state.stride(2),
        gate.stride(0),
        out.stride(0),
        head_k_dim**-0.5,
        L2NORM_EPS,
        norm.eps if norm is not None else 0.0,
        NUM_K_HEADS=num_k_heads,
        GROUP=num_v_heads // num_k_heads,
        K_DIM=head_k_dim,
        V_DIM=head_v_dim,
        BLOCK_K=block_k,
        BLOCK_V=block_v,
        KERNEL_SIZE=kernel_size,
        BLOCK_HIST=pow2_block(kernel_size - 1, minimum=1),
        USE_L2NORM=use_qk_l2norm,
        NORM=norm is not None,
        ZERO_CENTERED=norm is not None and norm.zero_centered,
        num_warps=8 if block_k * block_v > 64 * 64 else 4,
        **pdl_launch(mixed_qkv.device),
    )
    return out
