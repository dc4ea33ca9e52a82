"""LLM: the user-facing engine (vLLM-shaped): load a model, then `generate`, `stream` or `encode` prompts."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch
from tokenizers import Tokenizer
from torch import nn
from tqdm.auto import tqdm

from radixc.engine.gdn_checkpoints import (
    DEFAULT_CHECKPOINT_INTERVAL,
    HybridPrefixCache,
    default_num_checkpoints,
)
from radixc.engine.overlap import LaunchedStep, TokenReadback
from radixc.engine.placement import resolve_device, resolve_dtype
from radixc.engine.prefix_cache import PrefixCache, PrefixCacheStats
from radixc.engine.prompts import Prompt, load_tokenizer, params_per_prompt, tokenize_prompts
from radixc.engine.queued_copy import queued_tensor
from radixc.engine.request import Request, RequestOutput, SamplingParams, TokenUpdate
from radixc.engine.runner import ModelRunner, build_runner
from radixc.engine.sampling import Sampler
from radixc.engine.scheduler import ScheduledStep, Scheduler
from radixc.engine.step_stats import StepStats
from radixc.engine.tensor_parallel import (
    TensorParallelWorkers,
    check_tensor_parallel_model,
    close_on_collect,
    serve_launched_rank,
    tensor_parallel_context,
    torchrun_rank,
)
from radixc.models import load_model_or_preset

logger = logging.getLogger("radixc.engine")


class LLM:
    """An inference engine over one model: continuous batching, paged KV cache, prefix cache, sampling.

    Offline: `generate` / `stream` / `encode` run whole lists of prompts. Online (a server's loop):
    `add_request` queues prompts whenever they arrive, each `step()` runs one batch over all of them, `abort`
    drops one and frees its pages at once.

    model: a Hugging Face checkpoint directory, a preset name (`radixc.models.list_presets()`) or an nn.Module
    built from RadixAttention / RadixLinearAttention. backend: "auto" (best for the device) | "native" |
    "triton" | "flashinfer". Unset limits come from the device (small on CPU); on CUDA the KV pool takes what
    is left of `gpu_memory_utilization` (default 0.8) x the free memory after the weights, the GDN state and a
    reserve for activations, compilation and CUDA graphs (`kv_memory_bytes` sets it directly). cuda_graphs: replay
    decode steps from CUDA graphs captured per batch-size bucket (None: on for a compiled model on CUDA with a
    capturable backend), and extend steps of up to extend_graph_max_tokens tokens from graphs captured per
    token-count bucket (None: 2048 where the backend can capture extend steps; 0: none). progress: a tqdm bar
    over requests in `generate` and over the captures (None: only when stderr is a terminal). tokenizer: a tokenizer.json path or a `tokenizers.Tokenizer`, for models given without
    a checkpoint directory. Hybrid (GDN) models keep GDN state checkpoints with the prefix cache:
    gdn_checkpoint_memory_bytes sizes their pool (default an eighth of the KV pool, at most 256 checkpoints),
    gdn_checkpoint_interval spaces them along long prompts. tensor_parallel_size: split the model over that many
    processes of this host (this one is rank 0; see `radixc.engine.tensor_parallel`), for a checkpoint directory
    or preset of a decoder; `close()` (or garbage collection, or exit) stops the workers. Under torchrun every
    rank builds the LLM: rank 0 (`tensor_parallel_rank == 0`) schedules, and on every other rank the constructor
    serves rank 0's steps until rank 0 closes its engine; their `generate` / `stream` / `add_request` / `step`
    raise. `step_stats` counts the model steps run so far and their time, per mode (extend, decode).
    overlap_scheduling: plan and launch each decode step while the step before it runs, reading that step's
    tokens back only afterwards (None: on for CUDA, where it hides the host's work per step; on the CPU nothing
    can overlap). Outputs are the same either way; a request that a stop token ends computes one wasted row in
    the step already launched after it.
    """

    def __init__(
        self,
        model: str | Path | nn.Module,
        *,
        backend: str = "auto",
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        compile: bool = True,
        page_size: int = 16,
        max_batch_size: int | None = None,
        max_tokens_per_step: int | None = None,
        max_context_len: int | None = None,
        kv_memory_bytes: int | None = None,
        gpu_memory_utilization: float | None = None,
        cuda_graphs: bool | None = None,
        extend_graph_max_tokens: int | None = None,
        enable_prefix_cache: bool = True,
        gdn_checkpoint_memory_bytes: int | None = None,
        gdn_checkpoint_interval: int = DEFAULT_CHECKPOINT_INTERVAL,
        progress: bool | None = None,
        tokenizer: str | Path | Tokenizer | None = None,
        tensor_parallel_size: int = 1,
        overlap_scheduling: bool | None = None,
    ):
        started = time.perf_counter()
        # argument errors before anything loads; a module given without a device stays where it is
        device = None if device is None and isinstance(model, nn.Module) else resolve_device(device)
        given_tokenizer = None if tokenizer is None else load_tokenizer(tokenizer)
        check_tensor_parallel_model(model, tensor_parallel_size, cuda_graphs)
        self.tensor_parallel = None
        self.tensor_parallel_rank = torchrun_rank(tensor_parallel_size) or 0
        if self.tensor_parallel_rank:
            serve_launched_rank(model, tensor_parallel_size, resolve_device(device), resolve_dtype(dtype))
            return
        if tensor_parallel_size > 1:
            self.tensor_parallel = TensorParallelWorkers(
                model, tensor_parallel_size, device, resolve_dtype(dtype)
            )
            close_on_collect(self, self.tensor_parallel)
            device = self.tensor_parallel.device
        try:
            with tensor_parallel_context(self.tensor_parallel):
                self.model, self.tokenizer = _resolve_model(model, resolve_dtype(dtype), device)
            logger.info("model loaded in %.1f s", time.perf_counter() - started)
            self.runner = build_runner(
                self.model,
                backend=backend,
                compile=compile,
                page_size=page_size,
                max_batch_size=max_batch_size,
                max_tokens_per_step=max_tokens_per_step,
                max_context_len=max_context_len,
                kv_memory_bytes=kv_memory_bytes,
                gpu_memory_utilization=gpu_memory_utilization,
                cuda_graphs=False if self.tensor_parallel else cuda_graphs,
                extend_graph_max_tokens=extend_graph_max_tokens,
            )
            self.prefix_cache = _make_prefix_cache(
                self.runner,
                enable_prefix_cache,
                page_size,
                gdn_checkpoint_memory_bytes,
                gdn_checkpoint_interval,
            )
            if self.tensor_parallel is not None:
                self.tensor_parallel.attach(self.runner, compile, self.prefix_cache)
        except BaseException:
            self.close()
            raise
        if given_tokenizer is not None:
            self.tokenizer = given_tokenizer
        self.vocab_size = getattr(getattr(self.model, "config", None), "vocab_size", None)
        self.runner.capture_cuda_graphs(progress)
        self.device, self.config, self.attn_backend = (
            self.runner.device,
            self.runner.config,
            self.runner.attn_backend,
        )
        self.is_encoder = self.runner.spec.is_encoder_only
        self.scheduler = Scheduler(self.config, self.runner.builder, self.prefix_cache)
        self.sampler = Sampler()
        self.eos_token_ids = tuple(getattr(self.model, "eos_token_ids", ()))
        self.progress = progress
        self._added: dict[int, Request] = {}  # add_request's unfinished requests by id
        self._next_request_id = 0
        self.step_stats = StepStats()  # every model step so far, per mode, with its wall time
        self.overlap_scheduling = (
            self.device.type == "cuda" if overlap_scheduling is None else overlap_scheduling
        )
        self._readback = TokenReadback(self.config.max_batch_size, self.device)
        self._in_flight: LaunchedStep | None = None  # launched, its tokens not yet applied
        self._last_step_done = 0.0
        decode_graphs, extend_graphs = self.runner.decode_graphs, self.runner.extend_graphs
        logger.info(
            "LLM ready in %.1f s: %s on %s, backend %s, compile=%s, CUDA graphs: decode batch sizes %s, "
            "extend tokens %s; prefix cache %s, overlapped scheduling %s",
            time.perf_counter() - started,
            type(self.model).__name__,
            self.device,
            self.attn_backend.name,
            compile,
            decode_graphs.captured_sizes if decode_graphs else "off",
            extend_graphs.captured_sizes if extend_graphs else "off",
            "on" if self.prefix_cache is not None else "off",
            "on" if self.overlap_scheduling else "off",
        )

    def close(self) -> None:
        """Stop the tensor-parallel workers (a no-op on one rank); the engine cannot run steps afterwards."""
        if self.tensor_parallel is not None:
            self.tensor_parallel.close()

    def generate(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> list[RequestOutput]:
        """Generate for every prompt; one RequestOutput per prompt, in order (failed ones carry `.error`)."""
        requests = self._make_requests(prompts, sampling_params)
        disable = None if self.progress is None else not self.progress
        with tqdm(total=len(requests), desc="Generating", unit="req", disable=disable) as bar:
            bar.update(sum(r.finished for r in requests))
            for index, _ in self._run(requests):
                if requests[index].finished:
                    bar.update(1)
        return [self._output(r) for r in requests]

    def stream(
        self,
        prompts: Prompt | Sequence[Prompt],
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
    ) -> Iterator[tuple[int, list[int]]]:
        """Yield (prompt index, new token ids) as each step produces them. Closing it early aborts the rest.

        A request that fails before running (see generate's `.error`) yields nothing; its error is logged.
        """
        yield from self._run(self._make_requests(prompts, sampling_params))

    def encode(self, prompts: Prompt | Sequence[Prompt], normalize: bool = False) -> torch.Tensor:
        """Pooled embeddings `[n, hidden]` of an encoder model (L2-normalised when `normalize`)."""
        if not hasattr(self.model, "encode"):
            raise ValueError(
                f"{type(self.model).__name__} has no encode(); use generate() for decoder models"
            )
        token_lists = []
        for index, prompt in enumerate(tokenize_prompts(prompts, self.tokenizer, self.vocab_size)):
            problem = prompt.error
            if problem is None and not 1 <= len(prompt.ids) <= self.config.max_context_len:
                problem = (
                    f"has {len(prompt.ids)} tokens, not in [1, max_context_len={self.config.max_context_len}]"
                )
            if problem:
                raise ValueError(f"encode: prompt {index}: {problem}")
            token_lists.append(prompt.ids)
        pooled, group, group_tokens = [], [], 0
        for tokens in token_lists:
            full = len(group) == self.config.max_batch_size
            if group and (full or group_tokens + len(tokens) > self.config.max_tokens_per_step):
                pooled.append(self.runner.encode(group, normalize))
                group, group_tokens = [], 0
            group.append(tokens)
            group_tokens += len(tokens)
        if group:
            pooled.append(self.runner.encode(group, normalize))
        return torch.cat(pooled) if pooled else torch.empty(0)

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None) -> int:
        """Queue one prompt for `step()`; returns its request id. ValueError when it can never run."""
        if self.scheduler.has_work and not self._added:
            raise RuntimeError("LLM: a generate() or stream() is still running on this engine")
        [request] = self._make_requests([prompt], params, first_index=self._next_request_id)
        if request.error is not None:
            raise ValueError(request.error)
        self._next_request_id += 1
        self._added[request.index] = request
        self.scheduler.add(request)
        return request.index

    def step(self) -> list[TokenUpdate]:
        """Run one step over the added requests; an update for each request that got a token or ended.

        A step that raises (out of memory, a kernel error) fails every unfinished request, whose pages it may
        have half written, and leaves the engine ready for new requests.
        """
        self._check_scheduling_rank()
        try:
            events = self._advance()
        except Exception as err:
            self._in_flight = None
            failed = self.scheduler.abort(f"engine step failed: {type(err).__name__}: {err}")
            logger.exception("engine step failed; failed %d request(s)", len(failed))
            self._added.clear()
            return [TokenUpdate(r.index, [], error=r.error) for r in failed]
        updates = []
        for request, token in events or ():
            reason = None if request.finish_reason is None else request.finish_reason.value
            updates.append(TokenUpdate(request.index, [token], reason))
            if request.finished:
                del self._added[request.index]
        return updates

    def abort(self, request_id: int) -> bool:
        """Drop an added request now, freeing its KV pages; False when it already ended (or is unknown)."""
        request = self._added.pop(request_id, None)
        if request is None:
            return False
        self.scheduler.abort_request(request, "aborted")
        self._drop_dead_in_flight()
        return True

    @property
    def has_unfinished(self) -> bool:
        """Whether an added request is still waiting or running (step() has work)."""
        return bool(self._added)

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of a string prompt (add_special_tokens=False for text that already has them, e.g. a chat
        template's output)."""
        if self.tokenizer is None:
            raise ValueError(
                "string prompts need a tokenizer (tokenizer.json in the checkpoint directory, or "
                "LLM(tokenizer=...)); pass token id lists instead"
            )
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def prefix_cache_stats(self) -> PrefixCacheStats | None:
        """Hit-rate statistics of the prefix cache (None when it is off)."""
        return None if self.prefix_cache is None else self.prefix_cache.stats()

    def clear_prefix_cache(self) -> int:
        """Evict every prefix-cache page no request uses; returns how many were freed."""
        if self.prefix_cache is None:
            return 0
        pages = self.prefix_cache.evict(self.prefix_cache.num_evictable_pages)
        self.runner.kv_pool.free_pages(pages)
        return len(pages)

    def _check_scheduling_rank(self) -> None:
        if self.tensor_parallel_rank:
            raise RuntimeError(
                f"LLM: rank {self.tensor_parallel_rank} of a torchrun launch served rank 0's steps until rank 0 "
                "closed its engine; requests go to rank 0 (tensor_parallel_rank == 0)"
            )

    def _make_requests(self, prompts, sampling_params, first_index: int = 0) -> list[Request]:
        self._check_scheduling_rank()
        if self.is_encoder:
            raise ValueError(f"{type(self.model).__name__} is an encoder-only model: use encode()")
        token_lists = tokenize_prompts(prompts, self.tokenizer, self.vocab_size)
        params = params_per_prompt(sampling_params, len(token_lists))
        requests = []
        for index, (prompt, p) in enumerate(zip(token_lists, params)):
            stop = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos_token_ids))
            generator = None
            if p.seed is not None and not p.greedy:
                generator = torch.Generator(device=self.device).manual_seed(p.seed)
            request = Request(first_index + index, prompt.ids, p, frozenset(stop), generator=generator)
            request.error = prompt.error or self.scheduler.check(request)
            if request.error is not None:
                logger.warning("request %d failed: %s", request.index, request.error)
            requests.append(request)
        return requests

    def _run(self, requests: list[Request]) -> Iterator[tuple[int, list[int]]]:
        """Drive the scheduler until every request finished, yielding each step's new tokens per request."""
        if self.scheduler.has_work:
            raise RuntimeError(
                "LLM: requests of another generate(), stream() or add_request() are still running on this engine"
            )
        for request in requests:
            if request.error is None:
                self.scheduler.add(request)
        try:
            while (events := self._advance()) is not None:
                for request, token in events:
                    yield request.index, [token]
        finally:
            self._in_flight = None
            if self.scheduler.has_work:
                aborted = self.scheduler.abort("aborted: generation stopped before this request finished")
                logger.warning("aborted %d unfinished request(s)", len(aborted))

    def _advance(self) -> list[tuple[Request, int]] | None:
        """Complete one step, launching it unless it is in flight already; (request, token) pairs, None when no
        request is left. With overlapped scheduling the step that follows it is launched before its tokens are
        read (when the scheduler can plan it without them)."""
        launched = self._in_flight
        if launched is None:
            step = self.scheduler.schedule()
            if step is None:
                return None
            launched = self._launch(step)
        self._in_flight = None
        if self.overlap_scheduling:
            follow = self.scheduler.follow(launched.step)
            if follow is not None:
                self._in_flight = self._launch(follow, launched.tokens)
        events = self.scheduler.update(launched.step, self._collect(launched))
        self._drop_dead_in_flight()
        return events

    @torch.inference_mode()
    def _launch(self, step: ScheduledStep, previous_tokens: torch.Tensor | None = None) -> LaunchedStep:
        """Queue one step's forward and the sampling of its sampling rows on the device, without waiting; a step
        that follows its predecessor decodes `previous_tokens`, that step's sampled tokens on the device (inference
        tensors, as the compiled forward's inputs always are: another kind would recompile it)."""
        launched_at = time.perf_counter()
        memories = [r.memory for r in step.requests]
        if step.mode.is_extend():
            logits = self.runner.extend(memories, step.new_tokens)
        elif step.follows is None:
            logits = self.runner.decode(memories, [t[0] for t in step.new_tokens])
        else:
            if len(step.follows) < previous_tokens.shape[0]:  # requests the previous step ended by length
                previous_tokens = previous_tokens[queued_tensor(step.follows, torch.int64, self.device)]
            logits = self.runner.decode(memories, previous_tokens)
        rows = [i for i, sample in enumerate(step.samples) if sample]
        tokens = None
        if rows:
            if len(rows) < len(step.requests):
                logits = logits[queued_tensor(rows, torch.int64, logits.device)]
            sampled = [step.requests[i] for i in rows]
            tokens = self.sampler(logits, [r.params for r in sampled], [r.generator for r in sampled])
        return LaunchedStep(step, tokens, launched_at, self._readback.start(tokens))

    def _collect(self, launched: LaunchedStep) -> list[int]:
        """Wait for a launched step's tokens; count the step in step_stats (and log it at DEBUG)."""
        tokens = launched.read()
        done = time.perf_counter()
        seconds = done - max(launched.launched_at, self._last_step_done)
        self._last_step_done = done
        step = launched.step
        overlapped = step.follows is not None
        self.step_stats.record(step.mode, seconds, overlapped)
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug(
                "%s step%s: %d requests, %d tokens, %.2f ms",
                step.mode.name.lower(),
                " (overlapped)" if overlapped else "",
                len(step.requests),
                len(step.requests) if overlapped else sum(map(len, step.new_tokens)),
                seconds * 1e3,
            )
        return tokens

    def _drop_dead_in_flight(self) -> None:
        """Wait out an in-flight step none of whose requests runs any more (stop tokens of the step before it, or
        aborts), so that an engine with no request holds no step."""
        launched = self._in_flight
        if launched is not None and all(r.memory is None for r in launched.step.requests):
            self._in_flight = None
            self._collect(launched)

    def _output(self, request: Request) -> RequestOutput:
        text = None
        if self.tokenizer is not None and request.error is None:
            text = self.tokenizer.decode(request.output_ids, skip_special_tokens=True)
        return request.to_output(text)


def _make_prefix_cache(
    runner: ModelRunner,
    enabled: bool,
    page_size: int,
    gdn_checkpoint_memory_bytes: int | None,
    gdn_checkpoint_interval: int,
) -> PrefixCache | None:
    """The prefix cache for the runner's model: none without a KV cache, with GDN checkpoints for hybrids."""
    spec = runner.spec
    if not (enabled and spec.needs_kv_cache):
        return None
    if not spec.gdn_layer_ids:
        return PrefixCache(page_size)
    gdn_pool = runner.gdn_pool
    num_checkpoints = default_num_checkpoints(
        gdn_pool, runner.kv_pool.memory_bytes, gdn_checkpoint_memory_bytes
    )
    return HybridPrefixCache(page_size, gdn_pool, num_checkpoints, gdn_checkpoint_interval)


def _resolve_model(model, dtype: torch.dtype | None, device) -> tuple[nn.Module, Tokenizer | None]:
    """(module, tokenizer or None) for a checkpoint directory, a preset name or a module."""
    if isinstance(model, nn.Module):
        if device is not None or dtype is not None:
            model = model.to(device=device, dtype=dtype)
        return model.eval(), None
    tokenizer_file = Path(model) / "tokenizer.json"
    tokenizer = load_tokenizer(tokenizer_file) if tokenizer_file.is_file() else None
    return load_model_or_preset(model, dtype, device), tokenizer
