"""`radixc::gdn_decode_step`: a Gated DeltaNet layer's decode step, conv to (gated-normed) output, in one
kernel.

Made by radixc.passes.fuse_gdn_decode from the Triton backend's conv + SiLU and delta-rule kernel ops of a
decode graph, and the gated RMSNorm after them where the model has one (Qwen3.5, Qwen3-Next); runs
radixc.ops.triton.gdn_decode. Updates conv_state and ssm_state in place at each row's gdn slot.
"""

from __future__ import annotations

import torch

from radixc.ops.library import define_op

# the most elements of one v head's state tile a program holds in registers (128 x 128 float32 at 8 warps)
MAX_STATE_TILE = 128 * 128


def fits_gdn_decode_step(head_k_dim: int, head_v_dim: int) -> bool:
    """Whether one program holds a v head's whole [Dk, Dv] state tile (power-of-two padded, at least 16 each):
    the gated norm needs the whole head."""

    def tile(n: int) -> int:
        return max(16, 1 << (n - 1).bit_length())

    return tile(head_k_dim) * tile(head_v_dim) <= MAX_STATE_TILE


def _gdn_decode_step(
    mixed_qkv,
    conv_weight,
    conv_state,
    a,
    b,
    A_log,
    dt_bias,
    ssm_state,
    gdn_slots,
    gate=None,
    norm_weight=None,
    norm_eps=0.0,
    norm_zero_centered=False,
    **heads,
) -> torch.Tensor:
    from radixc.ops.triton.gdn_decode import GatedNormArgs, gdn_decode_step

    if (gate is None) != (norm_weight is None):
        raise ValueError("gdn_decode_step: a gated norm needs both gate and norm_weight")
    norm = None if gate is None else GatedNormArgs(gate, norm_weight, norm_eps, norm_zero_centered)
    args = (mixed_qkv, conv_weight, conv_state, a, b, A_log, dt_bias, ssm_state, gdn_slots)
    return gdn_decode_step(*args, norm=norm, **heads)


define_op(
    "gdn_decode_step",
    "Tensor mixed_qkv, Tensor conv_weight, Tensor(a!) conv_state, Tensor a, Tensor b, Tensor A_log, "
    "Tensor dt_bias, Tensor(b!) ssm_state, Tensor gdn_slots, Tensor? gate=None, Tensor? norm_weight=None, "
    "float norm_eps=0.0, bool norm_zero_centered=False, *, int num_k_heads, int num_v_heads, int head_k_dim, "
    "int head_v_dim",
    "Tensor",
    _gdn_decode_step,
    lambda mixed_qkv, *args, num_v_heads, head_v_dim, **kwargs: mixed_qkv.new_empty(
        mixed_qkv.shape[0], num_v_heads * head_v_dim
    ),
)
