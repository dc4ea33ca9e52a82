"""Soak: 1,000 requests of random prompts (lists, numpy arrays, tensors; some deliberately bad), sampling
settings, seeds and stop tokens through one engine with a KV pool far too small for them, on a tiny dense and a
tiny hybrid model. Each request completes or fails alone with its own error; greedy and seeded ones give what
they give alone; every KV page, GDN slot and request row is back in its pool at the end."""

from __future__ import annotations

import dataclasses
import random
import time

import numpy as np
import pytest
import torch

from radixc.engine.config import gdn_state_bytes
from radixc.engine.llm import LLM
from radixc.engine.request import RequestOutput, SamplingParams

pytestmark = pytest.mark.slow

NUM_REQUESTS = 1000
CONTEXT = 64
PAGE_SIZE = 4
KV_PAGES = 128  # 512 token slots for up to 32 running requests of up to 64 tokens: preemption is constant
VOCAB = 384  # the tiny presets'
EOS = 1  # the tiny presets'
CHECKPOINTS = 16  # GDN checkpoints the hybrid model's prefix cache may hold
SOLO_CHECKS = 60  # greedy or seeded requests re-run alone per model (a solo run costs a full generate)


@dataclasses.dataclass
class Case:
    """One request: what the user passes, the ids it stands for, its params and (if bad) its expected error."""

    prompt: object
    ids: list[int]
    params: SamplingParams
    error: str | None = None

    @property
    def deterministic(self) -> bool:
        return self.error is None and (self.params.greedy or self.params.seed is not None)


def random_params(rng: random.Random) -> SamplingParams:
    """Greedy, seeded or unseeded sampling with random filters, lengths and stop tokens."""
    mode = rng.choices(["greedy", "seeded", "unseeded"], weights=[4, 4, 2])[0]
    sampled = mode != "greedy"
    return SamplingParams(
        max_new_tokens=rng.randint(1, 16),
        temperature=rng.uniform(0.3, 1.5) if sampled else 0.0,
        top_k=rng.choice([-1, 1, 5, 50]) if sampled else -1,
        top_p=rng.choice([1.0, 0.9, 0.5]) if sampled else 1.0,
        seed=rng.randrange(1 << 31) if mode == "seeded" else None,
        stop_token_ids=rng.sample(range(VOCAB), rng.choice([0, 0, 1, 8, 40])),
        ignore_eos=rng.random() < 0.5,
    )


def bad_case(rng: random.Random, ids: list[int], params: SamplingParams) -> Case:
    """A request that must fail alone, and the words its error must contain."""
    kind = rng.choice(["floats", "bools", "bytes", "outside_vocab", "too_long", "empty"])
    if kind == "floats":
        return Case([t + 0.5 for t in ids], [], params, "token ids must be integers, got float")
    if kind == "bools":
        return Case(torch.tensor(ids) % 2 == 0, [], params, "token ids must be integers, got a torch tensor")
    if kind == "bytes":
        return Case(bytes(t % 256 for t in ids), [], params, "are not token ids")
    if kind == "outside_vocab":
        return Case(ids + [VOCAB + rng.randrange(100)], [], params, "outside the vocabulary")
    if kind == "too_long":
        long = [rng.randrange(2, VOCAB) for _ in range(rng.randint(CONTEXT, CONTEXT + 20))]
        return Case(long, [], params, "leaves no room for a new token")
    return Case([], [], params, "empty prompt")


def make_cases(seed: int) -> list[Case]:
    """NUM_REQUESTS cases: random lengths in [1, 48], a third extending one of four shared prefixes, passed as
    lists, numpy arrays or tensors of several integer dtypes; about 5% bad."""
    rng = random.Random(seed)
    shared = [[rng.randrange(2, VOCAB) for _ in range(rng.randint(8, 24))] for _ in range(4)]
    containers = [
        list,
        lambda ids: np.array(ids, dtype=np.int64),
        lambda ids: np.array(ids, dtype=np.int32),
        lambda ids: torch.tensor(ids),
        lambda ids: torch.tensor(ids, dtype=torch.int32),
    ]
    cases = []
    for _ in range(NUM_REQUESTS):
        ids = [rng.randrange(2, VOCAB) for _ in range(rng.randint(1, 48))]
        if rng.random() < 0.3:
            ids = (rng.choice(shared) + ids)[:48]
        params = random_params(rng)
        if rng.random() < 0.05:
            cases.append(bad_case(rng, ids, params))
        else:
            cases.append(Case(rng.choice(containers)(ids), ids, params))
    return cases


def check_output(index: int, case: Case, out: RequestOutput) -> None:
    """A bad request failed with its error and nothing else; a good one ran to a stop token or its limit."""
    if case.error is not None:
        assert out.error is not None and case.error in out.error, (index, case.error, out.error)
        assert out.token_ids == [] and out.finish_reason is None
        return
    assert out.error is None, (index, out.error)
    assert out.prompt_token_ids == case.ids
    tokens, params = out.token_ids, case.params
    stops = set(params.stop_token_ids) | (set() if params.ignore_eos else {EOS})
    assert 1 <= len(tokens) <= params.max_new_tokens and all(0 <= t < VOCAB for t in tokens)
    assert not stops & set(tokens[:-1]), (index, "generation went on past a stop token")
    if tokens[-1] in stops:
        assert out.finish_reason == "stop", index
    else:
        assert out.finish_reason == "length", index
        assert len(tokens) == params.max_new_tokens or len(case.ids) + len(tokens) == CONTEXT, index


def kv_bytes(model: torch.nn.Module, pages: int) -> int:
    """KV memory for `pages` float32 pages of the model's full-attention layers."""
    spec = model.kv_cache_spec()
    per_token = len(spec.full_attention_layer_ids) * spec.num_kv_heads * (spec.head_dim + spec.v_head_dim) * 4
    return pages * PAGE_SIZE * per_token


def checkpoint_bytes(model: torch.nn.Module, count: int) -> int | None:
    """Room for `count` GDN checkpoints (None for a dense model): the default, an eighth of this deliberately
    small KV pool, holds one, too few for the shared prefixes to be hit reliably while unseeded requests vary
    the schedule from run to run."""
    spec = model.kv_cache_spec()
    return count * 2 * gdn_state_bytes(spec, torch.float32) if spec.gdn_layer_ids else None


@pytest.mark.parametrize("model_name", ["tiny_llama", "tiny_qwen3_5"], ids=["dense", "hybrid"])
def test_1000_random_requests_on_a_small_kv_pool_each_complete_or_fail_alone(harness, request, model_name):
    model = request.getfixturevalue(model_name)
    llm = LLM(
        model,
        compile=False,
        page_size=PAGE_SIZE,
        max_batch_size=32,
        max_tokens_per_step=192,
        max_context_len=CONTEXT,
        kv_memory_bytes=kv_bytes(model, KV_PAGES),
        gdn_checkpoint_memory_bytes=checkpoint_bytes(model, CHECKPOINTS),
        progress=False,
    )
    assert llm.runner.kv_pool.capacity_pages == KV_PAGES
    cases = make_cases(seed=31)
    start = time.perf_counter()
    outputs = llm.generate([c.prompt for c in cases], [c.params for c in cases])
    elapsed = time.perf_counter() - start
    print(
        f"{model_name}: {NUM_REQUESTS} requests in {elapsed:.1f}s, {llm.scheduler.num_preemptions} preemptions, "
        f"prefix cache {llm.prefix_cache_stats()}"
    )

    assert [o.index for o in outputs] == list(range(NUM_REQUESTS))
    for index, (case, out) in enumerate(zip(cases, outputs)):
        check_output(index, case, out)
    assert sum(c.error is not None for c in cases) > 20  # every kind of bad request came up, among good ones
    assert llm.scheduler.num_preemptions > 50
    stats = llm.prefix_cache_stats()
    if stats is not None:
        assert stats.hit_tokens > 0
    harness.assert_pools_empty(llm, cached_pages=0 if stats is None else stats.cached_pages)

    deterministic = [i for i, c in enumerate(cases) if c.deterministic]
    for index in random.Random(32).sample(deterministic, SOLO_CHECKS):
        (alone,) = llm.generate([cases[index].ids], cases[index].params)
        assert alone.token_ids == outputs[index].token_ids, f"request {index} differs from its solo run"
    llm.clear_prefix_cache()
    harness.assert_pools_empty(llm)
