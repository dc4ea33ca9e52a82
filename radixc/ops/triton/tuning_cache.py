"""Kernel tuning choices kept on disk beside Inductor's caches, so that a warm start does not time kernels again.

One JSON file per tuner, device kind and torch / triton version, under Inductor's cache directory
(TORCHINDUCTOR_CACHE_DIR): another GPU model or version tunes afresh, and an emptied compile cache (a cold start)
empties this too. A file that cannot be read is ignored (and rewritten); writes replace the file atomically, so
processes sharing it never read half a file (the last writer's entries win).
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
from pathlib import Path
from typing import Any

import torch
import triton
from torch._inductor.runtime.cache_dir_utils import cache_dir

logger = logging.getLogger("radixc.ops")


class TuningCache:
    """Tuned choices of one tuner (`name`): JSON values by string key, per device kind (e.g.
    `torch.cuda.get_device_name()`)."""

    def __init__(self, name: str):
        self.name = name
        self._loaded: dict[Path, dict[str, Any]] = {}

    def path(self, device_kind: str) -> Path:
        """The file for a kind of device under the current cache directory."""
        versions = f"torch{torch.__version__}-triton{triton.__version__}"
        stem = re.sub(r"[^A-Za-z0-9.-]+", "_", f"{self.name}-{device_kind}-{versions}")
        return Path(cache_dir()) / "radixc" / f"{stem}.json"

    def get(self, device_kind: str, key: str) -> Any:
        """The stored value for key on this kind of device (None when there is none)."""
        return self._entries(self.path(device_kind)).get(key)

    def put(self, device_kind: str, key: str, value: Any) -> None:
        """Store a JSON-serialisable value (not None), written through to disk; a write that fails is logged,
        not raised (the choice still holds in this process)."""
        path = self.path(device_kind)
        entries = self._entries(path)
        entries[key] = value
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            with tempfile.NamedTemporaryFile("w", dir=path.parent, suffix=".tmp", delete=False) as file:
                json.dump(entries, file, indent=0, sort_keys=True)
            os.replace(file.name, path)
        except OSError as err:
            logger.warning("tuning cache %s: cannot write %s: %s", self.name, path, err)

    def _entries(self, path: Path) -> dict[str, Any]:
        if path not in self._loaded:
            entries: dict[str, Any] = {}
            if path.is_file():
                try:
                    entries = json.loads(path.read_text())
                    if not isinstance(entries, dict):
                        raise ValueError(f"a JSON object expected, got {type(entries).__name__}")
                except (OSError, ValueError) as err:
                    logger.warning("tuning cache %s: ignoring unreadable %s: %s", self.name, path, err)
                    entries = {}
            self._loaded[path] = entries
        return self._loaded[path]
