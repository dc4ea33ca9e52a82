"""The one-kernel GDN decode step (conv + SiLU, gates, delta rule, gated RMSNorm) against float64 torch math."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from radixc.ops.triton import gdn_decode_step
from radixc.ops.triton.gdn_decode import GatedNormArgs


def _case(batch, hk, hv, dk, dv, kernel, seed, dtype=torch.float32):
    """Projections as column slices of one packed row (as the layer splits its input projection), the
    conv weight and states, gate parameters, a gate and norm weight, and scattered state slots."""
    gen = torch.Generator().manual_seed(seed)
    channels, value_dim = 2 * hk * dk + hv * dv, hv * dv
    packed = torch.randn(batch, channels + value_dim + 2 * hv, generator=gen).to(dtype)
    mixed_qkv, gate, b, a = packed.split([channels, value_dim, hv, hv], dim=1)
    return dict(
        mixed_qkv=mixed_qkv,
        conv_weight=torch.randn(channels, 1, kernel, generator=gen) * 0.5,
        conv_state=torch.randn(batch + 3, channels, kernel - 1, generator=gen).to(dtype),
        a=a,
        b=b,
        A_log=torch.rand(hv, generator=gen),
        dt_bias=torch.randn(hv, generator=gen) * 0.5,
        ssm_state=torch.randn(batch + 3, hv, dk, dv, generator=gen),
        gdn_slots=torch.randperm(batch + 2, generator=gen)[:batch] + 1,
        gate=gate,
        norm_weight=torch.rand(dv, generator=gen) + 0.5,
    )


def _reference(case, hk, hv, dk, dv, norm_eps, zero_centered, with_norm):
    """float64: conv with history, SiLU, L2-normed q/k, gates, one delta-rule step, then the gated norm."""
    x = case["mixed_qkv"].double()
    weight = case["conv_weight"].double().squeeze(1)
    conv_state, ssm_state = case["conv_state"].double().clone(), case["ssm_state"].double().clone()
    slots = case["gdn_slots"]
    window = torch.cat([conv_state[slots], x.unsqueeze(-1)], dim=-1)
    conv_state[slots] = window[:, :, 1:]
    y = F.silu((window * weight).sum(-1))
    q, k, v = y.split([hk * dk, hk * dk, hv * dv], dim=1)
    group = hv // hk
    q = F.normalize(q.unflatten(1, (hk, dk)), dim=-1, eps=0).repeat_interleave(group, 1) * dk**-0.5
    k = F.normalize(k.unflatten(1, (hk, dk)), dim=-1, eps=0).repeat_interleave(group, 1)
    v = v.unflatten(1, (hv, dv))
    g = -case["A_log"].double().exp() * F.softplus(case["a"].double() + case["dt_bias"].double())
    beta = torch.sigmoid(case["b"].double())
    state = ssm_state[slots] * g.exp()[..., None, None]
    delta = beta[..., None] * (v - torch.einsum("bhkv,bhk->bhv", state, k))
    state = state + k[..., None] * delta[..., None, :]
    ssm_state[slots] = state
    out = torch.einsum("bhkv,bhk->bhv", state, q)
    if with_norm:
        scale = case["norm_weight"].double() + (1.0 if zero_centered else 0.0)
        out = out * torch.rsqrt(out.pow(2).mean(-1, keepdim=True) + norm_eps) * scale
        out = out * F.silu(case["gate"].double().unflatten(1, (hv, dv)))
    return out.flatten(1), conv_state, ssm_state


def _run(case, device, hk, hv, dk, dv, norm):
    moved = {name: tensor.to(device) for name, tensor in case.items()}
    gate_norm = None
    if norm is not None:
        gate_norm = GatedNormArgs(moved["gate"], moved["norm_weight"], *norm)
    names = ("mixed_qkv", "conv_weight", "conv_state", "a", "b", "A_log", "dt_bias", "ssm_state", "gdn_slots")
    out = gdn_decode_step(
        *(moved[name] for name in names),
        num_k_heads=hk,
        num_v_heads=hv,
        head_k_dim=dk,
        head_v_dim=dv,
        norm=gate_norm,
    )
    return out, moved["conv_state"], moved["ssm_state"]


@pytest.mark.parametrize(
    "hk, hv, dk, dv, kernel",
    [(2, 2, 16, 16, 4), (2, 4, 32, 16, 4), (1, 3, 20, 24, 2), (2, 4, 16, 32, 3)],
    ids=["hv1x", "hv2x", "hv3x-odd-dims-k2", "hv2x-dv32-k3"],
)
@pytest.mark.parametrize(
    "norm", [None, (1e-6, False), (1e-5, True)], ids=["no-norm", "gated-norm", "zero-centered-norm"]
)
def test_decode_step_matches_float64(device, hk, hv, dk, dv, kernel, norm):
    case = _case(3, hk, hv, dk, dv, kernel, seed=hk * 100 + dv + kernel)
    expected, conv_state, ssm_state = _reference(
        case, hk, hv, dk, dv, *(norm or (0.0, False)), norm is not None
    )
    out, got_conv_state, got_ssm_state = _run(case, device, hk, hv, dk, dv, norm)
    assert out.shape == (3, hv * dv) and out.dtype == torch.float32
    torch.testing.assert_close(out.cpu().double(), expected, atol=2e-5, rtol=2e-5)
    torch.testing.assert_close(got_conv_state.cpu().double(), conv_state, atol=0, rtol=0)
    torch.testing.assert_close(got_ssm_state.cpu().double(), ssm_state, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
def test_half_precision_step_tracks_float64(device, dtype):
    case = _case(4, 2, 4, 32, 32, 4, seed=11, dtype=dtype)
    expected, conv_state, ssm_state = _reference(case, 2, 4, 32, 32, 1e-6, False, True)
    out, got_conv_state, got_ssm_state = _run(case, device, 2, 4, 32, 32, (1e-6, False))
    assert out.dtype == dtype and got_conv_state.dtype == dtype
    torch.testing.assert_close(out.cpu().double(), expected, atol=3e-2, rtol=3e-2)
    torch.testing.assert_close(got_conv_state.cpu().double(), conv_state, atol=0, rtol=0)
    torch.testing.assert_close(got_ssm_state.cpu().double(), ssm_state, atol=1e-3, rtol=1e-3)


def test_empty_batch_touches_no_state(device):
    case = _case(2, 2, 2, 16, 16, 4, seed=5)
    case = {**case, **{name: case[name][:0] for name in ("mixed_qkv", "a", "b", "gdn_slots", "gate")}}
    conv_state, ssm_state = case["conv_state"].clone(), case["ssm_state"].clone()
    out, got_conv_state, got_ssm_state = _run(case, device, 2, 2, 16, 16, None)
    assert out.shape == (0, 32)
    assert torch.equal(got_conv_state.cpu(), conv_state) and torch.equal(got_ssm_state.cpu(), ssm_state)


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(dk=128, dv=256), r"a \[128, 256\] state per v head is more than one program holds"),
        (dict(ssm_dtype=torch.bfloat16), r"expected ssm_state float32 \[S, 4, 16, 16\]"),
        (dict(gate_width=60), r"expected a gate \[2, 64\]"),
        (dict(hv=3), r"3 v heads are not a multiple of 2 k heads"),
    ],
    ids=["state-too-large", "half-state", "gate-width", "head-ratio"],
)
def test_bad_inputs_are_named(device, change, message):
    dk, dv, hv = change.get("dk", 16), change.get("dv", 16), change.get("hv", 4)
    case = _case(2, 2, 4, dk, dv, 4, seed=6)
    if "ssm_dtype" in change:
        case["ssm_state"] = case["ssm_state"].to(change["ssm_dtype"])
    if "gate_width" in change:
        case["gate"] = case["gate"][:, : change["gate_width"]]
    with pytest.raises(ValueError, match=message):
        _run(case, device, 2, hv, dk, dv, (1e-6, False))
