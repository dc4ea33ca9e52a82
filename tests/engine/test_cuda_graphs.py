"""CUDA-graph decode on the CPU: the buckets, the static buffers and the padded batches (everything but the
capture itself) give the logits and tokens of unpadded decode steps, for a dense and a hybrid model."""

from __future__ import annotations

import random

import pytest
import torch

import radixc
from radixc.engine.cuda_graphs import DecodeGraphs, capture_batch_sizes
from radixc.engine.runner import build_runner

from .conftest import random_prompts, tiny_model


def test_buckets_are_powers_of_two_to_eight_then_multiples_of_eight_up_to_the_maximum() -> None:
    assert capture_batch_sizes(1) == [1]
    assert capture_batch_sizes(3) == [1, 2, 3]
    assert capture_batch_sizes(8) == [1, 2, 4, 8]
    assert capture_batch_sizes(30) == [1, 2, 4, 8, 16, 24, 30]
    assert capture_batch_sizes(32) == [1, 2, 4, 8, 16, 24, 32]


def _runner(model, padded: bool, compile: bool):
    runner = build_runner(
        model,
        backend="native",
        compile=compile,
        page_size=4,
        max_batch_size=12,
        max_context_len=96,
        kv_memory_bytes=1 << 22,
    )
    if padded:
        runner.decode_graphs = DecodeGraphs(runner._forward, runner.builder, 12, capture=False)
    return runner


def _decode_trace(runner, prompts: list[list[int]], steps: int, seed: int) -> tuple[list[torch.Tensor], list]:
    """Extend every prompt, then decode random subsets (batch sizes between buckets), releasing some requests on the
    way so rows and pages are reused; returns every decode step's logits and the greedy tokens."""
    rng = random.Random(seed)
    requests = [runner.builder.new_request() for _ in prompts]
    last = dict(enumerate(runner.extend(requests, prompts).argmax(-1).tolist()))
    live = list(range(len(prompts)))
    logits_trace, tokens = [], []
    for step in range(steps):
        chosen = sorted(rng.sample(live, rng.randint(1, len(live))))
        logits = runner.decode([requests[i] for i in chosen], [last[i] for i in chosen])
        logits_trace.append(logits.clone())
        for i, token in zip(chosen, logits.argmax(-1).tolist()):
            last[i] = token
        tokens.append([last[i] for i in chosen])
        if step == steps // 2:  # a finished request leaves; its row, pages and slot go back to the pools
            gone = live.pop(rng.randrange(len(live)))
            runner.builder.release(requests[gone])
    return logits_trace, tokens


@pytest.mark.parametrize(
    ("preset", "compile"), [("tiny-llama", True), ("tiny-qwen3.5", True), ("tiny-qwen3-next", False)]
)
def test_padded_static_decode_equals_unpadded_decode(preset: str, compile: bool) -> None:
    model = tiny_model(preset)
    prompts = random_prompts(11, 3, 20, seed=5)
    plain_logits, plain_tokens = _decode_trace(_runner(model, False, compile), prompts, 12, seed=9)
    padded = _runner(model, True, compile)
    padded_logits, padded_tokens = _decode_trace(padded, prompts, 12, seed=9)
    assert padded_tokens == plain_tokens
    for plain, pad in zip(plain_logits, padded_logits):
        assert pad.shape == plain.shape
        torch.testing.assert_close(pad, plain, rtol=1e-5, atol=1e-5)
    assert padded.decode_graphs.captured_sizes == []  # nothing is captured without CUDA


def test_the_decode_batch_past_the_largest_bucket_is_refused_by_name() -> None:
    runner = _runner(tiny_model("tiny-llama"), True, False)
    with pytest.raises(ValueError, match="exceeds the largest CUDA-graph bucket 12"):
        runner.decode_graphs.bucket(13)


def test_asking_for_cuda_graphs_where_they_cannot_run_says_why() -> None:
    with pytest.raises(
        ValueError, match="cuda_graphs=True: CUDA graphs need a CUDA device; the model is on cpu"
    ):
        radixc.LLM("tiny-llama", device="cpu", compile=False, cuda_graphs=True)
    llm = radixc.LLM("tiny-llama", device="cpu", compile=False)
    assert llm.runner.decode_graphs is None  # off by default where capture cannot run
