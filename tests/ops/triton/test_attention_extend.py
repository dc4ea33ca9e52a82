"""Triton paged extend attention against a float64 reference and its native twin."""

from __future__ import annotations

import pytest
import torch

from radixc.ops.native.attention import paged_attention
from radixc.ops.triton import paged_extend_attention

ATOL = RTOL = 2e-5


def _extend_case(
    paged_layout, prefix_lens, extend_lens, num_q_heads, num_kv_heads, head_dim, v_head_dim, page_size, seed
):
    """Packed new tokens of ragged requests whose keys (prefix and new) all sit in a paged cache."""
    gen = torch.Generator().manual_seed(seed)
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens, strict=True)]
    req_to_token, req_pool_indices, num_slots = paged_layout(seq_lens, page_size, gen)
    extend = torch.tensor(extend_lens)
    q = torch.randn(int(extend.sum()), num_q_heads, head_dim, generator=gen)
    k_cache = torch.randn(num_slots, num_kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_slots, num_kv_heads, v_head_dim, generator=gen)
    start_loc = torch.cumsum(extend, 0) - extend
    return (
        q,
        k_cache,
        v_cache,
        req_to_token,
        req_pool_indices,
        torch.tensor(seq_lens),
        torch.tensor(prefix_lens),
        extend,
        start_loc,
    )


def _run(case, device, **kwargs):
    return paged_extend_attention(*(t.to(device) for t in case), **kwargs).cpu()


def _check(out, expected, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(out.double(), expected.double(), atol=atol, rtol=rtol)


@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize(
    "num_q_heads, num_kv_heads, head_dim, v_head_dim",
    [(2, 2, 16, 16), (4, 2, 32, 32), (4, 1, 24, 24), (4, 2, 16, 24)],
    ids=["mha-d16", "gqa2-d32", "mqa4-d24", "gqa2-dv24"],
)
def test_extend_matches_reference_for_head_layouts_and_page_sizes(
    paged_layout,
    reference_paged_attention,
    device,
    page_size,
    num_q_heads,
    num_kv_heads,
    head_dim,
    v_head_dim,
):
    # 70 new tokens span two 64-row query blocks; prefixes put earlier keys in the cache
    case = _extend_case(
        paged_layout, [0, 5, 3], [4, 70, 1], num_q_heads, num_kv_heads, head_dim, v_head_dim, page_size, 0
    )
    kwargs = dict(scaling=head_dim**-0.5, causal=True, logit_cap=0.0, sliding_window=-1)
    _check(_run(case, device, **kwargs), reference_paged_attention(*case, **kwargs))


@pytest.mark.parametrize("logit_cap", [0.0, 5.0])
@pytest.mark.parametrize("sliding_window", [-1, 1, 6])
def test_extend_applies_soft_cap_and_sliding_window(
    paged_layout, reference_paged_attention, device, logit_cap, sliding_window
):
    case = _extend_case(paged_layout, [7, 0], [9, 12], 4, 2, 24, 24, 4, 1)
    kwargs = dict(scaling=1.0, causal=True, logit_cap=logit_cap, sliding_window=sliding_window)
    _check(_run(case, device, **kwargs), reference_paged_attention(*case, **kwargs))


@pytest.mark.parametrize("sliding_window", [-1, 4])
def test_extend_without_causal_mask_sees_every_key_of_the_request(
    paged_layout, reference_paged_attention, device, sliding_window
):
    case = _extend_case(paged_layout, [0, 6], [5, 8], 2, 1, 16, 16, 1, 2)
    kwargs = dict(scaling=0.25, causal=False, logit_cap=0.0, sliding_window=sliding_window)
    _check(_run(case, device, **kwargs), reference_paged_attention(*case, **kwargs))


def test_extend_matches_native_twin_with_kv_start_and_an_empty_request(paged_layout, device):
    """Rows of no request (a request with no new tokens, trailing padding rows) come out as zeros."""
    case = list(_extend_case(paged_layout, [6, 4, 0], [5, 0, 7], 4, 2, 24, 16, 4, 3))
    case[0] = torch.cat([case[0], torch.randn(2, 4, 24)])  # two padding rows after the last request
    kv_start = torch.tensor([2, 1, 0])
    case[5] = case[5] - kv_start  # seq_lens count keys from kv_start on
    kwargs = dict(scaling=0.3, causal=True, logit_cap=4.0, sliding_window=8)
    out = _run(case, device, kv_start=kv_start.to(device), **kwargs)
    torch.testing.assert_close(out, paged_attention(*case, kv_start=kv_start, **kwargs), atol=ATOL, rtol=RTOL)
    assert out[-2:].abs().max() == 0


def test_extend_in_half_precision_stays_close_to_float64(
    paged_layout, reference_paged_attention, device, half_dtype
):
    case = _extend_case(paged_layout, [3, 0], [20, 6], 4, 2, 32, 32, 4, 4)
    case = tuple(t.to(half_dtype) if t.is_floating_point() else t for t in case)
    kwargs = dict(scaling=32**-0.5, causal=True, logit_cap=0.0, sliding_window=-1)
    out = _run(case, device, **kwargs)
    assert out.dtype == half_dtype
    _check(out, reference_paged_attention(*case, **kwargs), atol=2e-2, rtol=2e-2)
