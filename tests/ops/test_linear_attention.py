"""RadixLinearAttention (Gated DeltaNet) through the hybrid backend against a float64 per-token loop."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import radixc  # noqa: F401
from radixc.engine import GDNPool, HybridAttnBackend, NativeBackend, ReqToTokenPool
from radixc.engine.batch_builder import BatchBuilder
from radixc.ops import RadixLinearAttention

HK, HV, DK, DV, KERNEL = 2, 4, 8, 6, 4
CONV_DIM = 2 * HK * DK + HV * DV


def reference_gdn(mixed_qkv, a, b, conv_weight, A_log, dt_bias):
    """Float64 loop over tokens of one request from zero state: conv1d + silu, gating, delta rule."""
    x = mixed_qkv.double()
    T = x.shape[0]
    padded = torch.cat([torch.zeros(KERNEL - 1, CONV_DIM, dtype=torch.float64), x])
    w = conv_weight.double().view(CONV_DIM, KERNEL)
    conv = torch.stack([(padded[t : t + KERNEL].T * w).sum(-1) for t in range(T)])
    conv = F.silu(conv)
    q, k, v = conv.split([HK * DK, HK * DK, HV * DV], dim=-1)
    q = F.normalize(q.view(T, HK, DK), dim=-1, eps=1e-6).repeat_interleave(HV // HK, dim=1) * DK**-0.5
    k = F.normalize(k.view(T, HK, DK), dim=-1, eps=1e-6).repeat_interleave(HV // HK, dim=1)
    v = v.view(T, HV, DV)
    g = -A_log.double().exp() * F.softplus(a.double() + dt_bias.double())
    beta = b.double().sigmoid()
    state = torch.zeros(HV, DK, DV, dtype=torch.float64)
    out = []
    for t in range(T):
        state = state * g[t].exp()[:, None, None]
        recalled = torch.einsum("hkv,hk->hv", state, k[t])
        state = state + torch.einsum("hk,hv->hkv", k[t], beta[t][:, None] * (v[t] - recalled))
        out.append(torch.einsum("hkv,hk->hv", state, q[t]))
    return torch.stack(out).reshape(T, HV * DV)


def make_layer():
    conv_weight = torch.nn.Parameter(torch.randn(CONV_DIM, 1, KERNEL) * 0.5)
    A_log = torch.nn.Parameter(torch.rand(HV) * 2 - 1)
    dt_bias = torch.nn.Parameter(torch.randn(HV) * 0.5)
    return RadixLinearAttention(0, 0, HK, HV, DK, DV, conv_weight, A_log, dt_bias)


def make_builder():
    pool = GDNPool(6, 1, CONV_DIM, KERNEL, HV, DK, DV, torch.float32)
    backend = HybridAttnBackend(NativeBackend(), NativeBackend(), full_attn_layer_ids=[1])
    return BatchBuilder(ReqToTokenPool(6, 128), None, backend, gdn_pool=pool), pool


def test_extend_then_decode_matches_float64_loop_for_a_ragged_batch():
    torch.manual_seed(0)
    layer = make_layer()
    builder, _ = make_builder()
    lengths, steps = [9, 3, 17], 3
    total = [n + steps for n in lengths]
    inputs = [(torch.randn(n, CONV_DIM), torch.randn(n, HV), torch.randn(n, HV)) for n in total]
    requests = [builder.new_request() for _ in lengths]
    batch = builder.extend(requests, [[0] * n for n in lengths])
    cat = lambda i, rows: torch.cat([inp[i][rows(n)] for inp, n in zip(inputs, lengths)])  # noqa: E731
    outs = [layer(batch, *(cat(i, lambda n: slice(0, n)) for i in range(3))).split(lengths)]
    for s in range(steps):
        batch = builder.decode(requests, [0] * len(requests))
        outs.append(
            layer(batch, *(cat(i, lambda n, s=s: slice(n + s, n + s + 1)) for i in range(3))).split(1)
        )
    for r, inp in enumerate(inputs):
        got = torch.cat([outs[0][r]] + [outs[1 + s][r] for s in range(steps)])
        ref = reference_gdn(*inp, layer.conv_weight, layer.A_log, layer.dt_bias)
        torch.testing.assert_close(got.double(), ref, atol=1e-5, rtol=1e-5)


def test_second_extend_continues_from_the_stored_state():
    torch.manual_seed(1)
    layer = make_layer()
    builder, _ = make_builder()
    x, a, b = torch.randn(20, CONV_DIM), torch.randn(20, HV), torch.randn(20, HV)
    (r,) = [builder.new_request()]
    first = layer(builder.extend([r], [[0] * 12]), x[:12], a[:12], b[:12])
    second = layer(builder.extend([r], [[0] * 8]), x[12:], a[12:], b[12:])
    ref = reference_gdn(x, a, b, layer.conv_weight, layer.A_log, layer.dt_bias)
    torch.testing.assert_close(torch.cat([first, second]).double(), ref, atol=1e-5, rtol=1e-5)


def test_bad_shapes_and_missing_pool_are_clear_errors():
    layer = make_layer()
    builder, _ = make_builder()
    batch = builder.extend([builder.new_request()], [[0] * 3])
    with pytest.raises(ValueError, match=r"RadixLinearAttention\(layer_id=0\): expected mixed_qkv \[T, 56\]"):
        layer(batch, torch.randn(3, 50), torch.randn(3, HV), torch.randn(3, HV))
    with pytest.raises(ValueError, match=r"expected b \[T, 4\]"):
        layer(batch, torch.randn(3, CONV_DIM), torch.randn(3, HV), torch.randn(3, 2))
    batch.gdn_pool = None
    with pytest.raises(ValueError, match="no GDN pool"):
        layer(batch, torch.randn(3, CONV_DIM), torch.randn(3, HV), torch.randn(3, HV))
    with pytest.raises(ValueError, match="multiple of num_k_heads"):
        RadixLinearAttention(0, 0, 3, 4, DK, DV, layer.conv_weight, layer.A_log, layer.dt_bias)


def test_a_backend_without_gdn_kernels_refuses_gdn_layers(monkeypatch):
    layer = make_layer()
    builder, _ = make_builder()
    batch = builder.extend([builder.new_request()], [[0] * 2])
    batch.attn_backend = NativeBackend()
    monkeypatch.setattr(batch.attn_backend, "has_gdn", lambda: False)
    with pytest.raises(
        NotImplementedError, match="has no GDN kernels; run GDN layers through HybridAttnBackend"
    ):
        layer(batch, torch.randn(2, CONV_DIM), torch.randn(2, HV), torch.randn(2, HV))
