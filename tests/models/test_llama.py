"""Llama and Qwen3 loaded from transformers checkpoints match transformers' logits in prefill and decode."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, Qwen3Config
from transformers import LlamaForCausalLM as HFLlama
from transformers import Qwen3ForCausalLM as HFQwen3

from radixc.models import load_model

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def tiny_llama(num_kv_heads: int, tie: bool) -> HFLlama:
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=128,
        rope_parameters=LLAMA3_ROPE,
        tie_word_embeddings=tie,
        rms_norm_eps=1e-5,
    )
    return HFLlama._from_config(config, attn_implementation="eager")


def tiny_qwen3(num_kv_heads: int) -> HFQwen3:
    config = Qwen3Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        head_dim=24,
        attention_bias=True,
        max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0},
    )
    return HFQwen3._from_config(config, attn_implementation="eager")


@pytest.mark.parametrize(
    "name, make_hf, seed",
    [
        ("llama-gqa-llama3rope", lambda: tiny_llama(num_kv_heads=2, tie=False), 1),
        ("llama-mqa-tied", lambda: tiny_llama(num_kv_heads=1, tie=True), 2),
        ("qwen3-gqa-bias", lambda: tiny_qwen3(num_kv_heads=2), 3),
        ("qwen3-mqa-bias", lambda: tiny_qwen3(num_kv_heads=1), 4),
    ],
)
def test_prefill_and_greedy_decode_logits_match_transformers(
    name, make_hf, seed, prompts, hf_harness, tmp_path
):
    hf = hf_harness.randomize(make_hf(), seed=seed)
    hf_harness.save(hf, tmp_path)
    model = load_model(tmp_path)
    assert next(model.parameters()).dtype == torch.float32
    run = hf_harness.greedy_run(model, prompts, steps=8)
    hf_harness.compare(name, run, hf, prompts)


def test_compiled_fullgraph_matches_transformers(prompts, hf_harness, tmp_path):
    hf = hf_harness.randomize(tiny_qwen3(num_kv_heads=2), seed=5)
    hf_harness.save(hf, tmp_path)
    model = load_model(tmp_path)
    compiled = torch.compile(model, fullgraph=True)
    run = hf_harness.greedy_run(model, prompts, steps=8, forward=compiled)
    hf_harness.compare("qwen3-compiled", run, hf, prompts)
