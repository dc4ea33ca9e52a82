"""Any number of engines in one process: each model compiles its own graphs (its forward has a code object of
its own), so 20 compiled engines of different shapes never share guards or hit Dynamo's recompile limit, and a
model compiled by hand keeps its own cache too."""

from __future__ import annotations

import torch
from torch._dynamo.utils import counters

from radixc.engine.llm import LLM
from radixc.engine.request import SamplingParams
from radixc.models.presets import init_random_weights, preset_config
from radixc.models.registry import build_model, model_config

FAMILIES = ("tiny-llama", "tiny-qwen3", "tiny-gemma2", "tiny-qwen3.5")


def variant(index: int) -> torch.nn.Module:
    """Engine index's model: a tiny family with its own layer count and MLP width (a shape no other has)."""
    raw = preset_config(FAMILIES[index % len(FAMILIES)])
    raw["intermediate_size"] = 48 + 8 * index
    raw["num_hidden_layers"] = raw.get("num_hidden_layers", 2) + index % 2
    if "layer_types" in raw:
        raw["layer_types"] = (raw["layer_types"] * 2)[: raw["num_hidden_layers"]]
    model_cls, config = model_config(raw)
    model = build_model(model_cls, config, torch.float32, "cpu")
    init_random_weights(model, index, std=0.2)
    return model


def test_twenty_compiled_engines_of_different_shapes_in_one_process():
    torch._dynamo.reset()
    counters.clear()
    limit = torch._dynamo.config.recompile_limit
    for index in range(20):
        model = variant(index)
        llm = LLM(model, max_batch_size=2, max_tokens_per_step=32, page_size=4, progress=False)
        eager = LLM(
            model, compile=False, max_batch_size=2, max_tokens_per_step=32, page_size=4, progress=False
        )
        params = SamplingParams(max_new_tokens=3)
        prompts = [[3 + index, 7, 11], [5, 9]]
        assert [o.token_ids for o in llm.generate(prompts, params)] == [
            o.token_ids for o in eager.generate(prompts, params)
        ]
    assert 20 * 2 > limit  # shared guards would have failed long before
    assert counters["stats"]["unique_graphs"] == 20 * 2  # one extend and one decode graph per engine
    assert not counters["graph_break"]


def test_two_instances_of_one_family_compiled_by_hand_keep_separate_caches():
    first, second = variant(0), variant(4)  # same family and class
    assert type(first) is type(second)
    assert first.forward.__func__.__code__ is not second.forward.__func__.__code__
    assert first.forward.__func__.__code__.co_code == type(first).forward.__code__.co_code
