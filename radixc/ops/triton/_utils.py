"""Helpers shared by the Triton kernels: tile sizes, dot precision, soft-cap, ragged block maps and PDL."""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from radixc.ops.pdl import pdl_enabled


def pow2_block(n: int, minimum: int = 16) -> int:
    """Smallest power of two >= max(n, minimum): tiles are powers of two, tl.dot needs at least 16."""
    return max(minimum, triton.next_power_of_2(n))


def dot_precision(dtype: torch.dtype) -> str:
    """tl.dot precision for inputs of `dtype`: fp32 stays IEEE so results track the float32 native twins."""
    return "ieee" if dtype == torch.float32 else "tf32"


# stands for "no sliding window" in the attention kernels: wider than any context, still an int32
UNBOUNDED_WINDOW = 2**31 - 1


def kernel_window(sliding_window: int) -> int:
    """The window the attention kernels mask with: keys with q_pos - key < window (itself included)."""
    return sliding_window if sliding_window > 0 else UNBOUNDED_WINDOW


def check_last_dim_contiguous(op: str, **tensors: torch.Tensor) -> None:
    """The kernels address the last dim with unit stride; say which tensor breaks that."""
    for name, tensor in tensors.items():
        if tensor.stride(-1) != 1:
            raise ValueError(f"{op}: {name} must have a unit-stride last dim, got strides {tensor.stride()}")


def query_group_size(op: str, num_q_heads: int, num_kv_heads: int) -> int:
    """Query heads per kv head (GQA/MQA); query head h reads kv head h // group_size."""
    if num_kv_heads == 0 or num_q_heads % num_kv_heads != 0:
        raise ValueError(f"{op}: {num_q_heads} query heads are not a multiple of {num_kv_heads} kv heads")
    return num_q_heads // num_kv_heads


# added to the squared norm when q and k are L2-normalised over the head dim (as the native twin does)
L2NORM_EPS = 1e-6


def check_gdn_inputs(op: str, **tensors: torch.Tensor) -> None:
    """Checks the GDN kernels rely on: unit last-dim strides, whole k heads per v head, a float32 state."""
    check_last_dim_contiguous(op, **tensors)
    q, v, ssm_state = tensors["q"], tensors["v"], tensors["ssm_state"]
    num_k_heads, k_dim = q.shape[1:]
    num_v_heads, v_dim = v.shape[1:]
    if num_v_heads % num_k_heads != 0:
        raise ValueError(f"{op}: v has {num_v_heads} heads, not a multiple of q/k's {num_k_heads}")
    if ssm_state.dtype != torch.float32 or tuple(ssm_state.shape[1:]) != (num_v_heads, k_dim, v_dim):
        raise ValueError(
            f"{op}: expected ssm_state float32 [S, {num_v_heads}, {k_dim}, {v_dim}], "
            f"got {list(ssm_state.shape)} {ssm_state.dtype}"
        )


def ragged_grid_size(num_rows: int, num_reqs: int, block: int, at_least_one: bool = False) -> int:
    """A static upper bound on the blocks of `block` rows that ragged requests of `num_rows` rows in all
    need (the grid of a kernel that finds its block with `ragged_block_of`): no host sync on the lengths."""
    return (num_rows + num_reqs * (block - 1)) // block + (num_reqs if at_least_one else 0)


def lens_block(num_reqs: int) -> int:
    """The BLOCK_B tile `ragged_block_of` loads every request's length in: a power of two >= num_reqs, and at
    least 256, so that batches up to 256 requests share one compiled kernel instead of one per power of two."""
    return pow2_block(num_reqs, minimum=256)


@triton.jit
def ragged_block_of(
    pid, Lens, num_reqs, BLOCK: tl.constexpr, BLOCK_B: tl.constexpr, AT_LEAST_ONE: tl.constexpr
):
    """(request, block within it) of program `pid` in `ragged_block_map`'s order, found by the program itself
    from the lengths (one tile of BLOCK_B >= num_reqs), so a launch needs no block map built with torch ops.
    Past the last block the request is >= num_reqs: such a program must exit."""
    offs = tl.arange(0, BLOCK_B)
    lens = tl.load(Lens + offs, mask=offs < num_reqs, other=0)
    blocks = (lens + BLOCK - 1) // BLOCK
    if AT_LEAST_ONE:
        blocks = tl.where(offs < num_reqs, tl.maximum(blocks, 1), 0)
    ends = tl.cumsum(blocks, 0)
    request = tl.sum((ends <= pid).to(tl.int32), 0)
    first = tl.sum(tl.where(offs < request, blocks, 0), 0)
    return request, pid - first


def _blocks_per_request(lens: torch.Tensor, block: int, at_least_one: bool) -> torch.Tensor:
    blocks = (lens + block - 1) // block
    return blocks.clamp(min=1) if at_least_one else blocks


def ragged_block_map(
    lens: torch.Tensor, block: int, num_rows: int, *, at_least_one: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map program ids to (request, block of `block` rows) over ragged `lens` without a host sync.

    The grid is a static upper bound on the block count; programs past the last block get request index B and
    must exit. `at_least_one` gives empty requests one (empty) block too. Returns (block_req [P] int32,
    block_idx [P] int32).
    """
    num_reqs = lens.shape[0]
    num_programs = ragged_grid_size(num_rows, num_reqs, block, at_least_one)
    blocks = _blocks_per_request(lens, block, at_least_one)
    ends = torch.cumsum(blocks, 0)
    pids = torch.arange(num_programs, device=lens.device, dtype=ends.dtype)
    block_req = torch.searchsorted(ends, pids, right=True)
    starts = ends - blocks
    block_idx = pids - starts[block_req.clamp(max=max(num_reqs - 1, 0))]
    return block_req.to(torch.int32), block_idx.to(torch.int32)


def ragged_block_starts(lens: torch.Tensor, block: int, *, at_least_one: bool = False) -> torch.Tensor:
    """Program id of each request's first block in `ragged_block_map`'s order, [B] int32: lets a kernel that
    walks a request's blocks in sequence address per-block scratch that a block-parallel kernel also reads."""
    blocks = _blocks_per_request(lens, block, at_least_one)
    return (torch.cumsum(blocks, 0) - blocks).to(torch.int32)


@triton.jit
def soft_cap(x, cap):
    """cap * tanh(x / cap), with tanh(y) = 2 * sigmoid(2y) - 1 (no tanh in tl on every triton version)."""
    return cap * (2.0 * tl.sigmoid(2.0 * x / cap) - 1.0)


@triton.jit
def l2_normalize(x, eps):
    """x / sqrt(sum(x^2) + eps) along the last dim of a [rows, dim] float32 tile (masked columns hold 0)."""
    return x * tl.rsqrt(tl.sum(x * x, 1) + eps)[:, None]


# per device: arrival counters for kernels whose last program to finish a group reduces it (split-K GEMV, decode
# attention's merge). Zero between launches (each group's last program zeroes its counter), so one buffer serves
# every such launch in stream order; launches on two streams of one device at once would share counters (radixc
# runs a model's kernels on one stream).
_arrival_counters: dict[torch.device, torch.Tensor] = {}
MAX_ARRIVAL_GROUPS = 1 << 16


def arrival_counters(device: torch.device, groups: int, op: str) -> torch.Tensor:
    """The device's arrival counters, at least `groups` of them (allocated and zeroed on first use, which must
    not be during a CUDA-graph capture)."""
    if groups > MAX_ARRIVAL_GROUPS:
        raise ValueError(f"{op}: {groups} groups to count arrivals in, more than {MAX_ARRIVAL_GROUPS}")
    counters = _arrival_counters.get(device)
    if counters is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError(f"{op}: arrival counters first needed during a CUDA-graph capture")
        counters = torch.zeros(MAX_ARRIVAL_GROUPS, dtype=torch.int32, device=device)
        _arrival_counters[device] = counters
    return counters


def env_switch(name: str, default: bool) -> bool:
    """An on/off setting from the environment: `1` or `0`, `default` when unset; anything else is a ValueError
    naming the variable."""
    setting = os.environ.get(name)
    if setting is None:
        return default
    if setting not in ("0", "1"):
        raise ValueError(f"{name} must be 0 or 1, got {setting!r}")
    return setting == "1"


def pdl_launch(device: torch.device) -> dict[str, bool]:
    """Launch arguments of a decode kernel that uses programmatic dependent launch (radixc.ops.pdl): its
    `USE_PDL` constexpr and Triton's `launch_pdl` option, both on where `pdl_enabled(device)` holds."""
    enabled = pdl_enabled(device)
    return {"USE_PDL": enabled, "launch_pdl": enabled}


@triton.jit
def wait_for_previous_kernel(USE_PDL: tl.constexpr):
    """Under PDL: block until the kernel before this one has finished and its writes are visible. A kernel
    launched with PDL calls this before it writes anything, and before it reads what the kernel before it may
    write; reads of what only kernels two or more places back wrote (weights, a layer's own state from earlier
    steps, the step's inputs) may come first (`let_next_kernel_start` runs after this wait, so those kernels
    have finished; a kernel launched without PDL finishes before the next one starts)."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()


@triton.jit
def let_next_kernel_start(USE_PDL: tl.constexpr):
    """Under PDL: let the next kernel be scheduled (it still waits for this one to finish before it touches
    memory). Called after the last load of the main loop, so the next kernel's blocks do not take SM slots this
    kernel's later blocks need; only after `wait_for_previous_kernel`, so that a kernel never lets a later one
    start before the kernels before it have finished (the one exception, decode attention's
    `RADIXC_DECODE_ATTENTION_EARLY_LAUNCH`, says why it is safe there)."""
    if USE_PDL:
        tl.extra.cuda.gdc_launch_dependents()


# one thread of the program hands the TMA unit a bulk prefetch of [ptr, ptr + num_bytes), rounded out to the
# 16-byte bounds the instruction needs (sm_90+); $0 is a dummy result (inline asm must return one)
_BULK_PREFETCH_L2 = tl.constexpr(
    "{ .reg .pred p; .reg .u32 t; .reg .b64 a, e; .reg .u32 s;"
    " mov.u32 t, %tid.x; setp.eq.u32 p, t, 0;"
    " and.b64 a, $1, -16;"
    " cvt.u64.u32 e, $2; add.u64 e, e, $1; add.u64 e, e, 15; and.b64 e, e, -16; sub.u64 e, e, a;"
    " cvt.u32.u64 s, e;"
    " @p cp.async.bulk.prefetch.L2.global [a], s;"
    " mov.u32 $0, 0; }"
)


@triton.jit
def prefetch_to_l2(ptr, num_bytes):
    """Bring the `num_bytes` at `ptr` into L2 with one bulk request, which nothing waits for (Hopper or later
    GPUs only; never under the interpreter, which runs no PTX: callers gate it on a constexpr). A kernel launched
    with PDL issues it for its weights before `wait_for_previous_kernel`, so they stream in while the kernel
    before it drains."""
    tl.inline_asm_elementwise(
        _BULK_PREFETCH_L2, "=r,l,r", [ptr, num_bytes], dtype=tl.int32, is_pure=False, pack=1
    )
