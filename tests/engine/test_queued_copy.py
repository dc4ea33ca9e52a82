"""queued_tensor: the values on the device, and on CUDA without waiting for the kernels already queued."""

from __future__ import annotations

import time

import pytest
import torch

from radixc.engine.queued_copy import queued_tensor


def test_values_and_dtype_arrive():
    for dtype, values in ((torch.int64, [3, 1, 4]), (torch.float32, [0.5, 2.0]), (torch.bool, [True, False])):
        got = queued_tensor(values, dtype, torch.device("cpu"))
        assert got.dtype == dtype and got.tolist() == values


@pytest.mark.gpu
def test_a_cuda_copy_does_not_wait_for_queued_kernels():
    device = torch.device("cuda")
    queued_tensor([1], torch.int64, device)  # the pinned allocator's first block
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # ~1 s of one spinning kernel at GPU clocks
    start = time.perf_counter()
    copied = queued_tensor(list(range(64)), torch.int64, device)
    returned = time.perf_counter() - start
    assert returned < 0.1, f"queued_tensor waited {returned:.3f} s for the queued kernel"
    assert copied.tolist() == list(range(64))  # reading it waits, and finds the values
