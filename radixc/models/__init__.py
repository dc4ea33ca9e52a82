"""Model families, the Hugging Face checkpoint loader and random-weight presets."""

from radixc.models.config import ModelConfig
from radixc.models.loader import load_model, load_model_or_preset
from radixc.models.presets import build_preset, list_presets, preset_config
from radixc.models.weights import CheckpointError

__all__ = [
    "CheckpointError",
    "ModelConfig",
    "build_preset",
    "list_presets",
    "load_model",
    "load_model_or_preset",
    "preset_config",
]
