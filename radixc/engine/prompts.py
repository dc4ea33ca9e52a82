"""What users pass to `LLM.generate` / `encode`, made into token id lists the model can run.

A prompt is a str (tokenized), a sequence of integer ids, or a 1-D integer numpy array or torch tensor; a 2-D
array is a batch of rows. Anything else (floats, booleans, bytes) fails that prompt alone with a message naming
what was given. The tokenizer never pads or truncates: the engine packs requests without padding, and a prompt
past the context limit is an error for that prompt, not silently shortened.
"""

from __future__ import annotations

import dataclasses
import logging
import numbers
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer

from radixc.engine.request import SamplingParams
from radixc.models.weights import CheckpointError

logger = logging.getLogger("radixc.engine")

Prompt = str | Sequence[int] | np.ndarray | torch.Tensor


@dataclasses.dataclass(frozen=True)
class PromptIds:
    """One prompt's token ids, or (ids empty) the error that fails its request."""

    ids: list[int]
    error: str | None = None


def load_tokenizer(source: str | Path | Tokenizer) -> Tokenizer:
    """A tokenizer from a tokenizer.json path (CheckpointError naming an unreadable file) or object, with its
    padding and truncation off (a given object that pads or truncates is copied, not changed)."""
    if isinstance(source, Tokenizer):
        tokenizer = source
    elif isinstance(source, (str, Path)):
        file = Path(source)
        if not file.is_file():
            raise CheckpointError(f"{file}: tokenizer file not found")
        try:
            tokenizer = Tokenizer.from_file(str(file))
        except Exception as err:  # tokenizers raises a bare Exception for every parse error
            raise CheckpointError(f"{file}: unreadable tokenizer file ({err})") from err
    else:
        raise TypeError(
            f"tokenizer must be a tokenizer.json path or a tokenizers.Tokenizer, got {type(source).__name__}"
        )
    if tokenizer.padding is None and tokenizer.truncation is None:
        return tokenizer
    logger.info(
        "tokenizer: padding %s and truncation %s turned off (requests are packed, never padded; a "
        "prompt past the context limit fails)",
        tokenizer.padding,
        tokenizer.truncation,
    )
    tokenizer = Tokenizer.from_str(tokenizer.to_str()) if tokenizer is source else tokenizer
    tokenizer.no_padding()
    tokenizer.no_truncation()
    return tokenizer


def split_prompts(prompts: Prompt | Sequence[Prompt] | np.ndarray | torch.Tensor) -> list[object]:
    """The prompts of one call: a single prompt (a str, bytes, a flat sequence of numbers, a 1-D array) as a
    list of one, a 2-D array as its rows, a sequence of prompts as a list."""
    if isinstance(prompts, (str, bytes, bytearray)):
        return [prompts]
    if isinstance(prompts, (np.ndarray, torch.Tensor)):
        return list(prompts) if prompts.ndim == 2 else [prompts]
    if isinstance(prompts, Mapping) or not isinstance(prompts, Iterable):
        raise TypeError(
            "prompts must be a str, a sequence of token ids, a 1-D numpy array or torch tensor of ids, or a "
            f"list of those; got {type(prompts).__name__}"
        )
    items = list(prompts)
    return [items] if items and all(_is_scalar(item) for item in items) else items


def tokenize_prompts(
    prompts: Prompt | Sequence[Prompt], tokenizer: Tokenizer | None, vocab_size: int | None
) -> list[PromptIds]:
    """Each prompt's token ids, or its error (non-integer ids, ids outside the vocabulary); string prompts
    without a tokenizer are a ValueError for the whole call."""
    results = []
    for prompt in split_prompts(prompts):
        if isinstance(prompt, str):
            if tokenizer is None:
                raise ValueError(
                    "string prompts need a tokenizer (tokenizer.json in the checkpoint directory, or "
                    "LLM(tokenizer=...)); pass token id lists instead"
                )
            ids, error = tokenizer.encode(prompt).ids, None
        else:
            ids, error = _token_ids(prompt)
        error = error or vocab_error(ids, vocab_size)
        results.append(PromptIds([] if error else ids, error))
    return results


def vocab_error(ids: Sequence[int], vocab_size: int | None) -> str | None:
    """Why `ids` cannot be embedded (ids below 0 or, when the vocabulary size is known, at or above it)."""
    bad = sorted({t for t in ids if t < 0 or (vocab_size is not None and t >= vocab_size)})
    if not bad:
        return None
    return f"token ids {bad[:8]} are outside the vocabulary [0, {'?' if vocab_size is None else vocab_size})"


def params_per_prompt(
    sampling_params: SamplingParams | Sequence[SamplingParams] | None, count: int
) -> list[SamplingParams]:
    """One SamplingParams per prompt: the one given (default SamplingParams()) for all, or a list of `count`."""
    if sampling_params is None or isinstance(sampling_params, SamplingParams):
        return [sampling_params or SamplingParams()] * count
    if isinstance(sampling_params, (str, bytes, Mapping)) or not isinstance(sampling_params, Sequence):
        hint = " (build one: SamplingParams(**params))" if isinstance(sampling_params, Mapping) else ""
        raise TypeError(
            "sampling_params must be a SamplingParams or a list of them, one per prompt; "
            f"got {type(sampling_params).__name__}{hint}"
        )
    if len(sampling_params) != count:
        raise ValueError(f"got {len(sampling_params)} SamplingParams for {count} prompts")
    for index, params in enumerate(sampling_params):
        if not isinstance(params, SamplingParams):
            raise TypeError(f"sampling_params[{index}] must be a SamplingParams, got {type(params).__name__}")
    return list(sampling_params)


def _is_scalar(item: object) -> bool:
    """A single number (bool and numpy scalars included) or a 0-d tensor: an element of one flat prompt."""
    return isinstance(item, (numbers.Number, np.generic)) or (
        isinstance(item, torch.Tensor) and item.ndim == 0
    )


def _token_ids(prompt: object) -> tuple[list[int], str | None]:
    """(ids, None) for a prompt of integer token ids, else ([], what is wrong with it)."""
    if isinstance(prompt, (bytes, bytearray)):
        return [], (
            f"{type(prompt).__name__} {bytes(prompt[:16])!r} are not token ids: decode them to a str to "
            "tokenize, or pass a list of ints"
        )
    if isinstance(prompt, (np.ndarray, torch.Tensor)):
        kind = "numpy array" if isinstance(prompt, np.ndarray) else "torch tensor"
        integer = prompt.dtype.kind in "iu" if isinstance(prompt, np.ndarray) else _is_integer_tensor(prompt)
        if prompt.ndim != 1:
            return [], f"a prompt {kind} must be 1-D, got shape {list(prompt.shape)}"
        if not integer:
            return [], f"token ids must be integers, got a {kind} of {prompt.dtype}"
        return [int(t) for t in prompt.tolist()], None
    if isinstance(prompt, Mapping) or not isinstance(prompt, Iterable):
        return [], f"a prompt must be a str or a sequence of integer token ids, got {type(prompt).__name__}"
    ids = []
    for position, token in enumerate(prompt):
        if isinstance(token, torch.Tensor) and token.ndim == 0 and _is_integer_tensor(token):
            token = token.item()
        if isinstance(token, bool | np.bool_) or not isinstance(token, numbers.Integral):
            return (
                [],
                f"token ids must be integers, got {type(token).__name__} {token!r} at position {position}",
            )
        ids.append(int(token))
    return ids, None


def _is_integer_tensor(tensor: torch.Tensor) -> bool:
    return not (tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool)
