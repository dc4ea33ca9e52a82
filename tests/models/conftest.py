"""Shared harness for the model tests: random HF checkpoints, pools and batches for a model, greedy runs,
and the Hugging Face float64 reference they are compared with."""

from __future__ import annotations

import dataclasses
import types

import pytest
import torch

from radixc.engine.backends import HybridAttnBackend, NativeBackend
from radixc.engine.batch_builder import BatchBuilder
from radixc.engine.memory_pool import GDNPool, KVPool, ReqToTokenPool

# max abs logit error seen per test, printed at the end of the session (pytest -s or -rA shows it)
MAX_ERRORS: dict[str, float] = {}


def pytest_terminal_summary(terminalreporter):
    if MAX_ERRORS:
        terminalreporter.write_sep("-", "radixc.models: max abs logit error vs transformers (float64)")
        for name, error in sorted(MAX_ERRORS.items()):
            terminalreporter.write_line(f"{name}: {error:.3g}")


@torch.no_grad()
def randomize_hf_model(model: torch.nn.Module, seed: int, std: float = 0.1) -> torch.nn.Module:
    """Deterministic weights of order one: N(0, std) matrices and biases, norm weights jittered around their
    HF init (so (1 + w) versus w norms are exercised), GDN decay A in [1, 16] and dt_bias around 1."""
    gen = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen, dtype=param.dtype)
        if name.endswith("A_log"):
            param.copy_(torch.empty_like(param).uniform_(1.0, 16.0, generator=gen).log())
        elif name.endswith("dt_bias"):
            param.copy_(1.0 + 0.1 * noise)
        elif "norm" in name.lower():
            param.add_(0.1 * noise)
        else:
            param.copy_(std * noise)
    return model.eval()


def save_hf_checkpoint(model: torch.nn.Module, path) -> None:
    model.save_pretrained(path)  # safetensors by default in transformers 5


@dataclasses.dataclass
class GreedyRun:
    """Per prompt: prefill logits `[L, V]` for every prompt row, decode logits `[steps, V]`, generated ids."""

    prefill: list[torch.Tensor]
    decode: list[torch.Tensor]
    tokens: list[list[int]]


def make_builder(model: torch.nn.Module, max_requests: int = 8, max_context: int = 128) -> BatchBuilder:
    """Pools sized from the model's kv_cache_spec, a native (or hybrid native) backend, page size 4."""
    spec = model.kv_cache_spec()
    dtype = next(model.parameters()).dtype
    kv_pool = None
    if spec.needs_kv_cache:
        kv_pool = KVPool(
            max_requests * max_context // 4 + 1,
            4,
            spec.num_layers,
            spec.num_kv_heads,
            spec.head_dim,
            dtype,
            v_head_dim=spec.v_head_dim,
            layer_ids=spec.full_attention_layer_ids,
        )
    backend, gdn_pool = NativeBackend(), None
    if spec.num_gdn_layers:
        gdn_pool = GDNPool(
            max_requests + 1,
            spec.num_gdn_layers,
            spec.conv_dim,
            spec.conv_kernel_size,
            spec.num_v_heads,
            spec.head_k_dim,
            spec.head_v_dim,
            dtype,
        )
        backend = HybridAttnBackend(NativeBackend(), NativeBackend(), spec.full_attention_layer_ids)
    return BatchBuilder(ReqToTokenPool(max_requests + 1, max_context), kv_pool, backend, gdn_pool)


def greedy_run(model: torch.nn.Module, prompts: list[list[int]], steps: int, forward=None) -> GreedyRun:
    """Prefill all prompts in one batch (logits of every row), then `steps` batched greedy decode steps."""
    forward = model if forward is None else forward
    builder = make_builder(model)
    requests = [builder.new_request() for _ in prompts]
    with torch.inference_mode():
        batch = builder.extend(requests, prompts, all_logits=True)
        logits = forward(batch.input_ids, batch.positions, batch)
        prefill = list(logits.split([len(p) for p in prompts]))
        last = [rows[-1] for rows in prefill]
        tokens: list[list[int]] = [[] for _ in prompts]
        decode: list[list[torch.Tensor]] = [[row] for row in last]
        for step in range(steps):
            next_ids = [int(row.argmax()) for row in last]
            for generated, token in zip(tokens, next_ids):
                generated.append(token)
            if step == steps - 1:
                break
            batch = builder.decode(requests, next_ids)
            last = list(forward(batch.input_ids, batch.positions, batch))
            for rows, row in zip(decode, last):
                rows.append(row)
    return GreedyRun(prefill, [torch.stack(rows) for rows in decode], tokens)


@torch.no_grad()
def hf_logits(hf_model: torch.nn.Module, ids: list[int]) -> torch.Tensor:
    """Logits `[L, V]` of one sequence from the Hugging Face model (no cache, no padding)."""
    return hf_model(torch.tensor([ids]), use_cache=False).logits[0]


def compare_with_hf(
    name: str, run: GreedyRun, hf_model: torch.nn.Module, prompts: list[list[int]], atol: float = 1e-4
) -> float:
    """Our prefill and decode logits against HF's on the same token histories; same greedy argmax."""
    hf64 = hf_model.double()
    worst = 0.0
    for prompt, prefill, decode, generated in zip(prompts, run.prefill, run.decode, run.tokens):
        reference = hf_logits(hf64, prompt + generated[:-1])
        ours = torch.cat([prefill, decode[1:]]).double()
        assert ours.shape == reference.shape
        worst = max(worst, (ours - reference).abs().max().item())
        # argmax only where HF's top-2 margin is clear of float32 noise
        top2 = reference.topk(2, dim=-1).values
        clear = (top2[:, 0] - top2[:, 1]) > 10 * atol
        assert torch.equal(ours.argmax(-1)[clear], reference.argmax(-1)[clear])
    record_error(name, worst)
    assert worst < atol, f"{name}: max abs logit error {worst:.3g} >= {atol}"
    return worst


@pytest.fixture
def prompts() -> list[list[int]]:
    """Three prompts of different lengths (longest 19 > the tiny Gemma2 window) with fresh random ids."""
    gen = torch.Generator().manual_seed(1234)
    return [torch.randint(3, 250, (n,), generator=gen).tolist() for n in (19, 6, 11)]


def record_error(name: str, error: float) -> None:
    MAX_ERRORS[name] = max(MAX_ERRORS.get(name, 0.0), error)


@pytest.fixture
def hf_harness():
    """The helpers above, for test modules (conftest functions are not importable under importlib mode)."""
    return types.SimpleNamespace(
        randomize=randomize_hf_model,
        save=save_hf_checkpoint,
        make_builder=make_builder,
        greedy_run=greedy_run,
        compare=compare_with_hf,
        record=record_error,
    )
