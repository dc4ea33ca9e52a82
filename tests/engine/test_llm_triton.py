"""LLM with backend="triton" (Triton's CPU interpreter): the same greedy tokens as the native backend, for a
dense model and a hybrid one (Triton attention + Triton GDN)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

# TRITON_INTERPRET is read when kernels are decorated, so the engine runs in a fresh interpreter process
SCRIPT = """
import torch
from radixc.engine.llm import LLM
from radixc.engine.request import SamplingParams
from radixc.models.presets import build_preset, init_random_weights

torch.set_num_threads(1)
gen = torch.Generator().manual_seed(0)
prompts = [torch.randint(2, 384, (n,), generator=gen).tolist() for n in (3, 17, 9)]
params = SamplingParams(max_new_tokens=4)
for name in ("tiny-llama", "tiny-qwen3.5"):
    model = build_preset(name)
    init_random_weights(model, 0, std=0.2)
    tokens = {}
    for backend in ("native", "triton"):
        llm = LLM(model, backend=backend, compile=False, page_size=4, max_tokens_per_step=16, progress=False)
        assert llm.attn_backend.name == backend, llm.attn_backend
        tokens[backend] = [o.token_ids for o in llm.generate(prompts, params)]
    assert tokens["native"] == tokens["triton"], (name, tokens)
    if name == "tiny-qwen3.5":
        assert llm.attn_backend.gdn_backend.name == "triton"
print("ok")
"""


def test_triton_backend_gives_the_native_greedy_tokens_for_dense_and_hybrid_models():
    pytest.importorskip("triton")
    env = {**os.environ, "TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]
