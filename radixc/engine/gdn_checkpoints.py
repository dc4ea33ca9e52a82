"""HybridPrefixCache: the prefix cache for hybrid (Gated DeltaNet) models, with GDN state checkpoints in the tree.

Attention layers resume from cached KV pages at any page boundary, but a GDN layer's conv window and recurrent
state summarise the whole prefix and exist only where a request stopped a step. So the tree keeps checkpoints
(the state of every GDN layer after a node's last token, copied into a slot of their own GDNPool) on a few
chosen nodes, never one per page (a Qwen3.5-0.8B checkpoint is ~19 MB):

- where requests diverge: a request admitted past the deepest checkpoint of its cached prefix ends a prefill
  chunk where it leaves the tree (for a prompt seen before, its last page boundary), and a request waiting for
  a running prefill with the same prefix makes that one stop where the two part; every later request with the
  prefix resumes there. A checkpoint at every prompt's end would split each prefill's last chunk for prompts
  that mostly never come back (~18% slower on the CPU with no shared prefix), so only a repeat plants one;
- every `interval` tokens of long prompts, at chunk ends (chunks that stop before the prompt's end stop on a
  page boundary);
- while decoding, at the request's newest page boundary (one checkpoint per request, moved as it decodes),
  so the next turn of a chat resumes after the reply.

A request resumes from the deepest node of its cached prefix that holds a checkpoint: the state is copied into
its GDN slot at admission and the pages past it are recomputed (the tree's copies are shared again once
computed). Checkpoints live until evicted: least recently used first when the pool is full, or with their node
when its KV page is evicted; with a small pool the cache keeps fewer checkpoints and hits less, never fails.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import logging
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from radixc.engine.memory_pool import GDNPool
from radixc.engine.prefix_cache import CacheNode, PrefixCache, PrefixCacheStats

if TYPE_CHECKING:
    from radixc.engine.request import Request

logger = logging.getLogger("radixc.engine")

DEFAULT_CHECKPOINT_INTERVAL = 512


@dataclasses.dataclass
class CheckpointPlan:
    """Where a running request takes GDN checkpoints: prefill chunks end at `boundaries`; page boundaries past
    `prompt_end` (its tokens' last page boundary when admitted) are decode checkpoints, one at a time."""

    boundaries: list[int]
    prompt_end: int
    last_checkpoint: int
    decode_node: CacheNode | None = None


def copy_checkpoint(
    gdn_pool: GDNPool,
    checkpoint_pool: GDNPool,
    to_checkpoint: bool,
    slots: Sequence[int],
    source_slots: Sequence[int],
) -> None:
    """Save GDN slots `source_slots` into checkpoints `slots` (to_checkpoint), or restore checkpoints
    `source_slots` into GDN slots `slots`."""
    if to_checkpoint:
        checkpoint_pool.copy_states(slots, gdn_pool, source_slots)
    else:
        gdn_pool.copy_states(slots, checkpoint_pool, source_slots)


class HybridPrefixCache(PrefixCache):
    """Prefix cache whose resumable nodes carry GDN state checkpoints, held in their own GDNPool with LRU eviction.

    gdn_pool: the engine's per-request state pool (checkpoints are copied from and into its slots).
    num_checkpoints: checkpoint slots (0 keeps none: every request then computes its whole prompt).
    interval: tokens between two checkpoints of a long prompt (rounded up to whole pages).
    """

    def __init__(
        self,
        page_size: int,
        gdn_pool: GDNPool,
        num_checkpoints: int,
        interval: int = DEFAULT_CHECKPOINT_INTERVAL,
    ):
        super().__init__(page_size)
        for name, value, low in (("num_checkpoints", num_checkpoints, 0), ("interval", interval, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"HybridPrefixCache: {name} must be an int >= {low}, got {value!r}")
        self.gdn_pool = gdn_pool
        self.interval = -(-interval // page_size) * page_size
        self.checkpoint_pool = GDNPool.like(gdn_pool, num_checkpoints + 1) if num_checkpoints else None
        self._held: collections.OrderedDict[CacheNode, None] = collections.OrderedDict()  # oldest use first
        self._taken = self._evicted_checkpoints = self._restores = 0
        # when a list: every save / restore also appends its (to_checkpoint, slot, source_slot), for
        # tensor-parallel workers to replay on their own pools (`copy_checkpoint`)
        self.journal: list[tuple[int, int, int]] | None = None
        self._queued_saves: list[tuple[int, int]] | None = None  # (checkpoint, GDN slot) inside batched_saves

    @contextlib.contextmanager
    def batched_saves(self) -> Iterator[None]:
        """Queue the checkpoints taken inside and copy them together on leaving: one copy per GDN state tensor for
        all of them rather than per request, as a decode step where many requests cross a page boundary would
        otherwise launch hundreds of small copies. Saves only read GDN slots, so a checkpoint slot saved twice
        inside (evicted and reused) simply keeps its last save."""
        self._queued_saves = []
        try:
            yield
        finally:
            sources = dict(self._queued_saves)  # checkpoint slot -> GDN slot of its last save
            self._queued_saves = None
            if sources:
                copy_checkpoint(
                    self.gdn_pool, self.checkpoint_pool, True, list(sources), list(sources.values())
                )

    @property
    def num_checkpoints(self) -> int:
        return len(self._held)

    @property
    def checkpoint_capacity(self) -> int:
        return 0 if self.checkpoint_pool is None else self.checkpoint_pool.num_slots - 1

    @staticmethod
    def resumable_pages(chain: Sequence[CacheNode]) -> int:
        """Pages of a matched chain a request can resume after: up to its deepest node holding a checkpoint."""
        return max((i + 1 for i, node in enumerate(chain) if node.gdn_checkpoint is not None), default=0)

    def start(self, request: Request, chain: Sequence[CacheNode], gdn_slot: int) -> list[CacheNode]:
        """Plan a newly admitted request's checkpoints and restore into gdn_slot the state of the deepest node of
        its matched `chain` holding one; returns the part of the chain it resumes from (up to that node)."""
        depth = self.resumable_pages(chain)
        resumed = list(chain[:depth])
        if resumed:
            node = resumed[-1]
            self._copy(False, gdn_slot, node.gdn_checkpoint)
            self._held.move_to_end(node)
        start, page = depth * self.page_size, self.page_size
        prompt_end = (request.num_tokens - 1) // page * page
        # the prompt leaves the tree at len(chain) pages: a checkpoint there serves the next request with it
        boundaries = [len(chain) * page] if len(chain) > depth else []
        request.checkpoint_plan = CheckpointPlan(boundaries, prompt_end, last_checkpoint=start)
        return resumed

    def add_boundary(self, request: Request, depth: int) -> None:
        """Make a running prefill stop (and take a checkpoint) at `depth` tokens, where another prompt leaves it."""
        plan = request.checkpoint_plan
        if depth > request.num_cached and depth not in plan.boundaries:
            plan.boundaries = sorted([*plan.boundaries, depth])

    def chunk_limit(self, request: Request, chunk: int) -> int:
        """Shorten a prefill chunk to stop at the request's next planned checkpoint, and a chunk that stops before
        its prompt's end to stop on a page boundary (where an interval checkpoint can be taken)."""
        start, plan = request.num_cached, request.checkpoint_plan
        ahead = [b for b in plan.boundaries if b > start]
        if ahead:
            chunk = min(chunk, ahead[0] - start)
        end = start + chunk
        aligned = end // self.page_size * self.page_size
        if end < plan.prompt_end and aligned > start:
            chunk = aligned - start
        return chunk

    def capture(self, request: Request) -> None:
        """After a step (its pages in the tree), take a checkpoint if the request stopped where its plan says."""
        plan, done = request.checkpoint_plan, request.num_cached
        if plan is None or done == 0 or done % self.page_size:
            return
        node = request.cache_nodes[done // self.page_size - 1]
        if node.gdn_checkpoint is not None:
            self._held.move_to_end(node)
            plan.last_checkpoint = done
            return
        decoding = done > plan.prompt_end
        if not (decoding or done in plan.boundaries or done - plan.last_checkpoint >= self.interval):
            return
        previous = plan.decode_node if decoding else None
        if previous is not None and previous.gdn_checkpoint is not None:
            slot = previous.gdn_checkpoint  # the request's last decode checkpoint moves here
            self._detach(previous)
        else:
            slot = self._take_slot()
            if slot is None:
                return
        self._copy(True, slot, request.memory.gdn_slot)
        node.gdn_checkpoint = slot
        self._held[node] = None
        self._taken += 1
        plan.last_checkpoint = done
        if decoding:
            plan.decode_node = node

    def _copy(self, to_checkpoint: bool, slot: int, source_slot: int) -> None:
        if to_checkpoint and self._queued_saves is not None:
            self._queued_saves.append((slot, source_slot))
        else:
            copy_checkpoint(self.gdn_pool, self.checkpoint_pool, to_checkpoint, [slot], [source_slot])
        if self.journal is not None:
            self.journal.append((int(to_checkpoint), slot, source_slot))

    def record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        super().record_lookup(num_tokens, num_hit_tokens)
        self._restores += num_hit_tokens > 0

    def evict(self, num_pages: int) -> list[int]:
        nodes = self._evict_nodes(num_pages)
        for node in nodes:
            if node.gdn_checkpoint is not None:
                self.checkpoint_pool.free(self._detach(node))
                self._evicted_checkpoints += 1
        return [node.page for node in nodes]

    def stats(self) -> PrefixCacheStats:
        return dataclasses.replace(
            super().stats(),
            gdn_checkpoints=self.num_checkpoints,
            gdn_checkpoint_bytes=self.num_checkpoints * self.gdn_pool.slot_bytes,
            gdn_checkpoint_capacity=self.checkpoint_capacity,
            gdn_checkpoints_taken=self._taken,
            gdn_checkpoints_evicted=self._evicted_checkpoints,
            gdn_restores=self._restores,
        )

    def _take_slot(self) -> int | None:
        """A free checkpoint slot, evicting the least recently used checkpoint if none is; None without a pool."""
        if self.checkpoint_pool is None:
            return None
        if self.checkpoint_pool.num_free == 0:
            oldest = next(iter(self._held))
            self.checkpoint_pool.free(self._detach(oldest))
            self._evicted_checkpoints += 1
        return self.checkpoint_pool.alloc(clear=False)

    def _detach(self, node: CacheNode) -> int:
        """Take a node's checkpoint slot off it (the caller frees or reuses the slot)."""
        slot, node.gdn_checkpoint = node.gdn_checkpoint, None
        del self._held[node]
        return slot


def default_num_checkpoints(
    gdn_pool: GDNPool, kv_pool_bytes: int, memory_bytes: int | None, max_checkpoints: int = 256
) -> int:
    """Checkpoint slots for `memory_bytes` (default: an eighth of the KV pool's bytes, at most max_checkpoints)."""
    if memory_bytes is not None:
        if isinstance(memory_bytes, bool) or not isinstance(memory_bytes, int) or memory_bytes < 0:
            raise ValueError(f"gdn_checkpoint_memory_bytes must be an int >= 0, got {memory_bytes!r}")
        return memory_bytes // gdn_pool.slot_bytes
    count = min(kv_pool_bytes // 8 // gdn_pool.slot_bytes, max_checkpoints)
    if count == 0:
        logger.warning(
            "prefix cache: no GDN checkpoint fits in %d bytes (one takes %d): hybrid prefixes will not be reused",
            kv_pool_bytes // 8,
            gdn_pool.slot_bytes,
        )
    return count
