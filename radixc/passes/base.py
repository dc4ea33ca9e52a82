"""RadixPass: a named, switchable Inductor post-grad pass whose uuid follows its source code."""

from __future__ import annotations

import hashlib
import inspect
import logging
import sys
import types

import torch

from radixc.passes import graph_utils

logger = logging.getLogger("radixc.passes")


class RadixPass:
    """One graph rewrite. Subclasses implement `apply(graph) -> number of rewrites`."""

    name: str = "radix_pass"
    # other pass modules whose matchers this pass calls: their source is part of its uuid
    helper_modules: tuple[types.ModuleType, ...] = ()

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
        """Hash of the pass's module, the modules it borrows matchers from and the shared pass helpers: the FX
        graph cache invalidates when any changes (a pass whose code changed under an old uuid would be skipped
        on a cache hit)."""
        digest = hashlib.sha256()
        modules = (inspect.getmodule(type(self)), *self.helper_modules, graph_utils, sys.modules[__name__])
        for module in modules:
            digest.update(inspect.getsource(module).encode())
        return digest.hexdigest()
