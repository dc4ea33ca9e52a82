"""`radixc::small_batch_linear`: a linear layer that runs radixc's Triton GEMV kernel when it has few rows.

Models call `F.linear`; the pass radixc.passes.lower_linear puts this op in its place in decode graphs on CUDA.
The row count is only known when the graph runs (one graph serves every batch size), so the op decides there:
up to `SMALL_BATCH_MAX_ROWS` rows it runs whichever of the Triton kernel's tiles and cuBLAS was timed fastest for
the shape on this device (radixc.ops.triton.gemv.tuned_linear), above that cuBLAS through `F.linear`. The CUDA
graph warm-up of each batch-size bucket does the timing; the captured graph keeps the choice.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from radixc.ops.library import define_op

# the most rows the Triton kernel serves (radixc.ops.triton.gemv.MAX_ROWS, kept here so that
# importing the op does not import triton)
SMALL_BATCH_MAX_ROWS = 32


def _small_batch_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    if x.shape[0] > SMALL_BATCH_MAX_ROWS:
        return F.linear(x, weight, bias)
    from radixc.ops.triton.gemv import tuned_linear

    return tuned_linear(x, weight, bias)


define_op(
    "small_batch_linear",
    "Tensor x, Tensor weight, Tensor? bias",
    "Tensor",
    _small_batch_linear,
    lambda x, weight, bias: x.new_empty(x.shape[0], weight.shape[0]),
)
