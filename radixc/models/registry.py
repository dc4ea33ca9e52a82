"""Which model class serves a config.json (by `architectures`, then `model_type`), and building one."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

from radixc.models.bert import BertModel
from radixc.models.config import ModelConfig
from radixc.models.gemma2 import Gemma2ForCausalLM
from radixc.models.llama import LlamaForCausalLM, Qwen3ForCausalLM
from radixc.models.qwen3_5 import Qwen3_5ForCausalLM, Qwen3_5ForConditionalGeneration
from radixc.models.qwen3_next import Qwen3NextForCausalLM
from radixc.models.weights import CheckpointError

ARCHITECTURES: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": Qwen3ForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
    "Qwen3_5ForCausalLM": Qwen3_5ForCausalLM,
    "Qwen3_5ForConditionalGeneration": Qwen3_5ForConditionalGeneration,
    "Qwen3NextForCausalLM": Qwen3NextForCausalLM,
    "BertModel": BertModel,
}

# model_type -> architecture, for configs whose `architectures` is absent or names a head we do not serve
MODEL_TYPES: dict[str, str] = {
    "llama": "LlamaForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
    "qwen3_5_text": "Qwen3_5ForCausalLM",
    "qwen3_5": "Qwen3_5ForConditionalGeneration",
    "qwen3_next": "Qwen3NextForCausalLM",
    "bert": "BertModel",
}


def resolve_architecture(raw: Mapping[str, Any]) -> tuple[str, type[nn.Module]]:
    """The (architecture name, model class) for a config.json dict; CheckpointError naming it if unknown."""
    architectures = list(raw.get("architectures") or [])
    for name in architectures:
        if name in ARCHITECTURES:
            return name, ARCHITECTURES[name]
    model_type = raw.get("model_type")
    if model_type in MODEL_TYPES:
        name = MODEL_TYPES[model_type]
        return name, ARCHITECTURES[name]
    raise CheckpointError(
        f"unknown architecture {architectures or None} (model_type {model_type!r}); radixc serves "
        f"{sorted(ARCHITECTURES)}"
    )


def model_config(raw: Mapping[str, Any]) -> tuple[type[nn.Module], ModelConfig]:
    """Resolve the family of a config.json dict and parse it with that family's defaults."""
    architecture, model_cls = resolve_architecture(raw)
    return model_cls, model_cls.config_from_hf(raw, architecture)


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype) -> Iterator[None]:
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def build_model(
    model_cls: type[nn.Module], config: ModelConfig, dtype: torch.dtype, device: torch.device | str
) -> nn.Module:
    """Construct a model directly on `device` in `dtype`, parameters uninitialised, in eval mode."""
    if not dtype.is_floating_point:
        raise ValueError(f"model dtype must be floating point, got {dtype}")
    with torch.device(device), _default_dtype(dtype):
        model = model_cls(config)
    return model.eval()
