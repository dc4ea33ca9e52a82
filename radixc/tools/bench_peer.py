"""The peer for radixc-bench: the same model shape in Hugging Face transformers (random weights), decoding one
token per request with a static KV cache through `torch.compile(model.forward)` (`mode="reduce-overhead"` on CUDA),
as its docs recommend."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
from collections.abc import Mapping
from typing import Any

import torch

from radixc.tools.bench_timing import median, timed

logger = logging.getLogger("radixc.tools")

PEER_NAME = "transformers"


def peer_version() -> str | None:
    """transformers' version, or None when it is not installed."""
    if importlib.util.find_spec(PEER_NAME) is None:
        return None
    return importlib.metadata.version(PEER_NAME)


def error_text(err: BaseException) -> str:
    """The first line of an exception, with its type: what the table shows instead of a number."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0]}" if lines else type(err).__name__


class TransformersPeer:
    """A transformers LM built from a config.json-shaped dict, its forward compiled once for all runs."""

    def __init__(self, raw_config: Mapping[str, Any], dtype: torch.dtype, device: torch.device):
        from transformers import AutoConfig, AutoModelForCausalLM

        raw = dict(raw_config)
        config = AutoConfig.for_model(raw.pop("model_type"), **raw)
        with torch.device(device):
            self.model = AutoModelForCausalLM.from_config(config, dtype=dtype).eval()
        self.device = device
        self.attn_implementation = getattr(self.model.config, "_attn_implementation", None)
        # on CUDA with its graphs (cudagraph trees), as transformers' static-cache docs recommend
        self.compile_mode = "reduce-overhead" if device.type == "cuda" else "default"
        self.forward = torch.compile(self.model.forward, mode=self.compile_mode)

    @torch.inference_mode()
    def decode_ms(
        self, batch_size: int, context: int, warmup: int, steps: int, generator: torch.Generator
    ) -> float:
        """Median ms of a decode step of batch_size requests after an eager prefill of `context` tokens."""
        from transformers import StaticCache

        vocab = self.model.config.vocab_size
        cache = StaticCache(config=self.model.config, max_cache_len=context + warmup + steps)
        prompt = torch.randint(0, vocab, (batch_size, context), generator=generator).to(self.device)
        positions = torch.arange(context, device=self.device)
        self.model(
            input_ids=prompt,
            past_key_values=cache,
            cache_position=positions,
            use_cache=True,
            logits_to_keep=1,
        )
        seconds = []
        for step in range(warmup + steps):
            tokens = torch.randint(0, vocab, (batch_size, 1), generator=generator).tolist()

            def decode(tokens=tokens, position=context + step):
                # building the inputs on the device is part of a step, as the radixc batch build is
                input_ids = torch.tensor(tokens, device=self.device)
                cache_position = torch.tensor([position], device=self.device)
                return self.forward(
                    input_ids=input_ids, past_key_values=cache, cache_position=cache_position, use_cache=True
                )

            seconds.append(timed(decode, self.device)[1])
        return median(seconds[warmup:]) * 1e3


def build_peer(
    raw_config: Mapping[str, Any], dtype: torch.dtype, device: torch.device
) -> TransformersPeer | str:
    """The peer model, or the error text when transformers cannot build this family."""
    try:
        return TransformersPeer(raw_config, dtype, device)
    except Exception as err:  # any failure of the peer is a table entry, not the benchmark's failure
        logger.warning("transformers could not build %s: %s", raw_config.get("model_type"), error_text(err))
        logger.debug("transformers build failure", exc_info=True)
        return error_text(err)


def peer_decode_ms(
    peer: TransformersPeer | str,
    batch_size: int,
    context: int,
    warmup: int,
    steps: int,
    generator: torch.Generator,
) -> float | str:
    """The peer's decode ms/step, or the error text of its build or of this run."""
    if isinstance(peer, str):
        return peer
    try:
        return peer.decode_ms(batch_size, context, warmup, steps, generator)
    except Exception as err:
        logger.warning("transformers decode at batch %d failed: %s", batch_size, error_text(err))
        logger.debug("transformers decode failure", exc_info=True)
        return error_text(err)
