"""Serving load: N concurrent streaming clients against `radixc serve` vs offline `LLM.generate` on the same
prompts. Prints a table and writes JSON (--json); never asserts on time.

The server runs as its own process (`python -m radixc.serve`), as deployed; the clients stream from this one.
Offline runs first, in this process, and is freed before the server starts (one model in memory at a time).
Reported: output tokens/s both ways and their ratio, time to first token with 1 and with N clients, and the
server's overhead per step: (server wall - offline wall) / the engine steps the server ran (from /metrics).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import socket
import subprocess
import sys
import time

import httpx
import torch

from radixc.engine.llm import LLM
from radixc.engine.request import SamplingParams


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llama", help="a preset name or a checkpoint directory")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64, help="tokens each client generates")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--dtype")
    parser.add_argument("--device")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--max-batch-size", type=int, help="default: --clients")
    parser.add_argument("--threads", type=int, help="torch intra-op threads, here and in the server")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for the server")
    parser.add_argument("--json", help="write the results here")
    return parser.parse_args()


def engine_options(args: argparse.Namespace) -> list[str]:
    """The LLM options, as `radixc serve` flags (the offline LLM gets the same values)."""
    options = ["--backend", args.backend, "--max-batch-size", str(args.max_batch_size or args.clients)]
    options += ["--dtype", args.dtype] if args.dtype else []
    options += ["--device", args.device] if args.device else []
    options += ["--no-compile"] if args.no_compile else []
    return options


def run_offline(args: argparse.Namespace, prompts: list[list[int]]) -> dict[str, float]:
    llm = LLM(
        args.model,
        backend=args.backend,
        dtype=args.dtype,
        device=args.device,
        compile=not args.no_compile,
        max_batch_size=args.max_batch_size or args.clients,
        progress=False,
    )
    params = SamplingParams(max_new_tokens=args.max_tokens, ignore_eos=True)
    llm.generate(prompts, params)  # compiles every shape the timed run meets
    _synchronize(llm.device)
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    _synchronize(llm.device)
    wall = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outputs)
    del llm, outputs
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"wall_s": wall, "tokens": tokens, "tokens_per_s": tokens / wall}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


async def stream_one(
    client: httpx.AsyncClient, model: str, prompt: list[int], max_tokens: int
) -> tuple[float, int]:
    """(seconds to the first text chunk, completion tokens) of one streamed completion."""
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    start, first, tokens = time.perf_counter(), None, 0
    async with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        async for line in response.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(f"server error: {chunk['error']['message']}")
            if chunk["choices"] and first is None:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return first, tokens


async def run_clients(url: str, model: str, prompts: list[list[int]], max_tokens: int) -> dict[str, float]:
    limits = httpx.Limits(max_connections=len(prompts) + 4)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        start = time.perf_counter()
        results = await asyncio.gather(*(stream_one(client, model, p, max_tokens) for p in prompts))
        wall = time.perf_counter() - start
    ttft = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return {
        "wall_s": wall,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "ttft_p50_s": ttft[len(ttft) // 2],
        "ttft_max_s": ttft[-1],
    }


def metrics(url: str) -> dict[str, float]:
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    return {
        name: float(value) for name, value in (line.split() for line in lines if not line.startswith("#"))
    }


def run_server(args: argparse.Namespace, prompts: list[list[int]]) -> dict[str, dict[str, float]]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    command = [
        sys.executable,
        "-m",
        "radixc.serve",
        args.model,
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    server = subprocess.Popen(command + engine_options(args), env=env)
    try:
        deadline = time.monotonic() + args.startup_timeout
        while not _healthy(url):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not become ready (exit code {server.poll()})")
            time.sleep(0.2)
        asyncio.run(run_clients(url, args.model, prompts, args.max_tokens))  # warm: same shapes as timed
        single = asyncio.run(run_clients(url, args.model, prompts[:1], args.max_tokens))
        before = metrics(url)
        loaded = asyncio.run(run_clients(url, args.model, prompts, args.max_tokens))
        after = metrics(url)
        loaded["steps"] = after["radixc_steps_total"] - before["radixc_steps_total"]
        return {"single": single, "loaded": loaded}
    finally:
        server.terminate()
        server.wait(60)


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(2, 256, (args.clients, args.prompt_len), generator=gen).tolist()
    offline = run_offline(args, prompts)
    served = run_server(args, prompts)
    loaded = served["loaded"]
    overhead_ms = (loaded["wall_s"] - offline["wall_s"]) / loaded["steps"] * 1e3
    rows = [
        ("offline LLM.generate tokens/s", f"{offline['tokens_per_s']:.1f}"),
        (f"server, {args.clients} streaming clients, tokens/s", f"{loaded['tokens_per_s']:.1f}"),
        ("server / offline throughput", f"{loaded['tokens_per_s'] / offline['tokens_per_s']:.3f}"),
        ("engine steps (server run)", f"{loaded['steps']:.0f}"),
        ("server overhead per step, ms", f"{overhead_ms:.3f}"),
        ("time to first token, 1 client, ms", f"{served['single']['ttft_p50_s'] * 1e3:.1f}"),
        (
            f"time to first token, {args.clients} clients, p50 / max ms",
            f"{loaded['ttft_p50_s'] * 1e3:.1f} / {loaded['ttft_max_s'] * 1e3:.1f}",
        ),
    ]
    print(
        f"\n{args.model}: {args.clients} prompts x {args.prompt_len} tokens, {args.max_tokens} new tokens each"
    )
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value:>14}")
    if args.json:
        record = {
            "args": vars(args),
            "offline": offline,
            "served": served,
            "overhead_ms_per_step": overhead_ms,
        }
        with open(args.json, "w") as file:
            json.dump(record, file, indent=2)


if __name__ == "__main__":
    main()
