"""Suite-wide settings, applied before any test module imports radixc, triton or transformers.

- Without a GPU, Triton kernels run under its interpreter (TRITON_INTERPRET=1); triton reads the variable when a
  kernel is decorated, so it must be set before the first kernel module is imported, by any test. Tests marked
  `triton` (and everything under tests/ops/triton/) skip where Triton cannot run: no GPU and an interpreter that
  fails on loop bounds loaded from tensors (triton 3.6 with NumPy 2, the GPU machine's torch 2.11 on a CPU).
- The Hugging Face references run their torch code: fla and causal-conv1d are hidden from transformers, which
  would otherwise call their GPU kernels on CPU tensors wherever those packages are installed.
- One intra-op thread: tiny tensors gain nothing from more, and on a shared 2-core machine OpenMP threads
  contending with other processes make each op many times slower.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

for _package in ("fla", "causal_conv1d"):
    sys.modules.setdefault(_package, None)

_TRITON_TESTS = Path(__file__).parent / "ops" / "triton"


@functools.cache
def triton_unavailable_reason() -> str | None:
    """None when Triton kernels run here (a GPU, or a working interpreter), else why not."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return "triton is not installed"
    if torch.cuda.is_available():
        return None

    @triton.jit
    def count_to(n_ptr, out_ptr):
        total = 0
        for _ in range(0, tl.load(n_ptr)):
            total += 1
        tl.store(out_ptr, total)

    out = torch.zeros(1, dtype=torch.int32)
    try:
        count_to[(1,)](torch.tensor([3], dtype=torch.int32), out)
    except Exception as err:  # the interpreter's own failure, whatever its type
        return (
            f"no GPU, and triton {triton.__version__}'s CPU interpreter fails ({type(err).__name__}: {err})"
        )
    return None if int(out) == 3 else f"triton {triton.__version__}'s CPU interpreter computes wrongly"


def pytest_configure(config) -> None:
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items) -> None:
    for item in items:
        if _TRITON_TESTS in Path(item.fspath).parents:
            item.add_marker(pytest.mark.triton)
        if item.get_closest_marker("gpu") is not None and not torch.cuda.is_available():
            item.add_marker(pytest.mark.skip(reason="needs a CUDA device"))
        if item.get_closest_marker("triton") is not None and triton_unavailable_reason() is not None:
            item.add_marker(pytest.mark.skip(reason=f"Triton cannot run here: {triton_unavailable_reason()}"))


@pytest.fixture(autouse=True, scope="module")
def fresh_dynamo_per_module():
    """Each test module starts from empty Dynamo caches, so one module's compiles never change another's."""
    torch._dynamo.reset()
    yield
