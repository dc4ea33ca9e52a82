"""load_model: a Hugging Face-format directory (config.json + safetensors, sharded or not) -> nn.Module.

Only safetensors are read (radixc never unpickles). The whole checkpoint is checked against the model before
any tensor is copied: unknown, missing and wrongly shaped tensors each raise a CheckpointError naming them.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from tqdm.auto import tqdm

from radixc.models.presets import build_preset, list_presets
from radixc.models.registry import build_model, model_config
from radixc.models.weights import CheckpointError, WeightSpec, collect_weight_specs

logger = logging.getLogger("radixc.models")

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


def load_model(
    path: str | Path, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> nn.Module:
    """Build the model a checkpoint directory describes and load its weights (dtype None: config.json's)."""
    path = Path(path)
    model_cls, config = model_config(read_hf_config(path))
    dtype = dtype or config.dtype or torch.float32
    model = build_model(model_cls, config, dtype, device or "cpu")
    load_weights(model, path)
    return model


def load_model_or_preset(
    model: str | Path, dtype: torch.dtype | None = None, device: torch.device | str | None = None
) -> nn.Module:
    """A checkpoint directory (loaded) or a preset name (random weights), on `device` in `dtype`."""
    if Path(model).is_dir():
        return load_model(model, dtype, device)
    if str(model) in list_presets():
        return build_preset(str(model), dtype, device)
    raise ValueError(
        f"model {str(model)!r} is neither a checkpoint directory nor a preset (presets: {list_presets()})"
    )


def read_hf_config(path: Path) -> dict[str, Any]:
    """config.json as a dict, eos ids of generation_config.json (if any) merged into `eos_token_id`."""
    raw = _read_json(path / "config.json")
    generation = path / "generation_config.json"
    if generation.is_file():
        eos = [*_as_list(raw.get("eos_token_id")), *_as_list(_read_json(generation).get("eos_token_id"))]
        raw["eos_token_id"] = list(dict.fromkeys(eos)) or None
    return raw


def _as_list(value: int | list[int] | None) -> list[int]:
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def _read_json(file: Path) -> dict[str, Any]:
    if not file.is_file():
        raise CheckpointError(f"{file}: not found (a Hugging Face-format checkpoint directory needs it)")
    try:
        return json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file}: not valid JSON ({err})") from err


def checkpoint_files(path: Path) -> tuple[list[Path], Mapping[str, str]]:
    """The safetensors files of a checkpoint and the index's tensor -> file map (empty when not sharded)."""
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = _read_json(index_file).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise CheckpointError(f"{index_file}: no 'weight_map'")
        files = [path / name for name in sorted(set(weight_map.values()))]
        for file in files:
            if not file.is_file():
                raise CheckpointError(f"{index_file}: shard {file.name} is missing from {path}")
        return files, weight_map
    single = path / "model.safetensors"
    if single.is_file():
        return [single], {}
    files = sorted(path.glob("*.safetensors"))
    if files:
        return files, {}
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in _PICKLE_SUFFIXES) if path.is_dir() else []
    if pickles:
        raise CheckpointError(
            f"{path}: only pickle weights {pickles}; radixc loads safetensors only (it never unpickles). "
            "Convert them to model.safetensors first."
        )
    raise CheckpointError(f"{path}: no model.safetensors, model.safetensors.index.json or *.safetensors")


def _open_shard(stack: contextlib.ExitStack, file: Path):
    """Open a safetensors file, turning a corrupted header or truncated file into a CheckpointError."""
    try:
        return stack.enter_context(safe_open(str(file), framework="pt", device="cpu"))
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f"{file}: corrupted or unreadable safetensors file ({err})") from err


def _first(names: list[str], limit: int = 8) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f", ... ({len(names)} in all)" if len(names) > limit else "")


def load_weights(model: nn.Module, path: str | Path) -> None:
    """Copy a checkpoint's tensors into `model` after checking names and shapes against its WeightSpecs."""
    path = Path(path)
    files, weight_map = checkpoint_files(path)
    renames = getattr(model, "checkpoint_prefix_renames", ())
    ignores = [re.compile(p) for p in getattr(model, "checkpoint_ignores", lambda: ())()]
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        # checkpoint name (after prefix renames) -> (file, handle, name in the file)
        sources: dict[str, tuple[Path, Any, str]] = {}
        for file in files:
            handle = _open_shard(stack, file)
            stored = set(handle.keys())
            for name in sorted(stored):
                key = _rename(name, renames)
                if key in sources:
                    raise CheckpointError(
                        f"{path}: tensor {name!r} is stored in both {sources[key][0].name} and {file.name}"
                    )
                if not any(p.search(key) for p in ignores):
                    sources[key] = (file, handle, name)
            listed = [n for n, f in weight_map.items() if f == file.name and n not in stored]
            if listed:
                raise CheckpointError(
                    f"{file}: corrupted shard, lacks tensors its index lists: {_first(listed)}"
                )
        specs = collect_weight_specs(model, set(sources))
        _check(path, sources, specs, type(model).__name__)
        params = dict(model.named_parameters())
        with torch.no_grad():
            for key in tqdm(sorted(sources), desc=f"Loading {path.name}", unit="tensor", disable=None):
                file, handle, name = sources[key]
                try:
                    tensor = handle.get_tensor(name)
                except (SafetensorError, OSError, ValueError) as err:
                    raise CheckpointError(f"{file}: cannot read tensor {name!r} ({err})") from err
                _copy_into(params[specs[key].param], specs[key], tensor)
    logger.info(
        "loaded %d tensors from %d file(s) of %s in %.1fs",
        len(sources),
        len(files),
        path,
        time.perf_counter() - start,
    )


def _rename(name: str, renames: tuple[tuple[str, str], ...]) -> str:
    for old, new in renames:
        if name.startswith(old):
            return new + name[len(old) :]
    return name


def _check(
    path: Path, sources: Mapping[str, tuple], specs: Mapping[str, WeightSpec], model_name: str
) -> None:
    """Raise a CheckpointError for unexpected, missing or wrongly shaped tensors (all listed)."""
    unexpected = [k for k in sources if k not in specs]
    if unexpected:
        raise CheckpointError(f"{path}: unexpected tensors for {model_name}: {_first(unexpected)}")
    missing = [k for k in specs if k not in sources]
    if missing:
        raise CheckpointError(f"{path}: missing tensors for {model_name}: {_first(missing)}")
    wrong = []
    for key, (file, handle, name) in sources.items():
        shape = tuple(handle.get_slice(name).get_shape())
        if shape != specs[key].shape:
            wrong.append(f"{name} in {file.name} has shape {list(shape)}, expected {list(specs[key].shape)}")
    if wrong:
        raise CheckpointError(f"{path}: wrongly shaped tensors for {model_name}: " + "; ".join(wrong[:8]))


def _copy_into(param: torch.Tensor, spec: WeightSpec, tensor: torch.Tensor) -> None:
    if spec.rows is not None:
        tensor = tensor[spec.rows]
    if spec.transpose:
        tensor = tensor.transpose(-1, -2)
    if spec.shard is not None:
        tensor = spec.shard.take(tensor)
    target = param[spec.index] if spec.index else param
    target.copy_(tensor.to(dtype=param.dtype))
