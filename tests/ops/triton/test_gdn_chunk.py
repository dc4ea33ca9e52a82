"""Triton chunked gated delta rule (GDN prefill) against a float64 token-by-token reference and its twin."""

from __future__ import annotations

import pytest
import torch

from radixc.ops.native import gdn
from radixc.ops.triton import chunk_gated_delta_rule, recurrent_gated_delta_rule

ATOL = RTOL = 5e-5


def _chunk_case(lengths, num_k_heads, num_v_heads, k_dim, v_dim, seed, decay_scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lengths)
    total = int(lens.sum())
    q = torch.randn(total, num_k_heads, k_dim, generator=gen)
    k = torch.randn(total, num_k_heads, k_dim, generator=gen)
    v = torch.randn(total, num_v_heads, v_dim, generator=gen)
    g = -torch.rand(total, num_v_heads, generator=gen) * decay_scale
    beta = torch.rand(total, num_v_heads, generator=gen)
    ssm_state = torch.randn(len(lengths) + 3, num_v_heads, k_dim, v_dim, generator=gen)
    gdn_slots = torch.randperm(len(lengths) + 2, generator=gen)[: len(lengths)] + 1
    has_initial_state = torch.arange(len(lengths)) % 2 == 1
    return q, k, v, g, beta, ssm_state, gdn_slots, torch.cumsum(lens, 0) - lens, lens, has_initial_state


def _expected(reference_delta_rule, case, scale, use_qk_l2norm):
    q, k, v, g, beta, ssm_state, idx, start, lens, has_init = case
    states = ssm_state.double().clone()
    out = torch.zeros(v.shape, dtype=torch.float64)
    for b, slot in enumerate(idx.tolist()):
        rows = slice(int(start[b]), int(start[b] + lens[b]))
        state0 = states[slot] if has_init[b] else torch.zeros_like(states[slot])
        out[rows], states[slot] = reference_delta_rule(
            q[rows], k[rows], v[rows], g[rows], beta[rows], state0, scale, use_qk_l2norm
        )
    return out, states


def _run(case, device, **kwargs):
    """The kernel on a copy of the case's state; returns (out, final states) on the CPU."""
    q, k, v, g, beta, ssm_state, *rest = (t.to(device, copy=True) for t in case)
    out = chunk_gated_delta_rule(q, k, v, g, beta, ssm_state, *rest, **kwargs)
    return out.cpu(), ssm_state.cpu()


@pytest.mark.parametrize(
    "num_k_heads, num_v_heads, k_dim, v_dim",
    [(2, 2, 16, 16), (1, 2, 32, 32), (1, 2, 24, 16), (2, 4, 16, 40)],
    ids=["hv1x-d16", "hv2x-d32", "hv2x-dk24", "hv2x-dv40"],
)
@pytest.mark.parametrize("chunk_size", [16, 64])
def test_chunked_rule_matches_token_by_token_reference(
    reference_delta_rule, device, num_k_heads, num_v_heads, k_dim, v_dim, chunk_size
):
    # ragged requests: partial chunks, several whole chunks, a single token; half start from a state
    case = _chunk_case([5, 37, 1, 16], num_k_heads, num_v_heads, k_dim, v_dim, 0)
    out, state = _run(case, device, scale=k_dim**-0.5, chunk_size=chunk_size)
    expected, expected_state = _expected(reference_delta_rule, case, k_dim**-0.5, True)
    torch.testing.assert_close(out.double(), expected, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(state.double(), expected_state, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("chunk_size", [32, 64])
def test_varlen_requests_spanning_several_chunks_match_the_reference(
    reference_delta_rule, device, chunk_size
):
    """Lengths around the chunk size (one short, exact, one over, two and a bit) in one packed batch: every
    sub-block of the split solve, partial last chunks and each request's chunk offsets are exercised."""
    case = _chunk_case([63, 1, 64, 65, 130], 1, 2, 16, 16, 6)
    out, state = _run(case, device, scale=0.25, chunk_size=chunk_size)
    expected, expected_state = _expected(reference_delta_rule, case, 0.25, True)
    torch.testing.assert_close(out.double(), expected, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(state.double(), expected_state, atol=ATOL, rtol=RTOL)


@pytest.mark.gpu
def test_every_request_count_shares_one_compile(reference_delta_rule):
    """The request count is a run-time argument: prefills of 1, 16 and 5 requests (Triton's three integer
    classes) run the kernels compiled for the first (the prepare kernel takes 5 s to compile for sm90 on a 2-core host)."""
    from radixc.ops.triton import gdn_chunk

    kernels = (gdn_chunk._chunk_prepare_kernel, gdn_chunk._chunk_state_kernel, gdn_chunk._chunk_output_kernel)
    device = torch.cuda.current_device()

    def compiled() -> int:
        return sum(len(kernel.device_caches[device][0]) for kernel in kernels)

    before = None
    for seed, lengths in enumerate(([70], [9] * 16, [3, 64, 1, 20, 65])):
        case = _chunk_case(lengths, 1, 2, 16, 16, 20 + seed)
        out, state = _run(case, "cuda", scale=0.25)
        expected, expected_state = _expected(reference_delta_rule, case, 0.25, True)
        torch.testing.assert_close(out.double(), expected, atol=ATOL, rtol=RTOL)
        torch.testing.assert_close(state.double(), expected_state, atol=ATOL, rtol=RTOL)
        before = compiled() if before is None else before
    assert compiled() == before


def test_chunked_rule_without_l2norm_and_with_strong_decay(reference_delta_rule, device):
    """Decays of up to e^-8 a token underflow exp(G) within a chunk; masking keeps the upper triangle finite."""
    case = list(_chunk_case([20, 9], 1, 1, 16, 16, 1, decay_scale=8.0))
    case[0], case[1] = case[0] / 16, torch.nn.functional.normalize(case[1], dim=-1)
    out, state = _run(case, device, scale=0.25, use_qk_l2norm=False, chunk_size=64)
    expected, expected_state = _expected(reference_delta_rule, case, 0.25, False)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), expected, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(state.double(), expected_state, atol=ATOL, rtol=RTOL)


def test_request_without_new_tokens_keeps_or_resets_its_state(reference_delta_rule, device):
    case = _chunk_case([6, 0, 0, 3], 1, 1, 16, 16, 2)  # request 1 starts from its state, request 2 from zeros
    out, state = _run(case, device, scale=0.25, chunk_size=16)
    expected, expected_state = _expected(reference_delta_rule, case, 0.25, True)
    torch.testing.assert_close(state.double(), expected_state, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(out.double(), expected, atol=ATOL, rtol=RTOL)


def test_chunked_rule_matches_native_twin_in_half_precision(device, half_dtype):
    case = list(_chunk_case([19, 4], 1, 2, 32, 32, 3))
    case[:3] = [t.to(half_dtype) for t in case[:3]]
    native_state = case[5].clone()
    out, state = _run(case, device, scale=32**-0.5)
    expected = gdn.chunk_gated_delta_rule(*case[:5], native_state, *case[6:], scale=32**-0.5)
    assert out.dtype == half_dtype
    torch.testing.assert_close(out, expected, atol=1e-2, rtol=1e-2)
    # the kernel keeps each chunk's start state in the inputs' half precision (2^-11 relative for fp16)
    torch.testing.assert_close(state, native_state, atol=4e-3, rtol=4e-3)


def test_prefill_then_decode_continues_the_same_recurrence(reference_delta_rule, device):
    """A chunked prefill followed by a recurrent decode step equals running the reference over all tokens."""
    q, k, v, g, beta, ssm_state, idx, start, lens, _ = _chunk_case([21], 2, 2, 16, 24, 4)
    prefill, last = slice(0, 20), slice(20, 21)
    no_state = torch.tensor([False])
    state = ssm_state.to(device)
    tensors = [t.to(device) for t in (q, k, v, g, beta)]
    chunk_gated_delta_rule(
        *(t[prefill] for t in tensors),
        state,
        idx.to(device),
        start.to(device),
        torch.tensor([20]).to(device),
        no_state.to(device),
        scale=0.25,
        chunk_size=16,
    )
    out = recurrent_gated_delta_rule(*(t[last] for t in tensors), state, idx.to(device), scale=0.25)
    expected, expected_state = reference_delta_rule(
        q, k, v, g, beta, torch.zeros_like(ssm_state[0]), 0.25, True
    )
    torch.testing.assert_close(out.cpu().double(), expected[last], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(state[int(idx[0])].cpu().double(), expected_state, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("chunk_size", [48, 128])
def test_chunked_rule_rejects_unsupported_chunk_sizes(device, chunk_size):
    case = _chunk_case([4], 1, 1, 16, 16, 5)
    with pytest.raises(ValueError, match="chunk_size"):
        _run(case, device, scale=0.25, chunk_size=chunk_size)
