"""`radixc serve MODEL` (also `python -m radixc.serve`): the OpenAI-compatible server on uvicorn, its model in
an engine process of its own.

SIGINT / SIGTERM stop it gracefully: no new connections, in-flight requests finish (up to --shutdown-timeout,
then they are cancelled), the engine process stops, and the process exits 0. When the model fails to load or
the engine process dies, every waiting client gets the error, the server stops and exits 1.
"""

from __future__ import annotations

import argparse
import functools
import logging
import signal
from collections.abc import Sequence
from pathlib import Path

import uvicorn

from radixc.engine.llm import LLM
from radixc.serve.affinity import parse_cpu_list, pin_server_beside
from radixc.serve.app import DEFAULT_MAX_BODY_BYTES, build_app
from radixc.serve.chat import ChatTemplate
from radixc.serve.engine import AsyncEngine
from radixc.serve.engine_process import LOG_FORMAT

logger = logging.getLogger("radixc.serve")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="radixc serve", description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a Hugging Face checkpoint directory or a preset name")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--served-model-name", help="the model name clients send (default: MODEL)")
    parser.add_argument("--backend", default="auto", help="auto | native | triton | flashinfer")
    parser.add_argument("--dtype", help="e.g. bfloat16, float16, float32 (default: the checkpoint's)")
    parser.add_argument("--device", help="e.g. cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--no-compile", action="store_true", help="run the model eagerly")
    parser.add_argument("--page-size", type=int, default=16)
    parser.add_argument("--max-batch-size", type=int)
    parser.add_argument("--max-tokens-per-step", type=int)
    parser.add_argument("--max-context-len", type=int)
    parser.add_argument("--kv-memory-bytes", type=int)
    parser.add_argument("--gpu-memory-utilization", type=float)
    parser.add_argument("--no-prefix-cache", action="store_true")
    parser.add_argument(
        "--extend-graph-max-tokens",
        type=int,
        help="the longest extend step replayed from a CUDA graph (default 2048 where it can be; 0: none)",
    )
    parser.add_argument("--tokenizer", help="a tokenizer.json (default: the checkpoint's)")
    parser.add_argument(
        "--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES, help="larger bodies get 413"
    )
    parser.add_argument(
        "--stream-interval",
        type=_positive_int,
        default=1,
        help="stream a choice's tokens in chunks of this many (its first token and its end at once); "
        "larger: less host work per token, coarser streams",
    )
    parser.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests may take to finish after SIGINT / SIGTERM",
    )
    parser.add_argument(
        "--engine-cpus",
        type=_cpu_list,
        help="run the engine process on these CPUs (e.g. 0-3) and the server process on the others (Linux)",
    )
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def _positive_int(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number of at least 1, not {text!r}")
    return int(text)


def _cpu_list(text: str) -> list[int]:
    try:
        return parse_cpu_list(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None


def main(argv: Sequence[str] | None = None) -> int:
    """Serve until SIGINT / SIGTERM; 0 after a graceful shutdown, 1 when the model fails to load or the engine
    process dies."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format=LOG_FORMAT)
    make_llm = functools.partial(
        LLM,
        args.model,
        backend=args.backend,
        device=args.device,
        dtype=args.dtype,
        compile=not args.no_compile,
        page_size=args.page_size,
        max_batch_size=args.max_batch_size,
        max_tokens_per_step=args.max_tokens_per_step,
        max_context_len=args.max_context_len,
        kv_memory_bytes=args.kv_memory_bytes,
        gpu_memory_utilization=args.gpu_memory_utilization,
        enable_prefix_cache=not args.no_prefix_cache,
        extend_graph_max_tokens=args.extend_graph_max_tokens,
        progress=False,
        tokenizer=args.tokenizer,
    )
    chat_template = ChatTemplate.from_checkpoint(args.model) if Path(args.model).is_dir() else None

    def stop_on_engine_failure(message: str) -> None:
        server.should_exit = True

    if args.engine_cpus is not None:
        kept = pin_server_beside(args.engine_cpus)
        logger.info("engine process on CPUs %s, server process on %s", args.engine_cpus, kept)
    engine = AsyncEngine(make_llm, on_failure=stop_on_engine_failure, engine_cpus=args.engine_cpus)
    app = build_app(
        engine,
        args.served_model_name or args.model,
        chat_template,
        args.max_body_bytes,
        args.stream_interval,
    )
    config = uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level=args.log_level,
        timeout_graceful_shutdown=args.shutdown_timeout,
    )
    server = uvicorn.Server(config)
    # uvicorn handles the first SIGINT / SIGTERM itself, then restores these handlers and re-raises the
    # signal to end the process; after a graceful shutdown, the end is a normal exit
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _after_graceful_shutdown)
    server.run()
    if engine.error is not None:
        logger.error("exiting: %s", engine.error)
        return 1
    return 0


def _after_graceful_shutdown(sig: int, frame) -> None:
    logger.info("shut down on %s", signal.Signals(sig).name)
