"""Run the Triton kernel tests on CUDA when there is a GPU, else on CPU tensors under the Triton interpreter
(tests/conftest.py sets TRITON_INTERPRET=1 for the whole suite when there is no GPU)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

if importlib.util.find_spec("triton") is None:
    collect_ignore_glob = ["test_*.py"]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

# half-precision dtypes to test; triton 3.9's interpreter computes tl.dot on bfloat16 from the raw bits
HALF_DTYPES = [
    torch.float16,
    pytest.param(
        torch.bfloat16,
        marks=pytest.mark.skipif(DEVICE == "cpu", reason="the Triton interpreter's bfloat16 tl.dot is wrong"),
    ),
]


@pytest.fixture
def device() -> str:
    return DEVICE


@pytest.fixture(params=HALF_DTYPES, ids=lambda dtype: str(dtype).removeprefix("torch."))
def half_dtype(request) -> torch.dtype:
    return request.param


@pytest.fixture
def paged_layout():
    """Factory for a paged KV layout: scattered pages of `page_size` slots, page 0 left as padding.

    Returns (req_to_token [R, max_len] int32, req_pool_indices [B] int64, num_slots); request b holds
    seq_lens[b] slots in req_to_token row req_pool_indices[b] (rows are shuffled, row 0 unused).
    """

    def build(seq_lens: list[int], page_size: int, generator: torch.Generator, max_len: int | None = None):
        pages_per_req = [-(-n // page_size) for n in seq_lens]
        num_pages = sum(pages_per_req) + 3
        pages = torch.randperm(num_pages - 1, generator=generator) + 1
        max_len = max_len or max(max(seq_lens, default=1), 1)
        num_rows = len(seq_lens) + 2
        req_to_token = torch.zeros(num_rows, max_len, dtype=torch.int32)
        req_pool_indices = torch.randperm(num_rows - 1, generator=generator)[: len(seq_lens)] + 1
        used = 0
        for row, n, num in zip(req_pool_indices.tolist(), seq_lens, pages_per_req, strict=True):
            mine = pages[used : used + num]
            used += num
            slots = (mine[:, None] * page_size + torch.arange(page_size)).flatten()[:n]
            req_to_token[row, :n] = slots.to(torch.int32)
        return req_to_token, req_pool_indices, num_pages * page_size

    return build


def _reference_paged_attention(
    q,
    k_cache,
    v_cache,
    req_to_token,
    req_pool_indices,
    seq_lens,
    prefix_lens,
    extend_lens,
    start_loc,
    *,
    scaling,
    causal,
    logit_cap,
    sliding_window,
    kv_start=None,
):
    """float64 attention, one request and one query row at a time; rows without keys stay zero."""
    num_q_heads, num_kv_heads = q.shape[1], k_cache.shape[1]
    group = num_q_heads // num_kv_heads
    out = torch.zeros(q.shape[0], num_q_heads, v_cache.shape[-1], dtype=torch.float64)
    for b in range(len(seq_lens)):
        length, first_col = int(seq_lens[b]), 0 if kv_start is None else int(kv_start[b])
        slots = req_to_token[int(req_pool_indices[b]), first_col : first_col + length].long().cpu()
        keys = k_cache.cpu().double()[slots].repeat_interleave(group, dim=1)  # [L, Hq, D]
        values = v_cache.cpu().double()[slots].repeat_interleave(group, dim=1)
        key_pos = torch.arange(length)
        for i in range(int(extend_lens[b])):
            row, pos = int(start_loc[b]) + i, int(prefix_lens[b]) + i
            allowed = torch.ones(length, dtype=torch.bool)
            if causal:
                allowed &= key_pos <= pos
            if sliding_window > 0:
                allowed &= pos - key_pos < sliding_window
            if not allowed.any():
                continue
            scores = torch.einsum("hd,nhd->hn", q[row].cpu().double(), keys[allowed]) * scaling
            if logit_cap > 0:
                scores = logit_cap * torch.tanh(scores / logit_cap)
            out[row] = torch.einsum("hn,nhd->hd", scores.softmax(-1), values[allowed])
    return out


@pytest.fixture
def reference_paged_attention():
    """float64 reference of paged attention with radixc.ops.native.attention.paged_attention's signature."""
    return _reference_paged_attention


def _reference_delta_rule(q, k, v, g, beta, state, scale, use_qk_l2norm):
    """float64 gated delta rule, token by token. q, k [L, Hk, Dk], v [L, Hv, Dv], g, beta [L, Hv],
    state [Hv, Dk, Dv] -> (o [L, Hv, Dv], final state)."""
    q, k, v, g, beta, state = (t.cpu().double() for t in (q, k, v, g, beta, state))
    if use_qk_l2norm:
        q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    group = v.shape[1] // q.shape[1]
    q, k = q.repeat_interleave(group, 1) * scale, k.repeat_interleave(group, 1)
    out = torch.zeros(v.shape, dtype=torch.float64)
    for t in range(v.shape[0]):
        state = state * torch.exp(g[t])[:, None, None]
        error = v[t] - torch.einsum("hkv,hk->hv", state, k[t])
        state = state + k[t][:, :, None] * (beta[t][:, None] * error)[:, None, :]
        out[t] = torch.einsum("hkv,hk->hv", state, q[t])
    return out, state


@pytest.fixture
def reference_delta_rule():
    """float64 token-by-token gated delta rule for one request."""
    return _reference_delta_rule
