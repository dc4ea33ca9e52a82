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
from radixc.models.qwen3_5 import GatedDeltaNet, Qwen3_5ForCausalLM
from radixc.models.weights import WeightSpec


def interleaved_rows(num_groups: int, sizes: tuple[int, ...]) -> torch.Tensor:
    """Rows of a projection stored as `num_groups` groups of [part_0 | part_1 | ...] (sizes per group), in
    the order [part_0 of every group | part_1 of every group | ...]."""
    grouped = torch.arange(num_groups * sum(sizes)).view(num_groups, sum(sizes))
    return torch.cat([part.reshape(-1) for part in grouped.split(sizes, dim=1)])


class ReorderedLinear(Linear):
    """A Linear loaded from the checkpoint tensor of the same name with its output rows permuted by `rows`."""

    def __init__(self, in_features: int, rows: torch.Tensor):
        super().__init__(in_features, rows.numel(), bias=False)
        self.rows = rows

    def checkpoint_specs(self, prefix: str, names: Set[str]) -> dict[str, WeightSpec]:
        name = prefix + "weight"
        return {name: WeightSpec(name, tuple(self.weight.shape), rows=self.rows)}


class Qwen3NextGatedDeltaNet(GatedDeltaNet):
    """GDN whose checkpoint fuses in_proj_qkvz and in_proj_ba, interleaved per key head.

    HF stores in_proj_qkvz rows as, for each of the Hk key heads, [q_h | k_h | v_group | z_group] (the group
    being the Hv/Hk value heads of that key head) and in_proj_ba as [b_group | a_group] per key head; its
    `fix_query_key_value_ordering` untangles them every step. We permute the rows once at load time instead,
    so the projections already produce our contiguous [q | k | v | z] and [b | a] (see GatedDeltaNet).
    """

    def input_projections(self, hidden_size: int) -> tuple[nn.Linear, nn.Linear]:
        ratio = self.num_v_heads // self.num_k_heads
        qkvz_sizes = (self.head_k_dim, self.head_k_dim, ratio * self.head_v_dim, ratio * self.head_v_dim)
        qkvz = ReorderedLinear(hidden_size, interleaved_rows(self.num_k_heads, qkvz_sizes))
        ba = ReorderedLinear(hidden_size, interleaved_rows(self.num_k_heads, (ratio, ratio)))
        return qkvz, ba


class Experts(nn.Module):
    """All experts' MLPs, computed densely as two GEMMs over the concatenated expert weights.

    gate_up_proj `[E, 2 * I, hidden]` (HF 5's stacked layout) and down_proj_t `[E, I, hidden]` (HF's down_proj
    transposed per expert) flatten for free into `[E * 2I, hidden]` and `[E * I, hidden]`: every expert runs
    on every token and the router's combine weights (zero for experts not picked) scale the activations
    before the down GEMM sums over experts. Static shapes, plain matmuls and no data-dependent control flow,
    so it compiles to one graph with dynamic token counts; the cost is E / top_k times the sparse FLOPs and a
    `[T, E * 2I]` activation (a grouped-GEMM kernel is the way to scale it to 512 experts).
    """

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, hidden_act: str):
        super().__init__()
        self.num_experts, self.hidden_size, self.intermediate_size = (
            num_experts,
            hidden_size,
            intermediate_size,
        )
        self.gate_up_proj = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.down_proj_t = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.act = activation(hidden_act)

    def forward(self, x: torch.Tensor, combine: torch.Tensor) -> torch.Tensor:
        """x `[T, hidden]`, combine `[T, E]` routing weights -> `[T, hidden]`."""
        num_tokens, experts, inter = x.shape[0], self.num_experts, self.intermediate_size
        gate_up = F.linear(x, self.gate_up_proj.view(experts * 2 * inter, self.hidden_size))
        gate, up = gate_up.view(num_tokens, experts, 2 * inter).chunk(2, dim=-1)  # [T, E, I] each
        scaled = self.act(gate) * up * combine.unsqueeze(-1)
        return scaled.reshape(num_tokens, experts * inter) @ self.down_proj_t.view(
            experts * inter, self.hidden_size
        )

    def checkpoint_specs(self, prefix: str, names: Set[str]) -> dict[str, WeightSpec]:
        """HF 5's stacked tensors if present, else the per-expert gate/up/down_proj of shipped checkpoints."""
        experts, hidden, inter = self.num_experts, self.hidden_size, self.intermediate_size
        gate_up, down = prefix + "gate_up_proj", prefix + "down_proj_t"
        if prefix + "gate_up_proj" in names or prefix + "down_proj" in names:
            return {
                gate_up: WeightSpec(gate_up, (experts, 2 * inter, hidden)),
                prefix + "down_proj": WeightSpec(down, (experts, hidden, inter), transpose=True),
            }
        specs = {}
        for e in range(experts):
            expert = f"{prefix}{e}."
            specs[expert + "gate_proj.weight"] = WeightSpec(gate_up, (inter, hidden), (e, slice(0, inter)))
            specs[expert + "up_proj.weight"] = WeightSpec(gate_up, (inter, hidden), (e, slice(inter, None)))
            specs[expert + "down_proj.weight"] = WeightSpec(down, (hidden, inter), (e,), transpose=True)
        return specs


class SparseMoeBlock(nn.Module):
    """Router (softmax, top-k, renormalised if norm_topk_prob), routed experts and a gated shared expert."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k, self.norm_topk_prob = config.num_experts_per_tok, config.norm_topk_prob
        self.gate = Linear(config.hidden_size, config.num_experts, bias=False)
        self.experts = Experts(
            config.num_experts, config.hidden_size, config.moe_intermediate_size, config.hidden_act
        )
        self.shared_expert = GatedMLP(
            config.hidden_size, config.shared_expert_intermediate_size, config.hidden_act
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
        return self.experts(x, combine) + shared


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
