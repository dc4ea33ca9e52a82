"""LLM(tensor_parallel_size=2) on the CPU over gloo: the same logits and greedy tokens as one rank from a Hugging
Face checkpoint each rank slices on load (dense, Gemma 2, hybrid GDN, hybrid GDN + MoE; eager and compiled with
no graph break), hybrid prefix-cache hits restoring the same GDN state on every rank, a torchrun launch where
every rank builds the LLM, a killed worker raising on rank 0 with no process left, and bad sizes refused before
anything starts."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch._dynamo.utils import counters
from transformers import (
    Gemma2Config,
    Gemma2ForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    Qwen3_5ForCausalLM,
    Qwen3_5TextConfig,
    Qwen3Config,
    Qwen3ForCausalLM,
    Qwen3NextConfig,
    Qwen3NextForCausalLM,
)

from radixc.engine.llm import LLM
from radixc.engine.request import SamplingParams
from radixc.engine.tensor_parallel import TensorParallelError
from radixc.models import build_preset
from radixc.models.presets import preset_config

HF_CLASSES = {
    "tiny-llama": (LlamaConfig, LlamaForCausalLM),
    "tiny-qwen3": (Qwen3Config, Qwen3ForCausalLM),
    "tiny-gemma2": (Gemma2Config, Gemma2ForCausalLM),
    "tiny-qwen3.5": (Qwen3_5TextConfig, Qwen3_5ForCausalLM),
    "tiny-qwen3-next": (Qwen3NextConfig, Qwen3NextForCausalLM),
}
GREEDY = SamplingParams(max_new_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module", params=sorted(HF_CLASSES))
def checkpoint(request, tmp_path_factory):
    """A tiny checkpoint saved by transformers, weights large enough (std 0.2) that greedy tokens vary:
    tiny-llama (GQA 4:2, KV heads split), tiny-qwen3 (MQA, the one KV head replicated), tiny-gemma2 (soft caps,
    sliding window), tiny-qwen3.5 (GDN heads split: 2 key / 4 value heads) and tiny-qwen3-next (GDN with HF's
    interleaved projections, 4 experts and a shared expert split by intermediate rows)."""
    config_cls, model_cls = HF_CLASSES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    hf = model_cls._from_config(config_cls(**preset_config(request.param)), attn_implementation="eager")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in hf.named_parameters():
            # small embeddings: Gemma 2 scales them by sqrt(hidden), and large ones make it repeat the prompt
            param.copy_(torch.randn(param.shape, generator=gen) * (0.02 if "embed_tokens" in name else 0.2))
    hf.save_pretrained(path)
    return path


def prompts(seed: int) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(2, 384, (n,), generator=gen).tolist() for n in (5, 19, 11)]


def last_token_logits(llm: LLM, token_lists: list[list[int]]) -> torch.Tensor:
    """Float32 logits `[B, vocab]` of each prompt's last token, through the engine's runner (and broadcast)."""
    memories = [llm.runner.builder.new_request() for _ in token_lists]
    try:
        return llm.runner.extend(memories, token_lists).clone()
    finally:
        for memory in memories:
            llm.runner.builder.release(memory)


def test_two_ranks_match_one_rank_in_logits_and_greedy_tokens(checkpoint):
    token_lists = prompts(seed=1)
    single = LLM(checkpoint, compile=False, device="cpu")
    expected_logits = last_token_logits(single, token_lists)
    expected = [o.token_ids for o in single.generate(token_lists, GREEDY)]
    llm = LLM(checkpoint, compile=False, device="cpu", tensor_parallel_size=2)
    workers = llm.tensor_parallel.processes
    try:
        torch.testing.assert_close(last_token_logits(llm, token_lists), expected_logits, rtol=1e-4, atol=1e-4)
        assert [o.token_ids for o in llm.generate(token_lists, GREEDY)] == expected
        assert len({tuple(t) for t in expected}) > 1 and any(len(set(t)) > 1 for t in expected)  # varied
        # each rank holds half of the query heads and vocabulary rows
        layer = llm.model.model.layers[-2]  # full attention in every family
        assert (layer.self_attn.num_heads, llm.model.model.embed_tokens.weight.shape[0]) == (2, 192)
    finally:
        llm.close()
    assert [w.exitcode for w in workers] == [0]


# tiny-qwen3 compiles as tiny-llama does (its replicated KV head is a shape, not other code)
@pytest.mark.parametrize(
    "checkpoint", ["tiny-llama", "tiny-gemma2", "tiny-qwen3.5", "tiny-qwen3-next"], indirect=True
)
def test_compiled_two_ranks_match_one_rank_in_one_graph_per_mode(checkpoint):
    token_lists = prompts(seed=4)
    expected = [
        o.token_ids for o in LLM(checkpoint, compile=False, device="cpu").generate(token_lists, GREEDY)
    ]
    torch._dynamo.reset()
    counters.clear()
    llm = LLM(checkpoint, compile=True, device="cpu", tensor_parallel_size=2)
    try:
        assert [o.token_ids for o in llm.generate(token_lists, GREEDY)] == expected
    finally:
        llm.close()
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 2  # one EXTEND graph, one DECODE graph, collectives inside


@pytest.mark.parametrize("checkpoint", ["tiny-qwen3.5"], indirect=True)
def test_hybrid_prefix_cache_hits_restore_the_same_gdn_state_on_every_rank(checkpoint):
    """Three turns sharing a 12-token prefix: the second plants a GDN checkpoint where the prompts part, the
    third restores it (rank 0 journals the copies, the worker replays them on its own heads' state)."""
    gen = torch.Generator().manual_seed(9)
    shared = torch.randint(2, 384, (12,), generator=gen).tolist()
    turns = [[shared + torch.randint(2, 384, (n,), generator=gen).tolist()] for n in (3, 6, 5)]
    settings = dict(compile=False, page_size=4, device="cpu")
    single = LLM(checkpoint, **settings)
    expected = [single.generate(turn, GREEDY)[0].token_ids for turn in turns]
    llm = LLM(checkpoint, tensor_parallel_size=2, **settings)
    try:
        assert [llm.generate(turn, GREEDY)[0].token_ids for turn in turns] == expected
        counts = [
            (s.hit_tokens, s.gdn_checkpoints_taken, s.gdn_restores)
            for s in (e.prefix_cache_stats() for e in (llm, single))
        ]
        assert counts[0] == counts[1] and counts[0][2] >= 1  # the same hits and checkpoint copies as one rank
    finally:
        llm.close()


def test_killed_worker_makes_generate_raise_and_leaves_no_process():
    llm = LLM("tiny-llama", compile=False, device="cpu", tensor_parallel_size=2)
    [worker] = llm.tensor_parallel.processes
    assert len(llm.generate(prompts(seed=5), GREEDY)) == 3
    os.kill(worker.pid, signal.SIGKILL)
    start = time.perf_counter()
    with pytest.raises(TensorParallelError, match=r"rank 1 \(pid \d+\) exited with code -9"):
        llm.generate(prompts(seed=6), GREEDY)
    assert time.perf_counter() - start < 20
    assert not worker.is_alive() and multiprocessing.active_children() == []
    with pytest.raises(TensorParallelError, match="workers are stopped"):
        llm.generate(prompts(seed=7), GREEDY)


@pytest.mark.parametrize(
    ("model", "size", "match"),
    [
        ("tiny-llama", 0, "must be an int >= 1"),
        ("tiny-llama", 3, "does not divide the 4 attention heads"),
        ("tiny-llama", 8, "does not divide the 4 attention heads"),
        ("tiny-qwen3.5", 4, r"does not divide the GDN key heads \(2\)"),
        ("tiny-bert", 2, "decoder models only"),
        ("no-such-model", 2, "neither a checkpoint directory nor a preset"),
    ],
)
def test_bad_tensor_parallel_size_is_a_value_error_before_any_process_starts(model, size, match):
    with pytest.raises(ValueError, match=match):
        LLM(model, compile=False, tensor_parallel_size=size)
    assert multiprocessing.active_children() == []


@pytest.mark.parametrize("field", ["moe_intermediate_size", "shared_expert_intermediate_size"])
def test_moe_intermediate_sizes_must_split_evenly(field, tmp_path):
    config = {**preset_config("tiny-qwen3-next"), field: 33}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"does not divide the MoE .*intermediate size \(33\)"):
        LLM(tmp_path, compile=False, tensor_parallel_size=2)
    assert multiprocessing.active_children() == []


def test_cuda_graphs_are_refused_with_tensor_parallelism():
    with pytest.raises(ValueError, match="cuda_graphs=True is not supported with tensor parallelism"):
        LLM("tiny-llama", compile=False, cuda_graphs=True, tensor_parallel_size=2)
    assert multiprocessing.active_children() == []


def test_a_torchrun_launch_of_another_size_is_refused(monkeypatch):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "4")
    with pytest.raises(ValueError, match="under torchrun with WORLD_SIZE=4: .* must be equal"):
        LLM("tiny-llama", compile=False, tensor_parallel_size=2)


def test_a_module_cannot_be_split_across_processes():
    with pytest.raises(ValueError, match="not an nn.Module"):
        LLM(build_preset("tiny-llama"), tensor_parallel_size=2)


def test_torchrun_ranks_each_build_the_llm_and_rank_0_gets_one_rank_tokens(tmp_path):
    token_lists = prompts(seed=8)
    expected = [
        o.token_ids for o in LLM("tiny-llama", compile=False, device="cpu").generate(token_lists, GREEDY)
    ]
    script = Path(__file__).with_name("torchrun_generate.py")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    command += [str(script), "tiny-llama", json.dumps(token_lists), str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), *sys.path])}
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stderr[-4000:]
    assert json.loads((tmp_path / "rank0.json").read_text()) == expected
    assert "rank 1 of a torchrun launch served rank 0's steps" in json.loads(
        (tmp_path / "rank1.json").read_text()
    )
