"""RadixPass: a named, switchable Inductor post-grad pass whose uuid follows its source code."""

from __future__ import annotations

import hashlib
import inspect
import logging
import sys

import torch

from radixc.passes import graph_utils

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
        """Hash of the pass's module and the shared pass helpers: the FX graph cache invalidates when either
        changes (a pass whose code changed under an old uuid would be skipped on a cache hit)."""
        digest = hashlib.sha256()
        for module in (inspect.getmodule(type(self)), graph_utils, sys.modules[__name__]):
            digest.update(inspect.getsource(module).encode())
        return digest.hexdigest()
