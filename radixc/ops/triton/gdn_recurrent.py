"""Gated delta rule, one recurrent step per request (GDN decode).

S = exp(g) S; S += k (beta (v - S^T k))^T; o = S^T q, with S [Dk, Dv] float32 per (request, v head) in the
GDN pool. Each program owns a BLOCK_V column slice of one state, so the update needs no cross-program sync.
`gated_recurrent_step` also computes the gates from the projections (g = -exp(A_log) softplus(a + dt_bias),
beta = sigmoid(b)) in the same kernel, sparing decode a chain of small elementwise launches per GDN layer.
Twin: radixc.ops.native.gdn.recurrent_gated_delta_rule (after radixc.ops.native.gdn.gdn_gating).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixc.ops.triton._utils import (
    L2NORM_EPS,
    check_gdn_inputs,
    l2_normalize,
    let_next_kernel_start,
    pdl_launch,
    pow2_block,
    wait_for_previous_kernel,
)


@triton.jit
def gdn_gates(a, b, ALog, DtBias, v_head):
    """(g, beta) of one v head from its projections: g = -exp(A_log) softplus(a + dt_bias), beta = sigmoid(b)."""
    x = a + tl.load(DtBias + v_head).to(tl.float32)
    softplus = tl.where(x > 20.0, x, tl.log(1.0 + tl.exp(x)))  # torch's softplus threshold
    return -tl.exp(tl.load(ALog + v_head).to(tl.float32)) * softplus, tl.sigmoid(b)


@triton.jit
def delta_rule_update(state, q, k, v, g, beta):
    """One step on a [Dk, Dv] float32 state tile: S = exp(g) S; S += k (beta (v - S^T k))^T; returns (S, S^T q)
    for q (scaled), k [Dk] and v [Dv] float32."""
    state = state * tl.exp(g)
    delta = beta * (v - tl.sum(state * k[:, None], 0))
    state += k[:, None] * delta[None, :]
    return state, tl.sum(state * q[:, None], 0)


@triton.jit
def _recurrent_step_kernel(
    Q,  # [B, Hk, Dk]
    K,  # [B, Hk, Dk]
    V,  # [B, Hv, Dv]
    G,  # [B, Hv] log-decay, or the projection `a` when RAW_GATES
    Beta,  # [B, Hv], or the projection `b` when RAW_GATES
    ALog,  # [Hv] (read when RAW_GATES)
    DtBias,  # [Hv] (read when RAW_GATES)
    SsmState,  # [S, Hv, Dk, Dv] float32
    GdnSlots,  # [B]
    Out,  # [B, Hv, Dv]
    stride_qb,
    stride_qh,
    stride_kb,
    stride_kh,
    stride_vb,
    stride_vh,
    stride_gb,
    stride_betab,
    stride_ss,
    stride_sh,
    stride_sk,
    stride_ob,
    stride_oh,
    scale,
    eps,
    group_size,
    K_DIM: tl.constexpr,
    V_DIM: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_V: tl.constexpr,
    USE_L2NORM: tl.constexpr,
    RAW_GATES: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    v_head = tl.program_id(1)
    k_head = v_head // group_size
    offs_k = tl.arange(0, BLOCK_K)
    offs_v = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    k_mask = offs_k < K_DIM
    v_mask = offs_v < V_DIM
    # the state tile first, before waiting for the kernel before this one (PDL): only this layer's kernels of
    # earlier steps write it (the slots are the step's inputs), so its bytes stream during that kernel's tail
    slot = tl.load(GdnSlots + b).to(tl.int64)
    state_ptrs = (
        SsmState + slot * stride_ss + v_head * stride_sh + offs_k[:, None] * stride_sk + offs_v[None, :]
    )
    state_mask = k_mask[:, None] & v_mask[None, :]
    state = tl.load(state_ptrs, mask=state_mask, other=0.0)
    wait_for_previous_kernel(USE_PDL)

    # q, k as [1, BLOCK_K] rows so the tile helpers apply
    q = tl.load(Q + b * stride_qb + k_head * stride_qh + offs_k[None, :], mask=k_mask[None, :], other=0.0)
    k = tl.load(K + b * stride_kb + k_head * stride_kh + offs_k[None, :], mask=k_mask[None, :], other=0.0)
    q, k = q.to(tl.float32), k.to(tl.float32)
    if USE_L2NORM:
        q, k = l2_normalize(q, eps), l2_normalize(k, eps)
    q = tl.reshape(q * scale, [BLOCK_K])
    k = tl.reshape(k, [BLOCK_K])
    v = tl.load(V + b * stride_vb + v_head * stride_vh + offs_v, mask=v_mask, other=0.0).to(tl.float32)
    g = tl.load(G + b * stride_gb + v_head).to(tl.float32)
    beta = tl.load(Beta + b * stride_betab + v_head).to(tl.float32)
    if RAW_GATES:
        g, beta = gdn_gates(g, beta, ALog, DtBias, v_head)
    let_next_kernel_start(USE_PDL)
    state, out = delta_rule_update(state, q, k, v, g, beta)
    tl.store(state_ptrs, state, mask=state_mask)
    tl.store(Out + b * stride_ob + v_head * stride_oh + offs_v, out.to(Out.dtype.element_ty), mask=v_mask)


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    ssm_state: torch.Tensor,
    gdn_slots: torch.Tensor,
    *,
    scale: float,
    use_qk_l2norm: bool = True,
) -> torch.Tensor:
    """One delta-rule step per request: q, k [B, Hk, Dk], v [B, Hv, Dv], g, beta [B, Hv]; updates
    ssm_state [S, Hv, Dk, Dv] (float32) at gdn_slots in place; returns o [B, Hv, Dv] in v.dtype."""
    check_gdn_inputs("recurrent_gated_delta_rule", q=q, k=k, v=v, g=g, beta=beta, ssm_state=ssm_state)
    return _launch(q, k, v, g, beta, None, ssm_state, gdn_slots, scale, use_qk_l2norm)


def gated_recurrent_step(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    A_log: torch.Tensor,
    dt_bias: torch.Tensor,
    ssm_state: torch.Tensor,
    gdn_slots: torch.Tensor,
    *,
    scale: float,
    use_qk_l2norm: bool = True,
) -> torch.Tensor:
    """`recurrent_gated_delta_rule` with the gates computed in the kernel from a, b [B, Hv] and A_log,
    dt_bias [Hv]."""
    check_gdn_inputs("gated_recurrent_step", q=q, k=k, v=v, a=a, b=b, ssm_state=ssm_state)
    num_v_heads = v.shape[1]
    for name, param in (("A_log", A_log), ("dt_bias", dt_bias)):
        if tuple(param.shape) != (num_v_heads,):
            raise ValueError(
                f"gated_recurrent_step: expected {name} [{num_v_heads}], got {list(param.shape)}"
            )
    return _launch(q, k, v, a, b, (A_log, dt_bias), ssm_state, gdn_slots, scale, use_qk_l2norm)


def _launch(q, k, v, g, beta, raw_gate_params, ssm_state, gdn_slots, scale, use_qk_l2norm) -> torch.Tensor:
    batch, num_k_heads, k_dim = q.shape
    num_v_heads, v_dim = v.shape[1:]
    out = torch.empty_like(v)
    if batch == 0:
        return out
    block_k = pow2_block(k_dim)
    # a [BLOCK_K, BLOCK_V] float32 state tile per program: 128 x 32 keeps 32 registers a thread at 4 warps
    block_v = min(pow2_block(v_dim), max(16, 4096 // block_k))
    grid = (batch, num_v_heads, triton.cdiv(v_dim, block_v))
    A_log, dt_bias = raw_gate_params or (g, g)
    _recurrent_step_kernel[grid](
        q,
        k,
        v,
        g,
        beta,
        A_log,
        dt_bias,
        ssm_state,
        gdn_slots,
        out,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        g.stride(0),
        beta.stride(0),
        ssm_state.stride(0),
        ssm_state.stride(1),
        ssm_state.stride(2),
        out.stride(0),
        out.stride(1),
        scale,
        L2NORM_EPS,
        num_v_heads // num_k_heads,
        K_DIM=k_dim,
        V_DIM=v_dim,
        BLOCK_K=block_k,
        BLOCK_V=block_v,
        USE_L2NORM=use_qk_l2norm,
        RAW_GATES=raw_gate_params is not None,
        num_warps=4,
        **pdl_launch(q.device),
    )
    return out
