"""Gemma2 from a transformers checkpoint: sliding window shorter than the prompt, attention and final logit
soft-caps, (1 + w) norms and scaled embeddings all match transformers in prefill and decode."""

from __future__ import annotations

import torch
from transformers import Gemma2Config
from transformers import Gemma2ForCausalLM as HFGemma2

from radixc.models import load_model


def tiny_gemma2(
    num_kv_heads: int = 2, attn_cap: float | None = 50.0, final_cap: float | None = 30.0
) -> HFGemma2:
    config = Gemma2Config(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        head_dim=16,
        query_pre_attn_scalar=24,
        sliding_window=5,
        max_position_embeddings=128,
        attn_logit_softcapping=attn_cap,
        final_logit_softcapping=final_cap,
    )
    return HFGemma2._from_config(config, attn_implementation="eager")


def test_sliding_window_and_soft_caps_match_transformers(prompts, hf_harness, tmp_path):
    # small caps so tanh bends the scores and logits (random weights give scores of order one)
    hf = hf_harness.randomize(tiny_gemma2(attn_cap=2.0, final_cap=3.0), seed=11, std=0.2)
    hf_harness.save(hf, tmp_path)
    model = load_model(tmp_path)
    assert model.kv_cache_spec().sliding_window_layer_ids == (0, 2)
    run = hf_harness.greedy_run(model, prompts, steps=8)
    hf_harness.compare("gemma2-window5-caps", run, hf, prompts)


def test_without_soft_caps_and_mqa_matches_transformers(prompts, hf_harness, tmp_path):
    hf = hf_harness.randomize(tiny_gemma2(num_kv_heads=1, attn_cap=None, final_cap=None), seed=12)
    hf_harness.save(hf, tmp_path)
    model = load_model(tmp_path)
    assert model.final_logit_softcap is None
    run = hf_harness.greedy_run(model, prompts, steps=8)
    hf_harness.compare("gemma2-mqa-nocaps", run, hf, prompts)


def test_compiled_fullgraph_matches_transformers(prompts, hf_harness, tmp_path):
    hf = hf_harness.randomize(tiny_gemma2(attn_cap=2.0, final_cap=3.0), seed=13, std=0.2)
    hf_harness.save(hf, tmp_path)
    model = load_model(tmp_path)
    run = hf_harness.greedy_run(model, prompts, steps=8, forward=torch.compile(model, fullgraph=True))
    hf_harness.compare("gemma2-compiled", run, hf, prompts)
