"""Sampler: top-k / top-p filtering matches a float64 reference, samples follow the filtered distribution,
greedy rows stay argmax, and a seeded row's draws do not depend on the rest of the batch."""

from __future__ import annotations

import pytest
import torch

from radixc.engine import sampling
from radixc.engine.request import SamplingParams
from radixc.engine.sampling import Sampler, filter_top_k_top_p


def reference_filtered_probs(
    logits: torch.Tensor, temperature: float, top_k: int, top_p: float
) -> torch.Tensor:
    """Float64 softmax(logits / T), restricted to the top-k tokens whose preceding mass is below top_p, renormed."""
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    order = probs.argsort(descending=True).tolist()
    kept, mass = torch.zeros_like(probs), 0.0
    for rank, token in enumerate(order):
        if rank > 0 and ((top_k > 0 and rank >= top_k) or mass >= top_p):
            break
        kept[token] = probs[token]
        mass += float(probs[token])
    return kept / kept.sum()


def test_top_k_top_p_filter_keeps_exactly_the_reference_tokens():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 50, generator=gen) * 2
    top_k = torch.tensor([50, 1, 5, 50, 10, 3, 50, 20])
    top_p = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.8, 0.99, 0.05, 0.3])
    filtered = filter_top_k_top_p(torch.softmax(logits, -1), top_k, top_p)
    for row in range(8):
        expected = reference_filtered_probs(logits[row], 1.0, int(top_k[row]), float(top_p[row]))
        assert torch.equal(filtered[row] > 0, expected > 0), row
        torch.testing.assert_close(
            filtered[row] / filtered[row].sum(), expected.float(), atol=1e-6, rtol=1e-5
        )


def test_samples_follow_the_temperature_top_k_top_p_distribution():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(12, generator=gen) * 1.5
    params = SamplingParams(temperature=0.7, top_k=6, top_p=0.9)
    draws = 20000
    tokens = Sampler()(logits.expand(draws, -1).contiguous(), [params] * draws, [None] * draws).tolist()
    frequency = torch.bincount(torch.tensor(tokens), minlength=12).double() / draws
    expected = reference_filtered_probs(logits, 0.7, 6, 0.9)
    assert torch.all(frequency[expected == 0] == 0)
    torch.testing.assert_close(frequency, expected, atol=0.015, rtol=0)


def test_greedy_rows_are_argmax_beside_sampled_rows():
    gen = torch.Generator().manual_seed(2)
    logits = torch.randn(6, 40, generator=gen)
    params = [SamplingParams(), SamplingParams(temperature=1.0)] * 3
    tokens = Sampler()(logits, params, [None] * 6).tolist()
    assert tokens[0::2] == logits[0::2].argmax(-1).tolist()


def test_seeded_row_draws_depend_only_on_its_seed_and_logits():
    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(5, 64, generator=gen)
    seeded = SamplingParams(temperature=1.0, seed=7)
    sampler = Sampler()

    def run(row_logits_batches, position):
        generator = torch.Generator().manual_seed(7)
        out = []
        for batch in row_logits_batches:
            params = [SamplingParams(temperature=1.0)] * batch.shape[0]
            params[position] = seeded
            generators = [None] * batch.shape[0]
            generators[position] = generator
            out.append(sampler(batch, params, generators)[position].item())
        return out

    steps = [torch.randn(64, generator=gen) for _ in range(10)]
    alone = run([s[None] for s in steps], 0)
    crowded = run([torch.cat([logits[:3], s[None], logits[3:]]) for s in steps], 3)
    assert alone == crowded
    assert len(set(alone)) > 1  # it really samples


def test_rows_without_top_k_or_top_p_skip_the_filter_and_race_the_full_distribution(monkeypatch):
    gen = torch.Generator().manual_seed(4)
    logits = torch.randn(3, 64, generator=gen)
    params = [SamplingParams(temperature=t, seed=s) for t, s in ((0.8, 1), (1.0, 2), (1.3, 3))]
    monkeypatch.setattr(
        sampling, "filter_top_k_top_p", lambda *_: pytest.fail("the filter ran without limits")
    )
    tokens = Sampler()(logits, params, [torch.Generator().manual_seed(p.seed) for p in params]).tolist()
    for row, p in enumerate(params):
        noise = torch.empty(64).exponential_(generator=torch.Generator().manual_seed(p.seed))
        probs = torch.softmax(logits[row].double() / p.temperature, dim=-1)
        assert tokens[row] == int((probs / noise.double()).argmax())
