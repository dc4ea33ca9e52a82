"""A hybrid module of RadixAttention + RadixLinearAttention compiles whole, matches eager, writes its pools,
and keeps one graph per forward mode across batch sizes and lengths."""

from __future__ import annotations

import torch
from torch import nn
from torch._dynamo.utils import counters

import radixc
from radixc.engine import GDNPool, HybridAttnBackend, KVPool, NativeBackend, ReqToTokenPool
from radixc.engine.batch_builder import BatchBuilder
from radixc.ops import RadixAttention, RadixLinearAttention, rotary_embedding

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 32, 4, 2, 8
HK, HV, DK, DV, KERNEL = 2, 4, 8, 8, 4
CONV_DIM = 2 * HK * DK + HV * DV


class TinyHybrid(nn.Module):
    """GDN layer (layer 0) then a rotary full-attention layer (layer 1)."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, HIDDEN)
        self.in_proj = nn.Linear(HIDDEN, CONV_DIM + 2 * HV)
        self.conv_weight = nn.Parameter(torch.randn(CONV_DIM, 1, KERNEL) * 0.3)
        self.A_log = nn.Parameter(torch.rand(HV))
        self.dt_bias = nn.Parameter(torch.randn(HV) * 0.3)
        self.gdn = RadixLinearAttention(0, 0, HK, HV, DK, DV, self.conv_weight, self.A_log, self.dt_bias)
        self.gdn_out = nn.Linear(HV * DV, HIDDEN)
        self.qkv = nn.Linear(HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM)
        self.attn = RadixAttention(HEADS, HEAD_DIM, HEAD_DIM**-0.5, KV_HEADS, layer_id=1)
        inv_freq = 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2).float() / HEAD_DIM))
        freqs = torch.outer(torch.arange(256).float(), inv_freq)
        self.register_buffer("cos_sin", torch.cat([freqs.cos(), freqs.sin()], dim=-1))
        self.out = nn.Linear(HEADS * HEAD_DIM, 64)

    def forward(self, input_ids, positions, forward_batch):
        x = self.embed(input_ids)
        mixed_qkv, a, b = self.in_proj(x).split([CONV_DIM, HV, HV], dim=-1)
        x = x + self.gdn_out(self.gdn(forward_batch, mixed_qkv, a, b))
        q, k, v = self.qkv(x).split([HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], dim=-1)
        q, k = rotary_embedding(positions, q, k, self.cos_sin, HEAD_DIM)
        return self.out(self.attn(q, k, v, forward_batch))


def make_builder():
    kv = KVPool(64, 4, 2, KV_HEADS, HEAD_DIM, torch.float32, layer_ids=[1])
    gdn = GDNPool(40, 1, CONV_DIM, KERNEL, HV, DK, DV, torch.float32)
    backend = HybridAttnBackend(NativeBackend(), NativeBackend(), full_attn_layer_ids=[1])
    return BatchBuilder(ReqToTokenPool(40, 128), kv, backend, gdn_pool=gdn)


def run_schedule(model, builder):
    """Extends and decodes of changing batch sizes and lengths; returns every step's output."""
    gen = torch.Generator().manual_seed(7)
    requests = [builder.new_request() for _ in range(32)]
    outputs = []
    tokens = lambda n: torch.randint(0, 64, (n,), generator=gen).tolist()  # noqa: E731
    for count, lengths in ((3, [5, 1, 9]), (2, [4, 7])):
        batch = builder.extend(requests[:count], [tokens(n) for n in lengths])
        outputs.append(model(batch.input_ids, batch.positions, batch))
    requests[3:32] and builder.extend(requests[3:32], [tokens(2) for _ in range(29)])
    for bs in (1, 3, 2, 32, 17, 1, 5):
        batch = builder.decode(requests[:bs], tokens(bs))
        outputs.append(model(batch.input_ids, batch.positions, batch))
    return outputs


def test_hybrid_module_compiles_fullgraph_matches_eager_writes_pools_without_recompiles():
    torch.manual_seed(0)
    model = TinyHybrid()
    eager_builder, compiled_builder = make_builder(), make_builder()
    torch._dynamo.reset()
    counters.clear()
    manager = radixc.passes.install()
    manager.history.clear()
    compiled = torch.compile(model, fullgraph=True)
    no_cache = torch._inductor.config.patch(fx_graph_cache=False)  # the passes must run, not a cache hit
    with torch.inference_mode(), no_cache, torch._functorch.config.patch(enable_autograd_cache=False):
        expected = run_schedule(model, eager_builder)
        got = run_schedule(compiled, compiled_builder)
    for e, g in zip(expected, got, strict=True):
        torch.testing.assert_close(g, e, atol=1e-5, rtol=1e-5)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] == 2  # one EXTEND graph, one DECODE graph, nothing else
    # the pools the compiled model wrote hold what eager wrote
    for pool in ("kv_pool", "gdn_pool"):
        eager_pool, compiled_pool = getattr(eager_builder, pool), getattr(compiled_builder, pool)
        buffers = ("k_buffer", "v_buffer") if pool == "kv_pool" else ("conv_state", "ssm_state")
        for name in buffers:
            e = [t for t in getattr(eager_pool, name) if t is not None]
            c = [t for t in getattr(compiled_pool, name) if t is not None]
            for et, ct in zip(e, c, strict=True):
                assert ct.abs().sum() > 0
                torch.testing.assert_close(ct, et, atol=1e-5, rtol=1e-5)
    # in both graphs the attention and GDN calls run in place, rope + KV store fused, then all three lowered
    assert len(manager.history) == 2
    for counts in manager.history:
        assert counts["defunctionalize"] == 2 and counts["fuse_rope_kv_store"] == 1
        assert counts["lower_radixc_ops"] == 3
