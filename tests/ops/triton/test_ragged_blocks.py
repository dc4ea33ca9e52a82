"""`ragged_block_of` (each program finds its request and block from the lengths) against the torch-built
`ragged_block_map` it replaces in the launchers: every program id of the static grid, empty requests included."""

from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from radixc.ops.triton._utils import lens_block, ragged_block_map, ragged_block_of, ragged_grid_size


@triton.jit
def _lookup_kernel(
    Lens, Request, Block, num_reqs, BLOCK: tl.constexpr, BLOCK_B: tl.constexpr, AT_LEAST_ONE: tl.constexpr
):
    pid = tl.program_id(0)
    request, block = ragged_block_of(pid, Lens, num_reqs, BLOCK, BLOCK_B, AT_LEAST_ONE)
    tl.store(Request + pid, request)
    tl.store(Block + pid, block)


@pytest.mark.parametrize("at_least_one", [False, True])
@pytest.mark.parametrize("block", [4, 16, 32])
@pytest.mark.parametrize("lens", [[5], [0, 7, 0, 33, 1], [16, 16, 15, 17], [0], [3] * 20])
def test_each_program_finds_the_request_and_block_of_the_torch_map(device, lens, block, at_least_one):
    gen = torch.Generator().manual_seed(len(lens) * block)
    # padding rows past the requests' tokens, as a packed batch may carry
    num_rows = sum(lens) + int(torch.randint(0, 5, (1,), generator=gen))
    lens_t = torch.tensor(lens, dtype=torch.int32, device=device)
    want_req, want_idx = ragged_block_map(lens_t, block, num_rows, at_least_one=at_least_one)
    programs = ragged_grid_size(num_rows, len(lens), block, at_least_one)
    assert programs == want_req.shape[0]
    request = torch.full((programs,), -1, dtype=torch.int32, device=device)
    index = torch.full((programs,), -1, dtype=torch.int32, device=device)
    _lookup_kernel[(programs,)](
        lens_t,
        request,
        index,
        len(lens),
        BLOCK=block,
        BLOCK_B=lens_block(len(lens)),
        AT_LEAST_ONE=at_least_one,
    )
    real = want_req < len(lens)  # programs past the last block only need a request >= num_reqs
    assert torch.equal(request[real], want_req[real])
    assert torch.equal(index[real], want_idx[real])
    assert bool((request[~real] >= len(lens)).all())
