"""radixc-inspect: compile a model and show what the radixc passes and Inductor made of it.

    radixc-inspect --model tiny-qwen3.5 --mode decode [--backend native] [--html report.html]
                   [--tensor-parallel-size 2]

For each compiled graph: the FX graph before and after the radixc passes with a diff per pass, the kernel each
attention / GDN node lowered to, its tensor-parallel collectives, Inductor's partition cuts and its output code;
then graph breaks and recompiles.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torch._dynamo.utils import counters, guard_failures

import radixc
from radixc.engine.backends import BACKENDS
from radixc.engine.batch_builder import BatchBuilder, RequestMemory
from radixc.engine.config import DEVICE_DEFAULTS
from radixc.engine.cuda_graphs import (
    DEFAULT_EXTEND_GRAPH_MAX_TOKENS,
    capture_batch_sizes,
    extend_token_buckets,
)
from radixc.engine.placement import resolve_device
from radixc.engine.runner import (
    ModelRunner,
    build_runner,
    compile_model,
    cuda_graphs_problem,
    model_cache_spec,
)
from radixc.engine.tensor_parallel import check_tensor_parallel_model, free_port
from radixc.forward_batch import ForwardBatch, ForwardMode
from radixc.models import CheckpointError, list_presets, load_model_or_preset
from radixc.models.config import DTYPE_NAMES, parse_dtype
from radixc.models.parallel import SINGLE, TensorParallel, tensor_parallel
from radixc.tools.graph_capture import GraphCapture, InspectReport, Step, has_partition_pass
from radixc.tools.html_report import render_html
from radixc.tools.text_report import render_text

logger = logging.getLogger("radixc.tools")

MODES = ("extend", "decode")
KV_MEMORY_BYTES = 64 << 20  # plenty for a few short requests; the engine default would take most of a GPU


class InspectError(RuntimeError):
    """A request the tool cannot serve (unknown model, mode the model lacks); main reports it and exits 2."""


def load(model: str, dtype: str | None, device: torch.device) -> nn.Module:
    """A preset by name (random weights) or a Hugging Face-format checkpoint directory."""
    try:
        return load_model_or_preset(model, parse_dtype(dtype), device)
    except ValueError as err:
        raise InspectError(str(err)) from err


def make_runner(model: nn.Module, backend: str, num_requests: int, max_context: int) -> ModelRunner:
    """The engine's pools and BatchBuilder for num_requests requests of up to max_context tokens (not compiled:
    the tool compiles the model itself)."""
    try:
        return build_runner(
            model,
            backend=backend,
            compile=False,
            max_batch_size=num_requests,
            max_context_len=max_context,
            kv_memory_bytes=KV_MEMORY_BYTES,
        )
    except (ValueError, RuntimeError) as err:
        raise InspectError(str(err)) from err


def modes_for(model: nn.Module, mode: str | None, name: str) -> tuple[str, ...]:
    """The forward modes to compile: the one asked for, or every mode the model has."""
    encoder_only = model_cache_spec(model).is_encoder_only
    if mode == "decode" and encoder_only:
        raise InspectError(f"{name} is encoder-only: it has no decode step (use --mode extend)")
    if mode is not None:
        return (mode,)
    return ("extend",) if encoder_only else MODES


def batches(
    builder: BatchBuilder, modes: Sequence[str], batch_size: int, prompt_len: int, vocab_size: int
) -> list[tuple[str, ForwardBatch, bool]]:
    """(mode, batch, is second batch of its mode) per step: per mode a batch of batch_size requests, then one
    of batch_size + 1 (other shapes: compiling again there is a recompile on a new batch size)."""
    generator = torch.Generator().manual_seed(0)
    tokens = lambda n: torch.randint(0, vocab_size, (n,), generator=generator).tolist()  # noqa: E731
    groups = [[builder.new_request() for _ in range(n)] for n in (batch_size, batch_size + 1)]
    steps = []

    def step(mode: str, group: list[RequestMemory], batch: ForwardBatch) -> None:
        if mode in modes:
            steps.append((mode, batch, group is groups[1]))

    # prompts are built (and their pages reserved) even when only decode is inspected
    for group in groups:
        step("extend", group, builder.extend(group, [tokens(prompt_len + i) for i in range(len(group))]))
    for group in groups:
        step("decode", group, builder.decode(group, tokens(len(group))))
    return steps


def inspect_tensor_parallel(args: argparse.Namespace) -> InspectReport:
    """Rank 0's report of `args.tensor_parallel_size` processes that each compile and run their shard on the
    same batches, joined by torch.distributed (gloo on CPU, NCCL on CUDA with rank r on cuda:r)."""
    size, port = args.tensor_parallel_size, free_port()
    try:
        check_tensor_parallel_model(args.model, size, cuda_graphs=False)
    except ValueError as err:
        raise InspectError(str(err)) from err
    context = mp.get_context("spawn")
    workers = [context.Process(target=_inspect_rank, args=(args, rank, port)) for rank in range(1, size)]
    for worker in workers:
        worker.start()
    try:
        return _inspect_rank(args, 0, port)
    finally:
        for worker in workers:
            worker.join(timeout=60)
            if worker.is_alive():
                worker.kill()
                worker.join()


def _inspect_rank(args: argparse.Namespace, rank: int, port: int) -> InspectReport:
    device = resolve_device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", rank)
        torch.cuda.set_device(device)
    dist.init_process_group(
        "nccl" if device.type == "cuda" else "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=args.tensor_parallel_size,
    )
    try:
        tp = TensorParallel(rank, args.tensor_parallel_size, dist.group.WORLD.group_name)
        return inspect_model(argparse.Namespace(**{**vars(args), "device": str(device)}), tp)
    finally:
        dist.destroy_process_group()


def inspect_model(args: argparse.Namespace, tp: TensorParallel = SINGLE) -> InspectReport:
    """Compile the model (this rank's shard under `tp`) under the radixc passes, run it on small batches and
    collect what was compiled."""
    try:
        device = resolve_device(args.device)
    except ValueError as err:
        raise InspectError(str(err)) from err
    with tensor_parallel(tp):
        model = load(args.model, args.dtype, device)
    modes = modes_for(model, args.mode, args.model)
    config = model.config
    # the second batch of each mode has batch_size + 1 requests, the longest prompt_len + batch_size tokens
    max_context = args.prompt_len + args.batch_size + 1
    runner = make_runner(model, args.backend, 2 * args.batch_size + 1, max_context)
    plan = batches(runner.builder, modes, args.batch_size, args.prompt_len, config.vocab_size)

    torch._dynamo.reset()
    counters.clear()
    capture = GraphCapture(radixc.passes.install())
    compiled = compile_model(model, device)
    no_graph_cache = torch._inductor.config.patch(fx_graph_cache=False)  # a cache hit would skip the passes
    no_autograd_cache = torch._functorch.config.patch(enable_autograd_cache=False)
    steps = []
    with torch.inference_mode(), no_graph_cache, no_autograd_cache, capture.attached():
        for mode, batch, second in plan:
            batch_size = batch.seq_lens.shape[0]
            capture.label = f"{mode}, batch of {batch_size}"
            logger.info("running %s", capture.label)
            compiled_before, start = len(capture.graphs), time.perf_counter()
            compiled(batch.input_ids, batch.positions, batch)
            elapsed = time.perf_counter() - start
            steps.append(Step(mode, batch_size, elapsed, len(capture.graphs) - compiled_before, second))

    inductor_config = torch._inductor.config
    return InspectReport(
        model=args.model,
        architecture=config.architecture,
        backend=runner.builder.attn_backend.name,
        dtype=str(next(model.parameters()).dtype).removeprefix("torch."),
        device=str(device),
        steps=steps,
        graphs=capture.graphs,
        graph_breaks=dict(counters["graph_break"]),
        unique_graphs=counters["stats"]["unique_graphs"],
        recompile_reasons=[str(reason) for reasons in guard_failures.values() for reason in reasons],
        has_partition_pass=has_partition_pass(),
        graph_partition=bool(getattr(inductor_config, "graph_partition", False)),
        cudagraphs=bool(inductor_config.triton.cudagraphs),
        decode_graphs=decode_graphs_summary(runner, device, "decode" in modes),
    )


def decode_graphs_summary(runner: ModelRunner, device: torch.device, decodes: bool) -> str:
    """What `LLM` would capture for this model on this device by default: the decode batch-size buckets and the
    extend token-count buckets, or why none."""
    problem = cuda_graphs_problem(device, runner.attn_backend, runner.spec)
    if problem is None and not decodes:
        problem = "no decode mode inspected"
    if problem is not None:
        return f"not captured: {problem}"
    defaults = DEVICE_DEFAULTS[device.type]
    extend_tokens = min(DEFAULT_EXTEND_GRAPH_MAX_TOKENS, defaults.max_tokens_per_step)
    extend = (
        f"extend at token counts {extend_token_buckets(extend_tokens)}"
        if runner.attn_backend.supports_cuda_graphs(ForwardMode.EXTEND)
        else f"extend uncaptured (the {runner.attn_backend.name} backend plans extend steps on the host)"
    )
    return (
        f"captured by LLM: decode at batch sizes {capture_batch_sizes(defaults.max_batch_size)}, {extend} "
        f"(default max_batch_size {defaults.max_batch_size}; one torch.cuda.CUDAGraph each, replaying this "
        "output code)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="radixc-inspect",
        description="Show the FX graphs around each radixc pass, the kernels attention and GDN nodes lowered "
        "to, Inductor's partitions and output code, graph breaks and recompiles.",
    )
    parser.add_argument(
        "--model", required=True, help=f"a preset ({', '.join(list_presets())}) or a checkpoint dir"
    )
    parser.add_argument("--mode", choices=MODES, help="forward mode to compile (default: both)")
    parser.add_argument(
        "--backend",
        choices=["auto", *BACKENDS],
        default="native",
        help="attention backend (default native; auto: the best available on the device)",
    )
    parser.add_argument("--dtype", choices=DTYPE_NAMES, help="model dtype (default: the model's own)")
    parser.add_argument("--device", help="device (default: cuda when available, else cpu)")
    parser.add_argument("--batch-size", type=int, default=2, help="requests in the first batch (default 2)")
    parser.add_argument("--prompt-len", type=int, default=5, help="tokens of the shortest prompt (default 5)")
    parser.add_argument(
        "--graphs",
        choices=("all", "ends", "none"),
        default="ends",
        help="full FX graphs to print: after every pass, only before and after the passes (default), none",
    )
    parser.add_argument(
        "--tensor-parallel-size",
        type=int,
        default=1,
        help="split the model over this many processes (default 1); the report is rank 0's",
    )
    parser.add_argument("--html", type=Path, help="also write a self-contained HTML report to this file")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress (radixc.tools at INFO)")
    return parser


def html_path_problem(path: Path) -> str | None:
    """Why the HTML report cannot be written to `path` (checked before compiling, which takes a while)."""
    if path.is_dir():
        return "is a folder; give a file name such as report.html"
    if not path.parent.is_dir():
        return f"folder {path.parent} does not exist"
    if not os.access(path.parent, os.W_OK):
        return f"folder {path.parent} is not writable"
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.verbose:
        logging.basicConfig(format="%(name)s: %(message)s")
        logging.getLogger("radixc").setLevel(logging.INFO)
    if min(args.batch_size, args.prompt_len, args.tensor_parallel_size) < 1:
        print(
            "radixc-inspect: error: --batch-size, --prompt-len and --tensor-parallel-size must be at least 1",
            file=sys.stderr,
        )
        return 2
    if args.html is not None and (problem := html_path_problem(args.html)):
        print(f"radixc-inspect: error: --html {args.html}: {problem}", file=sys.stderr)
        return 2
    try:
        report = inspect_model(args) if args.tensor_parallel_size == 1 else inspect_tensor_parallel(args)
    except (InspectError, CheckpointError) as err:
        print(f"radixc-inspect: error: {err}", file=sys.stderr)
        return 2
    sys.stdout.write(render_text(report, color=sys.stdout.isatty(), graphs=args.graphs))
    if args.html is not None:
        args.html.write_text(render_html(report))
        logger.info("wrote %s", args.html)
        print(f"HTML report: {args.html}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
