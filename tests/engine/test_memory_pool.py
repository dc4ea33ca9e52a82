"""Pools: allocation, free, page-to-slot mapping, exhaustion errors."""

from __future__ import annotations

import pytest
import torch

from radixc.engine import GDNPool, KVPool, PoolExhaustedError, ReqToTokenPool


def test_kv_pool_slots_follow_pages_in_order_for_any_page_size():
    for page_size in (1, 3, 16):
        pool = KVPool(10, page_size, 2, 2, 8, torch.float32)
        pages = pool.alloc_pages(3)
        assert 0 not in pages.tolist()  # page 0 is the padding page
        slots = pool.slots(pages, 0, 3 * page_size)
        expected = torch.cat([torch.arange(p * page_size, (p + 1) * page_size) for p in pages.tolist()])
        assert torch.equal(slots, expected)
        assert torch.equal(pool.slots(pages, 1, 2 * page_size), expected[1 : 2 * page_size])


def test_kv_pool_buffers_have_v_head_dim_and_only_requested_layers():
    pool = KVPool(4, 2, 3, 2, 16, torch.bfloat16, v_head_dim=8, layer_ids=[0, 2])
    k, v = pool.layer_buffers(2)
    assert k.shape == (8, 2, 16) and v.shape == (8, 2, 8) and k.dtype == torch.bfloat16
    assert k.data_ptr() != pool.layer_buffers(0)[0].data_ptr()
    with pytest.raises(ValueError, match="no KV buffer for layer_id=1"):
        pool.layer_buffers(1)


def test_kv_pool_exhaustion_and_free_roundtrip():
    pool = KVPool(4, 2, 1, 1, 4, torch.float32)
    pages = pool.alloc_pages(3)
    assert pool.num_free_pages == 0
    with pytest.raises(PoolExhaustedError, match="KVPool exhausted: asked for 1 page"):
        pool.alloc_pages(1)
    pool.free_pages(pages)
    assert pool.num_free_pages == 3
    with pytest.raises(ValueError, match="not allocated"):
        pool.free_pages(pages[:1])


def test_req_to_token_pool_alloc_free_and_exhaustion():
    pool = ReqToTokenPool(3, 16)
    rows = [pool.alloc(), pool.alloc()]
    assert sorted(rows) == [1, 2] and pool.req_to_token.dtype == torch.int32
    with pytest.raises(PoolExhaustedError, match="ReqToTokenPool exhausted"):
        pool.alloc()
    pool.free(rows[0])
    assert pool.alloc() == rows[0]


def test_gdn_pool_alloc_zeroes_the_slot_and_exhausts_clearly():
    pool = GDNPool(
        3,
        2,
        conv_dim=12,
        conv_kernel_size=4,
        num_v_heads=2,
        head_k_dim=4,
        head_v_dim=3,
        conv_dtype=torch.bfloat16,
    )
    conv, ssm = pool.layer_states(1)
    assert conv.shape == (3, 12, 3) and ssm.shape == (3, 2, 4, 3) and ssm.dtype == torch.float32
    slot = pool.alloc()
    ssm[slot].normal_()
    pool.free(slot)
    again = pool.alloc()
    assert again == slot and not ssm[again].any()
    pool.alloc()
    with pytest.raises(PoolExhaustedError, match="GDNPool exhausted"):
        pool.alloc()
    with pytest.raises(ValueError, match="no gdn_layer_idx=2"):
        pool.layer_states(2)


def test_gdn_pool_copies_a_slot_between_pools_of_the_same_geometry():
    live = GDNPool(3, 2, 6, 4, 2, 3, 5, torch.bfloat16)
    checkpoints = GDNPool.like(live, 4)
    assert checkpoints.num_slots == 4 and checkpoints.conv_dtype == torch.bfloat16
    assert checkpoints.slot_bytes == live.slot_bytes == 2 * (6 * 3 * 2 + 2 * 3 * 5 * 4)
    slot, saved = live.alloc(), checkpoints.alloc(clear=False)
    for conv, ssm in zip(live.conv_state, live.ssm_state):
        conv[slot].normal_()
        ssm[slot].normal_()
    checkpoints.copy_states([saved], live, [slot])
    restored = live.alloc()
    live.copy_states([restored], checkpoints, [saved])
    for conv, ssm in zip(live.conv_state, live.ssm_state):
        assert torch.equal(conv[restored], conv[slot]) and torch.equal(ssm[restored], ssm[slot])
    with pytest.raises(ValueError, match="geometry differs"):
        GDNPool(2, 2, 6, 4, 2, 3, 4, torch.bfloat16).copy_states([1], live, [slot])


def test_gdn_pool_copies_many_slots_at_once_and_refuses_a_slot_twice():
    live = GDNPool(5, 2, 6, 4, 2, 3, 5, torch.float32)
    checkpoints = GDNPool.like(live, 5)
    sources = [live.alloc() for _ in range(3)]
    for conv, ssm in zip(live.conv_state, live.ssm_state):
        conv.normal_()
        ssm.normal_()
    saved = [checkpoints.alloc(clear=False) for _ in sources]
    checkpoints.copy_states(saved, live, sources[::-1])  # saved[i] <- sources[-1 - i]
    for tensors, source_tensors in (
        (checkpoints.conv_state, live.conv_state),
        (checkpoints.ssm_state, live.ssm_state),
    ):
        for state, source_state in zip(tensors, source_tensors):
            for slot, source in zip(saved, sources[::-1]):
                assert torch.equal(state[slot], source_state[source])
    with pytest.raises(ValueError, match="distinct slots"):
        checkpoints.copy_states([saved[0], saved[0]], live, sources[:2])


def test_kv_pool_memory_bytes_counts_only_held_layers():
    pool = KVPool(5, 4, 3, 2, 8, torch.float16, v_head_dim=4, layer_ids=[1])
    assert pool.memory_bytes == 5 * 4 * 2 * (8 + 4) * 2
