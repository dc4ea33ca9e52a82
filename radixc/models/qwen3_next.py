"""Qwen3-Next: the Qwen3.5 hybrid (GDN + gated attention) with sparse MoE MLPs (top-k softmax routing over
experts plus a sigmoid-gated shared expert) and HF's fused, per-key-head-interleaved GDN input projections.
"""

from __future__ import annotations

from collections.abc import Set

import torch
import torch.nn.functional as F
from torch import nn

from radixc.models.config import ModelConfig
from radixc.models.layers import GatedMLP, Linear, activation
from radixc.models.parallel import MergedLinear, all_reduce, current_tensor_parallel
from radixc.models.qwen3_5 import GatedDeltaNet, Qwen3_5ForCausalLM
from radixc.models.weights import Shard, WeightSpec, interleaved_rows, set_shard


class Qwen3NextGatedDeltaNet(GatedDeltaNet):
    """GDN whose checkpoint fuses in_proj_qkvz and in_proj_ba, interleaved per key head.

    HF stores in_proj_qkvz rows as, for each of the Hk key heads, [q_h | k_h | v_group | z_group] (the group
    being the Hv/Hk value heads of that key head) and in_proj_ba as [b_group | a_group] per key head; its
    `fix_query_key_value_ordering` untangles them every step. We permute the rows once at load time instead,
    so the one input projection produces our contiguous [q | k | v | z | b | a] (see GatedDeltaNet).
    """

    def build_input_projections(self, hidden_size: int) -> None:
        """One GEMM, as for Qwen3.5, over HF's two fused tensors with their rows put in our order."""
        key_heads, value_heads = self.full_key_heads, self.full_value_heads
        ratio = value_heads // key_heads
        qkvz_sizes = (self.head_k_dim, self.head_k_dim, ratio * self.head_v_dim, ratio * self.head_v_dim)
        z_rows = tuple((self.full_conv_dim + start, length) for start, length in self.z_rows)
        a_rows = tuple((value_heads + start, length) for start, length in self.head_rows)
        self.in_proj = MergedLinear(
            hidden_size,
            (
                ("in_proj_qkvz", self.full_conv_dim + value_heads * self.head_v_dim),
                ("in_proj_ba", 2 * value_heads),
            ),
            shards=(self.qkv_rows + z_rows, self.head_rows + a_rows),
            reorders=(interleaved_rows(key_heads, qkvz_sizes), interleaved_rows(key_heads, (ratio, ratio))),
        )


class Experts(nn.Module):
    """All experts' MLPs, computed densely as two GEMMs over the concatenated expert weights.

    gate_up_proj `[E, 2 * I, hidden]` (HF 5's stacked layout) and down_proj_t `[E, I, hidden]` (HF's down_proj
    transposed per expert) flatten for free into `[E * 2I, hidden]` and `[E * I, hidden]`: every expert runs
    on every token and the router's combine weights (zero for experts not picked) scale the activations
    before the down GEMM sums over experts. Static shapes, plain matmuls and no data-dependent control flow,
    so it compiles to one graph with dynamic token counts; the cost is E / top_k times the sparse FLOPs and a
    `[T, E * 2I]` activation (a grouped-GEMM kernel is the way to scale it to 512 experts).

    Under tensor parallelism every rank holds every expert with `I / size` of its intermediate rows (gate and
    up column-, down row-parallel) and returns its partial sum; the MoE block all-reduces it.
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        tp = current_tensor_parallel()
        start, local = tp.split(intermediate_size, f"Experts' intermediate size {intermediate_size}")
        self.num_experts, self.hidden_size, self.intermediate_size = num_experts, hidden_size, local
        # this rank's rows of one expert's gate_up [2 * I, hidden] and of one [I, hidden] (gate, up, down^T)
        self.gate_up_shard = Shard(
            0, (2 * intermediate_size, hidden_size), ((start, local), (intermediate_size + start, local))
        )
        self.expert_rows = Shard(0, (intermediate_size, hidden_size), ((start, local),))
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * local, hidden_size))
        self.down_proj_t = nn.Parameter(torch.empty(num_experts, local, hidden_size))
        if tp.size > 1:
            for param, shard in (
                (self.gate_up_proj, self.gate_up_shard),
                (self.down_proj_t, self.expert_rows),
            ):
                set_shard(param, Shard(1, (num_experts, *shard.full_shape), shard.ranges))
        self.act = activation(hidden_act)

    def forward(self, x: torch.Tensor, combine: torch.Tensor) -> torch.Tensor:
        """x `[T, hidden]`, combine `[T, E]` routing weights -> `[T, hidden]` (this rank's partial sum)."""
        num_tokens, experts, inter = x.shape[0], self.num_experts, self.intermediate_size
        gate_up = F.linear(x, self.gate_up_proj.view(experts * 2 * inter, self.hidden_size))
        gate, up = gate_up.view(num_tokens, experts, 2 * inter).chunk(2, dim=-1)  # [T, E, I] each
        scaled = self.act(gate) * up * combine.unsqueeze(-1)
        return scaled.reshape(num_tokens, experts * inter) @ self.down_proj_t.view(
            experts * inter, self.hidden_size
        )

    def checkpoint_specs(self, prefix: str, names: Set[str]) -> dict[str, WeightSpec]:
        """HF 5's stacked tensors if present, else the per-expert gate/up/down_proj of shipped checkpoints."""
        experts, hidden = self.num_experts, self.hidden_size
        full_inter, local = self.expert_rows.full_shape[0], self.intermediate_size
        gate_up, down = prefix + "gate_up_proj", prefix + "down_proj_t"
        if prefix + "gate_up_proj" in names or prefix + "down_proj" in names:
            return {
                gate_up: WeightSpec(
                    gate_up,
                    (experts, 2 * full_inter, hidden),
                    shard=Shard(1, (experts, 2 * full_inter, hidden), self.gate_up_shard.ranges),
                ),
                prefix + "down_proj": WeightSpec(
                    down,
                    (experts, hidden, full_inter),
                    transpose=True,
                    shard=Shard(1, (experts, full_inter, hidden), self.expert_rows.ranges),
                ),
            }
        specs = {}
        for e in range(experts):
            expert = f"{prefix}{e}."
            specs[expert + "gate_proj.weight"] = WeightSpec(
                gate_up, (full_inter, hidden), (e, slice(0, local)), shard=self.expert_rows
            )
            specs[expert + "up_proj.weight"] = WeightSpec(
                gate_up, (full_inter, hidden), (e, slice(local, None)), shard=self.expert_rows
            )
            specs[expert + "down_proj.weight"] = WeightSpec(
                down, (hidden, full_inter), (e,), transpose=True, shard=self.expert_rows
            )
        return specs


class SparseMoeBlock(nn.Module):
    """Router (softmax, top-k, renormalised if norm_topk_prob), routed experts and a gated shared expert.

    The router is replicated; experts and shared expert are split by intermediate rows under tensor
    parallelism, and their gated partial sums are joined by one all-reduce."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.tp = current_tensor_parallel()
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = Experts(
            config.num_experts, config.hidden_size, config.moe_intermediate_size, config.hidden_act
        )
        self.shared_expert = GatedMLP(
            config.hidden_size, config.shared_expert_intermediate_size, config.hidden_act, reduce_output=False
        )
        self.shared_expert_gate = Linear(config.hidden_size, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        router_logits = self.gate(x)  # [T, E]
        probs = F.softmax(router_logits, dim=-1, dtype=torch.float32)
        top_weights, top_ids = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
        combine = torch.zeros_like(router_logits).scatter(1, top_ids, top_weights.to(x.dtype))
        shared = torch.sigmoid(self.shared_expert_gate(x)) * self.shared_expert(x)
        return all_reduce(self.experts(x, combine) + shared, self.tp)


class Qwen3NextForCausalLM(Qwen3_5ForCausalLM):
    """Qwen3-Next (e.g. 80B-A3B shape): hybrid GDN / gated attention, sparse MoE MLPs."""

    hf_defaults = {
        **Qwen3_5ForCausalLM.hf_defaults,
        "num_experts": 512,
        "num_experts_per_tok": 10,
        "moe_intermediate_size": 512,
        "shared_expert_intermediate_size": 512,
        "norm_topk_prob": True,
        "decoder_sparse_step": 1,
    }
    gdn_cls = Qwen3NextGatedDeltaNet

    def make_mlp(self, layer_id: int) -> nn.Module:
        """Sparse MoE unless the layer is in mlp_only_layers or off the decoder_sparse_step grid (as HF)."""
        cfg = self.config
        sparse = layer_id not in cfg.mlp_only_layers and cfg.num_experts > 0
        if sparse and (layer_id + 1) % cfg.decoder_sparse_step == 0:
            return SparseMoeBlock(cfg)
        return super().make_mlp(layer_id)
