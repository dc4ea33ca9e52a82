"""Torch-native Gated DeltaNet kernels against float64 per-token loop references."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from radixc.engine.backends import NativeBackend
from radixc.ops.kernel_ops import gdn_forward
from radixc.ops.native import gdn

NATIVE_GDN = NativeBackend.kernels.gdn

ATOL = RTOL = 2e-4


# ---------------------------------------------------------------- float64 references (independent loops)


def ref_conv(x, weight, state, activation):
    """Direct causal conv loop. x [L, C], weight [C, K], state [C, K-1] -> (y [L, C], new state [C, K-1])."""
    K = weight.shape[1]
    history = [state[:, j] for j in range(K - 1)]
    ys = []
    for x_t in x:
        history.append(x_t)
        y = sum(weight[:, j] * history[len(history) - K + j] for j in range(K))
        ys.append(y * torch.sigmoid(y) if activation == "silu" else y)
    return torch.stack(ys) if ys else x.new_zeros(0, x.shape[1]), torch.stack(history[-(K - 1) :], dim=1)


def ref_delta_rule(q, k, v, g, beta, state, scale, l2norm=True):
    """Per-token gated delta rule. q, k [L, Hk, Dk], v [L, Hv, Dv], g, beta [L, Hv], state [Hv, Dk, Dv]."""
    Hk, Hv = q.shape[1], v.shape[1]
    if l2norm:
        q = q / torch.sqrt((q * q).sum(-1, keepdim=True) + 1e-6)
        k = k / torch.sqrt((k * k).sum(-1, keepdim=True) + 1e-6)
    head_of = [h // (Hv // Hk) for h in range(Hv)]
    state = state.clone()
    out = []
    for t in range(v.shape[0]):
        q_t, k_t = q[t, head_of] * scale, k[t, head_of]  # [Hv, Dk]
        state = state * torch.exp(g[t])[:, None, None]
        error = v[t] - torch.einsum("hkv,hk->hv", state, k_t)
        state = state + k_t[:, :, None] * (beta[t][:, None] * error)[:, None, :]
        out.append(torch.einsum("hkv,hk->hv", state, q_t))
    return torch.stack(out) if out else v.new_zeros(0, *v.shape[1:]), state


def ref_gdn_forward(inputs, starts, lengths, has_prefix, dims):
    """Loop reference of the whole GDN core; returns (out [T, Hv*Dv], conv_state, ssm_state) in float64."""
    Hk, Hv, Dk, Dv = dims
    mixed, a, b = inputs["mixed_qkv"].double(), inputs["a"].double(), inputs["b"].double()
    weight = inputs["conv_weight"].double().reshape(mixed.shape[1], -1)
    conv_state, ssm_state = inputs["conv_state"].double(), inputs["ssm_state"].double()
    out = torch.zeros(mixed.shape[0], Hv * Dv, dtype=torch.float64)
    for slot, start, length, prefix in zip(
        inputs["gdn_slots"].tolist(), starts, lengths, has_prefix, strict=True
    ):
        rows = slice(start, start + length)
        conv0 = conv_state[slot] if prefix else torch.zeros_like(conv_state[slot])
        ssm0 = ssm_state[slot] if prefix else torch.zeros_like(ssm_state[slot])
        x, conv_state[slot] = ref_conv(mixed[rows], weight, conv0, "silu")
        q = x[:, : Hk * Dk].reshape(length, Hk, Dk)
        k = x[:, Hk * Dk : 2 * Hk * Dk].reshape(length, Hk, Dk)
        v = x[:, 2 * Hk * Dk :].reshape(length, Hv, Dv)
        dt = a[rows] + inputs["dt_bias"].double()
        g = -torch.exp(inputs["A_log"].double()) * torch.log1p(torch.exp(dt))
        o, ssm_state[slot] = ref_delta_rule(q, k, v, g, torch.sigmoid(b[rows]), ssm0, Dk**-0.5)
        out[rows] = o.reshape(length, Hv * Dv)
    return out, conv_state, ssm_state


# ---------------------------------------------------------------- input builders


def ragged(lengths):
    lens = torch.tensor(lengths, dtype=torch.int64)
    return torch.cumsum(lens, 0) - lens, lens


def pool_slots(batch, num_slots):
    """Distinct, shuffled non-zero slots so a mix-up of requests and slots shows."""
    return (torch.randperm(num_slots - 1)[:batch] + 1).to(torch.int64)


def rule_inputs(num_tokens, Hk, Hv, Dk=8, Dv=6, num_slots=8):
    return dict(
        q=torch.randn(num_tokens, Hk, Dk),
        k=torch.randn(num_tokens, Hk, Dk),
        v=torch.randn(num_tokens, Hv, Dv),
        g=-torch.rand(num_tokens, Hv) * 1.5,
        beta=torch.rand(num_tokens, Hv),
        ssm_state=torch.randn(num_slots, Hv, Dk, Dv),
    )


def gdn_inputs(num_tokens, Hk, Hv, Dk, Dv, K=4, num_slots=8, batch=1, dtype=torch.float32):
    conv_dim = 2 * Hk * Dk + Hv * Dv
    return dict(
        mixed_qkv=torch.randn(num_tokens, conv_dim).to(dtype),
        a=torch.randn(num_tokens, Hv).to(dtype),
        b=torch.randn(num_tokens, Hv).to(dtype),
        conv_weight=(torch.randn(conv_dim, 1, K) * 0.5).to(dtype),
        A_log=torch.randn(Hv) * 0.5,
        dt_bias=torch.randn(Hv) * 0.5,
        conv_state=torch.randn(num_slots, conv_dim, K - 1).to(dtype),
        ssm_state=torch.randn(num_slots, Hv, Dk, Dv),
        gdn_slots=pool_slots(batch, num_slots),
    )


def run_gdn_forward(inputs, starts, lengths, prefix_lens, dims, decode):
    Hk, Hv, Dk, Dv = dims
    return gdn_forward(
        NATIVE_GDN,
        **inputs,
        extend_start_loc=starts,
        extend_seq_lens=lengths,
        extend_prefix_lens=prefix_lens,
        num_k_heads=Hk,
        num_v_heads=Hv,
        head_k_dim=Dk,
        head_v_dim=Dv,
        decode=decode,
    )


def assert_close(actual, expected, atol=ATOL, rtol=RTOL):
    torch.testing.assert_close(actual.double(), expected.double(), atol=atol, rtol=rtol)


# ---------------------------------------------------------------- causal conv1d


@pytest.mark.parametrize("K", [2, 4])
@pytest.mark.parametrize("activation", [None, "silu"])
@pytest.mark.parametrize("conv1d_weight_layout", [False, True])
def test_causal_conv1d_extend_matches_direct_loop_and_keeps_last_inputs(K, activation, conv1d_weight_layout):
    torch.manual_seed(K)
    lengths, has_initial = [1, 7, 2, 5], [True, False, True, True]
    C, num_slots = 6, 7
    starts, lens = ragged(lengths)
    x = torch.randn(sum(lengths), C)
    weight = torch.randn(C, 1, K) if conv1d_weight_layout else torch.randn(C, K)
    conv_state = torch.randn(num_slots, C, K - 1)
    before = conv_state.clone()
    slots = pool_slots(len(lengths), num_slots)

    y = gdn.causal_conv1d_extend(
        x, weight, conv_state, slots, starts, lens, torch.tensor(has_initial), activation=activation
    )

    w = weight.double().reshape(C, K)
    for slot, start, length, init in zip(slots.tolist(), starts.tolist(), lengths, has_initial, strict=True):
        state0 = before[slot].double() if init else torch.zeros(C, K - 1, dtype=torch.float64)
        y_ref, state_ref = ref_conv(x[start : start + length].double(), w, state0, activation)
        assert_close(y[start : start + length], y_ref)
        assert_close(conv_state[slot], state_ref)
    untouched = [s for s in range(num_slots) if s not in slots.tolist()]
    assert torch.equal(conv_state[untouched], before[untouched])


def test_causal_conv1d_decode_steps_continue_extend_state():
    torch.manual_seed(0)
    prompt, steps, C, K, num_slots = [3, 1, 6], 4, 5, 4, 6
    B = len(prompt)
    totals = [p + steps for p in prompt]
    x_full = torch.randn(sum(totals), C)
    weight = torch.randn(C, K)
    slots = pool_slots(B, num_slots)
    no_init = torch.zeros(B, dtype=torch.bool)

    state_full = torch.randn(num_slots, C, K - 1)
    state_split = state_full.clone()
    starts, lens = ragged(totals)
    y_full = gdn.causal_conv1d_extend(x_full, weight, state_full, slots, starts, lens, no_init)

    prompt_rows = torch.cat([torch.arange(s, s + p) for s, p in zip(starts.tolist(), prompt, strict=True)])
    y_prompt = gdn.causal_conv1d_extend(
        x_full[prompt_rows], weight, state_split, slots, *ragged(prompt), no_init
    )
    assert_close(y_prompt, y_full[prompt_rows], atol=1e-6, rtol=1e-6)
    for i in range(steps):
        rows = starts + torch.tensor(prompt) + i
        y_step = gdn.causal_conv1d_decode(x_full[rows], weight, state_split, slots)
        assert_close(y_step, y_full[rows], atol=1e-6, rtol=1e-6)
    assert_close(state_split, state_full, atol=0, rtol=0)


# ---------------------------------------------------------------- gating


def test_gdn_gating_is_negative_exp_A_times_softplus_in_float32():
    torch.manual_seed(0)
    A_log, a, dt_bias = torch.randn(4), torch.randn(9, 4).bfloat16(), torch.randn(4)
    g = gdn.gdn_gating(A_log, a, dt_bias)
    expected = -torch.exp(A_log.double()) * torch.log1p(torch.exp(a.double() + dt_bias.double()))
    assert g.dtype == torch.float32
    assert_close(g, expected, atol=1e-6, rtol=1e-6)


# ---------------------------------------------------------------- delta rule


def check_chunked_against_loop(lengths, has_initial, Hk, Hv, chunk_size):
    starts, lens = ragged(lengths)
    inputs = rule_inputs(sum(lengths), Hk, Hv)
    before = inputs["ssm_state"].clone()
    slots = pool_slots(len(lengths), before.shape[0])
    scale = 8**-0.5

    o = gdn.chunk_gated_delta_rule(
        **inputs,
        gdn_slots=slots,
        extend_start_loc=starts,
        extend_seq_lens=lens,
        has_initial_state=torch.tensor(has_initial),
        scale=scale,
        chunk_size=chunk_size,
    )

    d = {name: t.double() for name, t in inputs.items()}
    for slot, start, length, init in zip(slots.tolist(), starts.tolist(), lengths, has_initial, strict=True):
        rows = slice(start, start + length)
        state0 = before[slot].double() if init else torch.zeros_like(before[slot], dtype=torch.float64)
        o_ref, state_ref = ref_delta_rule(
            d["q"][rows], d["k"][rows], d["v"][rows], d["g"][rows], d["beta"][rows], state0, scale
        )
        assert_close(o[rows], o_ref)
        assert_close(inputs["ssm_state"][slot], state_ref)


@pytest.mark.parametrize("chunk_size", [1, 4, 16, 64])
@pytest.mark.parametrize(("Hk", "Hv"), [(2, 2), (2, 4)])
def test_chunk_gated_delta_rule_matches_token_loop(chunk_size, Hk, Hv):
    torch.manual_seed(chunk_size + Hv)
    check_chunked_against_loop([5, 16, 1, 37], [True, False, True, False], Hk, Hv, chunk_size)


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 40), min_size=1, max_size=4),
    initial=st.lists(st.booleans(), min_size=4, max_size=4),
    heads=st.sampled_from([(1, 1), (2, 2), (1, 2), (2, 4)]),
    chunk_size=st.sampled_from([1, 3, 8, 16, 64]),
    seed=st.integers(0, 2**16),
)
def test_chunk_gated_delta_rule_matches_token_loop_on_ragged_batches(
    lengths, initial, heads, chunk_size, seed
):
    torch.manual_seed(seed)
    check_chunked_against_loop(lengths, initial[: len(lengths)], *heads, chunk_size)


@pytest.mark.parametrize(("Hk", "Hv"), [(2, 2), (1, 2)])
def test_recurrent_gated_delta_rule_step_matches_token_loop(Hk, Hv):
    torch.manual_seed(Hk)
    inputs = rule_inputs(3, Hk, Hv)
    before = inputs["ssm_state"].clone()
    slots = pool_slots(3, before.shape[0])
    o = gdn.recurrent_gated_delta_rule(**inputs, gdn_slots=slots, scale=0.3)
    d = {name: t.double() for name, t in inputs.items()}
    for i, slot in enumerate(slots.tolist()):
        rows = slice(i, i + 1)
        o_ref, state_ref = ref_delta_rule(
            d["q"][rows],
            d["k"][rows],
            d["v"][rows],
            d["g"][rows],
            d["beta"][rows],
            before[slot].double(),
            0.3,
        )
        assert_close(o[i], o_ref[0])
        assert_close(inputs["ssm_state"][slot], state_ref)
    untouched = [s for s in range(before.shape[0]) if s not in slots.tolist()]
    assert torch.equal(inputs["ssm_state"][untouched], before[untouched])


def test_recurrent_steps_reproduce_chunked_extend():
    torch.manual_seed(1)
    B, L, Hk, Hv = 3, 11, 1, 2
    inputs = rule_inputs(B * L, Hk, Hv)
    slots = pool_slots(B, inputs["ssm_state"].shape[0])
    starts, lens = ragged([L] * B)
    state_recurrent = inputs["ssm_state"].clone()
    o_chunked = gdn.chunk_gated_delta_rule(
        **inputs,
        gdn_slots=slots,
        extend_start_loc=starts,
        extend_seq_lens=lens,
        has_initial_state=torch.ones(B, dtype=torch.bool),
        scale=0.4,
        chunk_size=4,
    )
    step_inputs = {name: t for name, t in inputs.items() if name != "ssm_state"}
    for i in range(L):
        rows = starts + i
        o_step = gdn.recurrent_gated_delta_rule(
            **{name: t[rows] for name, t in step_inputs.items()},
            ssm_state=state_recurrent,
            gdn_slots=slots,
            scale=0.4,
        )
        assert_close(o_step, o_chunked[rows])
    assert_close(state_recurrent, inputs["ssm_state"])


def test_use_qk_l2norm_false_takes_q_and_k_as_given():
    torch.manual_seed(2)
    inputs = rule_inputs(9, 2, 2)
    normalised = dict(inputs, q=torch.nn.functional.normalize(inputs["q"], dim=-1))
    normalised["k"] = torch.nn.functional.normalize(inputs["k"], dim=-1)
    normalised["ssm_state"] = inputs["ssm_state"].clone()
    batch = dict(
        gdn_slots=torch.tensor([3]),
        extend_start_loc=torch.tensor([0]),
        extend_seq_lens=torch.tensor([9]),
        has_initial_state=torch.tensor([True]),
        scale=0.5,
        chunk_size=4,
    )
    o_auto = gdn.chunk_gated_delta_rule(**inputs, **batch)
    o_given = gdn.chunk_gated_delta_rule(**normalised, **batch, use_qk_l2norm=False)
    assert_close(o_given, o_auto, atol=1e-5, rtol=1e-5)


# ---------------------------------------------------------------- the whole GDN core


@pytest.mark.parametrize(("Hk", "Hv"), [(2, 2), (1, 2)])
def test_gdn_forward_extend_matches_float64_reference(Hk, Hv):
    torch.manual_seed(Hv + Hk)
    dims = (Hk, Hv, 8, 4)
    lengths, prefix = [6, 70, 1], [0, 12, 3]
    starts, lens = ragged(lengths)
    inputs = gdn_inputs(sum(lengths), *dims, batch=len(lengths))
    out_ref, conv_ref, ssm_ref = ref_gdn_forward(
        inputs, starts.tolist(), lengths, [p > 0 for p in prefix], dims
    )

    out = run_gdn_forward(inputs, starts, lens, torch.tensor(prefix), dims, decode=False)

    assert out.shape == (sum(lengths), Hv * 4) and out.dtype == torch.float32
    assert_close(out, out_ref)
    assert_close(inputs["conv_state"], conv_ref)
    assert_close(inputs["ssm_state"], ssm_ref)


def test_gdn_forward_decode_matches_float64_reference():
    torch.manual_seed(3)
    dims = (2, 4, 8, 4)
    B = 3
    inputs = gdn_inputs(B, *dims, batch=B)
    starts, lens = ragged([1] * B)
    out_ref, conv_ref, ssm_ref = ref_gdn_forward(inputs, starts.tolist(), [1] * B, [True] * B, dims)

    out = run_gdn_forward(inputs, starts, lens, torch.full((B,), 5), dims, decode=True)

    assert_close(out, out_ref)
    assert_close(inputs["conv_state"], conv_ref)
    assert_close(inputs["ssm_state"], ssm_ref)


@pytest.mark.parametrize("continuation", ["decode", "extend"])
def test_gdn_forward_prompt_then_continuation_equals_one_long_extend(continuation):
    """Prefill then decode steps (or a second extend, as in chunked prefill) match one extend of it all."""
    torch.manual_seed(4)
    dims = (1, 2, 8, 4)
    prompt, steps = [5, 66], 4
    B = len(prompt)
    totals = [p + steps for p in prompt]
    full = gdn_inputs(sum(totals), *dims, batch=B)
    split = {name: t.clone() for name, t in full.items()}
    starts, lens = ragged(totals)
    out_full = run_gdn_forward(full, starts, lens, torch.zeros(B, dtype=torch.int64), dims, decode=False)

    token_inputs = ("mixed_qkv", "a", "b")
    prompt_rows = torch.cat([torch.arange(s, s + p) for s, p in zip(starts.tolist(), prompt, strict=True)])
    prompt_inputs = dict(split, **{name: split[name][prompt_rows] for name in token_inputs})
    out_prompt = run_gdn_forward(
        prompt_inputs, *ragged(prompt), torch.zeros(B, dtype=torch.int64), dims, False
    )
    assert_close(out_prompt, out_full[prompt_rows])
    if continuation == "decode":
        for i in range(steps):
            rows = starts + torch.tensor(prompt) + i
            step_inputs = dict(split, **{name: split[name][rows] for name in token_inputs})
            out_step = run_gdn_forward(step_inputs, *ragged([1] * B), torch.tensor(prompt) + i, dims, True)
            assert_close(out_step, out_full[rows])
    else:
        rows = torch.cat(
            [torch.arange(s + p, s + p + steps) for s, p in zip(starts.tolist(), prompt, strict=True)]
        )
        rest_inputs = dict(split, **{name: split[name][rows] for name in token_inputs})
        out_rest = run_gdn_forward(rest_inputs, *ragged([steps] * B), torch.tensor(prompt), dims, False)
        assert_close(out_rest, out_full[rows])
    assert_close(split["conv_state"], full["conv_state"], atol=0, rtol=0)
    assert_close(split["ssm_state"], full["ssm_state"])


def test_gdn_forward_bfloat16_returns_bfloat16_close_to_reference():
    torch.manual_seed(5)
    dims = (2, 2, 8, 4)
    lengths = [9, 4]
    starts, lens = ragged(lengths)
    inputs = gdn_inputs(sum(lengths), *dims, batch=2, dtype=torch.bfloat16)
    out_ref, _, ssm_ref = ref_gdn_forward(inputs, starts.tolist(), lengths, [True, False], dims)

    out = run_gdn_forward(inputs, starts, lens, torch.tensor([3, 0]), dims, decode=False)

    assert out.dtype == torch.bfloat16 and inputs["conv_state"].dtype == torch.bfloat16
    assert_close(out, out_ref, atol=5e-2, rtol=5e-2)
    assert_close(inputs["ssm_state"], ssm_ref, atol=5e-2, rtol=5e-2)


# ---------------------------------------------------------------- validation


def _conv_extend(x=None, weight=None, conv_state=None, lens=None, activation="silu"):
    return gdn.causal_conv1d_extend(
        torch.randn(5, 6) if x is None else x,
        torch.randn(6, 4) if weight is None else weight,
        torch.randn(3, 6, 3) if conv_state is None else conv_state,
        torch.tensor([1, 2]),
        torch.tensor([0, 2]),
        torch.tensor([2, 3]) if lens is None else lens,
        torch.tensor([True, False]),
        activation=activation,
    )


def _rule(Hk=2, Hv=2, **overrides):
    inputs = dict(rule_inputs(4, Hk, Hv), **overrides)
    return gdn.chunk_gated_delta_rule(
        **inputs,
        gdn_slots=torch.tensor([1]),
        extend_start_loc=torch.tensor([0]),
        extend_seq_lens=torch.tensor([4]),
        has_initial_state=torch.tensor([False]),
        scale=1.0,
    )


def _forward(**overrides):
    dims = (1, 2, 4, 4)
    inputs = dict(gdn_inputs(3, *dims), **overrides)
    return run_gdn_forward(inputs, *ragged([3]), torch.tensor([0]), dims, decode=False)


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: _conv_extend(weight=torch.randn(7, 4)), "expected weight"),
        (lambda: _conv_extend(conv_state=torch.randn(3, 6, 2)), "expected conv_state"),
        (lambda: _conv_extend(x=torch.randn(5, 6, 1)), "expected x"),
        (lambda: _conv_extend(lens=torch.tensor([2, 3, 1])), "expected extend_seq_lens"),
        (lambda: _conv_extend(lens=torch.tensor([2, 4])), "outside the 5 packed tokens"),
        (lambda: _conv_extend(activation="relu"), "activation"),
        (
            lambda: gdn.causal_conv1d_decode(
                torch.randn(2, 6), torch.randn(6, 4), torch.randn(3, 6, 3), torch.ones(3)
            ),
            "expected gdn_slots",
        ),
        (lambda: _rule(k=torch.randn(4, 3, 8)), "expected k"),
        (lambda: _rule(Hk=2, Hv=3), "expected v with a multiple of Hk=2"),
        (lambda: _rule(g=torch.randn(4, 3)), "expected g"),
        (lambda: _rule(beta=torch.rand(5, 2)), "expected beta"),
        (lambda: _rule(ssm_state=torch.randn(8, 2, 8, 6).bfloat16()), "expected ssm_state in float32"),
        (lambda: _rule(ssm_state=torch.randn(8, 2, 6, 8)), "expected ssm_state of shape"),
        (lambda: gdn.gdn_gating(torch.randn(3), torch.randn(5, 3), torch.randn(2)), "expected dt_bias"),
        (lambda: _forward(mixed_qkv=torch.randn(3, 17)), "expected mixed_qkv"),
        (lambda: _forward(a=torch.randn(3, 3)), "expected a"),
    ],
)
def test_bad_shapes_raise_value_error_naming_the_tensor(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_causal_conv1d_extend_with_an_empty_request_only_rewrites_its_state():
    torch.manual_seed(11)
    x, weight = torch.randn(3, 8), torch.randn(8, 4)
    conv_state = torch.randn(4, 8, 3)
    before = conv_state.clone()
    out = gdn.causal_conv1d_extend(
        x,
        weight,
        conv_state,
        torch.tensor([1, 2]),
        torch.tensor([0, 0]),
        torch.tensor([0, 3]),
        torch.tensor([True, False]),
    )
    assert torch.equal(conv_state[1], before[1])  # no new input: the window is unchanged
    padded = torch.cat([torch.zeros(3, 8), x]).double()  # the second request starts from zeros
    expected = torch.stack([(padded[t : t + 4].T * weight.double()).sum(-1) for t in range(3)])
    torch.testing.assert_close(out.double(), torch.nn.functional.silu(expected), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(conv_state[2], x.T.contiguous())
