"""Triton paged decode attention against a float64 reference and its native twin."""

from __future__ import annotations

import pytest
import torch

from radixc.ops.native.attention import paged_attention
from radixc.ops.triton import attention_decode, paged_decode_attention

ATOL = RTOL = 2e-5


def _decode_case(paged_layout, seq_lens, num_q_heads, num_kv_heads, head_dim, v_head_dim, page_size, seed):
    gen = torch.Generator().manual_seed(seed)
    req_to_token, req_pool_indices, num_slots = paged_layout(seq_lens, page_size, gen)
    q = torch.randn(len(seq_lens), num_q_heads, head_dim, generator=gen)
    k_cache = torch.randn(num_slots, num_kv_heads, head_dim, generator=gen)
    v_cache = torch.randn(num_slots, num_kv_heads, v_head_dim, generator=gen)
    return q, k_cache, v_cache, req_to_token, req_pool_indices, torch.tensor(seq_lens)


def _run(case, device, **kwargs):
    tensors = [t.to(device) for t in case]
    return paged_decode_attention(*tensors, **kwargs).cpu()


def _reference(reference_paged_attention, case, **kwargs):
    q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens = case
    batch = seq_lens.shape[0]
    ones = torch.ones(batch, dtype=torch.int64)
    return reference_paged_attention(
        q,
        k_cache,
        v_cache,
        req_to_token,
        req_pool_indices,
        seq_lens,
        seq_lens - 1,
        ones,
        torch.arange(batch),
        causal=True,
        **kwargs,
    )


@pytest.mark.parametrize("page_size", [1, 4])
@pytest.mark.parametrize(
    "num_q_heads, num_kv_heads, head_dim, v_head_dim",
    [(2, 2, 16, 16), (4, 2, 32, 32), (4, 1, 24, 24), (4, 2, 16, 24)],
    ids=["mha-d16", "gqa2-d32", "mqa4-d24", "gqa2-dv24"],
)
def test_decode_matches_reference_for_head_layouts_and_page_sizes(
    paged_layout,
    reference_paged_attention,
    device,
    page_size,
    num_q_heads,
    num_kv_heads,
    head_dim,
    v_head_dim,
):
    case = _decode_case(
        paged_layout, [1, 9, 70, 130], num_q_heads, num_kv_heads, head_dim, v_head_dim, page_size, 0
    )
    kwargs = dict(scaling=head_dim**-0.5, logit_cap=0.0, sliding_window=-1)
    # two splits over 130 keys: each split loops over more than one 64-key block
    out = _run(case, device, num_kv_splits=2, **kwargs)
    torch.testing.assert_close(
        out.double(), _reference(reference_paged_attention, case, **kwargs), atol=ATOL, rtol=RTOL
    )


@pytest.mark.parametrize("logit_cap", [0.0, 5.0])
@pytest.mark.parametrize("sliding_window", [-1, 1, 6])
def test_decode_applies_soft_cap_and_sliding_window(
    paged_layout, reference_paged_attention, device, logit_cap, sliding_window
):
    case = _decode_case(paged_layout, [3, 17, 40], 4, 2, 24, 24, 4, 1)
    # a large scaling makes the cap bite
    kwargs = dict(scaling=1.0, logit_cap=logit_cap, sliding_window=sliding_window)
    out = _run(case, device, num_kv_splits=4, **kwargs)
    torch.testing.assert_close(
        out.double(), _reference(reference_paged_attention, case, **kwargs), atol=ATOL, rtol=RTOL
    )


# 40: more than the merge kernel's usual block of splits (MAX_KV_SPLITS), so a wider one
@pytest.mark.parametrize("num_kv_splits", [1, 3, 16, 40])
def test_decode_result_does_not_depend_on_split_count(
    paged_layout, reference_paged_attention, device, num_kv_splits
):
    # more splits than keys leaves some splits empty
    case = _decode_case(paged_layout, [2, 50], 2, 1, 16, 16, 1, 2)
    kwargs = dict(scaling=0.25, logit_cap=0.0, sliding_window=-1)
    out = _run(case, device, num_kv_splits=num_kv_splits, **kwargs)
    torch.testing.assert_close(
        out.double(), _reference(reference_paged_attention, case, **kwargs), atol=ATOL, rtol=RTOL
    )


@pytest.mark.gpu
def test_every_split_count_the_batch_sizes_choose_shares_one_compile(paged_layout, reference_paged_attention):
    """The split count is a run-time argument: after one launch with splits, the others (2 to 32, as the decode
    graphs of different batch sizes choose them) compile nothing more."""
    case = _decode_case(paged_layout, [70, 300, 513], 4, 2, 64, 64, 4, 11)
    kwargs = dict(scaling=0.125, logit_cap=0.0, sliding_window=-1)
    expected = _reference(reference_paged_attention, case, **kwargs)
    device = torch.cuda.current_device()

    def compiled() -> int:
        kernels = (attention_decode._decode_partial_kernel, attention_decode._decode_merge_kernel)
        return sum(len(kernel.device_caches[device][0]) for kernel in kernels)

    _run(case, "cuda", num_kv_splits=2, **kwargs)
    before = compiled()
    for splits in (4, 8, 16, 32):
        out = _run(case, "cuda", num_kv_splits=splits, **kwargs)
        torch.testing.assert_close(out.double(), expected, atol=ATOL, rtol=RTOL)
    assert compiled() == before


def test_decode_matches_native_twin_with_kv_start_and_padding_request(paged_layout, device):
    """A request with seq_len 0 (CUDA-graph padding) comes out as zeros, like the native twin's."""
    q, k_cache, v_cache, req_to_token, req_pool_indices, _ = _decode_case(
        paged_layout, [12, 0, 33], 4, 2, 24, 16, 4, 3
    )
    seq_lens, kv_start = torch.tensor([9, 0, 30]), torch.tensor([3, 0, 2])
    kwargs = dict(scaling=0.3, logit_cap=4.0, sliding_window=8)
    out = _run(
        (q, k_cache, v_cache, req_to_token, req_pool_indices, seq_lens),
        device,
        kv_start=kv_start.to(device),
        **kwargs,
    )
    batch = seq_lens.shape[0]
    expected = paged_attention(
        q,
        k_cache,
        v_cache,
        req_to_token,
        req_pool_indices,
        seq_lens,
        seq_lens - 1,
        torch.ones(batch, dtype=torch.int64),
        torch.arange(batch),
        causal=True,
        kv_start=kv_start,
        **kwargs,
    )
    torch.testing.assert_close(out, expected, atol=ATOL, rtol=RTOL)
    assert out[1].abs().max() == 0


def test_decode_in_half_precision_stays_close_to_float64(
    paged_layout, reference_paged_attention, device, half_dtype
):
    case = _decode_case(paged_layout, [5, 48], 4, 2, 32, 32, 4, 4)
    case = tuple(t.to(half_dtype) if t.is_floating_point() else t for t in case)
    kwargs = dict(scaling=32**-0.5, logit_cap=0.0, sliding_window=-1)
    out = _run(case, device, **kwargs)
    assert out.dtype == half_dtype
    expected = _reference(reference_paged_attention, case, **kwargs)
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize(
    "batch, num_kv_heads, head_blocks, max_seq_len, num_sms, expected",
    [
        (1, 8, 1, 1024, 132, 16),  # few programs: split, but no split under MIN_SPLIT_KEYS keys
        (1, 8, 1, 8192, 132, 32),  # few programs, long context: as many splits as fill the SMs
        (32, 8, 1, 4096, 132, 2),
        (64, 8, 1, 4096, 132, 1),  # the grid is already full: one split, no merge launch
        (1, 8, 1, 60, 132, 1),  # the context fits one split
        (8, 2, 1, 1024, 132, 16),  # 16 programs: 16 splits of 64 keys
        (1, 1, 1, 1 << 20, 132, attention_decode.MAX_KV_SPLITS),
    ],
)
def test_split_count_fills_the_gpu_without_splits_shorter_than_the_minimum(
    batch, num_kv_heads, head_blocks, max_seq_len, num_sms, expected
):
    splits = attention_decode.choose_num_kv_splits(batch, num_kv_heads, head_blocks, max_seq_len, num_sms)
    assert splits == expected


class _NoLaunch:
    def __getitem__(self, grid):
        raise AssertionError("the merge kernel was launched")


def test_one_split_writes_the_output_without_a_merge_launch(
    paged_layout, reference_paged_attention, device, monkeypatch
):
    case = _decode_case(paged_layout, [1, 30, attention_decode.MIN_SPLIT_KEYS - 4], 4, 2, 16, 24, 4, 6)
    kwargs = dict(scaling=0.3, logit_cap=3.0, sliding_window=-1)
    monkeypatch.setattr(attention_decode, "_decode_merge_kernel", _NoLaunch())
    expected = _reference(reference_paged_attention, case, **kwargs)
    # chosen from the context bound (shorter than one split's minimum, so one split on any GPU) and given
    # explicitly, into a caller's output
    out = torch.full((3, 4, 24), float("nan"), device=device)
    chosen = _run(case, device, max_seq_len=attention_decode.MIN_SPLIT_KEYS - 4, **kwargs)
    given = paged_decode_attention(*(t.to(device) for t in case), num_kv_splits=1, out=out, **kwargs)
    assert given is out
    for result in (chosen, given.cpu()):
        torch.testing.assert_close(result.double(), expected, atol=ATOL, rtol=RTOL)


def test_multi_split_writes_into_caller_scratch_sized_for_a_larger_batch(
    paged_layout, reference_paged_attention, device, monkeypatch
):
    case = _decode_case(paged_layout, [7, 300, 513], 4, 1, 16, 16, 4, 7)
    kwargs = dict(scaling=0.25, logit_cap=0.0, sliding_window=100)
    expected = _reference(reference_paged_attention, case, **kwargs)
    # scratch for 5 requests and 8 splits; NaN filling shows every entry the merge reads was written first
    partial_out = torch.empty((5, 4, 8, 16), device=device)
    partial_lse = torch.empty((5, 4, 8), device=device)
    scratch = dict(partial_out=partial_out, partial_lse=partial_lse)
    for splits in (3, 8):
        partial_out.fill_(float("nan")), partial_lse.fill_(float("nan"))
        out = _run(case, device, num_kv_splits=splits, **scratch, **kwargs)
        torch.testing.assert_close(out.double(), expected, atol=ATOL, rtol=RTOL)
        assert not partial_lse[:3, :, :splits].isnan().any() and partial_lse[3:].isnan().all()
    # on an H100-sized GPU a long context bound wants 64 splits here: the scratch's 8 cap the choice
    monkeypatch.setattr(attention_decode, "_num_sms", lambda device: 132)
    partial_lse.fill_(float("nan"))
    out = _run(case, device, max_seq_len=1 << 16, **scratch, **kwargs)
    torch.testing.assert_close(out.double(), expected, atol=ATOL, rtol=RTOL)
    assert not partial_lse[:3].isnan().any()


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(partial_lse=None), "together"),
        (dict(partial_out=torch.zeros(3, 4, 4, 8)), "partial_out"),
        (dict(partial_lse=torch.zeros(3, 4, 2)), "partial_lse"),
        (dict(partial_out=torch.zeros(3, 4, 4, 16, dtype=torch.float16)), "partial_out"),
        (dict(num_kv_splits=5), "num_kv_splits"),
        (dict(num_kv_splits=0), "num_kv_splits"),
    ],
    ids=["lse-missing", "out-dv", "lse-splits", "out-dtype", "more-than-scratch", "zero"],
)
def test_decode_rejects_mismatched_scratch(paged_layout, device, change, message):
    case = _decode_case(paged_layout, [4, 9, 2], 4, 2, 16, 16, 1, 8)
    scratch = dict(partial_out=torch.zeros(3, 4, 4, 16), partial_lse=torch.zeros(3, 4, 4))
    scratch.update(change)
    scratch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in scratch.items()}
    with pytest.raises(ValueError, match=message):
        _run(case, device, scaling=1.0, logit_cap=0.0, sliding_window=-1, **scratch)


def test_decode_rejects_query_heads_not_a_multiple_of_kv_heads(paged_layout, device):
    case = _decode_case(paged_layout, [4], 3, 2, 16, 16, 1, 5)
    with pytest.raises(ValueError, match="not a multiple"):
        _run(case, device, scaling=1.0, logit_cap=0.0, sliding_window=-1)
