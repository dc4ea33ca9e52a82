"""Sampler: next tokens from logits on the device (greedy, temperature, top-k, top-p), per-request seeds.

Sampling uses the exponential race: argmax(p / E) with E ~ Exp(1) drawn per vocabulary entry picks token i with
probability p_i. Each seeded request draws its E from its own torch.Generator, so its tokens depend only on its
logits and its seed, never on which requests share the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from radixc.engine.queued_copy import queued_tensor
from radixc.engine.request import SamplingParams


def filter_top_k_top_p(probs: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Zero the probabilities outside each row's top-k and top-p nucleus (the most likely token always stays).

    probs `[B, V]`, top_k `[B]` int64 (V or more: no limit), top_p `[B]` float32 (1.0: no limit).
    """
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    rank = torch.arange(probs.shape[-1], device=probs.device)
    # a token stays when fewer than k tokens rank above it and the ones above hold less than p of the mass
    mass_above = sorted_probs.cumsum(dim=-1) - sorted_probs
    keep = (rank < top_k.unsqueeze(1)) & (mass_above < top_p.unsqueeze(1))
    keep[:, 0] = True
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs * keep)


class Sampler:
    """Picks one token per logits row according to each row's SamplingParams."""

    def __call__(
        self,
        logits: torch.Tensor,
        params: Sequence[SamplingParams],
        generators: Sequence[torch.Generator | None],
    ) -> torch.Tensor:
        """Tokens `[B]` (int64, on the logits' device, not waited for) for logits `[B, V]`; row i follows
        params[i], drawing from generators[i] (global RNG if None)."""
        greedy = logits.argmax(dim=-1)
        if all(p.greedy for p in params):
            return greedy
        device, vocab = logits.device, logits.shape[-1]
        temperature = queued_tensor(
            [p.temperature if p.temperature > 0 else 1.0 for p in params], torch.float32, device
        )
        probs = torch.softmax(logits.float() / temperature.unsqueeze(1), dim=-1)
        if any(0 < p.top_k < vocab or p.top_p < 1.0 for p in params):  # else the filter keeps every token
            top_k = queued_tensor([p.top_k if p.top_k > 0 else vocab for p in params], torch.int64, device)
            top_p = queued_tensor([p.top_p for p in params], torch.float32, device)
            probs = filter_top_k_top_p(probs, top_k, top_p)
        noise = self._exponential_noise(probs, params, generators)
        sampled = (probs / noise).argmax(dim=-1)
        is_greedy = queued_tensor([p.greedy for p in params], torch.bool, device)
        return torch.where(is_greedy, greedy, sampled)

    @staticmethod
    def _exponential_noise(probs, params, generators) -> torch.Tensor:
        """Exp(1) noise `[B, V]`: one draw from its own generator per seeded sampled row, global RNG otherwise."""
        noise = torch.empty_like(probs, dtype=torch.float32)
        unseeded = [i for i, (p, g) in enumerate(zip(params, generators)) if g is None or p.greedy]
        if unseeded:
            rows = queued_tensor(unseeded, torch.int64, probs.device)
            noise[rows] = torch.empty(len(unseeded), probs.shape[-1], device=probs.device).exponential_()
        for row, (p, generator) in enumerate(zip(params, generators)):
            if generator is not None and not p.greedy:
                noise[row].exponential_(generator=generator)
        # Exp(1) can round to 0 in float32; a zero would turn p / E into inf or nan
        return noise.clamp_min_(torch.finfo(torch.float32).tiny)
