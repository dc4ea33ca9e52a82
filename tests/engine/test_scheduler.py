"""Scheduler under stress, with an exact model-free check of the KV cache: a stand-in model writes each token
id into its KV slot and predicts a hash of everything it reads back through req_to_token. Any request that
reads another's page, a stale page or a misplaced slot gets different tokens than the pure-Python reference.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from radixc.cache_spec import KVCacheSpec
from radixc.engine.llm import LLM
from radixc.engine.request import SamplingParams
from radixc.forward_batch import ForwardMode

# every test runs with steps in order and overlapped (scheduling fixture)
pytestmark = pytest.mark.usefixtures("scheduling")

VOCAB = 997


def next_token(tokens: list[int]) -> int:
    """The stand-in model's prediction: a rolling hash of the whole sequence."""
    h = 0
    for t in tokens:
        h = (h * 31 + t + 1) % VOCAB
    return h


class TokenEchoModel(nn.Module):
    """Stores token ids as keys in a one-layer KV pool; logits are one-hot at next_token(tokens read back)."""

    eos_token_ids = ()

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))  # gives the pools their dtype

    def kv_cache_spec(self) -> KVCacheSpec:
        return KVCacheSpec(1, 1, 1, 1, (0,))

    def forward(self, input_ids, positions, forward_batch):
        fb = forward_batch
        keys = fb.token_to_kv_pool.k_buffer[0][:, 0, 0]
        keys[fb.out_cache_loc] = input_ids.float()
        logits = torch.zeros(input_ids.shape[0], VOCAB)
        for b in range(fb.batch_size):
            seq_len, start, count = (
                int(fb.seq_lens[b]),
                int(fb.extend_start_loc[b]),
                int(fb.extend_seq_lens[b]),
            )
            assert positions[start : start + count].tolist() == list(range(seq_len - count, seq_len))
            slots = fb.req_to_token_pool.req_to_token[fb.req_pool_indices[b], :seq_len].long()
            seen = keys[slots].long().tolist()
            for row in range(count):
                logits[start + row, next_token(seen[: seq_len - count + row + 1])] = 1.0
        return logits if fb.logits_indices is None else logits[fb.logits_indices]


def reference(prompt: list[int], params: SamplingParams) -> list[int]:
    tokens, out = list(prompt), []
    while len(out) < params.max_new_tokens:
        out.append(next_token(tokens))
        tokens.append(out[-1])
        if out[-1] in params.stop_token_ids:
            break
    return out


def workload(count: int, seed: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """Prompts over a few shared prefixes (some prompts are prefixes of others), random lengths and limits."""
    gen = torch.Generator().manual_seed(seed)
    randint = lambda low, high, n=1: torch.randint(low, high, (n,), generator=gen).tolist()  # noqa: E731
    prefixes = [randint(0, VOCAB, n) for n in randint(3, 30, 5)]
    prompts, params = [], []
    for _ in range(count):
        prefix = prefixes[randint(0, 5)[0]]
        prompts.append(prefix[: randint(1, len(prefix) + 1)[0]] + randint(0, VOCAB, randint(0, 20)[0]))
        stop = tuple(randint(0, VOCAB, 40))  # ends some requests early with finish_reason "stop"
        params.append(SamplingParams(max_new_tokens=randint(1, 30)[0], stop_token_ids=stop))
    return prompts, params


class StepRecorder:
    """Wraps Scheduler.schedule to record each step with the state it was chosen in."""

    def __init__(self, scheduler):
        self.scheduler, self.schedule, self.steps = scheduler, scheduler.schedule, []
        scheduler.schedule = self

    def __call__(self):
        decode_ready = any(r.decoding for r in self.scheduler.running)
        preemptions = self.scheduler.num_preemptions
        step = self.schedule()
        if step is not None:
            preempted = self.scheduler.num_preemptions > preemptions
            self.steps.append((step, decode_ready, preempted, len(self.scheduler.running)))
        return step


@pytest.mark.parametrize(
    "page_size, pool_pages, max_batch_size, max_tokens_per_step, prefix_cache",
    [
        (4, 400, 16, 64, True),  # roomy: batching and the prefix cache only
        (4, 40, 16, 64, True),  # tight: waiting, preemption and eviction
        (1, 90, 8, 7, True),  # one-token pages and tiny chunks
        (8, 20, 32, 256, False),  # tight, without the cache
        (16, 12, 5, 20, True),  # pages larger than most prompts
        (4, 2000, 160, 8192, True),  # every request admitted at once: decode steps follow one another
    ],
)
def test_every_request_reads_exactly_its_own_tokens_back_from_the_kv_cache(
    harness, scheduling, page_size, pool_pages, max_batch_size, max_tokens_per_step, prefix_cache
):
    prompts, params = workload(150, seed=page_size * pool_pages)
    llm = LLM(
        TokenEchoModel(),
        compile=False,
        page_size=page_size,
        max_batch_size=max_batch_size,
        max_tokens_per_step=max_tokens_per_step,
        kv_memory_bytes=pool_pages * page_size * 2 * 4,
        enable_prefix_cache=prefix_cache,
        progress=False,
    )
    recorder = StepRecorder(llm.scheduler)
    outputs = llm.generate(prompts, params)
    for i, (out, prompt, p) in enumerate(zip(outputs, prompts, params)):
        expected = reference(prompt, p)
        assert out.error is None and out.token_ids == expected, i
        assert out.finish_reason == ("stop" if expected[-1] in p.stop_token_ids else "length")
    previous = None
    for step, decode_ready, preempted, running in recorder.steps:
        assert running <= max_batch_size
        if step.mode is ForwardMode.EXTEND:
            assert sum(len(t) for t in step.new_tokens) <= max_tokens_per_step
            # extend and decode alternate: a decode-ready request never waits two extend steps in a row
            assert not (previous is ForwardMode.EXTEND and decode_ready and not preempted)
        previous = step.mode
    cached = llm.prefix_cache_stats().cached_pages if prefix_cache else 0
    harness.assert_pools_empty(llm, cached_pages=cached)
    llm.clear_prefix_cache()
    harness.assert_pools_empty(llm)
    if pool_pages < 100:
        assert llm.scheduler.num_preemptions > 0
    if prefix_cache:
        assert llm.prefix_cache_stats().hit_rate > 0.1
    stats = llm.step_stats
    if not scheduling:
        assert stats.overlapped_steps == 0
    elif max_batch_size >= len(prompts):  # nothing waits: most decode steps follow the one before
        assert stats.overlapped_steps > stats.decode_steps * 2 // 3, stats
    else:
        assert stats.overlapped_steps > 0
