"""Single engine steps for radixc-bench: the engine's pools and BatchBuilder, driven one extend or decode at a
time through a given forward (the eager model or its compiled twin), each step timed."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from collections.abc import Callable

import torch
from torch import nn

from radixc.engine.batch_builder import RequestMemory
from radixc.engine.cuda_graphs import DecodeGraphs
from radixc.engine.runner import build_runner, compile_model, model_cache_spec
from radixc.tools.bench_floor import kv_bytes_per_token
from radixc.tools.bench_timing import synchronize

logger = logging.getLogger("radixc.tools")

PAGE_SIZE = 16
Forward = Callable[..., torch.Tensor]


class BenchError(RuntimeError):
    """A run the benchmark cannot do (encoder-only model, context beyond the model); main exits 2 on it."""


@dataclasses.dataclass(frozen=True)
class StepTime:
    """One step: seconds until the device finished, and the host part building its ForwardBatch."""

    seconds: float
    host_seconds: float


def compile_forward(model: nn.Module) -> Forward:
    """The model compiled as ModelRunner compiles it (radixc.engine.runner.compile_model) for its device."""
    return compile_model(model, next(model.parameters()).device)


class StepBench:
    """Pools for up to max_batch_size requests of max_context tokens, and timed extend / decode steps on them.

    One instance serves every batch size of a run: the pools are constants Dynamo guards on, so new pools
    would recompile the compiled forward.
    """

    def __init__(
        self,
        model: nn.Module,
        backend: str,
        max_batch_size: int,
        max_context: int,
        device: torch.device,
        seed: int = 0,
    ):
        spec = model_cache_spec(model)
        if spec.is_encoder_only:
            raise BenchError(f"{type(model).__name__} is encoder-only: it has no decode step to benchmark")
        dtype = next(model.parameters()).dtype
        pages = max_batch_size * math.ceil(max_context / PAGE_SIZE)
        try:
            # not compiled: the benchmark passes the eager model or its compiled twin to each step
            runner = build_runner(
                model,
                backend=backend,
                compile=False,
                page_size=PAGE_SIZE,
                max_batch_size=max_batch_size,
                max_tokens_per_step=max_batch_size * max_context,
                max_context_len=max_context,
                kv_memory_bytes=pages * PAGE_SIZE * kv_bytes_per_token(spec, dtype) or None,
            )
        except (ValueError, RuntimeError) as err:
            raise BenchError(str(err)) from err
        self.spec, self.dtype, self.device = spec, dtype, device
        self.max_batch_size = max_batch_size
        self.builder = runner.builder
        self.backend_name = runner.attn_backend.name
        self.cuda_graphs_problem = (
            f"n/a ({device.type})"
            if device.type != "cuda"
            else None
            if runner.attn_backend.supports_cuda_graphs()
            else f"n/a ({self.backend_name} not capturable)"
        )
        self.vocab_size = model.config.vocab_size
        self.generator = torch.Generator().manual_seed(seed)

    def random_tokens(self, n: int) -> list[int]:
        """n fresh random token ids."""
        return torch.randint(0, self.vocab_size, (n,), generator=self.generator).tolist()

    @torch.inference_mode()
    def prefill(
        self, forward: Forward, batch_size: int, context: int
    ) -> tuple[list[RequestMemory], StepTime]:
        """New requests, each filled with `context` random tokens by one extend step; (requests, its time)."""
        requests = [self.builder.new_request() for _ in range(batch_size)]
        prompts = [self.random_tokens(context) for _ in range(batch_size)]
        return requests, self._step(forward, lambda: self.builder.extend(requests, prompts))

    @torch.inference_mode()
    def capture(self, forward: Forward) -> DecodeGraphs:
        """Decode graphs of `forward` captured for every bucket up to the largest batch (CUDA only)."""
        self.builder.attn_backend.init_cuda_graph_state(self.max_batch_size, self.max_batch_size)
        graphs = DecodeGraphs(forward, self.builder, self.max_batch_size, capture=True)
        graphs.capture(progress=False)
        return graphs

    @torch.inference_mode()
    def decode(
        self, forward: Forward, requests: list[RequestMemory], graphs: DecodeGraphs | None = None
    ) -> StepTime:
        """One decode step appending a random token to every request (replayed from `graphs` when given; its host
        part is then everything until the replay is queued)."""
        tokens = self.random_tokens(len(requests))
        if graphs is None:
            return self._step(forward, lambda: self.builder.decode(requests, tokens))
        synchronize(self.device)
        start = time.perf_counter()
        graphs.run(requests, tokens)
        queued = time.perf_counter()
        synchronize(self.device)
        return StepTime(time.perf_counter() - start, queued - start)

    def release(self, requests: list[RequestMemory]) -> None:
        for request in requests:
            self.builder.release(request)

    def _step(self, forward: Forward, build) -> StepTime:
        synchronize(self.device)
        start = time.perf_counter()
        batch = build()
        built = time.perf_counter()
        forward(batch.input_ids, batch.positions, batch)
        synchronize(self.device)
        return StepTime(time.perf_counter() - start, built - start)
