"""HybridPrefixCache: GDN state checkpoints in the prefix cache of hybrid models.

A stand-in hybrid model makes any wrong state exact to detect: its "GDN layer" keeps a rolling hash of the tokens
it has seen and their count in the request's GDN slot, its attention layer reads the tokens back from the KV
cache, and it predicts from both, so a request resumed from a wrong checkpoint, a stale slot or a misplaced page
gets other tokens than the pure-Python reference. The tiny Qwen3.5 / Qwen3-Next presets then check that the cache
changes no token, and the restored state is compared with a float64 recomputation.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from radixc.cache_spec import KVCacheSpec
from radixc.engine.backends import HybridAttnBackend, NativeBackend
from radixc.engine.batch_builder import BatchBuilder, RequestMemory
from radixc.engine.config import gdn_state_bytes
from radixc.engine.gdn_checkpoints import HybridPrefixCache
from radixc.engine.llm import LLM
from radixc.engine.memory_pool import GDNPool, KVPool, ReqToTokenPool
from radixc.engine.request import Request, SamplingParams
from radixc.models.presets import build_preset, init_random_weights

VOCAB = 997


def rolling_hash(tokens: list[int], h: int = 0) -> int:
    for t in tokens:
        h = (h * 31 + t + 1) % VOCAB
    return h


def next_token(tokens: list[int]) -> int:
    """The stand-in model's prediction (its state hash and its KV hash agree when both are right)."""
    return (rolling_hash(tokens) * 2 + len(tokens)) % VOCAB


class StateEchoModel(nn.Module):
    """Layer 0 stores token ids as keys in the KV pool; GDN layer 1 keeps (hash, count) of the tokens seen in its
    recurrent and conv state, resumed only past a prefix (like the real kernels); logits are one-hot at the
    prediction from the state hash and the KV tokens, and a state whose count is not the prefix length fails."""

    eos_token_ids = ()

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def kv_cache_spec(self) -> KVCacheSpec:
        return KVCacheSpec(
            2,
            1,
            1,
            1,
            (0,),
            gdn_layer_ids=(1,),
            conv_dim=1,
            conv_kernel_size=2,
            num_k_heads=1,
            num_v_heads=1,
            head_k_dim=1,
            head_v_dim=1,
        )

    def forward(self, input_ids, positions, forward_batch):
        fb = forward_batch
        keys = fb.token_to_kv_pool.k_buffer[0][:, 0, 0]
        keys[fb.out_cache_loc] = input_ids.float()
        conv, ssm = fb.gdn_pool.layer_states(0)
        logits = torch.zeros(input_ids.shape[0], VOCAB)
        for b in range(fb.batch_size):
            seq_len, start, count = (
                int(fb.seq_lens[b]),
                int(fb.extend_start_loc[b]),
                int(fb.extend_seq_lens[b]),
            )
            prefix, slot = seq_len - count, int(fb.gdn_slots[b])
            h, seen_count = (int(ssm[slot, 0, 0, 0]), int(conv[slot, 0, 0])) if prefix else (0, 0)
            assert seen_count == prefix, f"GDN state of {seen_count} tokens resumed at position {prefix}"
            slots = fb.req_to_token_pool.req_to_token[fb.req_pool_indices[b], :seq_len].long()
            seen = keys[slots].long().tolist()
            for row in range(count):
                h = rolling_hash([int(input_ids[start + row])], h)
                n = prefix + row + 1
                logits[start + row, (h + rolling_hash(seen[:n]) + n) % VOCAB] = 1.0
            ssm[slot, 0, 0, 0], conv[slot, 0, 0] = float(h), float(seq_len)
        return logits if fb.logits_indices is None else logits[fb.logits_indices]


def reference(prompt: list[int], params: SamplingParams) -> list[int]:
    tokens, out = list(prompt), []
    while len(out) < params.max_new_tokens:
        out.append(next_token(tokens))
        tokens.append(out[-1])
        if out[-1] in params.stop_token_ids:
            break
    return out


def randint(gen: torch.Generator, low: int, high: int, n: int | None = None):
    values = torch.randint(low, high, (1 if n is None else n,), generator=gen).tolist()
    return values[0] if n is None else values


def shared_prefix_workload(count: int, seed: int) -> tuple[list[list[int]], list[SamplingParams]]:
    """Prompts over a few shared prefixes, with short and long (>= 64) suffixes, some repeated whole."""
    gen = torch.Generator().manual_seed(seed)
    prefixes = [randint(gen, 0, VOCAB, randint(gen, 3, 48)) for _ in range(4)]
    prompts, params = [], []
    for _ in range(count):
        if prompts and randint(gen, 0, 8) == 0:
            prompts.append(list(prompts[randint(gen, 0, len(prompts))]))
        else:
            prefix = prefixes[randint(gen, 0, 4)]
            suffix = randint(gen, 64, 80) if randint(gen, 0, 4) == 0 else randint(gen, 0, 12)
            prompts.append(prefix[: randint(gen, 1, len(prefix) + 1)] + randint(gen, 0, VOCAB, suffix))
        stop = tuple(randint(gen, 0, VOCAB, 30))
        params.append(SamplingParams(max_new_tokens=randint(gen, 1, 24), stop_token_ids=stop))
    return prompts, params


def assert_memory_back(llm: LLM) -> None:
    """Once the cache is cleared, every request row, GDN slot, KV page and checkpoint slot is free."""
    llm.clear_prefix_cache()
    runner, cache = llm.runner, llm.prefix_cache
    assert runner.req_to_token_pool.num_free == runner.req_to_token_pool.size - 1
    assert runner.gdn_pool.num_free == runner.gdn_pool.num_slots - 1
    assert runner.kv_pool.num_free_pages == runner.kv_pool.capacity_pages
    assert cache.num_checkpoints == 0 and cache.num_pages == 0
    if cache.checkpoint_pool is not None:
        assert cache.checkpoint_pool.num_free == cache.checkpoint_capacity


SLOT_BYTES = 8  # StateEchoModel: one float32 conv value and one float32 recurrent value


@pytest.mark.parametrize(
    "page_size, pool_pages, max_batch_size, max_tokens_per_step, checkpoints, interval",
    [
        (4, 600, 16, 64, 64, 8),  # roomy: batching and the cache only
        (4, 70, 16, 64, 3, 8),  # tight: preemption, KV and checkpoint eviction
        (1, 140, 8, 7, 16, 4),  # one-token pages and tiny chunks
        (8, 60, 32, 256, 0, 512),  # no checkpoint memory: no reuse, no error
        (16, 16, 5, 20, 8, 16),  # pages larger than most prompts
    ],
)
def test_every_request_resumes_from_exactly_its_own_state(
    page_size, pool_pages, max_batch_size, max_tokens_per_step, checkpoints, interval
):
    prompts, params = shared_prefix_workload(120, seed=page_size * pool_pages)
    llm = LLM(
        StateEchoModel(),
        compile=False,
        page_size=page_size,
        max_batch_size=max_batch_size,
        max_tokens_per_step=max_tokens_per_step,
        kv_memory_bytes=pool_pages * page_size * 2 * 4,
        gdn_checkpoint_memory_bytes=checkpoints * SLOT_BYTES,
        gdn_checkpoint_interval=interval,
        progress=False,
    )
    assert llm.runner.gdn_pool.slot_bytes == SLOT_BYTES
    outputs = llm.generate(prompts, params)
    for i, (out, prompt, p) in enumerate(zip(outputs, prompts, params)):
        assert out.error is None and out.token_ids == reference(prompt, p), i
    stats = llm.prefix_cache_stats()
    assert stats.gdn_checkpoint_capacity == checkpoints
    assert stats.gdn_checkpoints <= checkpoints
    assert stats.gdn_checkpoint_bytes == stats.gdn_checkpoints * SLOT_BYTES
    if checkpoints:
        assert stats.gdn_restores > 0 and stats.hit_rate > (0.2 if pool_pages >= 100 else 0.05)
    else:
        assert stats.hit_tokens == 0 and stats.gdn_checkpoints_taken == 0
    if pool_pages < 100:
        assert llm.scheduler.num_preemptions > 0 and stats.evicted_pages > 0
    if checkpoints == 3:
        assert stats.gdn_checkpoints_evicted > 0
    assert_memory_back(llm)


def test_each_chat_turn_resumes_after_the_previous_reply():
    gen = torch.Generator().manual_seed(7)
    chats = [randint(gen, 0, VOCAB, randint(gen, 5, 30)) for _ in range(6)]
    params = SamplingParams(max_new_tokens=12)
    llm = LLM(
        StateEchoModel(),
        compile=False,
        page_size=4,
        max_batch_size=4,
        max_tokens_per_step=32,
        kv_memory_bytes=400 * 4 * 8,
        gdn_checkpoint_memory_bytes=64 * SLOT_BYTES,
        progress=False,
    )
    computed = []  # each chat's tokens the previous turn computed: its prompt and reply but the last token
    for turn in range(3):
        before = llm.prefix_cache_stats()
        outputs = llm.generate(chats, params)
        after = llm.prefix_cache_stats()
        for chat, out in zip(chats, outputs):
            assert out.token_ids == reference(chat, params)
        if turn:  # the reply's last page boundary holds a checkpoint (the user's new message follows it)
            resumable = sum((len(c) - 1) // 4 * 4 for c in computed)
            assert after.hit_tokens - before.hit_tokens >= resumable
        computed = [c + o.token_ids[:-1] for c, o in zip(chats, outputs)]
        chats = [
            c + o.token_ids + randint(gen, 0, VOCAB, randint(gen, 1, 10)) for c, o in zip(chats, outputs)
        ]
    assert_memory_back(llm)


def test_requests_wait_for_a_running_prefill_of_their_prefix_and_resume_where_they_part():
    gen = torch.Generator().manual_seed(11)
    shared = randint(gen, 0, VOCAB, 96)
    prompts = [shared + randint(gen, 0, VOCAB, randint(gen, 1, 70)) for _ in range(16)]
    params = SamplingParams(max_new_tokens=4)
    llm = LLM(
        StateEchoModel(),
        compile=False,
        page_size=8,
        max_batch_size=16,
        max_tokens_per_step=512,
        kv_memory_bytes=600 * 8 * 8,
        gdn_checkpoint_memory_bytes=64 * SLOT_BYTES,
        progress=False,
    )
    outputs = llm.generate(prompts, params)
    assert [o.token_ids for o in outputs] == [reference(p, params) for p in prompts]
    stats = llm.prefix_cache_stats()
    # all arrive at once: only the first computes the shared prefix, every other one resumes after it
    assert stats.hit_tokens == 15 * len(shared) and stats.gdn_restores == 15
    assert_memory_back(llm)


def test_checkpoints_are_evicted_least_recently_used_and_with_their_node():
    pool = GDNPool(3, 1, 1, 2, 1, 1, 1, torch.float32)
    cache = HybridPrefixCache(2, pool, num_checkpoints=2, interval=2)  # one checkpoint per page
    request = Request(0, list(range(10)), SamplingParams(), frozenset())
    request.memory = RequestMemory(1, pages=[11, 12, 13, 14], gdn_slot=pool.alloc())
    assert cache.start(request, [], request.memory.gdn_slot) == []
    for done in (2, 4, 6):
        pool.ssm_state[0][request.memory.gdn_slot].fill_(done)
        request.memory.num_cached = done
        cache.insert(request.cache_nodes, request.tokens[:done], request.memory.pages)
        cache.capture(request)
    chain = request.cache_nodes
    assert [n.gdn_checkpoint is not None for n in chain] == [False, True, True]  # page 1's went first (LRU)
    assert cache.stats().gdn_checkpoints_evicted == 1
    assert cache.resumable_pages(chain) == 3 and cache.resumable_pages(chain[:2]) == 2
    restored = Request(1, list(range(6)) + [99, 98], SamplingParams(), frozenset())
    slot = pool.alloc()
    assert cache.start(restored, cache.match(restored.tokens), slot) == chain  # the node at 6 tokens
    assert float(pool.ssm_state[0][slot].flatten()[0]) == 6.0
    cache.release(chain)
    assert cache.evict(1) == [13] and cache.num_checkpoints == 1  # the leaf and its checkpoint
    assert cache.checkpoint_pool.num_free == 1


def test_checkpoints_taken_in_one_step_are_saved_together_and_in_order():
    pool = GDNPool(4, 1, 1, 2, 1, 1, 1, torch.float32)
    cache = HybridPrefixCache(2, pool, num_checkpoints=1, interval=2)  # one checkpoint slot for both requests
    requests = []
    for index, first in enumerate((0, 50)):
        request = Request(index, list(range(first, first + 5)), SamplingParams(), frozenset())
        request.memory = RequestMemory(
            1 + index, pages=[10 + 2 * index, 11 + 2 * index], gdn_slot=pool.alloc()
        )
        cache.start(request, [], request.memory.gdn_slot)
        pool.ssm_state[0][request.memory.gdn_slot].fill_(first + 1.0)
        request.memory.num_cached = 2
        cache.insert(request.cache_nodes, request.tokens[:2], request.memory.pages)
        requests.append(request)
    with cache.batched_saves():  # the second request's checkpoint evicts the first's and reuses its slot
        for request in requests:
            cache.capture(request)
        assert not cache.checkpoint_pool.ssm_state[0].any()  # nothing copied before leaving
    [node] = [n for r in requests for n in r.cache_nodes if n.gdn_checkpoint is not None]
    assert node is requests[1].cache_nodes[0] and cache.stats().gdn_checkpoints_evicted == 1
    assert float(cache.checkpoint_pool.ssm_state[0][node.gdn_checkpoint].flatten()[0]) == 51.0


def test_no_checkpoint_memory_keeps_the_cache_working_without_hits():
    pool = GDNPool(2, 1, 1, 2, 1, 1, 1, torch.float32)
    cache = HybridPrefixCache(2, pool, num_checkpoints=0)
    request = Request(0, list(range(5)), SamplingParams(), frozenset())
    request.memory = RequestMemory(1, pages=[3, 4], gdn_slot=pool.alloc(), num_cached=4)
    cache.start(request, [], request.memory.gdn_slot)
    cache.insert(request.cache_nodes, request.tokens[:4], request.memory.pages)
    cache.capture(request)
    assert cache.num_checkpoints == 0 and cache.resumable_pages(cache.match(request.tokens)) == 0
    with pytest.raises(ValueError, match="interval must be an int >= 1"):
        HybridPrefixCache(2, pool, num_checkpoints=1, interval=0)


HYBRIDS = ["tiny-qwen3.5", "tiny-qwen3-next"]


@pytest.fixture(scope="module", params=HYBRIDS)
def hybrid(request) -> nn.Module:
    model = build_preset(request.param)
    init_random_weights(model, 0, std=0.2)  # outputs that vary rather than repeat a token
    return model


def engines(model: nn.Module, **limits) -> tuple[LLM, LLM]:
    """The same model and limits with the prefix cache off and on."""
    return tuple(
        LLM(model, compile=False, page_size=4, enable_prefix_cache=cache, progress=False, **limits)
        for cache in (False, True)
    )


def assert_same_tokens(off, on) -> None:
    for i, (a, b) in enumerate(zip(off, on, strict=True)):
        assert a.error is None and b.error is None, i
        assert a.token_ids == b.token_ids, f"request {i}: cache off {a.token_ids}, on {b.token_ids}"


def test_shared_system_prompt_with_short_and_long_suffixes_gives_the_tokens_of_no_cache(harness, hybrid):
    system = harness.random_prompts(1, 48, 48, seed=20)[0]
    suffixes = harness.random_prompts(8, 1, 12, seed=21) + harness.random_prompts(4, 64, 72, seed=22)
    prompts = [system + s for s in suffixes]
    params = [SamplingParams(max_new_tokens=6)] * 8
    params += [SamplingParams(max_new_tokens=6, temperature=0.8, seed=i) for i in range(4)]
    off, on = engines(hybrid, max_batch_size=8, max_tokens_per_step=64)
    assert_same_tokens(off.generate(prompts, params), on.generate(prompts, params))
    stats = on.prefix_cache_stats()
    assert stats.hit_tokens >= 0.9 * 11 * len(system) and stats.gdn_restores >= 11
    assert_memory_back(on)


def test_multi_turn_chats_give_the_tokens_of_no_cache(harness, hybrid):
    chats = harness.random_prompts(3, 5, 20, seed=23)
    off, on = engines(hybrid, max_batch_size=4, max_tokens_per_step=32)
    for turn in range(3):
        before = on.prefix_cache_stats().hit_tokens
        params = SamplingParams(max_new_tokens=8)
        outputs = off.generate(chats, params)
        assert_same_tokens(outputs, on.generate(chats, params))
        if turn:
            assert on.prefix_cache_stats().hit_tokens - before >= sum(len(c) for c in chats) // 2
        news = harness.random_prompts(3, 1, 8, seed=24 + turn)
        chats = [c + o.token_ids + n for c, o, n in zip(chats, outputs, news)]
    assert_memory_back(on)


def test_eviction_pressure_and_preemption_give_the_tokens_of_no_cache(harness, hybrid):
    system = harness.random_prompts(2, 20, 30, seed=25)
    prompts = [system[i % 2] + s for i, s in enumerate(harness.random_prompts(16, 1, 30, seed=26))]
    params = [
        SamplingParams(max_new_tokens=int(n))
        for n in torch.randint(1, 16, (16,), generator=torch.Generator().manual_seed(27))
    ]
    page_bytes = 4 * 1 * 2 * (16 + 16) * 4  # one full-attention layer
    checkpoint_bytes = gdn_state_bytes(hybrid.kv_cache_spec(), torch.float32)
    off, on = engines(
        hybrid,
        max_batch_size=6,
        max_tokens_per_step=32,
        kv_memory_bytes=40 * page_bytes,
        gdn_checkpoint_memory_bytes=2 * checkpoint_bytes,
    )
    assert_same_tokens(off.generate(prompts, params), on.generate(prompts, params))
    stats = on.prefix_cache_stats()
    assert on.scheduler.num_preemptions > 0 and stats.evicted_pages > 0
    assert stats.gdn_checkpoints_evicted > 0 and stats.gdn_checkpoints <= 2
    assert_memory_back(on)


@torch.inference_mode()
def test_checkpointed_states_equal_the_states_recomputed_in_float64(harness, hybrid):
    prompt = harness.random_prompts(1, 45, 45, seed=27)[0]
    llm = LLM(
        hybrid, compile=False, page_size=4, max_tokens_per_step=16, gdn_checkpoint_interval=16, progress=False
    )
    llm.generate([prompt], SamplingParams(max_new_tokens=1))  # chunks of 16, 16, 13: checkpoints at 16 and 32
    llm.generate([prompt], SamplingParams(max_new_tokens=1))  # resumes at 32, the repeat plants one at 44
    chain = llm.prefix_cache.match(prompt)
    assert [4 * (i + 1) for i, n in enumerate(chain) if n.gdn_checkpoint is not None] == [16, 32, 44]
    assert llm.prefix_cache_stats().hit_tokens == 32
    model = copy.deepcopy(hybrid).double()
    spec = model.kv_cache_spec()
    checkpoints = llm.prefix_cache.checkpoint_pool
    for length in (16, 32, 44):
        gdn = GDNPool(
            2,
            spec.num_gdn_layers,
            spec.conv_dim,
            spec.conv_kernel_size,
            spec.num_v_heads,
            spec.head_k_dim,
            spec.head_v_dim,
            torch.float64,
        )
        kv = KVPool(
            length + 1,
            1,
            spec.num_layers,
            spec.num_kv_heads,
            spec.head_dim,
            torch.float64,
            v_head_dim=spec.v_head_dim,
            layer_ids=spec.full_attention_layer_ids,
        )
        backend = HybridAttnBackend(NativeBackend(), NativeBackend(), spec.full_attention_layer_ids)
        builder = BatchBuilder(ReqToTokenPool(2, 64), kv, backend, gdn_pool=gdn)
        memory = builder.new_request()
        batch = builder.extend([memory], [prompt[:length]])  # one step from scratch, in float64
        model(batch.input_ids, batch.positions, batch)
        slot = chain[length // 4 - 1].gdn_checkpoint
        for layer in range(spec.num_gdn_layers):
            for name in ("conv_state", "ssm_state"):
                restored = getattr(checkpoints, name)[layer][slot].double()
                expected = getattr(gdn, name)[layer][memory.gdn_slot].double()
                torch.testing.assert_close(
                    restored,
                    expected,
                    rtol=1e-3,
                    atol=1e-4,
                    msg=f"{name} of GDN layer {layer} differs after {length} tokens",
                )
