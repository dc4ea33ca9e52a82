"""LLM with backend="triton" (on CUDA, or under Triton's CPU interpreter): the same greedy tokens as the native
backend, for a dense model and a hybrid one (Triton attention + Triton GDN)."""

from __future__ import annotations

import pytest
import torch

from radixc.engine.llm import LLM
from radixc.engine.request import SamplingParams

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.triton
@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen3.5"])
def test_triton_backend_gives_the_native_greedy_tokens(harness, preset):
    model = harness.tiny_model(preset).to(DEVICE)
    prompts = harness.random_prompts(3, 3, 17, seed=0)
    params = SamplingParams(max_new_tokens=4)
    tokens = {}
    for backend in ("native", "triton"):
        llm = LLM(model, backend=backend, compile=False, page_size=4, max_tokens_per_step=16, progress=False)
        assert llm.attn_backend.name == backend
        if preset == "tiny-qwen3.5":
            assert llm.attn_backend.gdn_backend.name == backend
        tokens[backend] = [o.token_ids for o in llm.generate(prompts, params)]
    assert tokens["native"] == tokens["triton"]
