"""Shared harness for the pass tests (the `ph` fixture): small modules around RadixAttention and
RadixLinearAttention, a runner that compiles them with chosen pass switches and keeps Inductor's output code, and
a check that the output code never copies a pool buffer."""

from __future__ import annotations

import contextlib
import re
import types
from unittest import mock

import pytest
import torch
from torch import nn
from torch._inductor.graph import GraphLowering

import radixc
from radixc.engine import GDNPool, HybridAttnBackend, KVPool, NativeBackend, ReqToTokenPool
from radixc.engine.batch_builder import BatchBuilder
from radixc.engine.runner import build_runner
from radixc.ops import RadixAttention, RadixLinearAttention, rotary_embedding
from radixc.ops.norm import rms_norm

HIDDEN, HEADS, KV_HEADS, HEAD_DIM = 32, 4, 2, 8
HK, HV, DK, DV, KERNEL = 2, 4, 8, 8, 4
CONV_DIM = 2 * HK * DK + HV * DV


class RopeAttention(nn.Module):
    """qkv projection, optional per-head q/k RMSNorm, rotary, RadixAttention; k_also_out adds a second use of
    the rotated k (which must stop the rope + KV-store fusion); q_eps, when given, norms q with another eps than
    k (which must stop the q/k-norm fusion)."""

    def __init__(
        self, qk_norm: bool, k_also_out: bool = False, q_eps: float | None = None, layer_id: int = 0
    ):
        super().__init__()
        self.qk_norm, self.k_also_out, self.q_eps = qk_norm, k_also_out, q_eps
        self.embed = nn.Embedding(64, HIDDEN)
        self.qkv = nn.Linear(HIDDEN, (HEADS + 2 * KV_HEADS) * HEAD_DIM)
        self.q_norm = nn.Parameter(torch.rand(HEAD_DIM) + 0.5)
        self.k_norm = nn.Parameter(torch.rand(HEAD_DIM) + 0.5)
        self.attn = RadixAttention(HEADS, HEAD_DIM, HEAD_DIM**-0.5, KV_HEADS, layer_id=layer_id)
        freqs = torch.outer(
            torch.arange(128).float(), 1.0 / (10000 ** (torch.arange(0, HEAD_DIM, 2) / HEAD_DIM))
        )
        self.register_buffer("cos_sin", torch.cat([freqs.cos(), freqs.sin()], dim=-1))

    def forward(self, input_ids, positions, forward_batch):
        q, k, v = self.qkv(self.embed(input_ids)).split(
            [HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], -1
        )
        if self.qk_norm:
            q = rms_norm(q, self.q_norm, 1e-6 if self.q_eps is None else self.q_eps)
            k = rms_norm(k, self.k_norm, 1e-6)
        q, k = rotary_embedding(positions, q, k, self.cos_sin, HEAD_DIM)
        out = self.attn(q, k, v, forward_batch)
        return out + k.sum() if self.k_also_out else out


class HalfNormed(RopeAttention):
    """Only q is RMS-normed before the rope: the q/k-norm fusion must not match."""

    def forward(self, input_ids, positions, forward_batch):
        q, k, v = self.qkv(self.embed(input_ids)).split(
            [HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM, KV_HEADS * HEAD_DIM], -1
        )
        q, k = rotary_embedding(positions, rms_norm(q, self.q_norm, 1e-6), k, self.cos_sin, HEAD_DIM)
        return self.attn(q, k, v, forward_batch)


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


class HybridBlock(nn.Module):
    """A GDN layer (layer 0) then a rotary attention layer (layer 1), as in Qwen3.5."""

    def __init__(self):
        super().__init__()
        self.gdn = GDNBlock()
        self.attention = RopeAttention(qk_norm=True, layer_id=1)
        self.out = nn.Linear(HV * DV, HIDDEN)

    def forward(self, input_ids, positions, forward_batch):
        hidden = self.out(self.gdn(input_ids, positions, forward_batch))
        return self.attention(input_ids, positions, forward_batch) + hidden.sum(-1, keepdim=True)


@contextlib.contextmanager
def switches(**values: bool):
    """Set radixc.passes.config switches for the duration."""
    saved = {name: getattr(radixc.passes.config, name) for name in values}
    for name, value in values.items():
        setattr(radixc.passes.config, name, value)
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(radixc.passes.config, name, value)


@contextlib.contextmanager
def capture_output_code(codes: list[str]):
    """Compile with no cache (a hit would skip the passes) and append Inductor's output code to codes."""
    with (
        torch._inductor.config.patch(fx_graph_cache=False),
        torch._functorch.config.patch(enable_autograd_cache=False),
        mock.patch.object(GraphLowering, "save_output_code", codes.append),
    ):
        yield


def run_steps(model, builder: BatchBuilder, compiled: bool, extend_prompts, decode_tokens, **pass_switches):
    """Extend then decode (decode_tokens: one list per step); returns (outputs, pass counts per graph, code)."""
    requests = [builder.new_request() for _ in extend_prompts]
    manager = radixc.passes.install()
    manager.history.clear()
    fn = torch.compile(model, fullgraph=True) if compiled else model
    outputs, codes = [], []
    torch._dynamo.reset()
    with torch.inference_mode(), switches(**pass_switches), capture_output_code(codes):
        batch = builder.extend(requests, extend_prompts)
        outputs.append(fn(batch.input_ids, batch.positions, batch))
        for tokens in decode_tokens:
            batch = builder.decode(requests, tokens)
            outputs.append(fn(batch.input_ids, batch.positions, batch))
    return outputs, list(manager.history), "\n".join(codes)


def run_attention(model, compiled: bool, **pass_switches):
    """Two prompts extended, then two decode steps, over a fresh KV pool; (outputs, history, code, pool)."""
    pool = KVPool(16, 4, 1, KV_HEADS, HEAD_DIM, torch.float32)
    builder = BatchBuilder(ReqToTokenPool(4, 64), pool, NativeBackend())
    outputs, history, code = run_steps(
        model, builder, compiled, [[3, 4, 5], [6, 7]], [[8, 9]] * 2, **pass_switches
    )
    return outputs, history, code, pool


def run_gdn(model, compiled: bool, backend=None, **pass_switches):
    """The same steps through a GDN block; (outputs, history, code, pool)."""
    pool = GDNPool(4, 1, CONV_DIM, KERNEL, HV, DK, DV, torch.float32)
    backend = backend or NativeBackend()
    builder = BatchBuilder(
        ReqToTokenPool(4, 64), None, HybridAttnBackend(backend, backend, []), gdn_pool=pool
    )
    prompts = [[3, 4, 5, 6, 7], [6, 7]]
    outputs, history, code = run_steps(model, builder, compiled, prompts, [[8, 9]] * 2, **pass_switches)
    return outputs, history, code, pool


def run_hybrid(model, compiled: bool, full_backend, gdn_backend):
    """The same steps through a HybridBlock, on the device of its weights; (outputs, history, code, KV pool, GDN
    pool)."""
    device = next(model.parameters()).device
    kv_pool = KVPool(16, 4, 2, KV_HEADS, HEAD_DIM, torch.float32, device, layer_ids=[1])
    gdn_pool = GDNPool(4, 1, CONV_DIM, KERNEL, HV, DK, DV, torch.float32, device)
    backend = HybridAttnBackend(full_backend, gdn_backend, [1])
    builder = BatchBuilder(ReqToTokenPool(4, 64, device), kv_pool, backend, gdn_pool=gdn_pool, device=device)
    outputs, history, code = run_steps(model, builder, compiled, [[3, 4, 5, 6, 7], [6, 7]], [[8, 9]] * 2)
    return outputs, history, code, kv_pool, gdn_pool


def greedy_decode_logits(model, backend: str, compile: bool, prompts, steps: int) -> list[torch.Tensor]:
    """A model's logits over an extend of `prompts` and `steps` greedy decode steps, on a small engine runner
    (each step reads the keys and values the steps before it stored)."""
    runner = build_runner(
        model,
        backend=backend,
        compile=compile,
        page_size=4,
        max_batch_size=4,
        max_context_len=64,
        kv_memory_bytes=1 << 20,
    )
    requests = [runner.builder.new_request() for _ in prompts]
    logits = [runner.extend(requests, prompts)]
    for _ in range(steps):
        logits.append(runner.decode(requests, logits[-1].argmax(-1).tolist()))
    return logits


def pool_copies(code: str, buffers) -> list[str]:
    """Lines of Inductor output code that allocate or reinterpret a buffer of a pool buffer's shape: a copy of
    the cache made every step (what torch 2.11 did when it could not re-inplace the radixc ops)."""
    shapes = {re.escape(str(tuple(b.shape))) for b in buffers if b is not None}
    pattern = re.compile(rf"(empty_strided\w*|reinterpret_tensor\(buf\w+,)\s*\(?({'|'.join(shapes)})")
    return [line.strip() for line in code.splitlines() if pattern.search(line)]


@pytest.fixture
def ph() -> types.SimpleNamespace:
    return types.SimpleNamespace(
        RopeAttention=RopeAttention,
        HalfNormed=HalfNormed,
        GDNBlock=GDNBlock,
        HybridBlock=HybridBlock,
        run_hybrid=run_hybrid,
        switches=switches,
        capture_output_code=capture_output_code,
        run_steps=run_steps,
        run_attention=run_attention,
        run_gdn=run_gdn,
        greedy_decode_logits=greedy_decode_logits,
        pool_copies=pool_copies,
    )
