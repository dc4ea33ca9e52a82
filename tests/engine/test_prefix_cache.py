"""PrefixCache: page-granular matching that leaves the last token, duplicate pages, reference counts that
block eviction, and least-recently-used eviction of leaves first."""

from __future__ import annotations

import torch

from radixc.engine.prefix_cache import PrefixCache, shared_prefix_pages

PAGE = 4


def tokens(n: int, seed: int) -> list[int]:
    return torch.randint(0, 1000, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


def cached_request(cache: PrefixCache, ids: list[int], pages: list[int]) -> list:
    chain = []
    assert cache.insert(chain, ids, pages) == []
    return chain


def test_match_covers_full_cached_pages_but_never_the_last_token():
    cache = PrefixCache(PAGE)
    ids = tokens(13, seed=0)
    chain = cached_request(cache, ids, [10, 11, 12, 13])
    assert len(chain) == 3 and cache.num_pages == 3  # the 13th token does not fill a page
    assert [n.page for n in cache.match(ids)] == [10, 11, 12]
    assert [n.page for n in cache.match(ids[:12])] == [10, 11]  # token 12 must be recomputed
    assert [n.page for n in cache.match(ids[:9])] == [10, 11]
    assert [n.page for n in cache.match(ids[:6] + tokens(6, seed=1))] == [10]  # diverges inside page 2
    assert cache.match(tokens(13, seed=2)) == []


def test_a_page_cached_by_another_request_is_reported_as_duplicate_and_shared():
    cache = PrefixCache(PAGE)
    ids = tokens(12, seed=3)
    first = cached_request(cache, ids[:8], [5, 6])
    second = []
    assert cache.insert(second, ids, [7, 8, 9]) == [(0, 5), (1, 6)]
    assert [n.page for n in second] == [5, 6, 9] and second[:2] == first
    assert [n.ref_count for n in second] == [2, 2, 1]


def test_referenced_pages_are_never_evicted_and_lru_leaves_go_first():
    cache = PrefixCache(PAGE)
    base = tokens(8, seed=4)
    old = cached_request(cache, base + tokens(4, seed=5), [1, 2, 3])
    new = cached_request(cache, base + tokens(4, seed=6), [1, 2, 4])[2:]  # shares pages 1, 2
    held = cached_request(cache, tokens(8, seed=7), [5, 6])
    cache.release(old)
    cache.release(new)
    cache.release(old[:2])  # the second request's references on the shared pages
    assert cache.num_evictable_pages == 4 and cache.num_pages == 6
    assert cache.evict(1) == [3]  # the least recently used leaf
    assert cache.evict(10) == [4, 2, 1]  # then a parent only once its children are gone
    assert cache.num_pages == 2 and cache.num_evictable_pages == 0
    assert cache.evict(10) == []  # the held request's pages stay
    cache.release(held)
    assert sorted(cache.evict(10)) == [5, 6] and cache.stats().evicted_pages == 6


def test_stats_report_the_hit_rate_of_recorded_lookups():
    cache = PrefixCache(PAGE)
    cache.record_lookup(20, 8)
    cache.record_lookup(10, 0)
    stats = cache.stats()
    assert stats.lookups == 2 and stats.hit_rate == 8 / 30


def test_shared_prefix_pages_counts_equal_leading_pages_up_to_the_limit():
    a = tokens(40, seed=8)
    b = a[:22] + tokens(18, seed=9)
    assert shared_prefix_pages(a, b, PAGE, 9) == 5  # equal up to token 22: five whole pages
    assert shared_prefix_pages(a, list(a), PAGE, 9) == 9 and shared_prefix_pages(a, a, PAGE, 3) == 3
    assert shared_prefix_pages(a, a[:10], PAGE, 9) == 2  # a shorter list shares only its whole pages
    assert shared_prefix_pages(a, tokens(40, seed=10), PAGE, 9) == 0
