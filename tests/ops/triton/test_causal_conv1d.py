"""Triton causal conv1d (prefill and decode) against a float64 loop reference and the native twins."""

from __future__ import annotations

import pytest
import torch

from radixc.ops.native import gdn
from radixc.ops.triton import causal_conv1d_decode, causal_conv1d_extend

ATOL = RTOL = 1e-5


def _reference_conv(x, weight, state, activation):
    """Causal depthwise conv, one token at a time. x [L, C], weight [C, K], state [C, K-1] -> (y, new state)."""
    window = [state[:, j] for j in range(state.shape[1])]
    ys = []
    for x_t in x:
        window.append(x_t)
        y = sum(weight[:, j] * w for j, w in enumerate(window[-weight.shape[1] :]))
        ys.append(y * torch.sigmoid(y) if activation == "silu" else y)
    out = torch.stack(ys) if ys else x.new_zeros(0, x.shape[1])
    return out, torch.stack(window[-state.shape[1] :], dim=1)


def _extend_case(lengths, channels, kernel_size, seed):
    gen = torch.Generator().manual_seed(seed)
    lens = torch.tensor(lengths)
    x = torch.randn(int(lens.sum()), channels, generator=gen)
    weight = torch.randn(channels, 1, kernel_size, generator=gen)
    conv_state = torch.randn(len(lengths) + 3, channels, kernel_size - 1, generator=gen)
    gdn_slots = torch.randperm(len(lengths) + 2, generator=gen)[: len(lengths)] + 1
    has_initial_state = torch.arange(len(lengths)) % 2 == 0
    return x, weight, conv_state, gdn_slots, torch.cumsum(lens, 0) - lens, lens, has_initial_state


@pytest.mark.parametrize("kernel_size", [2, 4])
@pytest.mark.parametrize("activation", ["silu", None])
@pytest.mark.parametrize("channels", [20, 72], ids=["c20", "c72-two-channel-blocks"])
def test_extend_conv_matches_reference_and_carries_state(device, kernel_size, activation, channels):
    # 40 tokens span two 32-row blocks; 1 token is shorter than the state, 0 tokens only resets or keeps it
    x, weight, conv_state, idx, start, lens, has_init = _extend_case(
        [5, 40, 1, 0, 3], channels, kernel_size, 0
    )
    expected_state = conv_state.double().clone()
    expected = torch.zeros(x.shape, dtype=torch.float64)
    for b, slot in enumerate(idx.tolist()):
        rows = slice(int(start[b]), int(start[b] + lens[b]))
        state0 = expected_state[slot] if has_init[b] else torch.zeros_like(expected_state[slot])
        expected[rows], expected_state[slot] = _reference_conv(
            x[rows].double(), weight.double()[:, 0], state0, activation
        )

    state = conv_state.to(device)
    out = causal_conv1d_extend(
        x.to(device),
        weight.to(device),
        state,
        idx.to(device),
        start.to(device),
        lens.to(device),
        has_init.to(device),
        activation=activation,
    )
    torch.testing.assert_close(out.cpu().double(), expected, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(state.cpu().double(), expected_state, atol=ATOL, rtol=RTOL)


def test_extend_conv_matches_native_twin_with_2d_weight_and_strided_input(device):
    x, weight, conv_state, idx, start, lens, has_init = _extend_case([7, 33, 2], 24, 4, 1)
    wide = torch.randn(x.shape[0], 40)
    wide[:, 8:32] = x  # x as a column slice of a wider activation, as when it is split off mixed_qkv
    weight = weight[:, 0]
    native_state, state = conv_state.clone(), conv_state.to(device)
    out = causal_conv1d_extend(
        wide[:, 8:32].to(device),
        weight.to(device),
        state,
        idx.to(device),
        start.to(device),
        lens.to(device),
        has_init.to(device),
    )
    expected = gdn.causal_conv1d_extend(x, weight, native_state, idx, start, lens, has_init)
    torch.testing.assert_close(out.cpu(), expected, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(state.cpu(), native_state, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("kernel_size", [2, 4])
@pytest.mark.parametrize("activation", ["silu", None])
def test_decode_conv_matches_reference_and_shifts_state(device, kernel_size, activation):
    gen = torch.Generator().manual_seed(2)
    batch, channels = 3, 150  # two 128-channel blocks
    x = torch.randn(batch, channels, generator=gen)
    weight = torch.randn(channels, kernel_size, generator=gen)
    conv_state = torch.randn(5, channels, kernel_size - 1, generator=gen)
    idx = torch.tensor([4, 1, 2])
    expected_state = conv_state.double().clone()
    expected = torch.zeros(batch, channels, dtype=torch.float64)
    for b, slot in enumerate(idx.tolist()):
        y, expected_state[slot] = _reference_conv(
            x[b : b + 1].double(), weight.double(), expected_state[slot], activation
        )
        expected[b] = y[0]

    state = conv_state.to(device)
    out = causal_conv1d_decode(x.to(device), weight.to(device), state, idx.to(device), activation=activation)
    torch.testing.assert_close(out.cpu().double(), expected, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(state.cpu().double(), expected_state, atol=ATOL, rtol=RTOL)


# no tl.dot here, so the interpreter handles bfloat16 too (rounding to it may differ by one ulp)
@pytest.mark.parametrize("half_dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_decode_conv_with_half_precision_state_matches_native_twin(device, half_dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(4, 40, generator=gen).to(half_dtype)
    weight = torch.randn(40, 1, 4, generator=gen).to(half_dtype)
    conv_state = torch.randn(6, 40, 3, generator=gen).to(half_dtype)
    idx = torch.tensor([5, 0, 3, 2])
    native_state, state = conv_state.clone(), conv_state.to(device)
    out = causal_conv1d_decode(x.to(device), weight.to(device), state, idx.to(device))
    expected = gdn.causal_conv1d_decode(x, weight, native_state, idx)
    torch.testing.assert_close(out.cpu(), expected, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(state.cpu(), native_state, atol=0, rtol=0)


def test_conv_rejects_unknown_activation(device):
    x, weight, conv_state, idx, *_ = _extend_case([2], 8, 4, 4)
    with pytest.raises(ValueError, match="activation"):
        causal_conv1d_decode(
            x[:1].to(device), weight.to(device), conv_state.to(device), idx.to(device), activation="gelu"
        )
