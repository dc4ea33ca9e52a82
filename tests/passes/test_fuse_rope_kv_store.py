"""The rope + KV-store fusion: rotary and the cache write become one op, the attention then reads the cache only;
a rotated k with another use is left alone."""

from __future__ import annotations

import torch


def test_rope_and_store_fuse_and_the_attention_reads_only_the_cache(ph):
    torch.manual_seed(1)
    model = ph.RopeAttention(qk_norm=True)
    expected, _, _, eager_pool = ph.run_attention(model, compiled=False)
    outputs, history, code, pool = ph.run_attention(model, compiled=True)
    assert [h["fuse_rope_kv_store"] for h in history] == [1, 1]
    # the q/k norms folded first, so one kernel normalises, rotates and stores
    assert "native_rope_store_kv" in code and "qk_norm_rope" not in code and "rotary_embedding" not in code
    for got, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pool.k_buffer[0], eager_pool.k_buffer[0], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(pool.v_buffer[0], eager_pool.v_buffer[0])


def test_a_rotated_k_with_other_uses_is_left_alone(ph):
    torch.manual_seed(1)
    model = ph.RopeAttention(qk_norm=False, k_also_out=True)
    expected = ph.run_attention(model, compiled=False)[0]
    outputs, history, code, _ = ph.run_attention(model, compiled=True)
    assert history[0]["fuse_rope_kv_store"] == 0 and "native_rope_store_kv" not in code
    for got, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
