"""Presets: every shape is a valid transformers config with the same parameter count as transformers' model,
tiny presets build with deterministic random weights and generate, consistent between decode and prefill."""

from __future__ import annotations

import pytest
import torch
import transformers

from radixc.models import build_preset, list_presets, preset_config
from radixc.models.qwen3_5 import GatedDeltaNet
from radixc.models.registry import build_model, model_config

REQUIRED = [
    "llama-1b",
    "qwen3.5-0.8b",
    "gemma2-2b",
    "qwen3-next-tiny",
    "bert-mini",
    "tiny-llama",
    "tiny-qwen3",
    "tiny-gemma2",
    "tiny-qwen3.5",
    "tiny-qwen3-next",
    "tiny-bert",
]
TINY = [name for name in REQUIRED if name.startswith("tiny-")]


def test_required_presets_are_listed():
    assert set(REQUIRED) <= set(list_presets())
    with pytest.raises(KeyError, match="unknown model preset 'nope'"):
        build_preset("nope")


@pytest.mark.parametrize("name", REQUIRED)
def test_preset_has_transformers_parameter_count(name):
    """Built on the meta device (no memory), ours and transformers' model from the same dict agree."""
    raw = preset_config(name)
    model_cls, config = model_config(raw)
    ours = build_model(model_cls, config, torch.float32, "meta")
    hf_config = transformers.AutoConfig.for_model(**raw)
    with torch.device("meta"):
        if raw["model_type"] == "bert":
            hf = transformers.BertModel(hf_config, add_pooling_layer=False)
        else:
            hf = transformers.AutoModelForCausalLM.from_config(hf_config)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(ours) == count(hf)


def test_full_size_shapes():
    assert (
        sum(
            p.numel()
            for p in build_model(
                *model_config(preset_config("llama-1b")), torch.bfloat16, "meta"
            ).parameters()
        )
        == 1_235_814_400
    )
    spec = build_model(*model_config(preset_config("qwen3.5-0.8b")), torch.bfloat16, "meta").kv_cache_spec()
    assert spec.full_attention_layer_ids == (3, 7, 11, 15, 19, 23) and spec.num_gdn_layers == 18


def test_random_init_is_deterministic_per_seed():
    a, b, c = (
        build_preset("tiny-qwen3-next"),
        build_preset("tiny-qwen3-next"),
        build_preset("tiny-qwen3-next", seed=1),
    )
    for (name, pa), pb, pc in zip(a.named_parameters(), b.parameters(), c.parameters()):
        assert torch.equal(pa, pb), name
        assert pa.numel() == 1 or "norm" in name or "dt_bias" in name or not torch.equal(pa, pc), name
    gdn = a.model.layers[0].linear_attn
    assert torch.all((gdn.A_log.exp() >= 1) & (gdn.A_log.exp() <= 16)) and torch.all(gdn.dt_bias == 1)


@pytest.mark.parametrize("name", [n for n in TINY if n != "tiny-bert"])
def test_tiny_preset_decode_logits_equal_prefill_logits(name, hf_harness):
    """Greedy decode from the caches gives the logits a fresh prefill of the whole sequence gives."""
    model = build_preset(name)
    gen = torch.Generator().manual_seed(99)
    prompts = [torch.randint(3, 300, (n,), generator=gen).tolist() for n in (13, 4)]
    run = hf_harness.greedy_run(model, prompts, steps=4)
    full = [p + t[:-1] for p, t in zip(prompts, run.tokens)]
    replay = hf_harness.greedy_run(model, full, steps=1)
    for prompt, decode, prefill in zip(prompts, run.decode, replay.prefill):
        assert torch.isfinite(decode).all()
        torch.testing.assert_close(decode, prefill[len(prompt) - 1 :], atol=2e-5, rtol=1e-4)


def test_tiny_bert_encodes_each_request_independently(hf_harness):
    model = build_preset("tiny-bert")
    ids = [[5, 9, 11, 3], [7, 8]]
    builder = hf_harness.make_builder(model)
    batch = builder.extend([builder.new_request() for _ in ids], ids, all_logits=True)
    alone = hf_harness.make_builder(model)
    single = alone.extend([alone.new_request()], ids[1:], all_logits=True)
    with torch.inference_mode():
        pair = model.encode(batch.input_ids, batch.positions, batch)
        one = model.encode(single.input_ids, single.positions, single)
    torch.testing.assert_close(pair[1:], one)


@pytest.mark.parametrize("name", ["tiny-qwen3.5", "tiny-qwen3-next"])
def test_gdn_layers_read_their_input_projections_in_one_gemm(name):
    """qkv, z, b and a come from one linear layer (b and a alone are ~64 KB of weight: a launch of their own
    per layer at decode), whether the checkpoint stores four tensors (Qwen3.5) or two interleaved ones (Next)."""
    model = build_preset(name)
    gdn_layers = [m for m in model.modules() if isinstance(m, GatedDeltaNet)]
    assert gdn_layers
    for gdn in gdn_layers:
        linears = {n for n, m in gdn.named_modules() if isinstance(m, torch.nn.Linear)}
        assert linears == {"in_proj", "out_proj"}
