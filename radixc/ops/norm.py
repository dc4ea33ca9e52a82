"""RMSNorm as the op `radixc::rms_norm`, used for per-head q/k norms so that a pass can fuse it with the rotary
embedding that follows (`radixc::qk_norm_rope`)."""

from __future__ import annotations

import torch

from radixc.ops.library import define_op


def rms_norm_reference(
    x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered: bool
) -> torch.Tensor:
    """Float32 RMSNorm of x over its last dim; zero_centered scales by (1 + weight) in float32 (Gemma, Qwen3.5),
    otherwise casts back first and scales by weight (Llama, Qwen3), as Hugging Face does."""
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    if zero_centered:
        return (normed * (1.0 + weight.float())).to(x.dtype)
    return weight * normed.to(x.dtype)


def grouped_rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered: bool) -> torch.Tensor:
    """RMSNorm of each group of `weight.numel()` consecutive elements of x's last dim (each head of `[T, H*D]`)."""
    groups = x.unflatten(-1, (-1, weight.shape[0]))
    return rms_norm_reference(groups, weight, eps, zero_centered).flatten(-2)


define_op(
    "rms_norm",
    "Tensor x, Tensor weight, float eps, bool zero_centered",
    "Tensor",
    grouped_rms_norm,
    lambda x, weight, eps, zero_centered: torch.empty_like(x, memory_format=torch.contiguous_format),
)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, zero_centered: bool = False) -> torch.Tensor:
    """Per-head RMSNorm of x `[..., H * dim]` with weight `[dim]` through `radixc::rms_norm` (no reshapes in the
    graph, so the fusion pass sees `rotary_embedding(rms_norm(q), rms_norm(k))` directly)."""
    return torch.ops.radixc.rms_norm(x, weight, eps, zero_centered)
