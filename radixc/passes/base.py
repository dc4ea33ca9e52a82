"""RadixPass: a named, switchable Inductor post-grad pass whose uuid follows its source code."""

from __future__ import annotations

import hashlib
import inspect
import logging

import torch

logger = logging.getLogger("radixc.passes")


class RadixPass:
    """One graph rewrite. Subclasses implement `apply(graph) -> number of rewrites`."""

    name: str = "radix_pass"

    def apply(self, graph: torch.fx.Graph) -> int:
        raise NotImplementedError

    def __call__(self, graph: torch.fx.Graph) -> int:
        count = self.apply(graph)
        if count:
            graph.eliminate_dead_code()
            graph.lint()
        logger.debug("pass %s: %d rewrite(s)", self.name, count)
        return count

    def uuid(self) -> str:
        """Hash of the module that defines the pass: the FX graph cache invalidates when its code changes."""
        source = inspect.getsource(inspect.getmodule(type(self)))
        return hashlib.sha256(source.encode()).hexdigest()
