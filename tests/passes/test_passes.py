"""The radixc Inductor passes: lowering, each fusion on/off, numerics unchanged, uuid and chaining."""

from __future__ import annotations

import contextlib
from unittest import mock

import pytest
import torch
from torch import nn
from torch._inductor.graph import GraphLowering

import radixc
from radixc.engine import GDNPool, HybridAttnBackend, KVPool, NativeBackend, ReqToTokenPool
from radixc.engine.batch_builder import BatchBuilder
from radixc.ops import RadixAttention, RadixLinearAttention, rotary_embedding
from radixc.ops.norm import rms_norm
from radixc.passes import manager as pass_manager

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 32, 4, 2, 8


class RopeAttention(nn.Module):
    """qkv projection, optional per-head q/k RMSNorm, rotary, RadixAttention; k_also_out adds a second use of
    the rotated k (which must stop the rope + KV-store fusion)."""

    def __init__(self, qk_norm: bool, k_also_out: bool = False):
        super().__init__()
        self.qk_norm, self.k_also_out = qk_norm, k_also_out
        self.embed = nn.Embedding(64, HIDDEN)
        self.qkv = nn.Linear(HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM)
        self.q_norm = nn.Parameter(torch.rand(HEAD_DIM) + 0.5)
        self.k_norm = nn.Parameter(torch.rand(HEAD_DIM) + 0.5)
        self.attn = RadixAttention(HEADS, HEAD_DIM, HEAD_DIM**-0.5, KV_HEADS, layer_id=0)
        freqs = torch.outer(
            torch.arange(128).float(), 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2) / HEAD_DIM))
        )
        self.register_buffer("cos_sin", torch.cat([freqs.cos(), freqs.sin()], dim=-1))

    def forward(self, input_ids, positions, forward_batch):
        T = input_ids.shape[0]
        q, k, v = self.qkv(self.embed(input_ids)).split(
            [HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], -1
        )
        if self.qk_norm:
            q, k = rms_norm(q, self.q_norm, 1e-6), rms_norm(k, self.k_norm, 1e-6)
        q, k = rotary_embedding(positions, q, k, self.cos_sin, HEAD_DIM)
        out = self.attn(q, k, v, forward_batch)
        return out + k.sum() if self.k_also_out else out


def run(model, compiled: bool, **switches):
    """Extend two prompts then decode twice; returns (outputs, pass counts per graph, output code, pool)."""
    builder = BatchBuilder(ReqToTokenPool(4, 64), KVPool(16, 4, 1, KV_HEADS, HEAD_DIM, torch.float32),
                           NativeBackend())  # fmt: skip
    requests = [builder.new_request() for _ in range(2)]
    manager = radixc.passes.install()
    manager.history.clear()
    saved = {k: getattr(radixc.passes.config, k) for k in switches}
    fn = torch.compile(model, fullgraph=True, dynamic=None) if compiled else model
    outputs, codes = [], []
    try:
        for name, value in switches.items():
            setattr(radixc.passes.config, name, value)
        torch._dynamo.reset()
        no_cache = torch._inductor.config.patch(fx_graph_cache=False)
        capture = mock.patch.object(GraphLowering, "save_output_code", codes.append)
        with (
            torch.inference_mode(),
            no_cache,
            torch._functorch.config.patch(enable_autograd_cache=False),
            capture,
        ):
            for step in range(3):
                batch = (
                    builder.extend(requests, [[3, 4, 5], [6, 7]])
                    if step == 0
                    else builder.decode(requests, [8, 9])
                )
                outputs.append(fn(batch.input_ids, batch.positions, batch))
    finally:
        for name, value in saved.items():
            setattr(radixc.passes.config, name, value)
    return outputs, list(manager.history), "\n".join(codes), builder.kv_pool


@pytest.fixture(scope="module")
def eager_reference():
    torch.manual_seed(0)
    models = {qk: RopeAttention(qk_norm=qk) for qk in (False, True)}
    return models, {qk: run(m, compiled=False)[0] for qk, m in models.items()}


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("fuse_rope_kv_store", [False, True])
@pytest.mark.parametrize("fuse_qk_norm_rope", [False, True])
def test_each_pass_combination_rewrites_as_switched_and_keeps_numerics(
    eager_reference, qk_norm, fuse_rope_kv_store, fuse_qk_norm_rope
):
    models, expected = eager_reference
    outputs, history, code, pool = run(models[qk_norm], compiled=True, fuse_rope_kv_store=fuse_rope_kv_store,
                                       fuse_qk_norm_rope=fuse_qk_norm_rope)  # fmt: skip
    for got, want in zip(outputs, expected[qk_norm], strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert pool.k_buffer[0].abs().sum() > 0
    counts = history[0]
    assert counts["lower_radixc_ops"] >= 1 and len(history) == 2  # one extend and one decode graph
    assert counts.get("fuse_rope_kv_store", 0) == int(fuse_rope_kv_store)
    assert counts.get("fuse_qk_norm_rope", 0) == int(fuse_qk_norm_rope and qk_norm)
    # the output code calls kernel ops directly, in place on the pool (no copy of the cache)
    assert "torch.ops.radixc.native_extend_attention.default(" in code
    assert "torch.ops.radixc.attention.default(" not in code
    assert ("native_rope_store_kv" in code) == fuse_rope_kv_store
    assert ("rotary_embedding" in code) == (not fuse_rope_kv_store and not (qk_norm and fuse_qk_norm_rope))
    assert ("radixc.rms_norm" in code) == (qk_norm and not fuse_qk_norm_rope)
    assert "clone" not in code


def test_rope_kv_store_fusion_leaves_a_rotated_k_with_other_uses_alone():
    torch.manual_seed(1)
    model = RopeAttention(qk_norm=False, k_also_out=True)
    expected = run(model, compiled=False)[0]
    outputs, history, code, _ = run(model, compiled=True)
    assert history[0]["fuse_rope_kv_store"] == 0 and "native_rope_store_kv" not in code
    for got, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_graphs_without_radixc_ops_are_untouched_and_user_passes_still_run():
    seen = []

    class UserPass(torch._inductor.custom_graph_pass.CustomGraphPass):
        def __call__(self, graph):
            seen.append(len(graph.nodes))

        def uuid(self):
            return "user-pass-v1"

    original = torch._inductor.config.post_grad_custom_post_pass
    try:
        torch._inductor.config.post_grad_custom_post_pass = UserPass()
        manager = radixc.passes.install()
        assert manager.chained is not None
        manager.history.clear()
        torch._dynamo.reset()
        with torch._inductor.config.patch(fx_graph_cache=False):
            torch.compile(lambda x: torch.relu(x) * 2)(torch.randn(8))
        assert seen and manager.history == []
    finally:
        torch._inductor.config.post_grad_custom_post_pass = original


def test_uuid_is_stable_and_changes_with_switches_and_pass_source(monkeypatch):
    manager = pass_manager.RadixPassManager()
    first = manager.uuid()
    assert first == pass_manager.RadixPassManager().uuid()
    with _switch("fuse_rope_kv_store", False):
        assert manager.uuid() != first
    assert manager.uuid() == first
    real_getsource = pass_manager.RadixPass.uuid.__globals__["inspect"].getsource
    monkeypatch.setattr(
        pass_manager.RadixPass.uuid.__globals__["inspect"],
        "getsource",
        lambda obj: real_getsource(obj) + "# edit",
    )
    assert manager.uuid() != first


@contextlib.contextmanager
def _switch(name, value):
    old = getattr(radixc.passes.config, name)
    setattr(radixc.passes.config, name, value)
    try:
        yield
    finally:
        setattr(radixc.passes.config, name, old)


HK, HV, DK, DV, KERNEL = 2, 4, 8, 8, 4
CONV_DIM = 2 * HK * DK + HV * DV


class GDNBlock(nn.Module):
    """One RadixLinearAttention layer fed by a projection."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, HIDDEN)
        self.in_proj = nn.Linear(HIDDEN, CONV_DIM + 2 * HV)
        self.conv_weight = nn.Parameter(torch.randn(CONV_DIM, 1, KERNEL) * 0.3)
        self.A_log = nn.Parameter(torch.rand(HV))
        self.dt_bias = nn.Parameter(torch.randn(HV) * 0.3)
        self.gdn = RadixLinearAttention(0, 0, HK, HV, DK, DV, self.conv_weight, self.A_log, self.dt_bias)

    def forward(self, input_ids, positions, forward_batch):
        mixed_qkv, a, b = self.in_proj(self.embed(input_ids)).split([CONV_DIM, HV, HV], dim=-1)
        return self.gdn(forward_batch, mixed_qkv, a, b)


def run_gdn(model, compiled: bool, fuse: bool = True):
    pool = GDNPool(4, 1, CONV_DIM, KERNEL, HV, DK, DV, torch.float32)
    builder = BatchBuilder(ReqToTokenPool(4, 64), None, HybridAttnBackend(NativeBackend(), NativeBackend(), []),
                           gdn_pool=pool)  # fmt: skip
    requests = [builder.new_request() for _ in range(2)]
    manager = radixc.passes.install()
    manager.history.clear()
    codes, outputs = [], []
    fn = torch.compile(model, fullgraph=True) if compiled else model
    torch._dynamo.reset()
    with (
        torch.inference_mode(),
        _switch("fuse_gdn_conv", fuse),
        torch._inductor.config.patch(fx_graph_cache=False),
        torch._functorch.config.patch(enable_autograd_cache=False),
        mock.patch.object(GraphLowering, "save_output_code", codes.append),
    ):
        for step in range(3):
            batch = (
                builder.extend(requests, [[3, 4, 5, 6, 7], [6, 7]])
                if step == 0
                else builder.decode(requests, [8, 9])
            )
            outputs.append(fn(batch.input_ids, batch.positions, batch))
    return outputs, list(manager.history), "\n".join(codes), pool


@pytest.mark.parametrize("fuse", [False, True])
def test_gdn_lowers_to_conv_and_delta_rule_kernels_and_conv_fusion_is_switchable(fuse):
    torch.manual_seed(2)
    model = GDNBlock()
    expected, _, _, eager_pool = run_gdn(model, compiled=False)
    outputs, history, code, pool = run_gdn(model, compiled=True, fuse=fuse)
    for got, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pool.ssm_state[0], eager_pool.ssm_state[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(pool.conv_state[0], eager_pool.conv_state[0])
    assert [h.get("fuse_gdn_conv", 0) for h in history] == [int(fuse)] * 2
    # both native kernels (conv and delta rule) read lengths on the host: marked to run outside CUDA graphs
    assert [h["mark_cudagraph_partitions"] for h in history] == [2, 2]
    for mode in ("extend", "decode"):
        assert f"radixc.native_gated_delta_rule_{mode}.default(" in code
        assert (f"radixc.native_causal_conv1d_silu_split_{mode}.default(" in code) == fuse
        assert (f"radixc.native_causal_conv1d_{mode}.default(" in code) == (not fuse)
    assert "radixc.gdn.default" not in code and "clone" not in code


class HalfNormed(RopeAttention):
    """Only q is RMS-normed before the rope: the q/k-norm fusion must not match."""

    def forward(self, input_ids, positions, forward_batch):
        T = input_ids.shape[0]
        q, k, v = self.qkv(self.embed(input_ids)).split(
            [HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], -1
        )
        q = rms_norm(q.view(T, HEADS, HEAD_DIM), self.q_norm, 1e-6).view(T, -1)
        q, k = rotary_embedding(positions, q, k, self.cos_sin, HEAD_DIM)
        return self.attn(q, k, v, forward_batch)


def test_qk_norm_fusion_leaves_a_rope_with_only_one_normed_input_alone():
    torch.manual_seed(3)
    model = HalfNormed(qk_norm=True)
    expected = run(model, compiled=False)[0]
    outputs, history, code, _ = run(model, compiled=True)
    assert all(h["fuse_qk_norm_rope"] == 0 for h in history) and "radixc.native_rms_norm" not in code
    assert "torch.ops.radixc.rms_norm.default(" in code
    for got, want in zip(outputs, expected, strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
