"""RMSNorm over the last dim of `[M, K]` rows in one kernel.

`radixc::small_batch_linear` with a norm folds the RMSNorm before a linear layer into its GEMV's prologue; where
cuBLAS does the product instead (more rows than the GEMV serves, or cuBLAS timed faster), this kernel normalises
first, so the op never costs more launches than the unfused graph. Rounded as radixc.ops.norm's reference
rounds: zero-centered scales by (1 + weight) in float32 then rounds (Gemma, Qwen3.5), otherwise rounds the
normalised row and scales by weight in the input dtype (Llama, Qwen3). Twin: radixc.ops.norm.rms_norm_reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixc.ops.triton._utils import check_last_dim_contiguous

BLOCK_K = 1024


@triton.jit
def rms_normalize(x, rstd, weight, ZERO_CENTERED: tl.constexpr, dtype: tl.constexpr):
    """x `[..., BLOCK_K]` (float32) normalised by rstd `[..., 1]` and scaled by weight `[BLOCK_K]` (float32),
    rounded to dtype where the reference rounds; returned in dtype."""
    normed = x * rstd
    if ZERO_CENTERED:
        return (normed * (1.0 + weight)).to(dtype)
    return (normed.to(dtype).to(tl.float32) * weight).to(dtype)


@triton.jit
def _rms_norm_kernel(
    X, Weight, Out, K, stride_xm, stride_om, eps, ZERO_CENTERED: tl.constexpr, BLOCK_K: tl.constexpr
):
    row = tl.program_id(0).to(tl.int64)
    squares = tl.zeros([BLOCK_K], tl.float32)
    for k_start in range(0, K, BLOCK_K):
        offs = k_start + tl.arange(0, BLOCK_K)
        x = tl.load(X + row * stride_xm + offs, mask=offs < K, other=0.0).to(tl.float32)
        squares += x * x
    rstd = tl.rsqrt(tl.sum(squares, 0) / K + eps)
    for k_start in range(0, K, BLOCK_K):
        offs = k_start + tl.arange(0, BLOCK_K)
        mask = offs < K
        x = tl.load(X + row * stride_xm + offs, mask=mask, other=0.0).to(tl.float32)
        weight = tl.load(Weight + offs, mask=mask, other=0.0).to(tl.float32)
        out = rms_normalize(x, rstd, weight, ZERO_CENTERED, Out.dtype.element_ty)
        tl.store(Out + row * stride_om + offs, out, mask=mask)


def check_norm_weight(op: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    """A norm weight covers x's last dim."""
    if weight.dim() != 1 or weight.shape[0] != x.shape[-1]:
        raise ValueError(f"{op}: norm weight must be [{x.shape[-1]}], got {list(weight.shape)}")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered: bool = False) -> torch.Tensor:
    """RMSNorm of each row of x `[M, K]` with weight `[K]`, in x's dtype."""
    if x.dim() != 2:
        raise ValueError(f"rms_norm: expected x [M, K], got {list(x.shape)}")
    check_norm_weight("rms_norm", x, weight)
    check_last_dim_contiguous("rms_norm", x=x)
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    if x.numel():
        _rms_norm_kernel[(x.shape[0],)](
            x,
            weight,
            out,
            x.shape[1],
            x.stride(0),
            out.stride(0),
            eps,
            ZERO_CENTERED=zero_centered,
            BLOCK_K=min(BLOCK_K, triton.next_power_of_2(x.shape[1])),
        )
    return out
