"""Scheduler: continuous batching of requests over paged KV memory, with chunked prefill and preemption.

Each step is either EXTEND (prefill chunks of new, partly prefilled or preempted requests, up to
max_tokens_per_step tokens) or DECODE (one token for every request whose only uncomputed token is its last);
when both have work the two alternate. Pages are taken per step and freed when a request finishes. When the
KV pool runs short, unreferenced prefix-cache pages are evicted first; then new requests wait, and a decode
step preempts the newest running requests (their memory freed, their tokens kept and recomputed later), so
the oldest request always progresses and no request is ever dropped. A new request whose prompt shares pages
with a running prefill beyond what the prefix cache holds waits for them instead of computing them again.
Hybrid models stop prefill chunks where their prefix cache plans GDN state checkpoints (gdn_checkpoints.py).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
from collections.abc import Sequence

from radixc.engine.batch_builder import BatchBuilder
from radixc.engine.config import EngineConfig
from radixc.engine.gdn_checkpoints import HybridPrefixCache
from radixc.engine.prefix_cache import CacheNode, PrefixCache, shared_prefix_pages
from radixc.engine.request import FinishReason, Request
from radixc.forward_batch import ForwardMode

logger = logging.getLogger("radixc.engine")


@dataclasses.dataclass
class ScheduledStep:
    """One model step: requests[i] computes new_tokens[i]; rows where `samples` is set get a new token.

    A decode step that `follows` its predecessor (overlapped scheduling) was planned before that step's tokens
    were known: its new_tokens are empty, and row i decodes the token the previous step sampled in its row
    follows[i].
    """

    mode: ForwardMode
    requests: list[Request]
    new_tokens: list[list[int]]
    samples: list[bool]
    follows: list[int] | None = None


class Scheduler:
    """Decides each step's batch and owns every request's pool memory from admission to release."""

    def __init__(self, config: EngineConfig, builder: BatchBuilder, prefix_cache: PrefixCache | None = None):
        self.config, self.builder, self.prefix_cache = config, builder, prefix_cache
        self.kv_pool = builder.kv_pool
        self.gdn_checkpoints = prefix_cache if isinstance(prefix_cache, HybridPrefixCache) else None
        self.waiting: collections.deque[Request] = collections.deque()
        self.running: list[Request] = []  # admission order, oldest first
        self.num_preemptions = 0
        self._last_mode = ForwardMode.DECODE

    def add(self, request: Request) -> None:
        """Queue a request (check() it first: a request that can never run would fail the engine)."""
        self.waiting.append(request)

    def check(self, request: Request) -> str | None:
        """Why a request can never run within the engine's limits, or None when it can."""
        limit, prompt = self.config.max_context_len, len(request.prompt_ids)
        if prompt == 0:
            return "empty prompt: at least one token is needed"
        if prompt >= limit:
            return (
                f"prompt has {prompt} tokens, which leaves no room for a new token within "
                f"max_context_len={limit}"
            )
        if self.kv_pool is not None:
            # the longest KV the request will hold: every token but the last it generates
            longest = min(prompt + request.params.max_new_tokens, limit) - 1
            if self.kv_pool.pages_for(longest) > self.kv_pool.capacity_pages:
                return (
                    f"prompt of {prompt} tokens with max_new_tokens={request.params.max_new_tokens} needs "
                    f"{self.kv_pool.pages_for(longest)} KV pages, more than the pool's "
                    f"{self.kv_pool.capacity_pages}"
                )
        return None

    @property
    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> ScheduledStep | None:
        """The next step (None when no request is left); after an EXTEND step, DECODE goes first, and back."""
        while self.has_work:
            if self._last_mode.is_extend():
                order = (self._schedule_decode, self._schedule_extend)
            else:
                order = (self._schedule_extend, self._schedule_decode)
            for make_step in order:
                step = make_step()
                if step is not None:
                    self._last_mode = step.mode
                    return step
            if not self.running:
                raise RuntimeError(
                    f"scheduler: {len(self.waiting)} waiting request(s) cannot be admitted into an idle engine"
                )
            # every running request is a prefill blocked on memory: free the newest one's pages
            self._preempt(self.running[-1])
        return None

    def _schedule_extend(self) -> ScheduledStep | None:
        budget, planned = self.config.max_tokens_per_step, 0
        requests, chunks, blocked = [], [], False
        # hybrids align chunks that stop short to pages: the few tokens left are not worth a request's segment
        least = 1 if self.gdn_checkpoints is None else min(self.config.page_size, budget)
        for request in [r for r in self.running if not r.decoding]:
            if budget < least:
                break
            chunk = self._fitting_chunk(request, self._chunk_size(request, budget), planned)
            if chunk == 0:
                blocked = True  # admitting newer requests now would starve this one
                break
            planned += self.builder.pages_needed(request.memory, chunk)
            budget -= chunk
            requests.append(request)
            chunks.append(chunk)
        while (
            not blocked
            and self.waiting
            and budget >= least
            and len(self.running) < self.config.max_batch_size
        ):
            request = self.waiting[0]
            chunk = self._admit(request, budget, planned)
            if chunk == 0:
                break
            self.waiting.popleft()
            planned += self.builder.pages_needed(request.memory, chunk)
            budget -= chunk
            requests.append(request)
            chunks.append(chunk)
        if not requests:
            return None
        if self.gdn_checkpoints is not None and self.waiting:
            # stop this step's prefills where the next waiting prompt parts from them (a checkpoint goes there)
            self._awaits_running_prefill(self.waiting[0], self._reusable_pages(self.waiting[0]))
            chunks = [self.gdn_checkpoints.chunk_limit(r, c) for r, c in zip(requests, chunks)]
        new_tokens = [r.tokens[r.num_cached : r.num_cached + c] for r, c in zip(requests, chunks)]
        samples = [r.num_cached + c == r.num_tokens for r, c in zip(requests, chunks)]
        return ScheduledStep(ForwardMode.EXTEND, requests, new_tokens, samples)

    def _schedule_decode(self) -> ScheduledStep | None:
        decoding = [r for r in self.running if r.decoding]
        # the usual step: the pool has a token for every running request
        if self._make_room(sum(self.builder.pages_needed(r.memory, 1) for r in decoding)):
            batch = decoding
        else:
            batch = self._decode_batch_preempting(decoding)
        if not batch:
            return None
        return ScheduledStep(ForwardMode.DECODE, batch, [[r.last_token] for r in batch], [True] * len(batch))

    def follow(self, step: ScheduledStep) -> ScheduledStep | None:
        """The decode step after `step`, planned while `step` runs, before its tokens are known (overlapped
        scheduling); None where only its tokens can decide the next step.

        It is the step `schedule()` would return after `update(step, ...)` unless a token of `step` ends its
        request (a stop token): every running request that `step` does not bring to its length limit decodes the
        token `step` samples for it. So it needs no request waiting, every running request sampling in `step`
        (requests of `step` that ended since, while it ran, are left out), and a page for each without
        preempting. A request that a stop token ends in `step` computes one wasted row here, which `update` drops.
        """
        running = self.running
        live = [row for row, r in enumerate(step.requests) if r.memory is not None]
        if (
            self.waiting
            or len(live) != len(running)
            or not all(step.samples)
            or any(step.requests[row] is not r for row, r in zip(live, running))
        ):
            return None
        limit = self.config.max_context_len
        # update(step) appends one token to each: the rows it leaves below their length limits go on
        rows = [
            row
            for row in live
            if len(step.requests[row].output_ids) + 1 < step.requests[row].params.max_new_tokens
            and step.requests[row].num_tokens + 1 < limit
        ]
        batch = [step.requests[row] for row in rows]
        if not batch or not self._make_room(sum(self.builder.pages_needed(r.memory, 1) for r in batch)):
            return None
        self._last_mode = ForwardMode.DECODE
        return ScheduledStep(
            ForwardMode.DECODE, batch, [[] for _ in batch], [True] * len(batch), follows=rows
        )

    def _decode_batch_preempting(self, decoding: list[Request]) -> list[Request]:
        """The decode batch when the pool cannot give every request a token: oldest first, preempting the newest
        running requests (this step's batch excepted) until each older one fits."""
        batch, planned = [], 0
        for request in decoding:
            if request.memory is None:  # preempted to make room for an older request of this step
                continue
            need = self.builder.pages_needed(request.memory, 1)
            while not self._make_room(planned + need):
                victim = next(r for r in reversed(self.running) if r not in batch)
                self._preempt(victim)
                if victim is request:
                    break
            else:
                batch.append(request)
                planned += need
        return batch

    def _admit(self, request: Request, budget: int, planned: int) -> int:
        """Give a waiting request memory and its cached prefix; its first chunk's size, or 0 if it must wait."""
        cache = self.prefix_cache
        chain = cache.match(request.tokens) if cache is not None else []
        if cache is not None and self._awaits_running_prefill(request, self._reusable_pages(request, chain)):
            return 0
        memory = self.builder.new_request()
        if self.gdn_checkpoints is not None:
            chain = self.gdn_checkpoints.start(request, chain, memory.gdn_slot)
        if chain:
            cache.acquire(chain)
            self.builder.adopt_prefix(memory, [n.page for n in chain], len(chain) * self.config.page_size)
        request.memory, request.cache_nodes = memory, chain
        chunk = self._chunk_size(request, budget)
        if not self._make_room(planned + self.builder.pages_needed(memory, chunk)):
            self._release_memory(request)
            return 0
        if cache is not None:
            cache.record_lookup(request.num_tokens, memory.num_cached)
        self.running.append(request)
        return chunk

    def _reusable_pages(self, request: Request, chain: list[CacheNode] | None = None) -> int:
        """Pages of the request's prompt it could resume after from the prefix cache (`chain`: its match)."""
        chain = self.prefix_cache.match(request.tokens) if chain is None else chain
        if self.gdn_checkpoints is not None:
            return self.gdn_checkpoints.resumable_pages(chain)
        return len(chain)

    def _awaits_running_prefill(self, request: Request, cached_pages: int) -> bool:
        """Whether a running prefill has still to compute pages of this request's prompt past its cached_pages:
        admitted now, the request would compute them a second time (a hybrid prefill also plans a checkpoint
        where the two prompts part, for this request to resume from)."""
        tokens, page = request.tokens, self.config.page_size
        reusable = (len(tokens) - 1) // page
        for other in self.running:
            if other.decoding:
                continue
            shared = shared_prefix_pages(tokens, other.tokens, page, reusable)
            if shared > max(cached_pages, other.num_cached // page):
                if self.gdn_checkpoints is not None:
                    self.gdn_checkpoints.add_boundary(other, shared * page)
                return True
        return False

    def _chunk_size(self, request: Request, budget: int) -> int:
        """Tokens of the request's next prefill chunk within budget (hybrids stop at checkpoint boundaries)."""
        chunk = min(request.num_uncomputed, budget)
        if self.gdn_checkpoints is not None:
            chunk = self.gdn_checkpoints.chunk_limit(request, chunk)
        return chunk

    def _fitting_chunk(self, request: Request, chunk: int, planned: int) -> int:
        """The largest part of `chunk` tokens whose pages fit beside `planned` pages (evicting cache pages)."""
        if self._make_room(planned + self.builder.pages_needed(request.memory, chunk)):
            return chunk
        spare_pages = self.kv_pool.num_free_pages - planned
        memory = request.memory
        return max(
            0, min(chunk, (len(memory.pages) + spare_pages) * self.config.page_size - memory.num_cached)
        )

    def _make_room(self, num_pages: int) -> bool:
        """Whether num_pages pages are free, after evicting unreferenced prefix-cache pages if needed."""
        if self.kv_pool is None:
            return True
        missing = num_pages - self.kv_pool.num_free_pages
        if missing > 0 and self.prefix_cache is not None:
            self.kv_pool.free_pages(self.prefix_cache.evict(missing))
        return num_pages <= self.kv_pool.num_free_pages

    def update(self, step: ScheduledStep, tokens: Sequence[int]) -> list[tuple[Request, int]]:
        """Apply a step's sampled tokens (one per sampling row, in order); returns (request, token) pairs.

        A request that ended while the step ran (overlapped scheduling: a stop token of the step before, or an
        abort) holds no memory any more; its row's token is dropped."""
        sampled = [r for r, s in zip(step.requests, step.samples) if s]
        events = []
        for request, token in zip(sampled, tokens, strict=True):
            if request.memory is None:
                continue
            request.output_ids.append(token)
            events.append((request, token))
            params = request.params
            if token in request.stop_ids:
                request.finish_reason = FinishReason.STOP
            elif (
                len(request.output_ids) >= params.max_new_tokens
                or request.num_tokens >= self.config.max_context_len
            ):
                request.finish_reason = FinishReason.LENGTH
        saves = self.gdn_checkpoints.batched_saves() if self.gdn_checkpoints else contextlib.nullcontext()
        with saves:  # the step's GDN checkpoints, copied together
            for request in step.requests:
                if request.memory is None:
                    continue
                if request.finished:
                    self._release_memory(request)
                    self.running.remove(request)
                else:
                    self._cache_computed_pages(request)
        return events

    def abort(self, error: str) -> list[Request]:
        """Fail every unfinished request with `error`, freeing its memory; returns them."""
        aborted = [*self.running, *self.waiting]
        for request in self.running:
            self._release_memory(request, cache_pages=False)
        self.running, self.waiting = [], collections.deque()
        for request in aborted:
            request.error = error
        return aborted

    def abort_request(self, request: Request, error: str) -> None:
        """Fail one unfinished request now, between steps; its pages go back to the pool at once (its full
        computed pages, all written by the last step, stay in the prefix cache)."""
        if request in self.running:
            self._release_memory(request)
            self.running.remove(request)
        elif request in self.waiting:
            self.waiting.remove(request)
        else:
            raise ValueError(f"scheduler: request {request.index} is neither running nor waiting")
        request.error = error

    def _cache_computed_pages(self, request: Request) -> None:
        """Put a request's newly completed pages in the prefix cache (switching to pages already cached), then
        take the GDN checkpoint planned where the request stands."""
        cache, memory = self.prefix_cache, request.memory
        if cache is None:
            return
        if memory.num_cached // self.config.page_size > len(request.cache_nodes):
            duplicates = cache.insert(request.cache_nodes, request.tokens[: memory.num_cached], memory.pages)
            for index, page in duplicates:
                self.kv_pool.free_pages([self.builder.replace_page(memory, index, page)])
        if self.gdn_checkpoints is not None:
            self.gdn_checkpoints.capture(request)

    def _release_memory(self, request: Request, cache_pages: bool = True) -> None:
        """Free a request's memory; its full computed pages stay in the prefix cache (unreferenced) if cache_pages.

        An aborted step may have left pages half written, so abort frees them without caching.
        """
        if request.memory is None:
            return
        if cache_pages and request.memory.num_cached:
            self._cache_computed_pages(request)
        self.builder.release(request.memory, keep_pages=len(request.cache_nodes))
        if self.prefix_cache is not None:
            self.prefix_cache.release(request.cache_nodes)
        request.memory, request.cache_nodes, request.checkpoint_plan = None, [], None

    def _preempt(self, request: Request) -> None:
        """Free a running request's memory and put it first in line; it recomputes its tokens when readmitted."""
        self._release_memory(request)
        self.running.remove(request)
        self.waiting.appendleft(request)
        self.num_preemptions += 1
        logger.info("preempted request %d (%d tokens) to free KV pages", request.index, request.num_tokens)
