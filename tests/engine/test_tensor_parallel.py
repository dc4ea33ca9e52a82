"""LLM(tensor_parallel_size=2) on the CPU over gloo: the same logits and greedy tokens as one rank from a Hugging
Face checkpoint each rank slices on load, the functional all-reduce inside the one compiled graph, a killed
worker raising on rank 0 with no process left, and bad sizes refused before anything starts."""

from __future__ import annotations

import multiprocessing
import os
import signal
import time

import pytest
import torch
import torch.multiprocessing as mp
from transformers import LlamaConfig, LlamaForCausalLM, Qwen3Config, Qwen3ForCausalLM

from radixc.engine.llm import LLM
from radixc.engine.request import SamplingParams
from radixc.engine.tensor_parallel import TensorParallelError, _free_port
from radixc.models import build_preset
from radixc.models.parallel import TensorParallel, tensor_parallel
from radixc.models.presets import init_random_weights, preset_config

HF_CLASSES = {"tiny-llama": (LlamaConfig, LlamaForCausalLM), "tiny-qwen3": (Qwen3Config, Qwen3ForCausalLM)}
GREEDY = SamplingParams(max_new_tokens=8, ignore_eos=True)


@pytest.fixture(scope="module", params=sorted(HF_CLASSES))
def checkpoint(request, tmp_path_factory):
    """A tiny checkpoint saved by transformers, weights large enough (std 0.2) that greedy tokens vary:
    tiny-llama (GQA 4:2, KV heads split) and tiny-qwen3 (MQA, the one KV head replicated)."""
    config_cls, model_cls = HF_CLASSES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    hf = model_cls._from_config(config_cls(**preset_config(request.param)), attn_implementation="eager")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in hf.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * 0.2)
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
    single = LLM(checkpoint, compile=False)
    expected_logits = last_token_logits(single, token_lists)
    expected = [o.token_ids for o in single.generate(token_lists, GREEDY)]
    llm = LLM(checkpoint, compile=False, tensor_parallel_size=2)
    workers = llm.tensor_parallel.processes
    try:
        torch.testing.assert_close(last_token_logits(llm, token_lists), expected_logits, rtol=1e-4, atol=1e-4)
        assert [o.token_ids for o in llm.generate(token_lists, GREEDY)] == expected
        assert len({tuple(t) for t in expected}) > 1 and any(len(set(t)) > 1 for t in expected)  # varied
        # each rank holds half of the query heads and vocabulary rows
        attn = llm.model.model.layers[0].self_attn
        assert (attn.num_heads, llm.model.model.embed_tokens.weight.shape[0]) == (2, 192)
    finally:
        llm.close()
    assert [w.exitcode for w in workers] == [0]


def _compile_shard(rank: int, port: int, results: dict) -> None:
    """One rank: build tiny-qwen3's shard, compile it with fullgraph, record the graphs and the logits."""
    from radixc.engine.runner import build_runner

    torch.distributed.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2
    )
    try:
        tp = TensorParallel(rank, 2, torch.distributed.group.WORLD.group_name)
        with tensor_parallel(tp):
            model = build_preset("tiny-qwen3")
            init_random_weights(model, seed=3, std=0.2)
        graphs = []

        def record(gm: torch.fx.GraphModule, example_inputs):
            graphs.append(gm)
            return gm.forward

        runner = build_runner(model, compile=False)
        runner.wrap_forward(lambda forward: torch.compile(forward, fullgraph=True, backend=record))
        requests = [runner.builder.new_request() for _ in range(2)]
        logits = runner.extend(requests, prompts(seed=2)[:2])
        targets = [str(n.target) for g in graphs for n in g.graph.nodes if n.op == "call_function"]
        all_reduces = sum(t.startswith("_c10d_functional.all_reduce") for t in targets)
        results[rank] = (len(graphs), all_reduces, logits.clone())
    finally:
        torch.distributed.destroy_process_group()


def test_compiled_shard_is_one_graph_with_the_functional_all_reduce():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_compile_shard, args=(_free_port(), results), nprocs=2)
        results = dict(results)
    model = build_preset("tiny-qwen3")
    init_random_weights(model, seed=3, std=0.2)
    from radixc.engine.runner import build_runner

    runner = build_runner(model, compile=False)
    expected = runner.extend([runner.builder.new_request() for _ in range(2)], prompts(seed=2)[:2])
    layers = model.config.num_hidden_layers
    for rank in (0, 1):
        num_graphs, all_reduces, logits = results[rank]
        # embedding + (o_proj, down_proj) per layer; one graph (fullgraph: no breaks)
        assert (num_graphs, all_reduces) == (1, 1 + 2 * layers)
        torch.testing.assert_close(logits, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_compiled_two_ranks_match_one_rank(checkpoint):
    token_lists = prompts(seed=4)
    expected = [o.token_ids for o in LLM(checkpoint, compile=False).generate(token_lists, GREEDY)]
    llm = LLM(checkpoint, compile=True, tensor_parallel_size=2)
    try:
        assert [o.token_ids for o in llm.generate(token_lists, GREEDY)] == expected
    finally:
        llm.close()


def test_killed_worker_makes_generate_raise_and_leaves_no_process():
    llm = LLM("tiny-llama", compile=False, tensor_parallel_size=2)
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
        ("tiny-qwen3.5", 2, "hybrid GDN models are not tensor-parallel"),
        ("tiny-bert", 2, "decoder models only"),
        ("no-such-model", 2, "neither a checkpoint directory nor a preset"),
    ],
)
def test_bad_tensor_parallel_size_is_a_value_error_before_any_process_starts(model, size, match):
    with pytest.raises(ValueError, match=match):
        LLM(model, compile=False, tensor_parallel_size=size)
    assert multiprocessing.active_children() == []


def test_a_module_cannot_be_split_across_processes():
    with pytest.raises(ValueError, match="not an nn.Module"):
        LLM(build_preset("tiny-llama"), tensor_parallel_size=2)
