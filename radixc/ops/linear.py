"""`radixc::small_batch_linear`, `radixc::silu_mul_linear` and `radixc::linear_rope_store_kv`: linear layers that
run radixc's Triton GEMV kernel when they have few rows, with what the decode graph computed around them folded
in.

Models call `F.linear`; the pass radixc.passes.lower_linear puts these ops in its place in decode graphs on CUDA,
a residual added to the product included; radixc.passes.fuse_silu_mul_linear makes `silu_mul_linear` where a
gated MLP's gate-up projection feeds only its SiLU-and-multiply, and radixc.passes.fuse_rms_norm_linear folds
the residual add after the op and an RMSNorm that feeds only the op into it, radixc.passes.fuse_linear_cast a
cast that widens its output (`out_dtype`), radixc.passes.fuse_input_gate_linear a sigmoid gate multiplying its
input (`input_gate`); `linear_rope_store_kv` (made by radixc.passes.fuse_linear_rope_store_kv) is a qkv
projection with RoPE and the KV-cache store in its epilogue. The row count is only known when the graph runs
(one graph serves every batch size), so the op decides there: up to `SMALL_BATCH_MAX_ROWS` rows it runs
whichever of the Triton kernel's tiles and the unfused path was timed fastest for the shape on this device
(radixc.ops.triton.gemv.tuned_linear), above that cuBLAS (radixc.ops.triton.gemv.cublas_linear, with a kernel
for each fusion around it). The CUDA graph warm-up of each batch-size bucket does the timing; the captured graph
keeps the choice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from radixc.ops.library import define_op

# the most rows the Triton kernel serves (radixc.ops.triton.gemv.MAX_ROWS, kept here so that
# importing the op does not import triton)
SMALL_BATCH_MAX_ROWS = 32


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up `[..., 2N]` holding gate then up: a gated MLP's activation."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up


def sigmoid_gate(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(gate), in float32 and rounded once to x's dtype (as Inductor's fused kernel computes it): a
    gated attention's output gate."""
    return (x.float() * torch.sigmoid(gate.float())).to(x.dtype)


def _fused_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    residual: torch.Tensor | None,
    norm_weight: torch.Tensor | None,
    norm_eps: float,
    norm_zero_centered: bool,
    gated: bool,
    out_dtype: torch.dtype | None = None,
    input_gate: torch.Tensor | None = None,
) -> torch.Tensor:
    plain = residual is None and norm_weight is None and not gated and input_gate is None
    if x.shape[0] > SMALL_BATCH_MAX_ROWS and plain:
        product = F.linear(x, weight, bias)
        return product if out_dtype is None else product.to(out_dtype)
    from radixc.ops.triton.gemv import Fusions, RMSNormArgs, cublas_linear, tuned_linear

    norm = None if norm_weight is None else RMSNormArgs(norm_weight, norm_eps, norm_zero_centered)
    fusions = Fusions(norm=norm, residual=residual, gated=gated, out_dtype=out_dtype, input_gate=input_gate)
    if x.shape[0] > SMALL_BATCH_MAX_ROWS:
        return cublas_linear(x, weight, bias, fusions)
    return tuned_linear(x, weight, bias, fusions)


# the optional RMSNorm of x folded in front of either op (radixc.ops.norm.rms_norm_reference's arguments)
_NORM_ARGS = "Tensor? norm_weight=None, float norm_eps=0.0, bool norm_zero_centered=False"


def _small_batch_linear(
    x,
    weight,
    bias,
    residual=None,
    norm_weight=None,
    norm_eps=0.0,
    norm_zero_centered=False,
    out_dtype=None,
    input_gate=None,
) -> torch.Tensor:
    return _fused_linear(
        x, weight, bias, residual, norm_weight, norm_eps, norm_zero_centered, False, out_dtype, input_gate
    )


def _small_batch_linear_fake(
    x,
    weight,
    bias,
    residual=None,
    norm_weight=None,
    norm_eps=0.0,
    norm_zero_centered=False,
    out_dtype=None,
    input_gate=None,
) -> torch.Tensor:
    return x.new_empty(x.shape[0], weight.shape[0], dtype=out_dtype)


# out_dtype: the product, rounded to x's dtype, written widened (radixc.passes.fuse_linear_cast folds the LM
# head's float32 cast into it); input_gate: x * sigmoid(input_gate) goes into the product
# (radixc.passes.fuse_input_gate_linear folds a gated attention's output gate into its o_proj)
define_op(
    "small_batch_linear",
    f"Tensor x, Tensor weight, Tensor? bias, Tensor? residual=None, {_NORM_ARGS}, ScalarType? out_dtype=None, "
    "Tensor? input_gate=None",
    "Tensor",
    _small_batch_linear,
    _small_batch_linear_fake,
)


def _gated_columns(weight: torch.Tensor) -> int:
    """Output columns of a gate-up weight `[2N, K]` (N), checked when traced and when run."""
    if weight.shape[0] % 2:
        raise ValueError(f"silu_mul_linear: the weight holds gate and up halves, got {weight.shape[0]} rows")
    return weight.shape[0] // 2


def _silu_mul_linear(
    x, weight, bias, norm_weight=None, norm_eps=0.0, norm_zero_centered=False
) -> torch.Tensor:
    _gated_columns(weight)
    return _fused_linear(x, weight, bias, None, norm_weight, norm_eps, norm_zero_centered, gated=True)


define_op(
    "silu_mul_linear",
    f"Tensor x, Tensor weight, Tensor? bias, {_NORM_ARGS}",
    "Tensor",
    _silu_mul_linear,
    lambda x, weight, bias, *args, **kwargs: x.new_empty(x.shape[0], _gated_columns(weight)),
)


def _linear_rope_store_kv(
    *args, norm_weight=None, norm_eps=0.0, norm_zero_centered=False, **heads
) -> torch.Tensor:
    from radixc.ops.triton.gemv import RMSNormArgs
    from radixc.ops.triton.linear_rope import tuned_linear_rope_store_kv

    norm = None if norm_weight is None else RMSNormArgs(norm_weight, norm_eps, norm_zero_centered)
    return tuned_linear_rope_store_kv(*args, norm=norm, **heads)


# made by radixc.passes.fuse_linear_rope_store_kv from a qkv `small_batch_linear` and the rope + KV-store op
# after it; returns rotated q
define_op(
    "linear_rope_store_kv",
    "Tensor x, Tensor weight, Tensor? bias, Tensor positions, Tensor cos_sin_cache, Tensor(a!) k_cache, "
    "Tensor(b!) v_cache, Tensor out_cache_loc, *, int num_q_heads, int num_kv_heads, int head_size, bool is_neox, "
    f"{_NORM_ARGS}",
    "Tensor",
    _linear_rope_store_kv,
    lambda x, *args, num_q_heads, head_size, **kwargs: x.new_empty(x.shape[0], num_q_heads * head_size),
)
