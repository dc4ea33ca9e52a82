"""RadixLinearAttention: a Gated DeltaNet layer of a hybrid model, run by the batch's backend (`radixc::gdn`)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from radixc.ops import library  # noqa: F401  (defines the radixc ops)

if TYPE_CHECKING:
    from radixc.forward_batch import ForwardBatch


class RadixLinearAttention(nn.Module):
    """GDN linear attention: causal conv1d + gated delta rule, states kept per request in the GDNPool.

    conv_weight, A_log and dt_bias are the model's own parameters, referenced (not copied) here.
    """

    def __init__(
        self,
        layer_id: int,
        gdn_layer_idx: int,
        num_k_heads: int,
        num_v_heads: int,
        head_k_dim: int,
        head_v_dim: int,
        conv_weight: nn.Parameter,
        A_log: nn.Parameter,
        dt_bias: nn.Parameter,
    ):
        super().__init__()
        where = f"RadixLinearAttention(layer_id={layer_id})"
        if num_v_heads % num_k_heads:
            raise ValueError(
                f"{where}: num_v_heads={num_v_heads} must be a multiple of num_k_heads={num_k_heads}"
            )
        self.layer_id, self.gdn_layer_idx = layer_id, gdn_layer_idx
        self.num_k_heads, self.num_v_heads = num_k_heads, num_v_heads
        self.head_k_dim, self.head_v_dim = head_k_dim, head_v_dim
        self.conv_dim = 2 * num_k_heads * head_k_dim + num_v_heads * head_v_dim
        expected = {"conv_weight": self.conv_dim, "A_log": num_v_heads, "dt_bias": num_v_heads}
        for name, param in (("conv_weight", conv_weight), ("A_log", A_log), ("dt_bias", dt_bias)):
            if param.shape[0] != expected[name]:
                raise ValueError(
                    f"{where}: {name} has shape {list(param.shape)}, expected {expected[name]} rows"
                )
        # Kept out of this module's parameters (the owning model registers them) so state_dicts stay HF-shaped.
        self.__dict__["conv_weight"] = conv_weight
        self.__dict__["A_log"] = A_log
        self.__dict__["dt_bias"] = dt_bias

    def forward(
        self, forward_batch: ForwardBatch, mixed_qkv: torch.Tensor, a: torch.Tensor, b: torch.Tensor
    ) -> torch.Tensor:
        """mixed_qkv `[T, conv_dim]` (q | k | v before the conv), a, b `[T, Hv]` -> `[T, Hv * Dv]`."""
        self._check_inputs(forward_batch, mixed_qkv, a, b)
        if forward_batch.forward_mode.is_idle():
            return mixed_qkv.new_zeros(mixed_qkv.shape[0], self.num_v_heads * self.head_v_dim)
        return forward_batch.attn_backend.forward_gdn(self, forward_batch, mixed_qkv, a, b)

    def _check_inputs(self, forward_batch: ForwardBatch, mixed_qkv, a, b) -> None:
        where = f"RadixLinearAttention(layer_id={self.layer_id})"
        if mixed_qkv.dim() != 2 or mixed_qkv.shape[1] != self.conv_dim:
            raise ValueError(f"{where}: expected mixed_qkv [T, {self.conv_dim}], got {list(mixed_qkv.shape)}")
        for name, t in (("a", a), ("b", b)):
            if t.dim() != 2 or t.shape[1] != self.num_v_heads:
                raise ValueError(f"{where}: expected {name} [T, {self.num_v_heads}], got {list(t.shape)}")
        if forward_batch.forward_mode.is_idle():
            return
        pool = forward_batch.gdn_pool
        if pool is None or forward_batch.gdn_slots is None:
            raise ValueError(f"{where}: the forward batch has no GDN pool / gdn_slots")
        conv_state, ssm_state = pool.layer_states(self.gdn_layer_idx)
        if conv_state.shape[1] != self.conv_dim or tuple(ssm_state.shape[1:]) != (
            self.num_v_heads,
            self.head_k_dim,
            self.head_v_dim,
        ):
            raise ValueError(
                f"{where}: GDNPool layer {self.gdn_layer_idx} holds conv dim {conv_state.shape[1]} and state "
                f"{list(ssm_state.shape[1:])}, the layer expects {self.conv_dim} and "
                f"{[self.num_v_heads, self.head_k_dim, self.head_v_dim]}"
            )
        if conv_state.shape[2] != self.conv_weight.shape[-1] - 1:
            raise ValueError(
                f"{where}: GDNPool conv window {conv_state.shape[2]} does not match conv kernel "
                f"{self.conv_weight.shape[-1]}"
            )

    def extra_repr(self) -> str:
        return (
            f"layer_id={self.layer_id}, gdn_layer_idx={self.gdn_layer_idx}, k_heads={self.num_k_heads}, "
            f"v_heads={self.num_v_heads}, head_k_dim={self.head_k_dim}, head_v_dim={self.head_v_dim}"
        )
