"""silu(gate) * up of a gated MLP's gate-up product, and x * sigmoid(gate) of a gated attention's output, each in
one kernel.

`radixc::silu_mul_linear` computes the activation in its GEMV's epilogue, and `radixc::small_batch_linear` the
output gate (`input_gate`) in its prologue; where cuBLAS or the GEMV without them does the product instead (more
rows than the GEMV serves, or that timed faster), these kernels apply them, so the op never costs more launches
than the unfused graph (whose pointwise kernel Inductor generated). Rounded as that graph rounds: SiLU in float32
from the product's dtype, rounded before the multiply; the gate in float32, rounded once. Twins:
radixc.ops.linear.silu_and_mul, radixc.ops.linear.sigmoid_gate.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixc.ops.triton._utils import check_last_dim_contiguous

BLOCK = 1024


@triton.jit
def _silu_and_mul_kernel(GateUp, Out, N, stride_gm, stride_om, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    gate = tl.load(GateUp + row * stride_gm + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(GateUp + row * stride_gm + N + offs, mask=mask, other=0.0)
    dtype = Out.dtype.element_ty
    out = (gate * tl.sigmoid(gate)).to(dtype).to(tl.float32) * up.to(tl.float32)
    tl.store(Out + row * stride_om + offs, out.to(dtype), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up `[M, N]` for gate_up `[M, 2N]` holding gate then up."""
    if gate_up.dim() != 2 or gate_up.shape[1] % 2:
        raise ValueError(f"silu_and_mul: expected gate_up [M, 2N], got {list(gate_up.shape)}")
    check_last_dim_contiguous("silu_and_mul", gate_up=gate_up)
    rows, cols = gate_up.shape[0], gate_up.shape[1] // 2
    out = torch.empty(rows, cols, dtype=gate_up.dtype, device=gate_up.device)
    if rows and cols:
        grid = (rows, triton.cdiv(cols, BLOCK))
        _silu_and_mul_kernel[grid](gate_up, out, cols, gate_up.stride(0), out.stride(0), BLOCK=BLOCK)
    return out


@triton.jit
def _sigmoid_gate_kernel(X, Gate, Out, N, stride_xm, stride_gm, stride_om, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    x = tl.load(X + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(Gate + row * stride_gm + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_om + offs, (x * tl.sigmoid(gate)).to(Out.dtype.element_ty), mask=mask)


def sigmoid_gate(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(gate) `[M, N]` for x and gate `[M, N]` of one dtype."""
    if x.dim() != 2 or gate.shape != x.shape or gate.dtype != x.dtype:
        raise ValueError(
            f"sigmoid_gate: expected x [M, N] and a gate of its shape and dtype, got {x.dtype} "
            f"{list(x.shape)} and {gate.dtype} {list(gate.shape)}"
        )
    check_last_dim_contiguous("sigmoid_gate", x=x, gate=gate)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel():
        grid = (x.shape[0], triton.cdiv(x.shape[1], BLOCK))
        _sigmoid_gate_kernel[grid](
            x, gate, out, x.shape[1], x.stride(0), gate.stride(0), out.stride(0), BLOCK=BLOCK
        )
    return out
