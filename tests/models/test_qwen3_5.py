"""Qwen3.5 (hybrid GDN + gated attention) from a transformers checkpoint matches transformers in prefill and
decode, with several GDN layers before a full-attention layer; also the vision-language checkpoint layout."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file, save_file
from transformers import Qwen3_5ForCausalLM as HFQwen3_5
from transformers import Qwen3_5TextConfig

from radixc.models import load_model

# HF runs the GDN recurrence in float32 even in a float64 model, and ours (float32) chunks it differently:
# logit errors reach ~6e-5 on logits of magnitude ~3, where attention-only families stay near 2e-6
GDN_ATOL = 2e-4
LAYER_TYPES = ["linear_attention", "linear_attention", "full_attention", "linear_attention"]


def tiny_qwen3_5(num_kv_heads: int = 2, k_heads: int = 2, v_heads: int = 4) -> HFQwen3_5:
    config = Qwen3_5TextConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=4,
        layer_types=LAYER_TYPES,
        num_attention_heads=4,
        num_key_value_heads=num_kv_heads,
        head_dim=16,
        linear_num_key_heads=k_heads,
        linear_num_value_heads=v_heads,
        linear_key_head_dim=16,
        linear_value_head_dim=8,
        max_position_embeddings=128,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
    )
    return HFQwen3_5._from_config(config, attn_implementation="eager")


def test_hybrid_prefill_and_decode_match_transformers(prompts, hf_harness, tmp_path):
    hf = hf_harness.randomize(tiny_qwen3_5(), seed=21)
    hf_harness.save(hf, tmp_path)
    model = load_model(tmp_path)
    spec = model.kv_cache_spec()
    assert (spec.full_attention_layer_ids, spec.gdn_layer_ids) == ((2,), (0, 1, 3))
    run = hf_harness.greedy_run(model, prompts, steps=8)
    hf_harness.compare("qwen3.5-gqa-hv2xhk", run, hf, prompts, atol=GDN_ATOL)


def test_mqa_and_equal_key_value_heads_match_transformers(prompts, hf_harness, tmp_path):
    hf = hf_harness.randomize(tiny_qwen3_5(num_kv_heads=1, k_heads=2, v_heads=2), seed=22)
    hf_harness.save(hf, tmp_path)
    run = hf_harness.greedy_run(load_model(tmp_path), prompts, steps=8)
    hf_harness.compare("qwen3.5-mqa-hv=hk", run, hf, prompts, atol=GDN_ATOL)


def test_vision_language_checkpoint_loads_its_text_model(prompts, hf_harness, tmp_path):
    """Qwen3_5ForConditionalGeneration layout: text_config nested, model.language_model.* weights, vision
    tower and MTP tensors present but not loaded."""
    hf = hf_harness.randomize(tiny_qwen3_5(), seed=23)
    hf_harness.save(hf, tmp_path / "text")
    tensors = {
        name.replace("model.", "model.language_model.", 1): t
        for name, t in load_file(tmp_path / "text" / "model.safetensors").items()
    }
    tensors["model.visual.patch_embed.proj.weight"] = torch.randn(8, 3, 2, 2)
    tensors["mtp.fc.weight"] = torch.randn(64, 128)
    (tmp_path / "vl").mkdir()
    save_file(tensors, tmp_path / "vl" / "model.safetensors")
    text_config = json.loads((tmp_path / "text" / "config.json").read_text())
    config = {
        "architectures": ["Qwen3_5ForConditionalGeneration"],
        "model_type": "qwen3_5",
        "text_config": text_config,
        "vision_config": {"depth": 1},
        "tie_word_embeddings": False,
    }
    (tmp_path / "vl" / "config.json").write_text(json.dumps(config))
    run = hf_harness.greedy_run(load_model(tmp_path / "vl"), prompts, steps=2)
    hf_harness.compare("qwen3.5-vl-layout", run, hf, prompts, atol=GDN_ATOL)


def test_compiled_fullgraph_matches_transformers(prompts, hf_harness, tmp_path):
    hf = hf_harness.randomize(tiny_qwen3_5(), seed=24)
    hf_harness.save(hf, tmp_path)
    model = load_model(tmp_path)
    run = hf_harness.greedy_run(model, prompts, steps=8, forward=torch.compile(model, fullgraph=True))
    hf_harness.compare("qwen3.5-compiled", run, hf, prompts, atol=GDN_ATOL)
