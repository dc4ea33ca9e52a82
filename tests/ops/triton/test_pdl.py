"""Programmatic dependent launch: where it is on, and (on a Hopper GPU) decode kernels (GEMV, RoPE + store,
attention, GDN conv and recurrent steps, which read weights and their layer's states before their wait) and
Inductor's kernels launched with it give bit-for-bit the results of launches without it, replayed back to back
from a CUDA graph."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest
import torch
from torch._inductor.utils import run_and_get_code

import radixc.ops.linear  # noqa: F401  (defines radixc::small_batch_linear)
from radixc.engine.runner import compile_model
from radixc.ops import pdl
from radixc.ops.triton import paged_decode_attention, rotary_and_store_kv, small_batch_linear
from radixc.ops.triton._utils import pdl_launch


@pytest.fixture
def hopper(monkeypatch):
    """A CUDA device of compute capability 9 as far as radixc.ops.pdl can tell, GPU or not, RADIXC_PDL unset."""
    monkeypatch.setattr(pdl, "_supports_pdl", lambda index: True)
    monkeypatch.delenv(pdl.PDL_ENV, raising=False)
    return torch.device("cuda", 0)


def test_radixc_kernels_use_it_on_hopper_by_default_inductor_kernels_when_asked_for(hopper, monkeypatch):
    assert pdl.pdl_enabled(hopper)
    assert pdl.inductor_options(hopper) == {}
    assert pdl_launch(hopper) == {"USE_PDL": True, "launch_pdl": True}
    assert not pdl.pdl_enabled(torch.device("cpu"))
    assert pdl_launch(torch.device("cpu")) == {"USE_PDL": False, "launch_pdl": False}
    monkeypatch.setenv(pdl.PDL_ENV, "all")
    assert pdl.pdl_enabled(hopper)
    assert pdl.inductor_options(hopper) == {"triton.enable_pdl": True}
    assert pdl.inductor_options(torch.device("cpu")) == {}
    monkeypatch.setenv(pdl.PDL_ENV, "0")
    assert not pdl.pdl_enabled(hopper)
    assert pdl.inductor_options(hopper) == {}
    monkeypatch.setattr(pdl, "_supports_pdl", lambda index: False)  # an Ampere device
    monkeypatch.setenv(pdl.PDL_ENV, "all")
    assert not pdl.pdl_enabled(hopper)
    assert pdl.inductor_options(hopper) == {}


def test_a_setting_it_does_not_know_is_an_error(hopper, monkeypatch):
    monkeypatch.setenv(pdl.PDL_ENV, "yes")
    with pytest.raises(ValueError, match="RADIXC_PDL must be one of 0, 1, all, got 'yes'"):
        pdl.pdl_enabled(hopper)


def test_the_runner_compiles_with_inductor_pdl_only_when_asked_for(hopper, monkeypatch):
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: seen.append(kwargs) or fn)
    compile_model(lambda x: x, hopper)
    monkeypatch.setenv(pdl.PDL_ENV, "all")
    compile_model(lambda x: x, hopper)
    compile_model(lambda x: x, torch.device("cpu"))
    assert seen == [
        {"fullgraph": True, "options": {}},
        {"fullgraph": True, "options": {"triton.enable_pdl": True}},
        {"fullgraph": True, "options": {}},
    ]


needs_hopper = pytest.mark.skipif(
    not (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9),
    reason="programmatic dependent launch needs compute capability 9.0",
)


def _replayed(fn, *args):
    """fn(*args) run once (compiling and tuning), then captured in a CUDA graph and replayed: what the replay
    wrote."""
    fn(*args)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn(*args)
    for _ in range(3):
        graph.replay()
    torch.cuda.synchronize()
    return out.clone()


def _decode_chain(x, weights, caches, req_to_token, req_pool_indices, seq_lens, slots, positions, cos_sin):
    """Each kernel reading what the one before wrote: GEMVs, RoPE + KV store, split-KV attention, a GEMV."""
    k_cache, v_cache = caches
    batch, heads, head_dim = x.shape[0], k_cache.shape[1], k_cache.shape[2]
    h = x
    for weight in weights:
        h = small_batch_linear(h, weight)
    kv = h.view(batch, heads, head_dim)
    q = rotary_and_store_kv(
        positions, h, kv, kv, cos_sin, k_cache, v_cache, slots, head_size=head_dim, is_neox=True
    )
    attn = paged_decode_attention(
        q.view(batch, heads, head_dim),
        k_cache,
        v_cache,
        req_to_token,
        req_pool_indices,
        seq_lens,
        scaling=head_dim**-0.5,
        logit_cap=0.0,
        sliding_window=-1,
        num_kv_splits=4,
    )
    return small_batch_linear(attn.reshape(batch, heads * head_dim), weights[0])


@pytest.mark.gpu
@needs_hopper
def test_decode_kernels_under_pdl_give_the_results_of_plain_launches(monkeypatch):
    gen = torch.Generator(device="cuda").manual_seed(0)
    batch, heads, head_dim, context = 3, 4, 64, 300
    hidden = heads * head_dim

    def randn(*shape):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.bfloat16)

    weights = [randn(hidden, hidden) / hidden**0.5 for _ in range(12)]
    x = randn(batch, hidden)
    k_cache, v_cache = randn(batch * context, heads, head_dim), randn(batch * context, heads, head_dim)
    req_to_token = torch.arange(batch * context, device="cuda", dtype=torch.int32).view(batch, context)
    req_pool_indices = torch.tensor([2, 0, 1], device="cuda", dtype=torch.int32)
    seq_lens = torch.tensor([300, 17, 129], device="cuda", dtype=torch.int32)
    positions = (seq_lens - 1).long()
    slots = req_to_token[req_pool_indices.long(), positions]
    angles = torch.rand(context, head_dim // 2, generator=gen, device="cuda") * 6.3
    cos_sin = torch.cat([angles.cos(), angles.sin()], dim=1)

    from radixc.ops.triton import attention_decode, gemv

    # PDL, plain launches, and PDL with the attention letting o_proj start early and the GEMVs' L2 prefetch
    settings = {
        "1": {pdl.PDL_ENV: "1"},
        "0": {pdl.PDL_ENV: "0"},
        "early": {pdl.PDL_ENV: "1", attention_decode.EARLY_LAUNCH_ENV: "1", gemv.L2_PREFETCH_ENV: "1"},
    }
    results = {}
    for setting, env in settings.items():
        for name in (attention_decode.EARLY_LAUNCH_ENV, gemv.L2_PREFETCH_ENV):
            monkeypatch.delenv(name, raising=False)
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        caches = k_cache.clone(), v_cache.clone()
        out = _replayed(
            _decode_chain,
            x,
            weights,
            caches,
            req_to_token,
            req_pool_indices,
            seq_lens,
            slots,
            positions,
            cos_sin,
        )
        results[setting] = (out, *caches)
    for with_pdl, without, early in zip(results["1"], results["0"], results["early"], strict=True):
        assert torch.equal(with_pdl, without) and torch.equal(early, without)


@pytest.mark.gpu
@needs_hopper
def test_inductor_kernels_between_radixc_ops_under_pdl_give_the_results_of_plain_launches(monkeypatch):
    """RMSNorm-like Inductor kernels between GEMV ops, compiled as the runner compiles; the kernels wait on the
    GEMV before them and it on them."""

    def blocks(h, weights, norm_weight):
        for weight in weights:
            squares = h.float().pow(2).mean(-1, keepdim=True)
            normed = (h.float() * torch.rsqrt(squares + 1e-6)).to(h.dtype) * norm_weight
            h = h + torch.ops.radixc.small_batch_linear(normed, weight, None)
        return h

    gen = torch.Generator(device="cuda").manual_seed(1)
    hidden = 512
    weights = [
        torch.randn(hidden, hidden, generator=gen, device="cuda", dtype=torch.bfloat16) / hidden**0.5
        for _ in range(16)
    ]
    norm_weight = torch.rand(hidden, generator=gen, device="cuda", dtype=torch.bfloat16) + 0.5
    x = torch.randn(2, hidden, generator=gen, device="cuda", dtype=torch.bfloat16)
    results = {}
    for setting in ("all", "0"):
        monkeypatch.setenv(pdl.PDL_ENV, setting)
        torch._dynamo.reset()
        compiled = compile_model(blocks, x.device)
        no_caches = torch._inductor.config.patch(fx_graph_cache=False)
        with no_caches, torch._functorch.config.patch(enable_autograd_cache=False):
            _, code = run_and_get_code(compiled, x, weights, norm_weight)
        assert ("gdc_wait" in "\n".join(code)) == (setting == "all")
        results[setting] = _replayed(compiled, x, weights, norm_weight)
    torch._dynamo.reset()
    assert torch.equal(results["all"], results["0"])


def _gdn_steps(mixed, conv_weight, conv_state, ssm_state, slots, a, b, A_log, dt_bias, num_steps=3):
    """A GDN layer's decode steps back to back: each conv step reads the history the one two kernels before
    wrote, each recurrent step the state the one two kernels before wrote (the nearest a kernel reads, before
    its PDL wait, what another wrote)."""
    from radixc.ops.triton import causal_conv1d_decode, gated_recurrent_step

    batch, heads, dim = slots.shape[0], a.shape[-1], ssm_state.shape[-1]
    out = mixed
    for step in range(num_steps):
        qkv = causal_conv1d_decode(mixed[step], conv_weight, conv_state, slots)
        q, k, v = qkv.view(batch, 3, heads, dim).unbind(1)
        out = gated_recurrent_step(
            q, k, v, a[step], b[step], A_log, dt_bias, ssm_state, slots, scale=dim**-0.5
        )
    return out


@pytest.mark.gpu
@needs_hopper
def test_gdn_steps_under_pdl_give_the_results_of_plain_launches(monkeypatch):
    gen = torch.Generator(device="cuda").manual_seed(2)
    batch, heads, dim, steps = 3, 4, 64, 3

    def randn(*shape, dtype=torch.bfloat16):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=dtype)

    mixed = randn(steps, batch, 3 * heads * dim)
    conv_weight = randn(3 * heads * dim, 4) / 2
    conv_state, ssm_state = randn(5, 3 * heads * dim, 3), randn(5, heads, dim, dim, dtype=torch.float32)
    slots = torch.tensor([4, 1, 2], device="cuda", dtype=torch.int32)
    a, b = randn(steps, batch, heads), randn(steps, batch, heads)
    A_log, dt_bias = randn(heads, dtype=torch.float32), randn(heads, dtype=torch.float32)
    results = {}
    for setting in ("1", "0"):
        monkeypatch.setenv(pdl.PDL_ENV, setting)
        states = conv_state.clone(), ssm_state.clone()
        out = _replayed(_gdn_steps, mixed, conv_weight, *states, slots, a, b, A_log, dt_bias)
        results[setting] = (out, *states)
    for with_pdl, without in zip(results["1"], results["0"]):
        assert torch.equal(with_pdl, without)


PTX_PROBE = pathlib.Path(__file__).with_name("pdl_ptx_probe.py")


@pytest.fixture(scope="module")
def sm90_counts() -> dict[str, dict[str, int]]:
    """Per decode kernel (and variant), from its sm90 code: global loads and bulk L2 prefetches before its PDL
    wait, and L2 prefetches in all (compiled in a process without the Triton interpreter; no GPU needed)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(PTX_PROBE)], capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kernel", ["gdn_recurrent", "conv", "attention", "rope_kv_store"])
def test_what_no_kernel_just_before_writes_is_loaded_before_the_pdl_wait(sm90_counts, kernel):
    """Each kernel's sm90 code issues its prefetched loads (its layer's state, the step's inputs)
    before griddepcontrol.wait, where the thirteenth session's kernels, waiting first, issued none. (Triton 3.6,
    the GPU machine's, keeps loads in source order around its wait; 3.9 may also move independent loads above
    it, so there this checks the outcome, not the source order.)"""
    assert sm90_counts[kernel]["loads_before_wait"] > 0


@pytest.mark.parametrize(
    "variant, requests",
    [
        ("gemv_prefetch", 1),  # a program's rows are one run of weight bytes
        ("gemv_gated_prefetch", 2),  # gate rows and up rows
        ("gemv_split_k_prefetch", 32),  # a split walks part of each of its 32 rows: one request per row
        ("linear_rope_prefetch", 2),  # NeoX pairs: the first and second half of a head's rows
        ("linear_rope_gptj_prefetch", 1),  # GPT-J pairs are adjacent rows
    ],
)
def test_gemv_kernels_prefetch_their_weight_rows_into_l2_before_the_pdl_wait_only_when_asked(
    sm90_counts, variant, requests
):
    """With PREFETCH_L2 (`RADIXC_GEMV_L2_PREFETCH=1` on a PDL device) the GEMV kernels issue bulk L2 prefetches
    of their weight rows, all before griddepcontrol.wait, and still no global load there (x is the previous
    kernel's output); without it, none. ptxas accepts the code (the compile makes a cubin)."""
    counts = sm90_counts[variant]
    assert counts["l2_prefetches_before_wait"] == counts["l2_prefetches"] == requests
    assert counts["loads_before_wait"] == 0
    plain = sm90_counts["gemv" if variant.startswith("gemv") else "linear_rope"]
    assert plain["l2_prefetches"] == 0 and plain["loads_before_wait"] == 0


@pytest.mark.parametrize("kernel", ["attention", "merge"])
def test_decode_attention_lets_the_next_kernel_start_before_its_wait_only_when_asked(sm90_counts, kernel):
    """`RADIXC_DECODE_ATTENTION_EARLY_LAUNCH=1` moves the attention kernels' one launch_dependents before their
    griddepcontrol.wait; by default it comes after (a kernel lets the next start only once its own wait is
    over)."""
    assert sm90_counts[kernel]["launches"] == 1 and sm90_counts[kernel]["launches_before_wait"] == 0
    early = sm90_counts[f"{kernel}_early"]
    assert early["launches"] == 1 and early["launches_before_wait"] == 1


def test_early_launch_is_off_unless_asked_and_only_under_pdl(hopper, monkeypatch):
    from radixc.ops.triton import attention_decode

    monkeypatch.delenv(attention_decode.EARLY_LAUNCH_ENV, raising=False)
    assert attention_decode.launch_options(hopper) == {
        "USE_PDL": True,
        "launch_pdl": True,
        "EARLY_LAUNCH": False,
    }
    monkeypatch.setenv(attention_decode.EARLY_LAUNCH_ENV, "1")
    assert attention_decode.launch_options(hopper)["EARLY_LAUNCH"] is True
    assert attention_decode.launch_options(torch.device("cpu"))["EARLY_LAUNCH"] is False
    monkeypatch.setenv(pdl.PDL_ENV, "0")
    assert attention_decode.launch_options(hopper)["EARLY_LAUNCH"] is False
    monkeypatch.setenv(attention_decode.EARLY_LAUNCH_ENV, "yes")
    with pytest.raises(ValueError, match="RADIXC_DECODE_ATTENTION_EARLY_LAUNCH must be 0 or 1, got 'yes'"):
        attention_decode.launch_options(hopper)
