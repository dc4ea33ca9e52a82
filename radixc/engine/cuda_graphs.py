"""Decode steps replayed from CUDA graphs captured around the compiled model, one graph per batch-size bucket.

The runner owns static device buffers for every per-step input of a decode batch. Each step writes the batch into
one pinned host buffer, copies it to the device in one non-blocking copy, and replays the graph of the smallest
bucket that holds the batch. Rows past the real requests are padding: request row 0, KV slot 0 and GDN slot 0,
which every pool reserves for this, and a sequence length of the backend's fill value; their logits are dropped.

The captured callable is the compiled model itself (the step's KV slots are written to `req_to_token` just before,
outside the graph, so that backends planning on the host see them), so what is replayed is exactly what Inductor
generated; capture happens after a warm-up call has compiled and autotuned.
Without capture (`capture=False`, e.g. on the CPU) the same static, padded batches run through the compiled model
directly, which is how the padding is tested without a GPU.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import torch
from tqdm.auto import tqdm

from radixc.engine.batch_builder import BatchBuilder, HostStep
from radixc.forward_batch import ForwardBatch, ForwardMode

logger = logging.getLogger("radixc.engine")

# order of the rows of the static input buffer
_FIELDS = (
    "input_ids",
    "positions",
    "req_pool_indices",
    "seq_lens",
    "extend_prefix_lens",
    "out_cache_loc",
    "gdn_slots",
)


def capture_batch_sizes(max_batch_size: int) -> list[int]:
    """The buckets decode batches are padded up to: 1, 2, 4, 8, then every multiple of 8, and the maximum."""
    sizes = [s for s in (1, 2, 4) if s < max_batch_size]
    sizes += list(range(8, max_batch_size, 8))
    return sizes + [max_batch_size]


class DecodeGraphs:
    """Static decode inputs, padding to buckets and, on CUDA, one captured graph per bucket."""

    def __init__(
        self,
        forward: Callable[..., torch.Tensor],
        builder: BatchBuilder,
        max_batch_size: int,
        capture: bool,
    ):
        self.forward, self.builder, self.capture_enabled = forward, builder, capture
        self.backend = builder.attn_backend
        self.device = builder.device
        self.batch_sizes = capture_batch_sizes(max_batch_size)
        self.max_batch_size = max_batch_size
        fill = self.backend.get_cuda_graph_seq_len_fill_value()
        # padding row: token 0 at position 0 of request row 0, writing KV slot 0 and GDN slot 0
        self._padding = torch.tensor([0, 0, 0, fill, fill - 1, 0, 0], dtype=torch.int64)
        pin = self.device.type == "cuda"
        self._host = torch.empty(len(_FIELDS), max_batch_size, dtype=torch.int64, pin_memory=pin)
        self._host_rows, self._padding_rows = self._host.numpy(), self._padding.numpy()
        self._static = torch.empty(len(_FIELDS), max_batch_size, dtype=torch.int64, device=self.device)
        self._copied = torch.cuda.Event() if pin else None
        self._batches: dict[int, ForwardBatch] = {}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._outputs: dict[int, torch.Tensor] = {}
        self.capture_bytes = 0
        if capture:
            self.backend.init_cuda_graph_state(max_batch_size, max_batch_size)

    def bucket(self, batch_size: int) -> int:
        """The smallest captured batch size that holds batch_size requests."""
        for size in self.batch_sizes:
            if size >= batch_size:
                return size
        raise ValueError(
            f"decode batch of {batch_size} exceeds the largest CUDA-graph bucket {self.max_batch_size}"
        )

    def _batch(self, size: int) -> ForwardBatch:
        """The ForwardBatch of bucket `size`: views of the first `size` columns of the static buffers."""
        if size not in self._batches:
            field = dict(zip(_FIELDS, self._static[:, :size]))
            self._batches[size] = ForwardBatch.create(
                forward_mode=ForwardMode.DECODE,
                input_ids=field["input_ids"],
                positions=field["positions"],
                req_pool_indices=field["req_pool_indices"],
                seq_lens=field["seq_lens"],
                extend_prefix_lens=field["extend_prefix_lens"],
                out_cache_loc=field["out_cache_loc"],
                req_to_token_pool=self.builder.req_to_token_pool,
                token_to_kv_pool=self.builder.kv_pool,
                attn_backend=self.backend,
                gdn_pool=self.builder.gdn_pool,
                gdn_slots=field["gdn_slots"] if self.builder.gdn_pool is not None else None,
                init_metadata=False,
            )
        return self._batches[size]

    def _run(self, size: int) -> torch.Tensor:
        """What is captured: the compiled model on bucket `size`."""
        batch = self._batch(size)
        return self.forward(batch.input_ids, batch.positions, batch)

    def _record_slots(self, size: int) -> None:
        """Write the step's KV slots into req_to_token before the backend plans the step: a planner that reads
        the page table (FlashInfer) must see the page a new token opens (padding rows write row 0's column 0)."""
        if self.builder.kv_pool is not None:
            batch = self._batch(size)
            table = self.builder.req_to_token_pool.req_to_token
            table.index_put_((batch.req_pool_indices, batch.positions), batch.out_cache_loc.to(table.dtype))

    def _load(self, step: HostStep | None, size: int) -> None:
        """Write a step (or only padding) into the pinned host buffer and copy it to the static buffers at once."""
        if self._copied is not None:
            self._copied.synchronize()  # the previous step's copy has left the host buffer
        count = 0 if step is None else len(step.seq_lens)
        if step is not None:
            gdn = step.gdn_slots if step.gdn_slots is not None else [0] * count
            prefix = step.extend_prefix_lens
            rows = (
                step.token_ids,
                step.positions,
                step.req_pool_indices,
                step.seq_lens,
                prefix,
                step.out_cache_loc,
                gdn,
            )
            self._host_rows[:, :count] = rows  # through numpy: a third of torch.tensor(rows)'s host time
        self._host_rows[:, count:size] = self._padding_rows[:, None]
        self._static[:, :size].copy_(self._host[:, :size], non_blocking=True)
        if self._copied is not None:
            self._copied.record()

    def run(self, requests: Sequence, tokens: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """One decode step for `requests`, padded to its bucket (replayed when captured); logits `[B, vocab]`,
        a view of the graph's output, valid until the next `run` (graphs share one memory pool). `tokens` may be
        the previous step's sampled tokens on the device (overlapped scheduling), copied in on the device."""
        step = self.builder.decode_step(requests, tokens)
        count = len(requests)
        size = self.bucket(count)
        self._load(step, size)
        if isinstance(tokens, torch.Tensor):
            self._static[_FIELDS.index("input_ids"), :count].copy_(tokens)
        self._record_slots(size)
        graph = self._graphs.get(size)
        if graph is None:
            return self._run(size)[:count]
        seq_lens = self._static[_FIELDS.index("seq_lens"), :size]
        host_lens = self._host[_FIELDS.index("seq_lens"), :size]
        self.backend.init_forward_metadata_replay_cuda_graph(
            size,
            self._batch(size).req_pool_indices,
            seq_lens,
            int(host_lens.sum()),
            ForwardMode.DECODE,
            host_lens,
        )
        # again after the backend's planning, which may stage through pinned host memory too: the next step,
        # planned while this one runs, writes host buffers only once the device has taken these
        self._copied.record()
        graph.replay()
        return self._outputs[size][:count]

    def capture(self, progress: bool | None = None) -> None:
        """Capture every bucket, largest first, into one memory pool; logs the memory the graphs took."""
        if not self.capture_enabled:
            return
        before = torch.cuda.memory_reserved(self.device)
        pool = torch.cuda.graph_pool_handle()
        stream = torch.cuda.Stream(self.device)
        disable = None if progress is None else not progress
        for size in tqdm(
            sorted(self.batch_sizes, reverse=True), desc="Capturing CUDA graphs", disable=disable
        ):
            self._load(None, size)
            batch = self._batch(size)
            self.backend.init_forward_metadata_capture_cuda_graph(
                size, size, batch.req_pool_indices, batch.seq_lens, ForwardMode.DECODE
            )
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):  # compile, autotune and allocate outside the capture
                    self._run(size)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                self._outputs[size] = self._run(size)
            self._graphs[size] = graph
        torch.cuda.synchronize(self.device)
        self.capture_bytes = torch.cuda.memory_reserved(self.device) - before
        logger.info(
            "captured %d decode CUDA graphs (batch sizes %s) in %.0f MiB",
            len(self._graphs),
            self.batch_sizes,
            self.capture_bytes / 2**20,
        )

    @property
    def captured_sizes(self) -> list[int]:
        return sorted(self._graphs)
