"""LLM with compile=True: the same greedy tokens as eager, one graph per forward mode across every batch
shape the scheduler produces, and no graph breaks."""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from radixc.engine.llm import LLM
from radixc.engine.request import SamplingParams

# the compiled engine runs with steps in order and overlapped (scheduling fixture)
pytestmark = pytest.mark.usefixtures("scheduling")


def test_compiled_and_eager_engines_give_the_same_greedy_tokens(harness, tiny_llama):
    shared = harness.random_prompts(1, 10, 10, seed=30)[0]
    prompts = harness.random_prompts(12, 1, 40, seed=31)
    prompts[6:] = [shared + p for p in prompts[6:]]  # prefix-cache hits: extends with a cached prefix
    gen = torch.Generator().manual_seed(32)
    params = [SamplingParams(max_new_tokens=int(n)) for n in torch.randint(1, 16, (12,), generator=gen)]
    settings = dict(page_size=4, max_batch_size=5, max_tokens_per_step=32, progress=False)
    eager = LLM(tiny_llama, compile=False, **settings).generate(prompts, params)
    torch._dynamo.reset()
    counters.clear()
    compiled = LLM(tiny_llama, compile=True, **settings).generate(prompts, params)
    assert [o.token_ids for o in compiled] == [o.token_ids for o in eager]
    assert all(o.error is None for o in compiled)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 2  # one EXTEND graph, one DECODE graph
