"""Suite-wide settings, applied before any test module imports radixc or triton.

- Without a GPU, Triton kernels run under its interpreter (TRITON_INTERPRET=1); triton reads the variable when a
  kernel is decorated, so it must be set before the first kernel module is imported, by any test.
- One intra-op thread: tiny tensors gain nothing from more, and on a shared 2-core machine OpenMP threads
  contending with other processes make each op many times slower.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"


def pytest_configure(config) -> None:
    torch.set_num_threads(1)


@pytest.fixture(autouse=True, scope="module")
def fresh_dynamo_per_module():
    """Every model family shares CausalLM.forward, so compiles from many test modules would pile up in one code
    object's cache and hit Dynamo's recompile limit; each test module starts from an empty cache."""
    torch._dynamo.reset()
    yield
