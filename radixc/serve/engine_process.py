"""The engine process: builds the LLM, then runs the continuous-batching loop for the server process.

It owns the model and nothing else: between two steps it applies the commands that arrived (add, abort, encode,
stats), runs `LLM.step()` over every running request and sends the step's updates as one message. Its own
process, not a thread of the server, because Inductor's CPU kernels hold the GIL: in one process the model step
and the HTTP event loop take turns; in two they overlap. It exits on `Shutdown`, and on its own when the server
process goes away (its channel closes), so it never outlives the server; it ignores SIGINT and SIGTERM, which
reach it too when they are sent to the process group, so the server shuts down gracefully first.
"""

from __future__ import annotations

import dataclasses
import logging
import signal
import socket
import time
from collections.abc import Callable, Sequence

import torch

from radixc.engine.llm import LLM
from radixc.engine.request import SamplingParams
from radixc.serve.affinity import pin_engine
from radixc.serve.channel import Channel
from radixc.serve.messages import (
    SHUTDOWN_ERROR,
    AbortRequests,
    AddRequests,
    Encode,
    EngineStats,
    LoadFailed,
    ModelInfo,
    QueryStats,
    Ready,
    Reply,
    Shutdown,
    StepUpdates,
    Update,
)

logger = logging.getLogger("radixc.serve")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def run_engine(
    make_llm: Callable[[], LLM],
    sock: socket.socket,
    num_threads: int,
    log_level: int,
    cpus: Sequence[int] | None = None,
) -> None:
    """The engine process's main: keep to `cpus` (when given), load and warm up the model, say Ready (or
    LoadFailed), serve until Shutdown."""
    # Ctrl-C, and systemd's stop, signal the whole process group: the server process decides when this one ends
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.SIG_IGN)
    logging.basicConfig(level=log_level, format=LOG_FORMAT)
    if cpus is not None:
        pin_engine(cpus)
    torch.set_num_threads(num_threads)
    channel = Channel(sock)
    try:
        try:
            llm = make_llm()
            _warm_up(llm)
        except Exception as err:
            logger.exception("could not load the model")
            channel.send(LoadFailed(f"{type(err).__name__}: {err}"))
            return
        channel.send(Ready(ModelInfo(llm.is_encoder, llm.config.max_context_len, llm.tokenizer)))
        EngineLoop(llm, channel).run()
    except (EOFError, ConnectionError):
        logger.warning("the server process went away; the engine process exits")
    finally:
        channel.close()


def _warm_up(llm: LLM) -> None:
    """Run one tiny request so the first compiles (extend and decode) happen before the server says ready."""
    if llm.is_encoder:
        llm.encode([[0]])
    else:
        llm.generate([[0]], SamplingParams(max_new_tokens=2, ignore_eos=True))


class EngineLoop:
    """Commands in, one StepUpdates out per step; the server's request ids mapped to the LLM's."""

    def __init__(self, llm: LLM, channel: Channel):
        self.llm, self.channel = llm, channel
        self.stats = EngineStats()  # the counters; the pools and running requests are read when asked
        self.llm_ids: dict[int, int] = {}  # server request id -> LLM request id, while it runs
        self.server_ids: dict[int, int] = {}  # the reverse

    def run(self) -> None:
        while True:
            commands = self.channel.receive(wait=not self.llm.has_unfinished)  # idle: sleep until work comes
            try:
                for command in commands:
                    if isinstance(command, Shutdown):  # what came before it got its answer
                        self._fail_all(SHUTDOWN_ERROR)
                        return
                    self._apply(command)
                if self.llm.has_unfinished:
                    self._step()
            except (EOFError, ConnectionError):
                raise
            except Exception as err:  # a bug here must not leave every waiting client hanging
                logger.exception("engine loop failed")
                self._fail_all(f"engine error: {type(err).__name__}: {err}")

    def _apply(self, command) -> None:
        if isinstance(command, AddRequests):
            self._add(command)
        elif isinstance(command, AbortRequests):
            for request_id in command.request_ids:
                llm_id = self.llm_ids.pop(request_id, None)
                if llm_id is not None:
                    del self.server_ids[llm_id]
                    self.stats.requests_aborted += self.llm.abort(llm_id)
        elif isinstance(command, Encode):
            try:
                pooled = self.llm.encode(command.prompts, normalize=command.normalize)
            except Exception as err:
                self.channel.send(_error_reply(command.reply_to, err))
            else:
                self.channel.send(Reply(command.reply_to, pooled.float().cpu().numpy()))
        elif isinstance(command, QueryStats):
            self.channel.send(Reply(command.reply_to, self._stats()))
        else:
            raise TypeError(f"engine process: unknown command {command!r}")

    def _add(self, command: AddRequests) -> None:
        added: list[int] = []
        try:
            for prompt, params in zip(command.prompts, command.params, strict=True):
                added.append(self.llm.add_request(prompt, params))
        except Exception as err:
            for llm_id in added:
                self.llm.abort(llm_id)
            self.channel.send(_error_reply(command.reply_to, err))
            return
        for request_id, llm_id in zip(command.request_ids, added, strict=True):
            self.llm_ids[request_id], self.server_ids[llm_id] = llm_id, request_id
        self.stats.requests_added += len(added)
        self.channel.send(Reply(command.reply_to))

    def _step(self) -> None:
        updates: list[Update] = []
        new_tokens = 0
        start = time.perf_counter()
        step_updates = self.llm.step()
        self.stats.step_seconds += time.perf_counter() - start
        for update in step_updates:
            if update.finished:
                request_id = self.server_ids.pop(update.request_id)
                del self.llm_ids[request_id]
            else:
                request_id = self.server_ids[update.request_id]
            updates.append((request_id, update.token_ids, update.finish_reason, update.error))
            new_tokens += len(update.token_ids)
        stats = self.stats
        stats.steps += 1
        stats.generated_tokens += new_tokens
        stats.max_tokens_in_step = max(stats.max_tokens_in_step, new_tokens)
        if updates:
            self.channel.send(StepUpdates(updates))

    def _fail_all(self, error: str) -> None:
        """End every running request with `error` (the engine stops, or its loop failed)."""
        if self.server_ids:
            logger.warning("%s: failing %d unfinished request(s)", error, len(self.server_ids))
        for llm_id in self.server_ids:
            self.llm.abort(llm_id)
        updates = [(request_id, [], None, error) for request_id in self.llm_ids]
        self.llm_ids.clear()
        self.server_ids.clear()
        if updates:
            self.channel.send(StepUpdates(updates))

    def _stats(self) -> EngineStats:
        runner = self.llm.runner
        cache = self.llm.prefix_cache_stats()
        return dataclasses.replace(
            self.stats,
            **dataclasses.asdict(self.llm.step_stats),
            running_requests=len(self.server_ids),
            kv_pages=runner.kv_pool.capacity_pages,
            free_kv_pages=runner.kv_pool.num_free_pages,
            cached_kv_pages=0 if cache is None else cache.cached_pages,
            request_rows=runner.req_to_token_pool.size - 1,  # row 0 is reserved for padding
            free_request_rows=runner.req_to_token_pool.num_free,
        )


def _error_reply(reply_to: int, err: Exception) -> Reply:
    """ValueError is the engine's word for input that can never run (a 400); anything else is its failure."""
    invalid = isinstance(err, ValueError)
    return Reply(reply_to, error=str(err) if invalid else f"{type(err).__name__}: {err}", invalid=invalid)
