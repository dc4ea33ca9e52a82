"""PrefixCache: a radix tree over token ids whose edges are whole KV pages, so requests reuse a shared prefix.

A node stands for one page of `page_size` tokens following its parent's tokens and owns the KV page holding
them. A request keeps one reference on each node of its prefix chain; only unreferenced nodes are evicted,
leaves first, least recently used first. A request always recomputes at least its last prompt token (its
logits pick the next token), so a match never covers the whole prompt.

KV content depends only on the token prefix, not on which request computed it, so two requests that computed
the same page concurrently are interchangeable: the first to insert gives the tree its page, the other switches
to that page and frees its own copy.

Hybrid (Gated DeltaNet) models also need the GDN layers' state at the point where a request resumes: they use
HybridPrefixCache (radixc/engine/gdn_checkpoints.py), which keeps state checkpoints on chosen nodes.
"""

from __future__ import annotations

import dataclasses
import heapq
from collections.abc import Sequence


def shared_prefix_pages(a: Sequence[int], b: Sequence[int], page_size: int, limit: int) -> int:
    """How many leading whole pages (at most limit) of token lists a and b are equal (a binary search over
    list-slice comparisons, which run in C)."""
    low, high = 0, limit
    while low < high:
        mid = (low + high + 1) // 2
        end = mid * page_size
        if a[:end] == b[:end]:
            low = mid
        else:
            high = mid - 1
    return low


@dataclasses.dataclass(eq=False)
class CacheNode:
    """One cached page: its tokens, the KV page holding them, the requests using it and when it was last used."""

    tokens: tuple[int, ...]
    page: int
    parent: CacheNode | None
    children: dict[tuple[int, ...], CacheNode] = dataclasses.field(default_factory=dict)
    ref_count: int = 0
    last_used: int = 0
    # hybrid models: slot in the GDN checkpoint pool holding the state after this node's last token
    gdn_checkpoint: int | None = None


@dataclasses.dataclass(frozen=True)
class PrefixCacheStats:
    """Lookups since creation: prompt tokens looked up, tokens found cached; pages held and evicted. Hybrid
    models add their GDN state checkpoints: held (and their bytes), taken, evicted, and lookups that restored one."""

    lookups: int
    lookup_tokens: int
    hit_tokens: int
    cached_pages: int
    evicted_pages: int
    gdn_checkpoints: int = 0
    gdn_checkpoint_bytes: int = 0
    gdn_checkpoint_capacity: int = 0
    gdn_checkpoints_taken: int = 0
    gdn_checkpoints_evicted: int = 0
    gdn_restores: int = 0

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.lookup_tokens if self.lookup_tokens else 0.0


class PrefixCache:
    """Page-granular radix tree of cached KV pages with reference counts and LRU eviction."""

    def __init__(self, page_size: int):
        if page_size < 1:
            raise ValueError(f"PrefixCache: page_size must be >= 1, got {page_size}")
        self.page_size = page_size
        self.root = CacheNode((), -1, None)
        self._unreferenced: set[CacheNode] = set()
        self._clock = 0
        self._num_pages = 0
        self._lookups = self._lookup_tokens = self._hit_tokens = self._evicted = 0

    @property
    def num_pages(self) -> int:
        return self._num_pages

    @property
    def num_evictable_pages(self) -> int:
        """Pages no request references (a referenced node's ancestors are referenced too, so all can go)."""
        return len(self._unreferenced)

    def match(self, tokens: Sequence[int]) -> list[CacheNode]:
        """The longest chain of cached pages prefixing `tokens`, leaving at least the last token uncovered."""
        nodes, node = [], self.root
        for start in range(0, (len(tokens) - 1) // self.page_size * self.page_size, self.page_size):
            node = node.children.get(tuple(tokens[start : start + self.page_size]))
            if node is None:
                break
            nodes.append(node)
        return nodes

    def record_lookup(self, num_tokens: int, num_hit_tokens: int) -> None:
        """Count one admitted request's lookup for the hit-rate statistics."""
        self._lookups += 1
        self._lookup_tokens += num_tokens
        self._hit_tokens += num_hit_tokens

    def acquire(self, nodes: Sequence[CacheNode]) -> None:
        """Take a reference on each node: none of them can be evicted until released."""
        self._clock += 1
        for node in nodes:
            if node.ref_count == 0:
                self._unreferenced.discard(node)
            node.ref_count += 1
            node.last_used = self._clock

    def release(self, nodes: Sequence[CacheNode]) -> None:
        """Drop one reference on each node; nodes nobody references become evictable."""
        self._clock += 1
        for node in nodes:
            if node.ref_count <= 0:
                raise ValueError(f"PrefixCache: releasing page {node.page}, which holds no reference")
            node.ref_count -= 1
            node.last_used = self._clock
            if node.ref_count == 0:
                self._unreferenced.add(node)

    def insert(
        self, chain: list[CacheNode], tokens: Sequence[int], pages: Sequence[int]
    ) -> list[tuple[int, int]]:
        """Cache a request's further full pages of computed `tokens`, appending their nodes (referenced) to `chain`.

        pages[i] holds tokens[i*page_size : (i+1)*page_size]. Returns (page index, cached page) for each page the
        tree already held under the same prefix (another request computed it): the request should switch to the
        cached page and free its own, so that pages[:len(chain)] are always the tree's.
        """
        duplicates = []
        parent = chain[-1] if chain else self.root
        for index in range(len(chain), len(tokens) // self.page_size):
            key = tuple(tokens[index * self.page_size : (index + 1) * self.page_size])
            node = parent.children.get(key)
            if node is None:
                node = CacheNode(key, int(pages[index]), parent)
                parent.children[key] = node
                self._num_pages += 1
            elif node.page != pages[index]:
                duplicates.append((index, node.page))
            self.acquire([node])
            chain.append(node)
            parent = node
        return duplicates

    def evict(self, num_pages: int) -> list[int]:
        """Remove up to num_pages unreferenced pages, least recently used leaves first; returns their page ids."""
        return [node.page for node in self._evict_nodes(num_pages)]

    def _evict_nodes(self, num_pages: int) -> list[CacheNode]:
        leaves = [(n.last_used, id(n), n) for n in self._unreferenced if not n.children]
        heapq.heapify(leaves)
        freed = []
        while leaves and len(freed) < num_pages:
            _, _, node = heapq.heappop(leaves)
            parent = node.parent
            del parent.children[node.tokens]
            self._unreferenced.discard(node)
            freed.append(node)
            if parent is not self.root and parent.ref_count == 0 and not parent.children:
                heapq.heappush(leaves, (parent.last_used, id(parent), parent))
        self._num_pages -= len(freed)
        self._evicted += len(freed)
        return freed

    def stats(self) -> PrefixCacheStats:
        return PrefixCacheStats(
            lookups=self._lookups,
            lookup_tokens=self._lookup_tokens,
            hit_tokens=self._hit_tokens,
            cached_pages=self._num_pages,
            evicted_pages=self._evicted,
        )
