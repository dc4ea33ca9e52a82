"""Tensor parallelism over the processes of one host: the LLM's process is rank 0; it starts `size - 1` worker
processes (torch.multiprocessing spawn) joined by torch.distributed (gloo on CPU, NCCL on CUDA, a free port on
127.0.0.1). Each rank builds its shard of the model (`radixc.models.parallel`) and its own pools, which hold
only its KV (and GDN) heads. The scheduler, prefix cache and sampler run on rank 0 only: before each model
call rank 0 broadcasts the step (token ids, positions, KV slots, request rows, lengths, GDN state slots, logits
rows, and the req_to_token writes and GDN checkpoint copies since the last step); every worker replays the
writes and copies on its own pools and runs the same forward on it, joining rank 0's collectives.

Under torchrun (RANK / WORLD_SIZE in the environment) nothing is spawned: every rank builds its LLM, joining
the process group torchrun's ranks share (already initialised, or initialised here from the environment); rank
0 schedules and the LLM constructor of every other rank serves rank 0's steps until rank 0 closes its engine.

A worker that dies, a collective that fails or times out, or Ctrl-C stops every worker and raises on rank 0
(TensorParallelError, or the KeyboardInterrupt itself); nothing waits forever.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
import os
import socket
import weakref
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from radixc.engine.backends import choose_backend
from radixc.engine.gdn_checkpoints import HybridPrefixCache, copy_checkpoint
from radixc.engine.memory_pool import GDNPool
from radixc.engine.prefix_cache import PrefixCache
from radixc.engine.runner import ModelRunner, model_cache_spec
from radixc.forward_batch import ForwardBatch, ForwardMode
from radixc.models import load_model_or_preset, preset_config
from radixc.models.base import CausalLM
from radixc.models.loader import read_hf_config
from radixc.models.parallel import TensorParallel, check_tensor_parallel, tensor_parallel
from radixc.models.presets import list_presets
from radixc.models.registry import model_config

logger = logging.getLogger("radixc.engine")

# a collective (and the start-up rendezvous) that waits longer than this fails instead of hanging
DEFAULT_TIMEOUT_S = 300.0
_JOIN_TIMEOUT_S = 10.0
_MODES = (ForwardMode.EXTEND, ForwardMode.DECODE)
_STOP = len(_MODES)
# mode, tokens, requests, logits rows (-1: all), req_to_token writes, GDN checkpoint copies
_HEADER_SIZE = 6


class TensorParallelError(RuntimeError):
    """A tensor-parallel worker died or a collective failed; the workers are stopped and the engine unusable."""


def check_tensor_parallel_model(model: str | Path | nn.Module, size: int, cuda_graphs: bool | None) -> None:
    """ValueError before anything starts unless `size` ranks can serve `model` (a directory or preset name)."""
    if not isinstance(size, int) or size < 1:
        raise ValueError(f"tensor_parallel_size must be an int >= 1, got {size!r}")
    if size == 1:
        return
    if isinstance(model, nn.Module):
        raise ValueError(
            f"tensor_parallel_size={size} needs a checkpoint directory or preset name (each rank loads its "
            f"own shard), not an nn.Module ({type(model).__name__})"
        )
    if Path(model).is_dir():
        raw = read_hf_config(Path(model))
    elif str(model) in list_presets():
        raw = preset_config(str(model))
    else:
        raise ValueError(
            f"model {str(model)!r} is neither a checkpoint directory nor a preset (presets: {list_presets()})"
        )
    model_cls, config = model_config(raw)
    owner = f"{model_cls.__name__} with tensor_parallel_size={size}"
    if not issubclass(model_cls, CausalLM):
        raise ValueError(f"{owner}: tensor parallelism serves decoder models only")
    check_tensor_parallel(config.num_attention_heads, config.num_key_value_heads, size, model_cls.__name__)
    split = {"MLP intermediate size": config.intermediate_size}
    if "linear_attention" in config.layer_types:
        split["GDN key heads"] = config.linear_num_key_heads
        split["GDN value heads"] = config.linear_num_value_heads
    if config.num_experts:
        split["MoE expert intermediate size"] = config.moe_intermediate_size
        split["MoE shared expert intermediate size"] = config.shared_expert_intermediate_size
    for what, total in split.items():
        if total % size:
            raise ValueError(f"{owner}: does not divide the {what} ({total})")
    if cuda_graphs:
        raise ValueError(f"{owner}: cuda_graphs=True is not supported with tensor parallelism yet")


def torchrun_rank(size: int) -> int | None:
    """This process's rank when a launcher (torchrun: RANK and WORLD_SIZE in the environment) started the
    `size` ranks of one tensor-parallel LLM; None when it did not (rank 0 then spawns its workers)."""
    if size == 1 or "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    world = int(os.environ["WORLD_SIZE"])
    if world != size:
        raise ValueError(
            f"tensor_parallel_size={size} under torchrun with WORLD_SIZE={world}: one tensor-parallel LLM "
            "spans the whole launch, so they must be equal"
        )
    return int(os.environ["RANK"])


def _join_launched_group(size: int, backend: str, timeout_s: float) -> tuple[TensorParallel, bool]:
    """Join the group of a torchrun launch: the one this process already initialised, or a new one from the
    environment (env://). Returns the group and whether this call created it (and so must destroy it)."""
    created = not dist.is_initialized()
    if created:
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s))
    if dist.get_world_size() != size:
        raise ValueError(
            f"tensor_parallel_size={size}: the initialised process group has {dist.get_world_size()} ranks"
        )
    return TensorParallel(dist.get_rank(), size, dist.group.WORLD.group_name), created


def _local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for a process group's rendezvous)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclasses.dataclass(frozen=True)
class _WorkerArgs:
    """What a worker needs to join the group and build its shard (picklable: sent through spawn)."""

    model: str
    size: int
    port: int
    backend: str
    device_type: str
    dtype: torch.dtype | None
    timeout_s: float


def _init_group(args: _WorkerArgs, rank: int) -> TensorParallel:
    dist.init_process_group(
        args.backend,
        init_method=f"tcp://127.0.0.1:{args.port}",
        rank=rank,
        world_size=args.size,
        timeout=datetime.timedelta(seconds=args.timeout_s),
    )
    return TensorParallel(rank, args.size, dist.group.WORLD.group_name)


def _rank_device(device_type: str, rank: int) -> torch.device:
    if device_type != "cuda":
        return torch.device(device_type)
    torch.cuda.set_device(rank)
    return torch.device("cuda", rank)


class TensorParallelWorkers:
    """Rank 0's side: starts the workers and the process group, broadcasts each step, stops the workers."""

    def __init__(
        self,
        model: str | Path,
        size: int,
        device: torch.device,
        dtype: torch.dtype | None,
        timeout_s: float = DEFAULT_TIMEOUT_S,
    ):
        launched = torchrun_rank(size) is not None
        if dist.is_initialized() and not launched:
            raise RuntimeError(
                f"tensor_parallel_size={size}: this process already has a torch.distributed process group; "
                "one tensor-parallel LLM per process (close() the other first)"
            )
        if device.type == "cuda" and torch.cuda.device_count() < (_local_rank() + 1 if launched else size):
            raise ValueError(
                f"tensor_parallel_size={size} needs {size} GPUs, {torch.cuda.device_count()} visible"
            )
        backend = "nccl" if device.type == "cuda" else "gloo"
        self.size, self.closed, self.processes = size, False, []
        self._journal: list[torch.Tensor] | None = None
        self._checkpoint_journal: list[tuple[int, int, int]] = []
        if launched:
            self.device = _rank_device(device.type, _local_rank())
            self.tp, self.owns_group = _join_launched_group(size, backend, timeout_s)
            logger.info("tensor parallel: rank 0 of %d torchrun ranks over %s", size, backend)
            return
        args = _WorkerArgs(str(model), size, free_port(), backend, device.type, dtype, timeout_s)
        self.device, self.owns_group = _rank_device(device.type, 0), True
        context = mp.get_context("spawn")
        self.processes = [
            context.Process(target=_worker_main, args=(args, rank), name=f"radixc-tp-rank{rank}", daemon=True)
            for rank in range(1, size)
        ]
        for process in self.processes:
            process.start()
        try:
            self.tp = _init_group(args, 0)
        except BaseException as err:
            self._fail("the process group did not form", err)
        logger.info("tensor parallel: %d ranks over %s (workers %s)", size, backend, self.pids)

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def attach(self, runner: ModelRunner, compile: bool, prefix_cache: PrefixCache | None) -> None:
        """Send rank 0's engine limits, backend and GDN checkpoint count to the workers (they build the same
        pools), then route every model call of `runner` through the step broadcast."""
        self._journal = runner.req_to_token_pool.journal = []
        num_checkpoint_slots = 0
        if isinstance(prefix_cache, HybridPrefixCache) and prefix_cache.checkpoint_pool is not None:
            self._checkpoint_journal = prefix_cache.journal = []
            num_checkpoint_slots = prefix_cache.checkpoint_pool.num_slots
        self._collective(
            dist.broadcast_object_list,
            [runner.config, runner.attn_backend.name, compile, num_checkpoint_slots],
            src=0,
        )
        runner.wrap_forward(self._broadcast_step)

    def _broadcast_step(self, forward: Callable) -> Callable:
        def step(input_ids: torch.Tensor, positions: torch.Tensor, batch: ForwardBatch) -> torch.Tensor:
            if self.closed:
                raise TensorParallelError("tensor parallel: the workers are stopped; build a new LLM")
            writes = torch.cat(self._journal, 1) if self._journal else input_ids.new_empty(3, 0)
            copies = torch.tensor(self._checkpoint_journal, dtype=torch.int64).view(-1, 3)
            self._journal.clear()
            self._checkpoint_journal.clear()
            logits_rows = batch.logits_indices
            header = torch.tensor(
                [
                    _MODES.index(batch.forward_mode),
                    input_ids.shape[0],
                    batch.batch_size,
                    -1 if logits_rows is None else logits_rows.shape[0],
                    writes.shape[1],
                    copies.shape[0],
                ],
                device=input_ids.device,
            )
            fields = [input_ids, positions, batch.out_cache_loc, batch.req_pool_indices, batch.seq_lens]
            fields += [
                batch.extend_prefix_lens,
                *([] if batch.gdn_slots is None else [batch.gdn_slots]),
                *([] if logits_rows is None else [logits_rows]),
                writes.flatten(),
                copies.flatten(),
            ]
            payload = torch.cat([f.to(input_ids.device, torch.int64) for f in fields])
            self._collective(dist.broadcast, header, src=0)
            self._collective(dist.broadcast, payload, src=0)
            return self._collective(forward, input_ids, positions, batch)

        return step

    def _collective(self, call: Callable, *args, **kwargs):
        """Run a call that the workers join; on any failure stop them all and raise TensorParallelError."""
        try:
            return call(*args, **kwargs)
        except BaseException as err:
            self._fail("a step failed", err)

    def _fail(self, what: str, err: BaseException):
        """Stop everything and raise: Ctrl-C as itself, anything else as a TensorParallelError naming the dead."""
        for process in self.processes:
            process.join(timeout=1.0)
        dead = [
            f"rank {r} (pid {p.pid}) exited with code {p.exitcode}" for r, p in self._ranks() if p.exitcode
        ]
        self.close(notify=False)
        if isinstance(err, KeyboardInterrupt):
            raise err
        reason = "; ".join(dead) if dead else f"{type(err).__name__}: {err}"
        raise TensorParallelError(f"tensor parallel: {what}: {reason}; all workers are stopped") from err

    def _ranks(self) -> list[tuple[int, mp.Process]]:
        return list(enumerate(self.processes, start=1))

    def close(self, notify: bool = True) -> None:
        """Stop the workers (asking them to leave their loop first when `notify`) and leave the process group."""
        if self.closed:
            return
        self.closed = True
        if notify and dist.is_initialized() and all(p.is_alive() for p in self.processes):
            try:
                stop = torch.zeros(_HEADER_SIZE, dtype=torch.int64, device=self.device)
                dist.broadcast(stop.fill_(_STOP), src=0)
            except Exception:  # a worker is going down anyway; terminate() below ends the rest
                logger.warning("tensor parallel: could not tell the workers to stop", exc_info=True)
        for process in self.processes:
            process.join(timeout=_JOIN_TIMEOUT_S if notify else 0.0)
            if process.is_alive():
                process.terminate()
                process.join(timeout=_JOIN_TIMEOUT_S)
            if process.is_alive():
                process.kill()
                process.join()
        if dist.is_initialized() and self.owns_group:
            dist.destroy_process_group()
        logger.info("tensor parallel: workers stopped")


def tensor_parallel_context(workers: TensorParallelWorkers | None):
    """Where rank 0 builds its model: inside the group's `tensor_parallel` block (a plain block on one rank)."""
    return tensor_parallel(workers.tp if workers is not None else TensorParallel())


def close_on_collect(owner: object, workers: TensorParallelWorkers) -> None:
    """Stop `workers` when `owner` is garbage-collected or the interpreter exits, whichever comes first."""
    weakref.finalize(owner, workers.close)


def _worker_main(args: _WorkerArgs, rank: int) -> None:
    """A spawned worker: join the group, build this rank's shard and pools, then run every step rank 0 sends."""
    try:
        device = _rank_device(args.device_type, rank)
        tp = _init_group(args, rank)
        _serve_steps(*_build_rank_engine(args.model, args.dtype, device, tp), device)
    except KeyboardInterrupt:
        pass  # rank 0 got the same Ctrl-C and reports it
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def serve_launched_rank(
    model: str | Path,
    size: int,
    device: torch.device,
    dtype: torch.dtype | None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
) -> None:
    """A non-zero rank of a torchrun launch: join the group, build this rank's shard, run rank 0's steps until
    rank 0 closes its engine, then leave the group (if this call created it)."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    device = _rank_device(device.type, _local_rank())
    tp, created = _join_launched_group(size, backend, timeout_s)
    try:
        _serve_steps(*_build_rank_engine(str(model), dtype, device, tp), device)
    finally:
        if created and dist.is_initialized():
            dist.destroy_process_group()


def _build_rank_engine(
    model: str, dtype: torch.dtype | None, device: torch.device, tp: TensorParallel
) -> tuple[ModelRunner, GDNPool | None]:
    """This rank's shard in an engine like rank 0's (its limits, backend and compile flag, sent by `attach`),
    and its pool of GDN checkpoints when rank 0's prefix cache keeps some."""
    with tensor_parallel(tp):
        shard = load_model_or_preset(model, dtype, device)
    received = [None, None, None, None]
    dist.broadcast_object_list(received, src=0)
    config, backend_name, compile, num_checkpoint_slots = received
    spec = model_cache_spec(shard)
    runner = ModelRunner(
        shard,
        spec,
        dataclasses.replace(config, device=device),
        choose_backend(backend_name, device, spec),
        compile=compile,
        cuda_graphs=False,
    )
    checkpoints = GDNPool.like(runner.gdn_pool, num_checkpoint_slots) if num_checkpoint_slots else None
    return runner, checkpoints


def _serve_steps(runner: ModelRunner, checkpoints: GDNPool | None, device: torch.device) -> None:
    """Receive each step from rank 0, replay its table writes and GDN checkpoint copies, and run the same
    forward, until rank 0 says stop."""
    pool = runner.req_to_token_pool
    while True:
        header = torch.empty(_HEADER_SIZE, dtype=torch.int64, device=device)
        dist.broadcast(header, src=0)
        mode, num_tokens, batch_size, num_logits_rows, num_writes, num_copies = header.tolist()
        if mode == _STOP:
            return
        gdn_slots_size = 0 if runner.gdn_pool is None else batch_size
        sizes = [num_tokens] * 3 + [batch_size] * 3
        sizes += [gdn_slots_size, max(num_logits_rows, 0), 3 * num_writes, 3 * num_copies]
        payload = torch.empty(sum(sizes), dtype=torch.int64, device=device)
        dist.broadcast(payload, src=0)
        fields = payload.split(sizes)
        input_ids, positions, out_cache_loc, rows, seq_lens, prefix_lens, gdn_slots, logits_rows = fields[:8]
        writes, copies = fields[8:]
        if num_writes:
            pool.write(*writes.view(3, num_writes))
        for to_checkpoint, slot, source_slot in copies.view(num_copies, 3).tolist():
            copy_checkpoint(runner.gdn_pool, checkpoints, bool(to_checkpoint), [slot], [source_slot])
        batch = ForwardBatch.create(
            forward_mode=_MODES[mode],
            input_ids=input_ids,
            positions=positions,
            req_pool_indices=rows,
            seq_lens=seq_lens,
            extend_prefix_lens=prefix_lens,
            out_cache_loc=out_cache_loc,
            req_to_token_pool=pool,
            token_to_kv_pool=runner.kv_pool,
            attn_backend=runner.attn_backend,
            gdn_pool=runner.gdn_pool,
            gdn_slots=None if runner.gdn_pool is None else gdn_slots,
            logits_indices=None if num_logits_rows < 0 else logits_rows,
        )
        runner.forward(batch)
