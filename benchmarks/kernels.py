"""Kernel benchmark: radixc's Triton kernels against FlashInfer, fla-core and the native (plain torch) twins.

Families: paged decode attention, paged extend (prefill) attention, GDN chunked prefill and GDN recurrent decode.
Every implementation of a case runs twice: as plain launches (host launch cost included) and replayed inside one
torch.cuda.CUDAGraph (launch cost gone). Each row reports microseconds per call, achieved GB/s (bytes the call
must move) or TFLOP/s (nominal FLOPs), the share of the ceiling measured in the same run (device copy bandwidth,
bf16 matmul throughput), the ratio to the best peer (FlashInfer or fla) and the relative difference of the output
from radixc-Triton's. A library that is missing or whose API does not match fails its own row, not the run.

    python benchmarks/kernels.py --quick --json kernels-quick.json --markdown kernels-quick.md

Needs a CUDA device; FlashInfer (`flashinfer`) and fla-core (`fla`) are used when importable.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import math
import platform
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

PAGE_SIZE = 16
FAMILIES = ("decode", "extend", "gdn-prefill", "gdn-decode")
# (name, query heads, kv heads, head dim)
ATTENTION_HEADS = {
    "llama3-8b": (32, 8, 128),
    "qwen3-0.6b": (16, 8, 128),
    "qwen3-32b": (64, 8, 128),
}
# Qwen3.5-0.8B's Gated DeltaNet: (k heads, v heads, head dim)
GDN_HEADS = (16, 16, 128)
# decode rows of issue 12's table: (batch, context)
QUICK_DECODE = [
    (1, 1024),
    (1, 8192),
    (32, 1024),
    (32, 4096),
    (64, 4096),
    (128, 2048),
    (256, 1024),
    (8, 32768),
]
FULL_DECODE = [
    (b, c) for b in (1, 4, 16, 32, 64, 128, 256) for c in (512, 1024, 2048, 4096, 8192, 16384, 32768)
]
# (batch, prefix, new tokens per request)
QUICK_EXTEND = [(1, 0, 4096), (8, 1024, 512)]
FULL_EXTEND = [(1, 0, 2048), (1, 0, 8192), (4, 2048, 1024), (8, 1024, 512), (32, 0, 512), (64, 4096, 64)]
GDN_PREFILL = [(1, 4096), (8, 2048), (32, 512)]  # (requests, tokens each)
QUICK_GDN_DECODE = [1, 32, 256]
FULL_GDN_DECODE = [1, 8, 32, 64, 128, 256, 512]
# past this many cached tokens the native twins (which gather whole contexts) are skipped
NATIVE_MAX_TOKENS = 1 << 18
# cases whose KV cache would exceed this are left out of the grid
MAX_KV_BYTES = 16 << 30
GRAPH_CALLS = 8  # calls captured into one CUDA graph, so one replay's own cost is shared


class NoCudaError(RuntimeError):
    """The benchmark was started where no CUDA device is visible."""


@dataclasses.dataclass
class Ceilings:
    """What the device can do at best, measured in this run."""

    copy_gb_per_s: float
    matmul_tflops: float


@dataclasses.dataclass
class Impl:
    """One implementation of a case: `setup()` returns (one zero-arg call per layer copy, output of a check call)."""

    name: str
    setup: Callable[[], tuple[list[Callable[[], Any]], torch.Tensor]]
    capturable: bool = True
    peer: bool = False  # FlashInfer / fla: what radixc is compared with


@dataclasses.dataclass
class Row:
    """One (case, implementation) measurement; times in microseconds per call, None where it did not run."""

    family: str
    case: str
    impl: str
    work: float  # bytes (bandwidth-bound families) or FLOPs (compute-bound)
    unit: str  # "GB/s" or "TFLOP/s"
    plain_us: float | None = None
    graph_us: float | None = None
    rel_diff: float | None = None
    ratio_plain: float | None = None
    ratio_graph: float | None = None
    error: str | None = None

    def rate(self, us: float | None) -> float | None:
        """Achieved GB/s or TFLOP/s at `us` microseconds per call."""
        if us is None or us <= 0:
            return None
        return self.work / (us * 1e-6) / (1e9 if self.unit == "GB/s" else 1e12)


# ---------------------------------------------------------------------------------------------------------------
# timing


def _events_us(run: Callable[[], None], calls: int) -> float:
    """Microseconds per call of `run()` (which makes `calls` calls), bracketed by CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    run()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) * 1e3 / calls


def _repeats(per_call_us: float, calls: int, budget_s: float) -> int:
    return max(2, min(200, int(budget_s * 1e6 / max(per_call_us * calls, 1.0))))


def time_plain(calls: list[Callable[[], Any]], budget_s: float) -> float:
    """Microseconds per call, calls launched back to back from Python (the host's launch cost included)."""

    def once() -> None:
        for call in calls:
            call()

    once()
    torch.cuda.synchronize()
    estimate = _events_us(once, len(calls))
    reps = _repeats(estimate, len(calls), budget_s)

    def loop() -> None:
        for _ in range(reps):
            once()

    return _events_us(loop, reps * len(calls))


def time_graph(calls: list[Callable[[], Any]], budget_s: float) -> float:
    """Microseconds per call, the calls captured into one CUDA graph and replayed (no host launch cost)."""
    per_graph = [calls[i % len(calls)] for i in range(max(GRAPH_CALLS, len(calls)))]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up off the default stream, as capture requires
        for call in per_graph:
            call()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in per_graph:
            call()
    graph.replay()
    torch.cuda.synchronize()
    estimate = _events_us(graph.replay, len(per_graph))
    reps = _repeats(estimate, len(per_graph), budget_s)

    def loop() -> None:
        for _ in range(reps):
            graph.replay()

    return _events_us(loop, reps * len(per_graph))


def measure_ceilings(device: torch.device) -> Ceilings:
    """Device copy bandwidth (read + write bytes) and dense bf16 matmul throughput."""
    from radixc.tools.bench_floor import copy_bandwidth

    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    us = time_plain([lambda: torch.mm(a, b)], budget_s=0.2)
    return Ceilings(copy_bandwidth(device) / 1e9, 2 * 8192**3 / (us * 1e-6) / 1e12)


def _layer_copies(bytes_per_layer: int, device: torch.device) -> int:
    """How many copies of the cache/state to cycle through so that, as in a model's step, a call does not find
    the previous call's bytes in L2 (one copy off CUDA)."""
    if device.type != "cuda":
        return 1
    l2 = getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 << 20)
    return max(1, min(32, math.ceil(4 * l2 / max(bytes_per_layer, 1))))


# ---------------------------------------------------------------------------------------------------------------
# paged attention cases


@dataclasses.dataclass
class PagedLayout:
    """A paged KV layout with pages in random order, in radixc's (slots) and FlashInfer's (pages) terms."""

    req_to_token: torch.Tensor  # [B, pages_per_req * PAGE_SIZE] int32 slots
    req_pool_indices: torch.Tensor  # [B]
    seq_lens: torch.Tensor  # [B] int32
    kv_indptr: torch.Tensor  # [B + 1] int32 page offsets
    kv_indices: torch.Tensor  # [B * pages_per_req] int32 pages
    kv_last_page_len: torch.Tensor  # [B] int32
    num_pages: int


def paged_layout(batch: int, context: int, device: torch.device, gen: torch.Generator) -> PagedLayout:
    pages_per_req = -(-context // PAGE_SIZE)
    num_pages = batch * pages_per_req + 1  # page 0 is padding, as in radixc's pool
    pages = (torch.randperm(num_pages - 1, generator=gen) + 1).view(batch, pages_per_req)
    slots = (pages[:, :, None] * PAGE_SIZE + torch.arange(PAGE_SIZE)).flatten(1)
    last = context - (pages_per_req - 1) * PAGE_SIZE
    return PagedLayout(
        req_to_token=slots.to(torch.int32).to(device),
        req_pool_indices=torch.arange(batch, device=device),
        seq_lens=torch.full((batch,), context, dtype=torch.int32, device=device),
        kv_indptr=(torch.arange(batch + 1) * pages_per_req).to(torch.int32).to(device),
        kv_indices=pages.flatten().to(torch.int32).to(device),
        kv_last_page_len=torch.full((batch,), last, dtype=torch.int32, device=device),
        num_pages=num_pages,
    )


def _kv_caches(layout: PagedLayout, heads: tuple[int, int, int], dtype: torch.dtype, copies: int, device):
    _, num_kv_heads, head_dim = heads
    shape = (layout.num_pages * PAGE_SIZE, num_kv_heads, head_dim)
    return [
        (torch.randn(shape, dtype=dtype, device=device), torch.randn(shape, dtype=dtype, device=device))
        for _ in range(copies)
    ]


def _flashinfer_workspace(device: torch.device) -> torch.Tensor:
    return torch.empty(256 << 20, dtype=torch.uint8, device=device)


def _paged_view(cache: torch.Tensor) -> torch.Tensor:
    """[slots, Hk, D] as FlashInfer's NHD pages [pages, PAGE_SIZE, Hk, D]."""
    return cache.view(-1, PAGE_SIZE, *cache.shape[1:])


def decode_impls(batch: int, context: int, heads: tuple[int, int, int], dtype: torch.dtype, device, gen):
    """Implementations of one decode-attention case and the bytes a call must move."""
    num_q_heads, num_kv_heads, head_dim = heads
    layout = paged_layout(batch, context, device, gen)
    kv_bytes = 2 * batch * context * num_kv_heads * head_dim * dtype.itemsize
    caches = _kv_caches(layout, heads, dtype, _layer_copies(kv_bytes, device), device)
    q = torch.randn(batch, num_q_heads, head_dim, dtype=dtype, device=device)
    scaling = head_dim**-0.5
    work = kv_bytes + 2 * q.numel() * dtype.itemsize

    def with_kernel(module: str):
        """(one call per KV copy, the first copy's output) of `module`'s paged_decode_attention."""
        paged_decode_attention = importlib.import_module(module).paged_decode_attention

        def call(k, v):
            return paged_decode_attention(
                q,
                k,
                v,
                layout.req_to_token,
                layout.req_pool_indices,
                layout.seq_lens,
                scaling=scaling,
                logit_cap=0.0,
                sliding_window=-1,
            )

        return [functools.partial(call, k, v) for k, v in caches], call(*caches[0])

    def radixc_triton():
        return with_kernel("radixc.ops.triton.attention_decode")

    def native():
        return with_kernel("radixc.ops.native.attention")

    def flashinfer(use_tensor_cores: bool):
        def setup():
            fi = importlib.import_module("flashinfer")
            wrapper = fi.BatchDecodeWithPagedKVCacheWrapper(
                _flashinfer_workspace(device),
                "NHD",
                use_cuda_graph=True,
                use_tensor_cores=use_tensor_cores,
                paged_kv_indptr_buffer=layout.kv_indptr.clone(),
                paged_kv_indices_buffer=layout.kv_indices.clone(),
                paged_kv_last_page_len_buffer=layout.kv_last_page_len.clone(),
            )
            wrapper.plan(
                layout.kv_indptr,
                layout.kv_indices,
                layout.kv_last_page_len,
                num_q_heads,
                num_kv_heads,
                head_dim,
                PAGE_SIZE,
                q_data_type=dtype,
                kv_data_type=dtype,
                sm_scale=scaling,
            )

            def call(k, v):
                return wrapper.run(q, (_paged_view(k), _paged_view(v)))

            return [functools.partial(call, k, v) for k, v in caches], call(*caches[0])

        return setup

    impls = [
        Impl("radixc-triton", radixc_triton),
        Impl("flashinfer", flashinfer(False), peer=True),
        Impl("flashinfer-tc", flashinfer(True), peer=True),
    ]
    if batch * context <= NATIVE_MAX_TOKENS:
        impls.append(Impl("native", native, capturable=False))
    return impls, work


def _extend_flops(batch: int, prefix: int, new: int, heads: tuple[int, int, int]) -> float:
    """QK^T and PV FLOPs of causal extend attention: query i of a request sees prefix + i + 1 keys."""
    num_q_heads, _, head_dim = heads
    keys_seen = new * prefix + new * (new + 1) / 2
    return batch * num_q_heads * 2 * (2 * head_dim) * keys_seen


def extend_impls(batch: int, prefix: int, new: int, heads, dtype, device, gen):
    """Implementations of one extend-attention case (the new tokens' K/V already in the cache) and its FLOPs."""
    num_q_heads, num_kv_heads, head_dim = heads
    context = prefix + new
    layout = paged_layout(batch, context, device, gen)
    ((k_cache, v_cache),) = _kv_caches(layout, heads, dtype, 1, device)
    q = torch.randn(batch * new, num_q_heads, head_dim, dtype=dtype, device=device)
    prefix_lens = torch.full((batch,), prefix, dtype=torch.int32, device=device)
    new_lens = torch.full((batch,), new, dtype=torch.int32, device=device)
    start_loc = torch.arange(batch, dtype=torch.int32, device=device) * new
    scaling = head_dim**-0.5
    args = (
        q,
        k_cache,
        v_cache,
        layout.req_to_token,
        layout.req_pool_indices,
        layout.seq_lens,
        prefix_lens,
        new_lens,
        start_loc,
    )
    kwargs = dict(scaling=scaling, causal=True, logit_cap=0.0, sliding_window=-1)

    def radixc_triton():
        from radixc.ops.triton.attention_extend import paged_extend_attention

        call = functools.partial(paged_extend_attention, *args, **kwargs)
        return [call], call()

    def native():
        from radixc.ops.native.attention import paged_attention

        call = functools.partial(paged_attention, *args, **kwargs)
        return [call], call()

    def flashinfer():
        fi = importlib.import_module("flashinfer")
        qo_indptr = (torch.arange(batch + 1, dtype=torch.int32) * new).to(device)
        wrapper = fi.BatchPrefillWithPagedKVCacheWrapper(
            _flashinfer_workspace(device),
            "NHD",
            use_cuda_graph=True,
            qo_indptr_buf=qo_indptr.clone(),
            paged_kv_indptr_buf=layout.kv_indptr.clone(),
            paged_kv_indices_buf=layout.kv_indices.clone(),
            paged_kv_last_page_len_buf=layout.kv_last_page_len.clone(),
        )
        wrapper.plan(
            qo_indptr,
            layout.kv_indptr,
            layout.kv_indices,
            layout.kv_last_page_len,
            num_q_heads,
            num_kv_heads,
            head_dim,
            PAGE_SIZE,
            causal=True,
            sm_scale=scaling,
            q_data_type=dtype,
            kv_data_type=dtype,
        )

        def call():
            return wrapper.run(q, (_paged_view(k_cache), _paged_view(v_cache)))

        return [call], call()

    impls = [Impl("radixc-triton", radixc_triton), Impl("flashinfer", flashinfer, peer=True)]
    if batch * context <= NATIVE_MAX_TOKENS // 4:
        impls.append(Impl("native", native, capturable=False))
    return impls, _extend_flops(batch, prefix, new, heads)


# ---------------------------------------------------------------------------------------------------------------
# Gated DeltaNet cases


def _gdn_inputs(num_tokens: int, heads: tuple[int, int, int], dtype: torch.dtype, device):
    """q, k, v [T, H, D] in dtype; g (log-decay, < 0) and beta [T, Hv] float32, as radixc's gating makes them."""
    num_k_heads, num_v_heads, dim = heads

    def randn(*shape):
        return torch.randn(*shape, device=device)

    q = randn(num_tokens, num_k_heads, dim).to(dtype)
    k = randn(num_tokens, num_k_heads, dim).to(dtype)
    v = randn(num_tokens, num_v_heads, dim).to(dtype)
    g = torch.nn.functional.logsigmoid(randn(num_tokens, num_v_heads) + 4.0)
    beta = torch.sigmoid(randn(num_tokens, num_v_heads))
    return q, k, v, g, beta


def _fla_module():
    return importlib.import_module("fla.ops.gated_delta_rule")


def gdn_prefill_impls(num_reqs: int, length: int, dtype, device, heads: tuple[int, int, int] = GDN_HEADS):
    """Implementations of one GDN chunked-prefill case and its nominal FLOPs.

    FLOPs of the chunked algorithm (chunk C = 64) per token and head: 2 (3 C Dk + 2 C Dv + 3 Dk Dv) — the
    intra-chunk K K^T, Q K^T and W products, the U_v and scores-times-U products, and three state products.
    """
    num_tokens = num_reqs * length
    _, num_v_heads, dim = heads
    q, k, v, g, beta = _gdn_inputs(num_tokens, heads, dtype, device)
    state = torch.randn(num_reqs + 1, num_v_heads, dim, dim, device=device) * 0.1
    initial = state.clone()  # every call of every implementation starts from these states
    slots = torch.arange(1, num_reqs + 1, device=device)
    lens = torch.full((num_reqs,), length, dtype=torch.int32, device=device)
    start_loc = torch.arange(num_reqs, dtype=torch.int32, device=device) * length
    has_initial = torch.ones(num_reqs, dtype=torch.bool, device=device)
    scale = dim**-0.5
    chunk = 64
    flops = num_tokens * num_v_heads * 2 * (3 * chunk * dim + 2 * chunk * dim + 3 * dim * dim)
    args = (q, k, v, g, beta, state, slots, start_loc, lens, has_initial)

    def radixc(module: str):
        def setup():
            rule = importlib.import_module(module).chunk_gated_delta_rule

            def call():
                state.copy_(initial)  # timed too: one read and write of the states, small next to the rule
                return rule(*args, scale=scale)

            return [call], call()

        return setup

    def fla_chunk():
        rule = _fla_module().chunk_gated_delta_rule
        cu_seqlens = torch.arange(num_reqs + 1, dtype=torch.int64, device=device) * length
        initial_per_req = initial[slots]
        beta_in = beta.to(dtype)  # as models pass it (sigmoid of a projection in the model dtype)

        def call():
            out, _ = rule(
                q=q[None],
                k=k[None],
                v=v[None],
                g=g[None],
                beta=beta_in[None],
                scale=scale,
                initial_state=initial_per_req,
                output_final_state=True,
                use_qk_l2norm_in_kernel=True,
                cu_seqlens=cu_seqlens,
            )
            return out[0]

        return [call], call()

    impls = [
        Impl("radixc-triton", radixc("radixc.ops.triton.gdn_chunk")),
        Impl("fla-chunk", fla_chunk, peer=True),
    ]
    if num_tokens <= 8192:
        impls.append(Impl("native", radixc("radixc.ops.native.gdn"), capturable=False))
    return impls, flops


def gdn_decode_impls(batch: int, dtype, device, heads: tuple[int, int, int] = GDN_HEADS):
    """Implementations of one GDN recurrent-decode case and the bytes a step must move (state read + written)."""
    _, num_v_heads, dim = heads
    q, k, v, g, beta = _gdn_inputs(batch, heads, dtype, device)
    state_bytes = batch * num_v_heads * dim * dim * 4
    copies = _layer_copies(2 * state_bytes, device)
    states = [torch.randn(batch + 1, num_v_heads, dim, dim, device=device) * 0.1 for _ in range(copies)]
    pristine = states[0].clone()  # the check call of every implementation starts from these
    slots = torch.arange(1, batch + 1, device=device)
    scale = dim**-0.5
    work = 2 * state_bytes + 4 * q.numel() * dtype.itemsize

    def radixc(module: str):
        def setup():
            rule = importlib.import_module(module).recurrent_gated_delta_rule
            calls = [functools.partial(rule, q, k, v, g, beta, s, slots, scale=scale) for s in states]
            return calls, rule(q, k, v, g, beta, pristine.clone(), slots, scale=scale)

        return setup

    def fla_recurrent():
        rule = _fla_module().fused_recurrent_gated_delta_rule
        initials = [s[slots] for s in states]
        beta_in = beta.to(dtype)

        def call(initial):
            out, _ = rule(
                q=q[:, None],
                k=k[:, None],
                v=v[:, None],
                g=g[:, None],
                beta=beta_in[:, None],
                scale=scale,
                initial_state=initial,
                output_final_state=True,
                use_qk_l2norm_in_kernel=True,
            )
            return out[:, 0]

        return [functools.partial(call, s) for s in initials], call(pristine[slots])

    impls = [
        Impl("radixc-triton", radixc("radixc.ops.triton.gdn_recurrent")),
        Impl("fla-recurrent", fla_recurrent, peer=True),
        Impl("native", radixc("radixc.ops.native.gdn")),
    ]
    return impls, work


# ---------------------------------------------------------------------------------------------------------------
# running


def _short_error(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".splitlines()[0]
    return text[:160]


def _rel_diff(out: torch.Tensor, reference: torch.Tensor | None) -> float | None:
    if reference is None or out.shape != reference.shape:
        return None
    ref = reference.float()
    return ((out.float() - ref).norm() / ref.norm().clamp_min(1e-12)).item()


def run_case(family: str, case: str, impls: list[Impl], work: float, unit: str, budget_s: float) -> list[Row]:
    """Measure every implementation of one case; a failure is recorded in its row and the others still run."""
    rows, reference = [], None
    for impl in impls:
        row = Row(family, case, impl.name, work, unit)
        rows.append(row)
        try:
            calls, out = impl.setup()
            torch.cuda.synchronize()
            if impl.name == "radixc-triton":
                reference = out
            else:
                row.rel_diff = _rel_diff(out, reference)
            row.plain_us = time_plain(calls, budget_s)
            if impl.capturable:
                row.graph_us = time_graph(calls, budget_s)
            else:
                row.error = "graph: not capturable (reads sizes on the host)"
        except Exception as err:  # one row's failure (missing library, API mismatch) is data
            row.error = _short_error(err)
            torch.cuda.synchronize()
        finally:
            torch.cuda.empty_cache()
    _fill_ratios(rows)
    return rows


def _fill_ratios(rows: list[Row]) -> None:
    """Each row's time over the best peer's (FlashInfer / fla) in the same mode: < 1 is faster than the peer."""
    peers = [r for r in rows if r.impl.startswith(("flashinfer", "fla"))]
    for mode in ("plain_us", "graph_us"):
        times = [getattr(r, mode) for r in peers if getattr(r, mode) is not None]
        if not times:
            continue
        best = min(times)
        for row in rows:
            value = getattr(row, mode)
            if value is not None:
                setattr(row, "ratio_" + mode.removesuffix("_us"), value / best)


def _attention_grid(quick: bool) -> tuple[list, list]:
    decode = [("llama3-8b", b, c) for b, c in QUICK_DECODE] + [
        ("qwen3-32b", 1, 4096),
        ("qwen3-32b", 64, 4096),
    ]
    extend = [("llama3-8b", *shape) for shape in QUICK_EXTEND]
    if not quick:
        decode = [(name, b, c) for name in ATTENTION_HEADS for b, c in FULL_DECODE]
        extend = [(name, *shape) for name in ATTENTION_HEADS for shape in FULL_EXTEND]
    return decode, extend


def _fits(batch: int, context: int, heads: tuple[int, int, int]) -> bool:
    return 2 * batch * context * heads[1] * heads[2] * 2 <= MAX_KV_BYTES


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """Every selected family over the quick or full grid; returns the JSON report."""
    if not torch.cuda.is_available():
        raise NoCudaError(
            "benchmarks/kernels.py needs a CUDA device, and torch.cuda.is_available() is False "
            f"(torch {torch.__version__}); run it on the GPU machine"
        )
    device = torch.device("cuda")
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    gen = torch.Generator().manual_seed(args.seed)
    budget = 0.02 if args.quick else 0.1
    started = time.perf_counter()
    ceilings = measure_ceilings(device)
    rows: list[Row] = []
    decode, extend = _attention_grid(args.quick)

    def record(family: str, case: str, build: Callable[[], tuple[list[Impl], float]], unit: str) -> None:
        torch.manual_seed(args.seed)
        try:
            impls, work = build()
        except Exception as err:  # building inputs failed (e.g. out of memory): one row says so
            rows.append(Row(family, case, "all", 0.0, unit, error=_short_error(err)))
            return
        rows.extend(run_case(family, case, impls, work, unit, budget))
        print(f"[{time.perf_counter() - started:6.1f}s] {family} {case}", file=sys.stderr, flush=True)

    if "decode" in args.families:
        for name, batch, context in decode:
            heads = ATTENTION_HEADS[name]
            if _fits(batch, context, heads):
                build = functools.partial(decode_impls, batch, context, heads, dtype, device, gen)
                record("decode", f"{name} {batch}x{context}", build, "GB/s")
    if "extend" in args.families:
        for name, batch, prefix, new in extend:
            heads = ATTENTION_HEADS[name]
            build = functools.partial(extend_impls, batch, prefix, new, heads, dtype, device, gen)
            record("extend", f"{name} {batch}x(prefix {prefix} + {new})", build, "TFLOP/s")
    if "gdn-prefill" in args.families:
        for num_reqs, length in GDN_PREFILL:
            build = functools.partial(gdn_prefill_impls, num_reqs, length, dtype, device)
            record("gdn-prefill", f"qwen3.5-0.8b {num_reqs}x{length}", build, "TFLOP/s")
    if "gdn-decode" in args.families:
        for batch in QUICK_GDN_DECODE if args.quick else FULL_GDN_DECODE:
            build = functools.partial(gdn_decode_impls, batch, dtype, device)
            record("gdn-decode", f"qwen3.5-0.8b batch {batch}", build, "GB/s")

    return {
        "command": " ".join(["python", "benchmarks/kernels.py", *args.argv]),
        "device": torch.cuda.get_device_name(device),
        "versions": _versions(),
        "dtype": args.dtype,
        "page_size": PAGE_SIZE,
        "copy_gb_per_s": ceilings.copy_gb_per_s,
        "matmul_tflops": ceilings.matmul_tflops,
        "seconds": time.perf_counter() - started,
        "rows": [_row_json(r, ceilings) for r in rows],
    }


def _versions() -> dict[str, str]:
    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": str(torch.version.cuda),
    }
    for name in ("triton", "flashinfer", "fla"):
        try:
            versions[name] = getattr(importlib.import_module(name), "__version__", "unknown")
        except Exception as err:  # an import that fails is reported, not fatal
            versions[name] = f"not importable ({type(err).__name__})"
    return versions


def _row_json(row: Row, ceilings: Ceilings) -> dict[str, Any]:
    ceiling = ceilings.copy_gb_per_s if row.unit == "GB/s" else ceilings.matmul_tflops
    record = dataclasses.asdict(row)
    for mode in ("plain", "graph"):
        rate = row.rate(getattr(row, f"{mode}_us"))
        record[f"{mode}_rate"] = rate
        record[f"{mode}_pct_of_ceiling"] = None if rate is None else 100 * rate / ceiling
    return record


# ---------------------------------------------------------------------------------------------------------------
# reporting


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def render_markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: a header with the device and ceilings, one table per family."""
    versions = ", ".join(f"{k} {v}" for k, v in report["versions"].items())
    lines = [
        f"# radixc kernels on {report['device']}",
        "",
        f"`{report['command']}` — {versions}; {report['dtype']}, page size {report['page_size']}, pages in random "
        f"order. Ceilings measured in this run: copy {report['copy_gb_per_s']:.0f} GB/s, bf16 matmul "
        f"{report['matmul_tflops']:.0f} TFLOP/s. Total {report['seconds']:.0f} s.",
        "",
        "µs per call as plain launches / replayed in a CUDA graph; rate and % of ceiling from the graph time "
        "(the plain time where there is none); ratio = time / best FlashInfer-or-fla time in the same mode; "
        "diff = relative difference (by norm) of the output from radixc-Triton's.",
    ]
    for family in FAMILIES:
        rows = [r for r in report["rows"] if r["family"] == family]
        if not rows:
            continue
        unit = rows[0]["unit"]
        lines += [
            "",
            f"## {family}",
            "",
            f"| case | impl | plain µs | graph µs | {unit} | % of ceiling | ratio plain | ratio graph | diff | note |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in rows:
            mode = "graph" if r["graph_rate"] is not None else "plain"
            lines.append(
                f"| {r['case']} | {r['impl']} | {_fmt(r['plain_us'], '.1f')} | {_fmt(r['graph_us'], '.1f')} | "
                f"{_fmt(r[f'{mode}_rate'], '.1f')} | {_fmt(r[f'{mode}_pct_of_ceiling'], '.0f')} | "
                f"{_fmt(r['ratio_plain'], '.2f')} | {_fmt(r['ratio_graph'], '.2f')} | {_fmt(r['rel_diff'], '.1e')} | "
                f"{(r['error'] or '').replace('|', '/')} |"
            )
    return "\n".join(lines) + "\n"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="benchmarks/kernels.py",
        description=(
            "Time radixc's Triton attention and GDN kernels against FlashInfer, fla-core and the native twins, "
            "as plain launches and inside a CUDA graph, with the device's copy bandwidth and matmul ceilings "
            "measured in the same run. Needs CUDA."
        ),
    )
    parser.add_argument(
        "--quick", action="store_true", help="the issue-12 rows only (a few minutes on an H100/H200)"
    )
    parser.add_argument("--json", type=Path, metavar="PATH", help="write the full report as JSON")
    parser.add_argument("--markdown", type=Path, metavar="PATH", help="write the tables as Markdown")
    parser.add_argument(
        "--families",
        type=lambda text: [f for f in text.split(",") if f],
        default=list(FAMILIES),
        help=f"comma-separated subset of {','.join(FAMILIES)} (default: all)",
    )
    parser.add_argument("--dtype", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--seed", type=int, default=0)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    unknown = sorted(set(args.families) - set(FAMILIES))
    if unknown:
        parser.error(f"--families: unknown {', '.join(unknown)}; choose from {', '.join(FAMILIES)}")
    args.argv = argv
    try:
        report = run_benchmark(args)
    except NoCudaError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    markdown = render_markdown(report)
    print(markdown)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    if args.markdown:
        args.markdown.write_text(markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
