"""BatchBuilder: per-request KV pages, request rows and GDN slots, turned into ForwardBatches."""

from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Sequence

import torch

from radixc.engine.backends.base import AttentionBackend
from radixc.engine.memory_pool import GDNPool, KVPool, ReqToTokenPool
from radixc.engine.queued_copy import queued_tensor
from radixc.forward_batch import ForwardBatch, ForwardMode


@dataclasses.dataclass
class RequestMemory:
    """What one request holds in the pools: its request row, KV pages in order, GDN slot, cached token count."""

    req_pool_index: int
    pages: list[int] = dataclasses.field(default_factory=list)
    gdn_slot: int | None = None
    num_cached: int = 0


@dataclasses.dataclass
class HostStep:
    """One step's batch as host lists, before it becomes device tensors: per token (ids, positions, KV slots and
    the request row each slot is recorded in) and per request (row, length after the step, prefix, GDN slot)."""

    mode: ForwardMode
    token_ids: list[int]
    positions: list[int]
    req_pool_indices: list[int]
    seq_lens: list[int]
    extend_prefix_lens: list[int]
    out_cache_loc: list[int]
    gdn_slots: list[int] | None
    token_rows: list[int]


class BatchBuilder:
    """Allocates pool memory for requests and builds the ForwardBatch of an extend or decode step."""

    def __init__(
        self,
        req_to_token_pool: ReqToTokenPool,
        kv_pool: KVPool | None,
        attn_backend: AttentionBackend,
        gdn_pool: GDNPool | None = None,
        device: torch.device | str = "cpu",
    ):
        self.req_to_token_pool, self.kv_pool, self.gdn_pool = req_to_token_pool, kv_pool, gdn_pool
        self.attn_backend, self.device = attn_backend, torch.device(device)

    def new_request(self) -> RequestMemory:
        """Take a request row (and a GDN slot for hybrid models); nothing is held if either pool is full."""
        index = self.req_to_token_pool.alloc()
        if self.gdn_pool is None:
            return RequestMemory(index)
        try:
            return RequestMemory(index, gdn_slot=self.gdn_pool.alloc())
        except Exception:
            self.req_to_token_pool.free(index)
            raise

    def release(self, request: RequestMemory, keep_pages: int = 0) -> list[int]:
        """Free a request's memory, except its first keep_pages pages, which are returned (prefix cache)."""
        kept = request.pages[:keep_pages]
        if self.kv_pool is not None and request.pages[keep_pages:]:
            self.kv_pool.free_pages(request.pages[keep_pages:])
        self.req_to_token_pool.free(request.req_pool_index)
        if request.gdn_slot is not None:
            self.gdn_pool.free(request.gdn_slot)
        request.pages, request.gdn_slot, request.num_cached = [], None, 0
        return kept

    def adopt_prefix(self, request: RequestMemory, pages: Sequence[int], num_tokens: int) -> None:
        """Give a fresh request already-filled pages holding its first num_tokens tokens."""
        request.pages = list(pages)
        request.num_cached = num_tokens
        self._write_slots(request, 0, num_tokens)

    def replace_page(self, request: RequestMemory, index: int, page: int) -> int:
        """Point a request's page `index` at another page holding the same tokens; returns the page it held."""
        old, request.pages[index] = request.pages[index], page
        start = index * self.kv_pool.page_size
        self._write_slots(request, start, min(start + self.kv_pool.page_size, request.num_cached))
        return old

    def pages_needed(self, request: RequestMemory, num_new_tokens: int) -> int:
        """Pages a request must still allocate to hold num_new_tokens more tokens."""
        if self.kv_pool is None:
            return 0
        return max(0, self.kv_pool.pages_for(request.num_cached + num_new_tokens) - len(request.pages))

    def _write_slots(self, request: RequestMemory, start: int, end: int) -> torch.Tensor:
        slots = self.kv_pool.slots(request.pages, start, end)
        device = self.req_to_token_pool.req_to_token.device
        positions = torch.arange(start, end, device=device)
        rows = torch.full_like(positions, request.req_pool_index)
        self.req_to_token_pool.write(rows, positions, slots.to(device, torch.int64))
        return slots

    def extend(
        self, requests: Sequence[RequestMemory], new_tokens: Sequence[Sequence[int]], all_logits: bool = False
    ) -> ForwardBatch:
        """EXTEND batch appending new_tokens[i] to requests[i]; logits of each request's last token unless all_logits."""
        last_rows = [end - 1 for end in itertools.accumulate(map(len, new_tokens))]
        return self._step(ForwardMode.EXTEND, requests, new_tokens, None if all_logits else last_rows)

    def decode(self, requests: Sequence[RequestMemory], tokens: Sequence[int] | torch.Tensor) -> ForwardBatch:
        """DECODE batch appending one token to each request; `tokens` may be a device tensor `[B]` (the previous
        step's sampled tokens, not read back: overlapped scheduling), which becomes the batch's input_ids."""
        on_device = isinstance(tokens, torch.Tensor)
        batch = self._step(ForwardMode.DECODE, requests, decode_tokens(tokens, len(requests)), None)
        if on_device:
            batch.input_ids = tokens
        return batch

    def decode_step(
        self, requests: Sequence[RequestMemory], tokens: Sequence[int] | torch.Tensor
    ) -> HostStep:
        """Allocate for one more token per request and return the step on the host, for a caller that loads it
        into static buffers (CUDA-graph decode) and records the slots in req_to_token on the device itself (token
        ids given as a device tensor are the caller's to copy: the host step holds zeros for them)."""
        return self._plan(ForwardMode.DECODE, requests, decode_tokens(tokens, len(requests)))

    def extend_step(self, requests: Sequence[RequestMemory], new_tokens: Sequence[Sequence[int]]) -> HostStep:
        """Allocate for new_tokens[i] in requests[i] and return the step on the host, for a caller that loads it
        into static buffers (CUDA-graph extend) and records the slots in req_to_token on the device itself."""
        return self._plan(ForwardMode.EXTEND, requests, new_tokens)

    def _step(self, mode, requests, new_tokens, logits_indices) -> ForwardBatch:
        step = self._plan(mode, requests, new_tokens)
        if step.token_rows:
            device = self.req_to_token_pool.req_to_token.device
            index = queued_tensor([step.token_rows, step.positions, step.out_cache_loc], torch.int64, device)
            self.req_to_token_pool.write(*index)
        return self._batch(step, logits_indices)

    def _plan(self, mode, requests, new_tokens) -> HostStep:
        """Check limits and free pages for every request first, so a failure changes no request's state; then
        allocate and compute every new token's slot on the host."""
        limit = self.req_to_token_pool.max_context_len
        for request, tokens in zip(requests, new_tokens):
            if request.num_cached + len(tokens) > limit:
                raise ValueError(
                    f"request row {request.req_pool_index} needs {request.num_cached + len(tokens)} tokens of "
                    f"context, above max_context_len={limit}"
                )
        missing_pages = [self.pages_needed(r, len(t)) for r, t in zip(requests, new_tokens)]
        if self.kv_pool is not None:
            self.kv_pool.require_pages(sum(missing_pages))
        prefix, positions, rows, slots = [], [], [], []
        for request, tokens, missing in zip(requests, new_tokens, missing_pages):
            start, end = request.num_cached, request.num_cached + len(tokens)
            prefix.append(start)
            positions.extend(range(start, end))
            if self.kv_pool is not None:
                if missing:
                    request.pages.extend(self.kv_pool.alloc_pages(missing).tolist())
                page_size = self.kv_pool.page_size
                slots.extend(
                    request.pages[p // page_size] * page_size + p % page_size for p in range(start, end)
                )
                rows.extend([request.req_pool_index] * (end - start))
            request.num_cached = end
        return HostStep(
            mode=mode,
            token_ids=[t for tokens in new_tokens for t in tokens],
            positions=positions,
            req_pool_indices=[r.req_pool_index for r in requests],
            seq_lens=[r.num_cached for r in requests],
            extend_prefix_lens=prefix,
            out_cache_loc=slots if slots else [0] * len(positions),
            gdn_slots=[r.gdn_slot for r in requests] if self.gdn_pool is not None else None,
            token_rows=rows,
        )

    def _batch(self, step: HostStep, logits_indices) -> ForwardBatch:
        as_tensor = lambda x: queued_tensor(x, torch.int64, self.device)  # noqa: E731
        return ForwardBatch.create(
            forward_mode=step.mode,
            input_ids=as_tensor(step.token_ids),
            positions=as_tensor(step.positions),
            req_pool_indices=as_tensor(step.req_pool_indices),
            seq_lens=as_tensor(step.seq_lens),
            extend_prefix_lens=as_tensor(step.extend_prefix_lens),
            out_cache_loc=as_tensor(step.out_cache_loc),
            req_to_token_pool=self.req_to_token_pool,
            token_to_kv_pool=self.kv_pool,
            attn_backend=self.attn_backend,
            gdn_pool=self.gdn_pool,
            gdn_slots=None if step.gdn_slots is None else as_tensor(step.gdn_slots),
            logits_indices=None if logits_indices is None else as_tensor(logits_indices),
        )


def decode_tokens(tokens: Sequence[int] | torch.Tensor, batch_size: int) -> list[list[int]]:
    """A decode step's new tokens per request: the host ids, or zeros where they are a device tensor (checked for
    one per request)."""
    if isinstance(tokens, torch.Tensor):
        if tokens.shape != (batch_size,):
            raise ValueError(f"decode tokens on the device must be [{batch_size}], got {list(tokens.shape)}")
        return [[0]] * batch_size
    return [[t] for t in tokens]
