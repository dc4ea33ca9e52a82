"""Steps replayed from CUDA graphs captured around the compiled model: decode steps, one graph per batch-size
bucket, and short extend steps, one graph per token-count bucket.

A captured step's inputs live in static device buffers owned here, per token (ids, positions, KV slots, the
request row each slot is recorded in) and per request (row, length, prefix, new tokens, first new token, GDN slot,
logits row). Each step writes its batch into one pinned host buffer, copies it to the device in one non-blocking
copy and replays the graph of the smallest bucket that holds it. Every graph copies its logits into one buffer of
its set, so that a bucket keeps no logits memory of its own.

Padding. A decode batch's padding rows are request row 0 with one token at position 0 writing KV slot 0 and GDN
slot 0 (every pool reserves them for this) and a sequence length of the backend's fill value. An extend batch's
padding requests are empty (no token, no key), and its padding tokens belong to no request: they write KV slot 0,
and their rows carry values that no real row reads. Padded rows' logits are dropped.

Extend steps are captured because, uncaptured, a short one is host-bound (on a 1B model, ~11 ms of launches for
~1 ms of GPU work) and it is what a new request waits for. Their buckets stop at a token count past which the GPU
sets the pace; longer extend steps run the compiled model directly.

The captured callable is the compiled model itself (the step's KV slots are written to `req_to_token` just before,
outside the graph, so that backends planning on the host see them): what is replayed is exactly what Inductor
generated, after warm-up calls have compiled and autotuned. Without capture (`capture=False`, e.g. on the CPU) the
same static, padded batches run through the compiled model directly, which is how padding is tested without a GPU.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from radixc.engine.batch_builder import BatchBuilder, HostStep, RequestMemory
from radixc.forward_batch import ForwardBatch, ForwardMode
from radixc.ops.linear import SMALL_BATCH_MAX_ROWS

logger = logging.getLogger("radixc.engine")

# rows of the static buffers: one column per token, and one per request
_TOKEN_FIELDS = ("input_ids", "positions", "out_cache_loc", "token_rows")
_REQUEST_FIELDS = (
    "req_pool_indices",
    "seq_lens",
    "extend_prefix_lens",
    "extend_seq_lens",
    "extend_start_loc",
    "gdn_slots",
    "logits_indices",
)
_LENS, _START = _REQUEST_FIELDS.index("extend_seq_lens"), _REQUEST_FIELDS.index("extend_start_loc")

# the longest extend step captured by default: beyond it a 1B model's step is GPU-bound on an H100
DEFAULT_EXTEND_GRAPH_MAX_TOKENS = 2048


@dataclasses.dataclass(frozen=True, order=True)
class Bucket:
    """The shape of one captured step: packed tokens and requests."""

    num_tokens: int
    num_requests: int


def capture_batch_sizes(max_batch_size: int) -> list[int]:
    """The buckets decode batches are padded up to: 1, 2, 4, 8, then every multiple of 8, and the maximum."""
    sizes = [s for s in (1, 2, 4) if s < max_batch_size]
    sizes += list(range(8, max_batch_size, 8))
    return sizes + [max_batch_size]


def extend_token_buckets(max_tokens: int) -> list[int]:
    """The token counts extend steps are padded up to: powers of two from 16 below max_tokens, and max_tokens."""
    sizes, size = [], 16
    while size < max_tokens:
        sizes.append(size)
        size *= 2
    return sizes + [max_tokens]


class StepGraphs:
    """Static inputs, padding to buckets and, on CUDA, one captured graph per bucket, for the steps of one mode."""

    mode: ForwardMode
    # a padding request's column (request row 0); its extend_start_loc is set per step
    _padding_request: tuple[int, ...]
    # what the bucket sizes of `captured_sizes` count, for the log
    _size_name: str

    def __init__(
        self,
        forward: Callable[..., torch.Tensor],
        builder: BatchBuilder,
        buckets: Sequence[Bucket],
        capture: bool,
    ):
        self.forward, self.builder, self.capture_enabled = forward, builder, capture
        self.backend, self.device = builder.attn_backend, builder.device
        self.buckets = sorted(buckets)
        max_tokens = max(b.num_tokens for b in self.buckets)
        self.max_requests = max(b.num_requests for b in self.buckets)
        pin = self.device.type == "cuda"
        token_size = len(_TOKEN_FIELDS) * max_tokens
        self._host = torch.empty(
            token_size + len(_REQUEST_FIELDS) * self.max_requests, dtype=torch.int64, pin_memory=pin
        )
        self._static = torch.empty_like(self._host, device=self.device)
        # [fields, columns] views of both buffers; the host ones also as numpy arrays, written without torch
        self._host_tokens = self._host[:token_size].view(len(_TOKEN_FIELDS), max_tokens)
        self._host_requests = self._host[token_size:].view(len(_REQUEST_FIELDS), self.max_requests)
        self._tokens = self._static[:token_size].view(len(_TOKEN_FIELDS), max_tokens)
        self._requests = self._static[token_size:].view(len(_REQUEST_FIELDS), self.max_requests)
        self._token_rows, self._request_rows = self._host_tokens.numpy(), self._host_requests.numpy()
        self._copied = torch.cuda.Event() if pin else None
        self._batches: dict[Bucket, ForwardBatch] = {}
        self._graphs: dict[Bucket, torch.cuda.CUDAGraph] = {}
        self._logits: torch.Tensor | None = None  # every graph's logits, copied in by the graph
        self.capture_bytes = 0
        self.warmup_seconds = 0.0  # the uncaptured run before each capture: compiling, autotuning
        self.capture_seconds = 0.0  # recording and instantiating the graphs
        self.replays = 0  # steps replayed from a graph so far
        self._tuning_gathered = False  # `gather_tuning` has run

    def find_bucket(self, num_tokens: int, num_requests: int) -> Bucket | None:
        """The smallest bucket that holds a step of this many tokens and requests (None: none does)."""
        for bucket in self.buckets:
            if bucket.num_tokens >= num_tokens and bucket.num_requests >= num_requests:
                return bucket
        return None

    @property
    def captured_sizes(self) -> list[int]:
        """The captured buckets, by the size that names them (batch size or token count)."""
        return sorted(self._size(bucket) for bucket in self._graphs)

    def _size(self, bucket: Bucket) -> int:
        raise NotImplementedError

    def _batch(self, bucket: Bucket) -> ForwardBatch:
        """The ForwardBatch of a bucket: views of the first columns of the static buffers."""
        if bucket not in self._batches:
            token = dict(zip(_TOKEN_FIELDS, self._tokens[:, : bucket.num_tokens]))
            request = dict(zip(_REQUEST_FIELDS, self._requests[:, : bucket.num_requests]))
            self._batches[bucket] = ForwardBatch.create(
                forward_mode=self.mode,
                input_ids=token["input_ids"],
                positions=token["positions"],
                req_pool_indices=request["req_pool_indices"],
                seq_lens=request["seq_lens"],
                extend_prefix_lens=request["extend_prefix_lens"],
                extend_seq_lens=request["extend_seq_lens"],
                extend_start_loc=request["extend_start_loc"],
                out_cache_loc=token["out_cache_loc"],
                req_to_token_pool=self.builder.req_to_token_pool,
                token_to_kv_pool=self.builder.kv_pool,
                attn_backend=self.backend,
                gdn_pool=self.builder.gdn_pool,
                gdn_slots=request["gdn_slots"] if self.builder.gdn_pool is not None else None,
                logits_indices=request["logits_indices"] if self.mode.is_extend() else None,
                init_metadata=False,
            )
        return self._batches[bucket]

    def _run(self, bucket: Bucket) -> torch.Tensor:
        """What is captured: the compiled model on a bucket's batch."""
        batch = self._batch(bucket)
        return self.forward(batch.input_ids, batch.positions, batch)

    def _load(self, step: HostStep | None, bucket: Bucket) -> None:
        """Write a step (or only padding) into the pinned host buffer, and copy it to the static buffers at once."""
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy has left the host buffer
        num_tokens = num_requests = 0
        if step is not None:
            num_tokens, num_requests = len(step.token_ids), len(step.seq_lens)
            rows = step.token_rows or [0] * num_tokens
            self._token_rows[:, :num_tokens] = (step.token_ids, step.positions, step.out_cache_loc, rows)
            seq_lens, prefix = np.asarray(step.seq_lens), np.asarray(step.extend_prefix_lens)
            lens = seq_lens - prefix
            ends = np.cumsum(lens)
            gdn = step.gdn_slots if step.gdn_slots is not None else np.zeros_like(lens)
            columns = (step.req_pool_indices, seq_lens, prefix, lens, ends - lens, gdn, ends - 1)
            self._request_rows[:, :num_requests] = (
                columns  # through numpy: a fraction of torch.tensor's host time
            )
        self._token_rows[:, num_tokens : bucket.num_tokens] = 0
        padding = self._request_rows[:, num_requests : bucket.num_requests]
        padding[:] = np.asarray(self._padding_request)[:, None]
        # a padding request's tokens (one in decode, none in extend) follow the real ones, in order
        padding[_START] = num_tokens + np.arange(padding.shape[1]) * self._padding_request[_LENS]
        self._static.copy_(self._host, non_blocking=True)
        if self._copied is not None:
            self._copied.record()

    def _record_slots(self, bucket: Bucket) -> None:
        """Write the step's KV slots into req_to_token before the backend plans the step: a planner that reads
        the page table (FlashInfer) must see the page a new token opens (padding tokens write row 0's column 0)."""
        if self.builder.kv_pool is not None:
            rows, positions, slots = (
                self._tokens[_TOKEN_FIELDS.index(name), : bucket.num_tokens]
                for name in ("token_rows", "positions", "out_cache_loc")
            )
            table = self.builder.req_to_token_pool.req_to_token
            table.index_put_((rows, positions), slots.to(table.dtype))

    def _step(
        self, step: HostStep, bucket: Bucket, device_tokens: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Load a planned step into a bucket and run it (replayed when captured); logits of its requests' rows.
        `device_tokens` replace the step's input ids on the device (copied after the host buffer's copy)."""
        self._load(step, bucket)
        if device_tokens is not None:
            self._tokens[0, : device_tokens.shape[0]].copy_(device_tokens)
        self._record_slots(bucket)
        count = len(step.seq_lens)
        graph = self._graphs.get(bucket)
        if graph is None:
            return self._run(bucket)[:count]
        batch = self._batch(bucket)
        host_lens = self._host_requests[_REQUEST_FIELDS.index("seq_lens"), : bucket.num_requests]
        self.backend.init_forward_metadata_replay_cuda_graph(
            bucket.num_requests,
            batch.req_pool_indices,
            batch.seq_lens,
            int(host_lens.sum()),
            self.mode,
            host_lens,
        )
        # again after the backend's planning, which may stage through pinned host memory too: the next step,
        # planned while this one runs, writes host buffers only once the device has taken these
        self._copied.record()
        graph.replay()
        self.replays += 1
        return self._logits[:count]

    def _prepare_capture(self, bucket: Bucket) -> None:
        """Load a padding-only batch into a bucket and let the backend plan it for capture."""
        self._load(None, bucket)
        batch = self._batch(bucket)
        self.backend.init_forward_metadata_capture_cuda_graph(
            bucket.num_requests, bucket.num_tokens, batch.req_pool_indices, batch.seq_lens, self.mode
        )

    def gather_tuning(self) -> None:
        """Run the largest bucket, then the largest the small-batch GEMV serves, under `gathered_tuning`: the
        first run compiles the graph (and Inductor autotunes it at that size, as the warm-up runs go, largest
        first); the candidate tiles of every linear shape they meet (and of the smaller row classes) then compile
        in one round, in the background, while the engine goes on (to the next set's graph, to warm-up runs) until
        a warm-up run's tuning waits for them. Once per set; `capture` does it if not done yet."""
        if not self.capture_enabled or self._tuning_gathered:
            return
        from radixc.ops.triton.gemv import gathered_tuning  # capture runs on CUDA only: triton is there

        started = time.perf_counter()
        served = [bucket for bucket in self.buckets if bucket.num_tokens <= SMALL_BATCH_MAX_ROWS]
        with gathered_tuning():
            for bucket in sorted({self.buckets[-1], *served[-1:]}, reverse=True):
                self._prepare_capture(bucket)
                self._run(bucket)
        torch.cuda.synchronize(self.device)
        self._tuning_gathered = True
        self.warmup_seconds += time.perf_counter() - started

    def capture(self, progress: bool | None = None, pool: tuple | None = None) -> None:
        """Capture every bucket, largest first, into one memory pool (`pool`, shared with other graph sets, or a
        new one); logs the memory the graphs took."""
        if not self.capture_enabled:
            return
        before = torch.cuda.memory_reserved(self.device)
        pool = torch.cuda.graph_pool_handle() if pool is None else pool
        stream = torch.cuda.Stream(self.device)
        current = torch.cuda.current_stream(self.device)
        disable = None if progress is None else not progress
        description = f"Capturing {self.mode.value} CUDA graphs"
        self.gather_tuning()
        for bucket in tqdm(
            reversed(self.buckets), total=len(self.buckets), desc=description, disable=disable
        ):
            self._prepare_capture(bucket)
            stream.wait_stream(current)
            started = time.perf_counter()
            with torch.cuda.stream(stream):  # compile, autotune and allocate outside the capture
                logits = self._run(bucket)
            stream.synchronize()
            warmed = time.perf_counter()
            self.warmup_seconds += warmed - started
            current.wait_stream(stream)
            if self._logits is None:
                shape = (self.max_requests, logits.shape[1])
                self._logits = torch.empty(shape, dtype=logits.dtype, device=self.device)
            del logits
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                logits = self._run(bucket)
                self._logits[: logits.shape[0]].copy_(logits)
                del logits
            self._graphs[bucket] = graph
            torch.cuda.synchronize(self.device)
            self.capture_seconds += time.perf_counter() - warmed
        self.capture_bytes = torch.cuda.memory_reserved(self.device) - before
        logger.info(
            "captured %d %s CUDA graphs (%s %s) in %.0f MiB: %.1f s of warm-up runs (compiling), %.1f s capturing",
            len(self._graphs),
            self.mode.value,
            self._size_name,
            self.captured_sizes,
            self.capture_bytes / 2**20,
            self.warmup_seconds,
            self.capture_seconds,
        )


class DecodeGraphs(StepGraphs):
    """Decode steps, one bucket per batch size of `capture_batch_sizes` (one token per request)."""

    mode = ForwardMode.DECODE
    _size_name = "batch sizes"

    def __init__(
        self, forward: Callable[..., torch.Tensor], builder: BatchBuilder, max_batch_size: int, capture: bool
    ):
        self.batch_sizes = capture_batch_sizes(max_batch_size)
        self.max_batch_size = max_batch_size
        fill = builder.attn_backend.get_cuda_graph_seq_len_fill_value()
        # request row 0, fill keys, one new token; GDN slot 0; no logits row (decode keeps every row)
        self._padding_request = (0, fill, fill - 1, 1, 0, 0, 0)
        super().__init__(forward, builder, [Bucket(s, s) for s in self.batch_sizes], capture)

    def _size(self, bucket: Bucket) -> int:
        return bucket.num_requests

    def bucket(self, batch_size: int) -> int:
        """The smallest captured batch size that holds batch_size requests."""
        found = self.find_bucket(batch_size, batch_size)
        if found is None:
            raise ValueError(
                f"decode batch of {batch_size} exceeds the largest CUDA-graph bucket {self.max_batch_size}"
            )
        return found.num_requests

    def run(self, requests: Sequence[RequestMemory], tokens: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """One decode step for `requests`, padded to its bucket (replayed when captured); logits `[B, vocab]`,
        valid until the next step of this set. `tokens` may be the previous step's sampled tokens on the device
        (overlapped scheduling), copied in on the device."""
        size = self.bucket(len(requests))
        step = self.builder.decode_step(requests, tokens)
        device_tokens = tokens if isinstance(tokens, torch.Tensor) else None
        return self._step(step, Bucket(size, size), device_tokens)


class ExtendGraphs(StepGraphs):
    """Extend steps of up to `max_tokens` tokens, one bucket per count of `extend_token_buckets`, each holding as
    many requests as it has tokens (up to the maximum batch size); logits of each request's last new token."""

    mode = ForwardMode.EXTEND
    _size_name = "tokens"
    # request row 0 with no key and no new token; GDN slot 0; logits row 0
    _padding_request = (0, 0, 0, 0, 0, 0, 0)

    def __init__(
        self,
        forward: Callable[..., torch.Tensor],
        builder: BatchBuilder,
        max_batch_size: int,
        max_tokens: int,
        capture: bool,
    ):
        buckets = [Bucket(t, min(t, max_batch_size)) for t in extend_token_buckets(max_tokens)]
        super().__init__(forward, builder, buckets, capture)

    def _size(self, bucket: Bucket) -> int:
        return bucket.num_tokens

    def holds(self, new_tokens: Sequence[Sequence[int]]) -> bool:
        """Whether an extend step appending these tokens fits a bucket."""
        return self.find_bucket(sum(map(len, new_tokens)), len(new_tokens)) is not None

    def run(self, requests: Sequence[RequestMemory], new_tokens: Sequence[Sequence[int]]) -> torch.Tensor:
        """One extend step appending new_tokens[i] to requests[i], padded to its bucket (replayed when captured);
        logits `[B, vocab]` of each request's last new token, valid until the next step of this set."""
        bucket = self.find_bucket(sum(map(len, new_tokens)), len(new_tokens))
        if bucket is None:
            raise ValueError(
                f"extend step of {sum(map(len, new_tokens))} tokens for {len(new_tokens)} requests exceeds the "
                f"largest CUDA-graph bucket ({self.buckets[-1].num_tokens} tokens)"
            )
        return self._step(self.builder.extend_step(requests, new_tokens), bucket)
