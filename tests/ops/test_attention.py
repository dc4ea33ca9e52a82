"""RadixAttention on the native backend against a float64 softmax reference written here."""

from __future__ import annotations

import math
import random

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import radixc  # noqa: F401  (installs the passes, defines the ops)
from radixc.engine import KVPool, NativeBackend, PoolExhaustedError, ReqToTokenPool
from radixc.engine.batch_builder import BatchBuilder
from radixc.ops import AttentionType, RadixAttention


def reference_attention(q, k, v, q_positions, *, scaling, causal, logit_cap, window):
    """Float64 attention of one request: q `[Lq, Hq, D]` at q_positions over k/v `[Lk, Hk, *]` at 0..Lk-1."""
    group = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(group, dim=1)
    v = v.double().repeat_interleave(group, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q.double(), k) * scaling
    if logit_cap > 0:
        scores = logit_cap * torch.tanh(scores / logit_cap)
    key_pos = torch.arange(k.shape[0])
    allowed = torch.ones(len(q_positions), k.shape[0], dtype=torch.bool)
    if causal:
        allowed &= key_pos[None, :] <= q_positions[:, None]
    if window > 0:
        allowed &= q_positions[:, None] - key_pos[None, :] < window
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


class Harness:
    """One RadixAttention layer over pools, with each request's K/V history kept for the reference."""

    def __init__(
        self,
        *,
        num_heads,
        num_kv_heads,
        head_dim,
        v_head_dim,
        page_size,
        logit_cap=0.0,
        window=-1,
        attn_type=AttentionType.DECODER,
        num_pages=64,
        dtype=torch.float32,
    ):
        self.layer = RadixAttention(
            num_heads,
            head_dim,
            head_dim**-0.5,
            num_kv_heads,
            layer_id=1,
            logit_cap=logit_cap,
            v_head_dim=v_head_dim,
            sliding_window_size=window,
            attn_type=attn_type,
        )
        self.kv = KVPool(num_pages, page_size, 2, num_kv_heads, head_dim, dtype, v_head_dim=v_head_dim)
        self.builder = BatchBuilder(ReqToTokenPool(8, 256), self.kv, NativeBackend())
        self.dtype = dtype
        self.history: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def new_requests(self, count):
        requests = [self.builder.new_request() for _ in range(count)]
        for r in requests:
            layer = self.layer
            self.history[id(r)] = (
                torch.empty(0, layer.tp_k_head_num, layer.qk_head_dim, dtype=self.dtype),
                torch.empty(0, layer.tp_v_head_num, layer.v_head_dim, dtype=self.dtype),
            )
        return requests

    def step(self, requests, lengths, decode=False):
        """Run one step with fresh random q/k/v; return (radixc output, float64 reference), both `[T, Hq, Dv]`."""
        layer = self.layer
        tokens = [[1] * n for n in lengths]
        batch = (
            self.builder.decode(requests, [1] * len(requests))
            if decode
            else self.builder.extend(requests, tokens)
        )
        total = sum(lengths)
        q = torch.randn(total, layer.tp_q_head_num * layer.qk_head_dim, dtype=self.dtype)
        k = torch.randn(total, layer.tp_k_head_num * layer.qk_head_dim, dtype=self.dtype)
        v = torch.randn(total, layer.tp_v_head_num * layer.v_head_dim, dtype=self.dtype)
        out = layer(q, k, v, batch).view(total, layer.tp_q_head_num, layer.v_head_dim)
        expected, row = [], 0
        causal = layer.attn_type is AttentionType.DECODER or decode
        for r, n in zip(requests, lengths):
            k_hist, v_hist = self.history[id(r)]
            k_new = k[row : row + n].view(n, layer.tp_k_head_num, -1)
            v_new = v[row : row + n].view(n, layer.tp_v_head_num, -1)
            k_all, v_all = torch.cat([k_hist, k_new]), torch.cat([v_hist, v_new])
            self.history[id(r)] = (k_all, v_all)
            positions = torch.arange(k_hist.shape[0], k_all.shape[0])
            expected.append(
                reference_attention(
                    q[row : row + n].view(n, layer.tp_q_head_num, -1),
                    k_all,
                    v_all,
                    positions,
                    scaling=layer.scaling,
                    causal=causal,
                    logit_cap=layer.logit_cap,
                    window=layer.sliding_window_size,
                )
            )
            row += n
        return out, torch.cat(expected)


CASES = [
    # num_heads, num_kv_heads, head_dim, v_head_dim, page_size, logit_cap, window
    (4, 4, 16, 16, 1, 0.0, -1),  # MHA, token pages
    (8, 2, 32, 32, 4, 0.0, -1),  # GQA 4
    (6, 1, 24, 24, 16, 0.0, -1),  # MQA, odd head dim
    (4, 2, 16, 8, 3, 30.0, -1),  # soft-cap, v_head_dim != head_dim
    (4, 2, 16, 16, 2, 0.0, 5),  # sliding window shorter than the prompts
    (8, 4, 64, 32, 8, 20.0, 7),  # all together
]


@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim,v_head_dim,page_size,logit_cap,window", CASES)
def test_extend_with_prefix_then_decode_matches_float64_reference(
    num_heads, num_kv_heads, head_dim, v_head_dim, page_size, logit_cap, window
):
    torch.manual_seed(hash((num_heads, head_dim, page_size)) % 1000)
    h = Harness(
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        v_head_dim=v_head_dim,
        page_size=page_size,
        logit_cap=logit_cap,
        window=window,
    )
    requests = h.new_requests(3)
    rng = random.Random(page_size)
    for lengths in ([rng.randint(1, 13) for _ in requests], [rng.randint(1, 9) for _ in requests]):
        out, ref = h.step(requests, lengths)
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    for _ in range(3):
        out, ref = h.step(requests, [1, 1, 1], decode=True)
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_bidirectional_decoder_extend_sees_later_tokens_of_its_request():
    torch.manual_seed(1)
    h = Harness(
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        v_head_dim=16,
        page_size=4,
        attn_type=AttentionType.DECODER_BIDIRECTIONAL,
    )
    requests = h.new_requests(2)
    out, ref = h.step(requests, [6, 3])
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)
    out, ref = h.step(requests, [2, 4])  # bidirectional within the new tokens, over the cached prefix too
    torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=2e-5)


def test_extend_then_decode_equals_one_long_extend():
    torch.manual_seed(2)
    kw = dict(num_heads=4, num_kv_heads=2, head_dim=16, v_head_dim=16, page_size=4, logit_cap=10.0, window=6)
    prompt, steps = 7, 4
    q = torch.randn(prompt + steps, 4 * 16)
    k = torch.randn(prompt + steps, 2 * 16)
    v = torch.randn(prompt + steps, 2 * 16)
    stepped = Harness(**kw)
    (r,) = stepped.new_requests(1)
    outs = [stepped.layer(q[:prompt], k[:prompt], v[:prompt], stepped.builder.extend([r], [[0] * prompt]))]
    for i in range(prompt, prompt + steps):
        outs.append(stepped.layer(q[i : i + 1], k[i : i + 1], v[i : i + 1], stepped.builder.decode([r], [0])))
    whole = Harness(**kw)
    (r2,) = whole.new_requests(1)
    out_whole = whole.layer(q, k, v, whole.builder.extend([r2], [[0] * (prompt + steps)]))
    torch.testing.assert_close(torch.cat(outs), out_whole, atol=1e-6, rtol=1e-6)


def test_encoder_only_attends_within_each_request_and_leaves_the_pool_alone():
    torch.manual_seed(3)
    layer = RadixAttention(4, 16, 0.25, 4, layer_id=0, attn_type=AttentionType.ENCODER_ONLY)
    builder = BatchBuilder(ReqToTokenPool(4, 32), None, NativeBackend())
    requests = [builder.new_request() for _ in range(2)]
    batch = builder.extend(requests, [[0] * 5, [0] * 3], all_logits=True)
    q, k, v = (torch.randn(8, 64) for _ in range(3))
    out = layer(q, k, v, batch).view(8, 4, 16)
    for rows in (slice(0, 5), slice(5, 8)):
        n = rows.stop - rows.start
        ref = reference_attention(
            q[rows].view(n, 4, 16),
            k[rows].view(n, 4, 16),
            v[rows].view(n, 4, 16),
            torch.arange(n),
            scaling=0.25,
            causal=False,
            logit_cap=0.0,
            window=-1,
        )
        torch.testing.assert_close(out[rows].double(), ref, atol=2e-5, rtol=2e-5)


def test_cross_layer_kv_sharing_reads_the_cache_written_by_an_earlier_call():
    torch.manual_seed(4)
    h = Harness(num_heads=4, num_kv_heads=2, head_dim=16, v_head_dim=16, page_size=2)
    requests = h.new_requests(2)
    batch = h.builder.extend(requests, [[0] * 4, [0] * 6])
    q, k, v = torch.randn(10, 64), torch.randn(10, 32), torch.randn(10, 32)
    with_kv = h.layer(q, k, v, batch)
    shared = h.layer(q, None, None, batch)  # k = v = None: read what the first call stored
    torch.testing.assert_close(shared, with_kv)


def test_save_kv_cache_false_leaves_the_pool_untouched():
    h = Harness(num_heads=4, num_kv_heads=2, head_dim=16, v_head_dim=16, page_size=2)
    requests = h.new_requests(1)
    batch = h.builder.extend(requests, [[0] * 3])
    before = h.kv.k_buffer[1].clone()
    h.layer(torch.randn(3, 64), torch.randn(3, 32), torch.randn(3, 32), batch, save_kv_cache=False)
    assert torch.equal(h.kv.k_buffer[1], before)
    h.layer(torch.randn(3, 64), torch.randn(3, 32), torch.randn(3, 32), batch)
    assert not torch.equal(h.kv.k_buffer[1], before)


def test_cross_attention_reads_encoder_tokens_without_causal_mask():
    torch.manual_seed(5)
    layer = RadixAttention(4, 16, 0.25, 2, layer_id=0, is_cross_attention=True)
    kv = KVPool(16, 4, 1, 2, 16, torch.float32)
    builder = BatchBuilder(ReqToTokenPool(4, 64), kv, NativeBackend())
    requests = [builder.new_request() for _ in range(2)]
    enc_lens = [5, 3]
    enc_batch = builder.extend(requests, [[0] * n for n in enc_lens])  # encoder tokens take positions 0..n-1
    enc_k, enc_v = torch.randn(8, 32), torch.randn(8, 32)
    enc_batch.encoder_lens = torch.tensor(enc_lens)
    enc_batch.encoder_out_cache_loc = enc_batch.out_cache_loc
    q = torch.randn(8, 64)
    out = layer(q, enc_k, enc_v, enc_batch).view(8, 4, 16)
    starts = [0, 5]
    for start, n in zip(starts, enc_lens):
        rows = slice(start, start + n)
        ref = reference_attention(
            q[rows].view(n, 4, 16),
            enc_k[rows].view(n, 2, 16),
            enc_v[rows].view(n, 2, 16),
            torch.zeros(n, dtype=torch.long),
            scaling=0.25,
            causal=False,
            logit_cap=0.0,
            window=-1,
        )
        torch.testing.assert_close(out[rows].double(), ref, atol=2e-5, rtol=2e-5)


def test_idle_batch_returns_zeros_without_touching_pools():
    h = Harness(num_heads=4, num_kv_heads=2, head_dim=16, v_head_dim=8, page_size=2)
    batch = h.builder.extend(h.new_requests(1), [[0, 0]])
    batch.forward_mode = radixc.ForwardMode.IDLE
    out = h.layer(torch.randn(2, 64), torch.randn(2, 32), torch.randn(2, 16), batch)
    assert out.shape == (2, 4 * 8) and not out.any()


def test_q_may_be_given_with_a_head_dim():
    torch.manual_seed(6)
    h = Harness(num_heads=4, num_kv_heads=2, head_dim=16, v_head_dim=16, page_size=2)
    batch = h.builder.extend(h.new_requests(1), [[0] * 3])
    q, k, v = torch.randn(3, 4, 16), torch.randn(3, 2, 16), torch.randn(3, 2, 16)
    flat = h.layer(q.reshape(3, 64), k.reshape(3, 32), v.reshape(3, 32), batch)
    torch.testing.assert_close(h.layer(q, k, v, batch), flat)


# ---- bad input: clear errors naming the layer and the tensor ----


def _batch(h, n=3):
    return h.builder.extend(h.new_requests(1), [[0] * n])


def test_wrong_head_count_names_the_layer_and_tensor():
    h = Harness(num_heads=4, num_kv_heads=2, head_dim=16, v_head_dim=16, page_size=2)
    with pytest.raises(ValueError, match=r"RadixAttention\(layer_id=1\): expected k with 2 heads of dim 16"):
        h.layer(torch.randn(3, 64), torch.randn(3, 4, 16), torch.randn(3, 32), _batch(h))


def test_dtype_mismatch_is_rejected():
    h = Harness(num_heads=4, num_kv_heads=2, head_dim=16, v_head_dim=16, page_size=2)
    with pytest.raises(TypeError, match="v has dtype torch.float64"):
        h.layer(torch.randn(3, 64), torch.randn(3, 32), torch.randn(3, 32, dtype=torch.float64), _batch(h))
    with pytest.raises(TypeError, match="KV pool holds torch.float32"):
        q, k, v = (torch.randn(3, n, dtype=torch.bfloat16) for n in (64, 32, 32))
        h.layer(q, k, v, _batch(h))


def test_layer_id_outside_the_pool_is_rejected():
    h = Harness(num_heads=4, num_kv_heads=2, head_dim=16, v_head_dim=16, page_size=2)
    layer = RadixAttention(4, 16, 0.25, 2, layer_id=7)
    with pytest.raises(ValueError, match="no KV buffer for layer_id=7"):
        layer(torch.randn(3, 64), torch.randn(3, 32), torch.randn(3, 32), _batch(h))


def test_pool_exhaustion_is_a_clear_error_and_changes_nothing():
    h = Harness(num_heads=4, num_kv_heads=2, head_dim=16, v_head_dim=16, page_size=4, num_pages=3)
    requests = h.new_requests(2)
    free_before = h.kv.num_free_pages
    with pytest.raises(PoolExhaustedError, match="KVPool exhausted: asked for 3 page"):
        h.builder.extend(requests, [[0] * 5, [0] * 4])
    assert h.kv.num_free_pages == free_before and all(r.num_cached == 0 and not r.pages for r in requests)


def test_bad_constructor_arguments_are_rejected():
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        RadixAttention(6, 16, 0.25, 4, layer_id=0)
    with pytest.raises(ValueError, match="ENCODER_ONLY supports neither"):
        RadixAttention(
            4, 16, 0.25, 4, layer_id=0, sliding_window_size=8, attn_type=AttentionType.ENCODER_ONLY
        )


def test_attention_type_is_a_string_enum():
    assert AttentionType.DECODER == "decoder" and isinstance(AttentionType.ENCODER_ONLY, str)
    assert AttentionType("decoder_bidirectional") is AttentionType.DECODER_BIDIRECTIONAL


def test_extra_repr_names_the_layer_configuration():
    layer = RadixAttention(8, 64, 1 / math.sqrt(64), 2, layer_id=3, logit_cap=50.0, sliding_window_size=128)
    text = repr(layer)
    assert (
        "layer_id=3" in text
        and "kv_heads=2" in text
        and "logit_cap=50.0" in text
        and "sliding_window_size=128" in text
    )


@settings(max_examples=25, deadline=None)
@given(
    num_kv_heads=st.sampled_from([1, 2, 4]),
    group=st.sampled_from([1, 2, 3]),
    head_dim=st.sampled_from([8, 16, 24]),
    v_head_dim=st.sampled_from([8, 16]),
    page_size=st.sampled_from([1, 2, 5, 16]),
    prompt_lens=st.lists(st.integers(1, 12), min_size=1, max_size=4),
    chunk_lens=st.lists(st.integers(1, 6), min_size=4, max_size=4),
    logit_cap=st.sampled_from([0.0, 5.0]),
    window=st.sampled_from([-1, 1, 4]),
    seed=st.integers(0, 2**16),
)
def test_random_shapes_extend_chunk_and_decode_match_float64(
    num_kv_heads, group, head_dim, v_head_dim, page_size, prompt_lens, chunk_lens, logit_cap, window, seed
):
    torch.manual_seed(seed)
    h = Harness(
        num_heads=num_kv_heads * group,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        v_head_dim=v_head_dim,
        page_size=page_size,
        logit_cap=logit_cap,
        window=window,
        num_pages=128,
    )
    requests = h.new_requests(len(prompt_lens))
    steps = [(prompt_lens, False), (chunk_lens[: len(requests)], False), ([1] * len(requests), True)]
    for lengths, decode in steps:
        out, ref = h.step(requests, lengths, decode=decode)
        torch.testing.assert_close(out.double(), ref, atol=3e-5, rtol=3e-5)
