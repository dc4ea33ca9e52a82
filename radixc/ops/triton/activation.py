"""silu(gate) * up of a gated MLP's gate-up product in one kernel.

`radixc::silu_mul_linear` computes the activation in its GEMV's epilogue; where cuBLAS does the product instead
(more rows than the GEMV serves, or cuBLAS timed faster), this kernel applies it, so the op never costs more
launches than the unfused graph (whose pointwise kernel Inductor generated). Rounded as that graph rounds: SiLU
in float32 from the product's dtype, rounded before the multiply. Twin: radixc.ops.linear.silu_and_mul.
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
