"""Qwen3-Next from a transformers checkpoint (interleaved GDN projections permuted at load, sparse MoE with
shared expert) matches transformers in prefill and decode; per-expert and stacked expert layouts both load."""

from __future__ import annotations

import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3NextConfig
from transformers import Qwen3NextForCausalLM as HFQwen3Next

from radixc.models import load_model
from radixc.models.weights import interleaved_rows

# HF runs the GDN recurrence in float32 even in a float64 model, and ours (float32) chunks it differently:
# logit errors reach ~6e-5 on logits of magnitude ~3, where attention-only families stay near 2e-6
GDN_ATOL = 2e-4
LAYER_TYPES = ["linear_attention", "linear_attention", "full_attention", "linear_attention"]


def tiny_qwen3_next(norm_topk_prob: bool = True, mlp_only_layers: tuple[int, ...] = ()) -> HFQwen3Next:
    config = Qwen3NextConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        layer_types=LAYER_TYPES,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=16,
        linear_value_head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        shared_expert_intermediate_size=48,
        norm_topk_prob=norm_topk_prob,
        mlp_only_layers=list(mlp_only_layers),
        max_position_embeddings=128,
    )
    return HFQwen3Next._from_config(config, attn_implementation="eager", experts_implementation="eager")


def test_interleaved_rows_regroups_parts_of_every_group():
    # 2 groups of [a a | b]: rows 0,1,3,4 are the a parts, rows 2,5 the b parts
    assert interleaved_rows(2, (2, 1)).tolist() == [0, 1, 3, 4, 2, 5]


def test_hybrid_moe_prefill_and_decode_match_transformers(prompts, hf_harness, tmp_path):
    hf = hf_harness.randomize(tiny_qwen3_next(), seed=31)
    hf_harness.save(hf, tmp_path)
    assert "model.layers.0.mlp.experts.3.up_proj.weight" in load_file(tmp_path / "model.safetensors")
    run = hf_harness.greedy_run(load_model(tmp_path), prompts, steps=8)
    hf_harness.compare("qwen3-next-moe", run, hf, prompts, atol=GDN_ATOL)


def test_stacked_expert_layout_and_dense_mlp_layers_match_transformers(prompts, hf_harness, tmp_path):
    """HF 5's in-memory layout (mlp.experts.gate_up_proj / down_proj stacks), no top-k renormalisation, and
    a dense MLP on layer 1 (mlp_only_layers)."""
    hf = hf_harness.randomize(tiny_qwen3_next(norm_topk_prob=False, mlp_only_layers=(1,)), seed=32)
    hf_harness.save(hf, tmp_path)
    stacked = {name: t.contiguous() for name, t in hf.state_dict().items()}
    save_file(stacked, tmp_path / "model.safetensors")
    assert "model.layers.0.mlp.experts.gate_up_proj" in stacked
    run = hf_harness.greedy_run(load_model(tmp_path), prompts, steps=8)
    hf_harness.compare("qwen3-next-stacked-experts", run, hf, prompts, atol=GDN_ATOL)


def test_compiled_fullgraph_matches_transformers(prompts, hf_harness, tmp_path):
    hf = hf_harness.randomize(tiny_qwen3_next(), seed=33)
    hf_harness.save(hf, tmp_path)
    model = load_model(tmp_path)
    run = hf_harness.greedy_run(model, prompts, steps=8, forward=torch.compile(model, fullgraph=True))
    hf_harness.compare("qwen3-next-compiled", run, hf, prompts, atol=GDN_ATOL)
