"""Triton recurrent gated delta rule (GDN decode step) against a float64 reference and its native twin."""

from __future__ import annotations

import pytest
import torch

from radixc.ops.native import gdn
from radixc.ops.triton import gated_recurrent_step, recurrent_gated_delta_rule

ATOL = RTOL = 2e-5


def _step_case(batch, num_k_heads, num_v_heads, k_dim, v_dim, seed):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, num_k_heads, k_dim, generator=gen)
    k = torch.randn(batch, num_k_heads, k_dim, generator=gen)
    v = torch.randn(batch, num_v_heads, v_dim, generator=gen)
    g = -torch.rand(batch, num_v_heads, generator=gen) * 2
    beta = torch.rand(batch, num_v_heads, generator=gen)
    ssm_state = torch.randn(batch + 3, num_v_heads, k_dim, v_dim, generator=gen)
    gdn_slots = torch.randperm(batch + 2, generator=gen)[:batch] + 1
    return q, k, v, g, beta, ssm_state, gdn_slots


@pytest.mark.parametrize(
    "num_k_heads, num_v_heads, k_dim, v_dim",
    [(2, 2, 16, 16), (1, 2, 32, 32), (2, 4, 24, 16), (1, 1, 16, 40)],
    ids=["hv1x-d16", "hv2x-d32", "hv2x-dk24", "dv40"],
)
@pytest.mark.parametrize("use_qk_l2norm", [True, False])
def test_recurrent_step_matches_reference(
    reference_delta_rule, device, num_k_heads, num_v_heads, k_dim, v_dim, use_qk_l2norm
):
    q, k, v, g, beta, ssm_state, idx = _step_case(3, num_k_heads, num_v_heads, k_dim, v_dim, 0)
    if not use_qk_l2norm:  # keep the unnormalised recurrence bounded
        q, k = q / k_dim, k / k_dim**0.5
    scale = k_dim**-0.5
    expected_state = ssm_state.double().clone()
    expected = torch.zeros(v.shape, dtype=torch.float64)
    for b, slot in enumerate(idx.tolist()):
        rows = slice(b, b + 1)
        o, expected_state[slot] = reference_delta_rule(
            q[rows], k[rows], v[rows], g[rows], beta[rows], expected_state[slot], scale, use_qk_l2norm
        )
        expected[b] = o[0]

    state = ssm_state.to(device)
    out = recurrent_gated_delta_rule(
        *(t.to(device) for t in (q, k, v, g, beta)),
        state,
        idx.to(device),
        scale=scale,
        use_qk_l2norm=use_qk_l2norm,
    )
    torch.testing.assert_close(out.cpu().double(), expected, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(state.cpu().double(), expected_state, atol=ATOL, rtol=RTOL)


# no tl.dot here, so the interpreter handles bfloat16 too
@pytest.mark.parametrize("half_dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_recurrent_step_on_strided_half_inputs_matches_native_twin(device, half_dtype):
    q, k, v, g, beta, ssm_state, idx = _step_case(4, 2, 4, 32, 32, 1)
    # q, k, v as column slices of one packed activation, as the GDN layer splits them
    packed = torch.cat([q.flatten(1), k.flatten(1), v.flatten(1)], dim=1).to(half_dtype)
    q, k, v = (t.unflatten(1, (-1, 32)) for t in packed.split([64, 64, 128], dim=1))
    native_state, state = ssm_state.clone(), ssm_state.to(device)
    out = recurrent_gated_delta_rule(
        *(t.to(device) for t in (q, k, v, g, beta)), state, idx.to(device), scale=32**-0.5
    )
    expected = gdn.recurrent_gated_delta_rule(q, k, v, g, beta, native_state, idx, scale=32**-0.5)
    assert out.dtype == half_dtype
    torch.testing.assert_close(out.cpu(), expected, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(state.cpu(), native_state, atol=1e-4, rtol=1e-4)


def test_gates_computed_in_the_kernel_match_the_float64_gating(reference_delta_rule, device):
    """gated_recurrent_step takes the projections a, b (strided, as the layer slices them) with A_log and
    dt_bias; softplus is exercised past torch's threshold of 20 and far below zero."""
    q, k, v, _, _, ssm_state, idx = _step_case(3, 2, 4, 16, 16, 2)
    gen = torch.Generator().manual_seed(3)
    ba = torch.randn(3, 8, generator=gen) * 4
    ba[0, 4] = 30.0  # a + dt_bias above the threshold: softplus(x) = x
    ba[1, 5] = -40.0
    b, a = ba.chunk(2, dim=-1)
    A_log, dt_bias = torch.randn(4, generator=gen), torch.randn(4, generator=gen)
    x = a.double() + dt_bias.double()
    g = -A_log.double().exp() * torch.where(x > 20, x, torch.log1p(x.exp()))
    beta = torch.sigmoid(b.double())
    expected_state = ssm_state.double().clone()
    expected = torch.zeros(v.shape, dtype=torch.float64)
    for row, slot in enumerate(idx.tolist()):
        rows = slice(row, row + 1)
        o, expected_state[slot] = reference_delta_rule(
            q[rows], k[rows], v[rows], g[rows], beta[rows], expected_state[slot], 0.25, True
        )
        expected[row] = o[0]
    state = ssm_state.to(device)
    out = gated_recurrent_step(
        *(t.to(device) for t in (q, k, v, a, b, A_log, dt_bias)), state, idx.to(device), scale=0.25
    )
    torch.testing.assert_close(out.cpu().double(), expected, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(state.cpu().double(), expected_state, atol=ATOL, rtol=RTOL)


def test_gate_parameters_of_the_wrong_size_are_named(device):
    q, k, v, g, beta, ssm_state, idx = (t.to(device) for t in _step_case(2, 2, 4, 16, 16, 4))
    with pytest.raises(ValueError, match=r"gated_recurrent_step: expected A_log \[4\], got \[2\]"):
        gated_recurrent_step(q, k, v, g, beta, g[0, :2], g[0], ssm_state, idx, scale=0.25)
