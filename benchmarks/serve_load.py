"""Serving load: N concurrent streaming clients against `radixc serve` vs offline `LLM.generate` on the same
prompts. Prints a table and writes JSON (--json); never asserts on time.

The server runs as its own process (`python -m radixc.serve`), as deployed, with its engine process below it;
the clients stream from this one. Offline generation runs in this process, with its own engine, and the timed
runs alternate (offline, server, offline, ...): a run is short (~0.2 s for llama-1b on an H200), and back-to-back
runs of one side on the GPU differed by 10-15% in step time, so the ratio is taken pair by pair (its median and
range reported) rather than between two separate series. Both engines get the same KV pool (--kv-memory-bytes;
1 GiB by default on CUDA, so that two engines fit).
Both sides detokenize: a preset (random weights, no tokenizer of its own) gets a word-level tokenizer of its
vocabulary, so the server streams a text chunk for every token (or every --stream-interval tokens), as it
would for a real model.
Reported: output tokens/s both ways and their ratio, time to first token with 1 and with N clients, and the
server's overhead per step: (server wall - offline wall) / the engine steps the server ran (from /metrics).
The model steps' own counts and times (`LLM.step_stats` offline, /metrics for the server) split that overhead:
slower extend or decode steps, or more time between them (scheduling, streaming, waiting for requests).
Walls and steps are the medians of --repeats timed runs each way; the clients' own CPU time is reported too,
since on a small machine the load generator competes with the server for the same cores. So is the CPU time per
step of the server (its HTTP process and, apart, its engine process and that one's children) and of offline
generation (Linux): unlike the walls, it does not move with what else runs on the machine, and its difference
is the server's own work per step. With --engine-cpus the engine process keeps to those CPUs, offline generation
runs on the same ones, and the server's HTTP process and the clients share the rest.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator

import httpx
import torch

from radixc.engine.llm import LLM
from radixc.engine.placement import resolve_device
from radixc.engine.request import SamplingParams
from radixc.engine.step_stats import StepStats
from radixc.models.presets import list_presets, preset_config, word_tokenizer
from radixc.serve.affinity import parse_cpu_list

MODEL_STEP_FIELDS = tuple(field.name for field in dataclasses.fields(StepStats))


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
    parser.add_argument(
        "--extend-graph-max-tokens",
        type=int,
        help="the engines' extend_graph_max_tokens (0: extend uncaptured)",
    )
    parser.add_argument("--max-batch-size", type=int, help="default: --clients")
    parser.add_argument(
        "--kv-memory-bytes",
        type=int,
        help="both engines' KV pool (default: 1 GiB on CUDA, the device's on CPU)",
    )
    parser.add_argument("--threads", type=int, help="torch intra-op threads, here and in the server")
    parser.add_argument(
        "--tokenizer", help="a tokenizer.json (default: the checkpoint's, or a preset's words)"
    )
    parser.add_argument(
        "--stream-interval", type=int, default=1, help="the server's --stream-interval (tokens per chunk)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="timed runs each way; medians are reported")
    parser.add_argument("--startup-timeout", type=float, default=600.0, help="seconds to wait for the server")
    parser.add_argument(
        "--engine-cpus",
        type=parse_cpu_list,
        help="the server's --engine-cpus (e.g. 0); offline generation then runs on the same CPUs, and the clients "
        "on the others, beside the server's HTTP process",
    )
    parser.add_argument("--json", help="write the results here")
    return parser.parse_args()


def engine_options(args: argparse.Namespace) -> list[str]:
    """The LLM options, as `radixc serve` flags (the offline LLM gets the same values)."""
    options = ["--backend", args.backend, "--max-batch-size", str(args.max_batch_size or args.clients)]
    options += ["--dtype", args.dtype] if args.dtype else []
    options += ["--device", args.device] if args.device else []
    options += ["--no-compile"] if args.no_compile else []
    if args.extend_graph_max_tokens is not None:
        options += ["--extend-graph-max-tokens", str(args.extend_graph_max_tokens)]
    options += ["--tokenizer", args.tokenizer] if args.tokenizer else []
    options += ["--engine-cpus", ",".join(map(str, args.engine_cpus))] if args.engine_cpus else []
    options += ["--kv-memory-bytes", str(args.kv_memory_bytes)] if args.kv_memory_bytes else []
    return options


@contextlib.contextmanager
def on_cpus(cpus: list[int] | None):
    """Run this process on `cpus` for the duration (no change when None)."""
    if cpus is None:
        yield
        return
    saved = os.sched_getaffinity(0)
    os.sched_setaffinity(0, cpus)
    try:
        yield
    finally:
        os.sched_setaffinity(0, saved)


def start_offline(args: argparse.Namespace, prompts: list[list[int]]) -> LLM:
    """The offline engine, with every shape of the timed runs compiled."""
    llm = LLM(
        args.model,
        backend=args.backend,
        dtype=args.dtype,
        device=args.device,
        compile=not args.no_compile,
        max_batch_size=args.max_batch_size or args.clients,
        kv_memory_bytes=args.kv_memory_bytes,
        extend_graph_max_tokens=args.extend_graph_max_tokens,
        progress=False,
        tokenizer=args.tokenizer,
    )
    llm.generate(prompts, SamplingParams(max_new_tokens=args.max_tokens, ignore_eos=True))
    return llm


def offline_run(llm: LLM, args: argparse.Namespace, prompts: list[list[int]]) -> dict[str, float]:
    """One timed `LLM.generate` over the prompts: wall, CPU, tokens and the model steps' counts and times."""
    params = SamplingParams(max_new_tokens=args.max_tokens, ignore_eos=True)
    _synchronize(llm.device)
    start, cpu_start, stats_before = time.perf_counter(), _cpu_seconds(), llm.step_stats.copy()
    outputs = llm.generate(prompts, params)
    _synchronize(llm.device)
    wall = time.perf_counter() - start
    tokens = sum(len(o.token_ids) for o in outputs)
    return {
        "wall_s": wall,
        "cpu_s": _cpu_seconds() - cpu_start,
        **dataclasses.asdict(llm.step_stats.since(stats_before)),
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
    }


def medians(runs: list[dict[str, float]]) -> dict[str, float]:
    """Each field's median over runs; tokens/s from the median wall."""
    summary = {key: statistics.median(run[key] for run in runs) for key in runs[0]}
    summary["tokens_per_s"] = summary["tokens"] / summary["wall_s"]
    return summary


def _step_ms(record: dict[str, float], mode: str) -> str:
    """Mean wall time of one model step of `mode` in a run's record."""
    steps = record[f"{mode}_steps"]
    return f"{record[f'{mode}_seconds'] / steps * 1e3:.2f}" if steps else "-"


def _outside_ms(record: dict[str, float]) -> str:
    """Wall time per model step not spent in model steps: scheduling, streaming, waiting for requests."""
    steps = record["extend_steps"] + record["decode_steps"]
    outside = record["wall_s"] - record["extend_seconds"] - record["decode_seconds"]
    return f"{outside / steps * 1e3:.2f}" if steps else "-"


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


FIRST_TEXT = b'"choices":[{'  # in every chunk that carries text, first in the first one


async def stream_one(
    host: str, port: int, model: str, prompt: list[int], max_tokens: int
) -> tuple[float, int]:
    """(seconds to the first text chunk, completion tokens) of one streamed completion.

    A bare HTTP/1.1 exchange (Connection: close, read to the end): the chunks are only searched as they come and
    the usage chunk parsed at the end, since httpx's line iterator took as much CPU as the server it measured.
    """
    body = json.dumps(
        {
            "model": model,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    ).encode()
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    start, first = time.perf_counter(), None
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(head.encode() + body)
    received = bytearray()
    while chunk := await reader.read(1 << 16):
        searched_from = max(0, len(received) - len(FIRST_TEXT))
        received += chunk
        if first is None and received.find(FIRST_TEXT, searched_from) >= 0:
            first = time.perf_counter() - start
    writer.close()
    status = bytes(received[: received.find(b"\r\n")])
    usage_at = received.rfind(b'"usage":')
    if not status.startswith(b"HTTP/1.1 200") or b'{"error":' in received or usage_at < 0:
        raise RuntimeError(f"server answered {status!r}: {bytes(received[-500:])!r}")
    event = received[received.rfind(b"data: ", 0, usage_at) + 6 : received.find(b"\n", usage_at)]
    return first, json.loads(event)["usage"]["completion_tokens"]


async def run_clients(url: str, model: str, prompts: list[list[int]], max_tokens: int) -> dict[str, float]:
    address = httpx.URL(url)
    start, cpu_start = time.perf_counter(), _cpu_seconds()
    results = await asyncio.gather(
        *(stream_one(address.host, address.port, model, p, max_tokens) for p in prompts)
    )
    wall, client_cpu = time.perf_counter() - start, _cpu_seconds() - cpu_start
    ttft = sorted(r[0] for r in results)
    tokens = sum(r[1] for r in results)
    return {
        "wall_s": wall,
        "client_cpu_s": client_cpu,
        "tokens": tokens,
        "tokens_per_s": tokens / wall,
        "ttft_p50_s": ttft[len(ttft) // 2],
        "ttft_max_s": ttft[-1],
    }


def _cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _process_cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of another process so far (Linux /proc; NaN elsewhere)."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            fields = file.read().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _descendants(pid: int) -> list[int]:
    """The live processes below `pid` (Linux /proc; none elsewhere)."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        try:
            tasks = os.listdir(f"/proc/{parent}/task")
        except OSError:
            continue
        for task in tasks:
            try:
                with open(f"/proc/{parent}/task/{task}/children") as file:
                    children = [int(child) for child in file.read().split()]
            except OSError:
                continue
            found += children
            todo += children
    return found


def _engine_cpu_seconds(server_pid: int) -> float:
    """CPU seconds so far of every process below the server: its engine process (and the forkserver it came
    from, and Inductor's compile workers, all idle once warm)."""
    return sum(_process_cpu_seconds(pid) for pid in _descendants(server_pid))


def metrics(url: str) -> dict[str, float]:
    lines = httpx.get(f"{url}/metrics").text.splitlines()
    return {
        name: float(value) for name, value in (line.split() for line in lines if not line.startswith("#"))
    }


@contextlib.contextmanager
def running_server(args: argparse.Namespace) -> Iterator[tuple[str, int]]:
    """`radixc serve` on a free loopback port, ready: (its URL, its pid); stopped afterwards."""
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
        "--stream-interval",
        str(args.stream_interval),
    ]
    server = subprocess.Popen(command + engine_options(args), env=env)
    try:
        deadline = time.monotonic() + args.startup_timeout
        while not _healthy(url):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the server did not become ready (exit code {server.poll()})")
            time.sleep(0.2)
        yield url, server.pid
    finally:
        server.terminate()
        server.wait(60)


def server_run(url: str, pid: int, args: argparse.Namespace, prompts: list[list[int]]) -> dict[str, float]:
    """One timed burst of streaming clients: the clients' view, and the server's CPU and engine steps meanwhile."""
    before = metrics(url)
    cpu_before, engine_before = _process_cpu_seconds(pid), _engine_cpu_seconds(pid)
    run = asyncio.run(run_clients(url, args.model, prompts, args.max_tokens))
    run["server_cpu_s"] = _process_cpu_seconds(pid) - cpu_before
    run["engine_cpu_s"] = _engine_cpu_seconds(pid) - engine_before
    after = metrics(url)
    run["steps"] = after["radixc_steps_total"] - before["radixc_steps_total"]
    for key in ("step_seconds", *MODEL_STEP_FIELDS):
        run[key] = after[f"radixc_{key}_total"] - before[f"radixc_{key}_total"]
    return run


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def main() -> None:
    args = parse_args()
    if args.tokenizer is None and args.model in list_presets():
        args.tokenizer = os.path.join(tempfile.mkdtemp(), "tokenizer.json")
        word_tokenizer(preset_config(args.model)["vocab_size"]).save(args.tokenizer)
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(2, 256, (args.clients, args.prompt_len), generator=gen).tolist()
    if args.kv_memory_bytes is None and resolve_device(args.device).type == "cuda":
        args.kv_memory_bytes = 1 << 30
    with on_cpus(args.engine_cpus):
        llm = start_offline(args, prompts)
    # the clients beside the server's HTTP process, off the engine's CPUs (the server started with all of ours)
    client_cpus = (
        (sorted(os.sched_getaffinity(0) - set(args.engine_cpus)) or None) if args.engine_cpus else None
    )
    with running_server(args) as (url, pid):
        with on_cpus(client_cpus):
            asyncio.run(run_clients(url, args.model, prompts, args.max_tokens))  # warm: same shapes as timed
            single = asyncio.run(run_clients(url, args.model, prompts[:1], args.max_tokens))
        offline_runs, server_runs = [], []
        for _ in range(args.repeats):
            with on_cpus(args.engine_cpus):
                offline_runs.append(offline_run(llm, args, prompts))
            with on_cpus(client_cpus):
                server_runs.append(server_run(url, pid, args, prompts))
    offline, loaded = medians(offline_runs), medians(server_runs)
    ratios = [s["tokens_per_s"] / o["tokens_per_s"] for o, s in zip(offline_runs, server_runs, strict=True)]
    overhead_ms = (loaded["wall_s"] - offline["wall_s"]) / loaded["steps"] * 1e3
    served_cpu = loaded["server_cpu_s"] + loaded["engine_cpu_s"]
    cpu_overhead_ms = (served_cpu - offline["cpu_s"]) / loaded["steps"] * 1e3
    rows = [
        ("offline LLM.generate tokens/s", f"{offline['tokens_per_s']:.1f}"),
        (f"server, {args.clients} streaming clients, tokens/s", f"{loaded['tokens_per_s']:.1f}"),
        ("server / offline throughput, median of pairs", f"{statistics.median(ratios):.3f}"),
        ("  range over the pairs", f"{min(ratios):.3f} - {max(ratios):.3f}"),
        ("  ratio of the median walls", f"{offline['wall_s'] / loaded['wall_s']:.3f}"),
        ("engine steps (server run)", f"{loaded['steps']:.0f}"),
        ("client CPU during the server run, s", f"{loaded['client_cpu_s']:.3f}"),
        ("server overhead per step, ms", f"{overhead_ms:.3f}"),
        ("engine time inside LLM.step / server wall", f"{loaded['step_seconds'] / loaded['wall_s']:.3f}"),
        *(
            (
                f"{mode} steps, offline / server",
                f"{offline[f'{mode}_steps']:.0f} / {loaded[f'{mode}_steps']:.0f}",
            )
            for mode in ("extend", "decode")
        ),
        *(
            (f"{mode} step, ms, offline / server", f"{_step_ms(offline, mode)} / {_step_ms(loaded, mode)}")
            for mode in ("extend", "decode")
        ),
        (
            "outside model steps, ms per step, offline / server",
            f"{_outside_ms(offline)} / {_outside_ms(loaded)}",
        ),
        (
            "CPU s: offline / server HTTP process / engine",
            f"{offline['cpu_s']:.3f} / {loaded['server_cpu_s']:.3f} / {loaded['engine_cpu_s']:.3f}",
        ),
        ("server CPU overhead per step, ms", f"{cpu_overhead_ms:.3f}"),
        ("time to first token, 1 client, ms", f"{single['ttft_p50_s'] * 1e3:.1f}"),
        (
            f"time to first token, {args.clients} clients, p50 / max ms",
            f"{loaded['ttft_p50_s'] * 1e3:.1f} / {loaded['ttft_max_s'] * 1e3:.1f}",
        ),
    ]
    print(
        f"\n{args.model}: {args.clients} prompts x {args.prompt_len} tokens, {args.max_tokens} new tokens each; "
        f"stream interval {args.stream_interval}; medians of {args.repeats} runs each way, alternating"
    )
    width = max(len(name) for name, _ in rows)
    for name, value in rows:
        print(f"  {name:<{width}}  {value:>14}")
    if args.json:
        record = {
            "args": vars(args),
            "offline": offline,
            "offline_runs": offline_runs,
            "served": loaded,
            "server_runs": server_runs,
            "single_client": single,
            "ratios": ratios,
            "overhead_ms_per_step": overhead_ms,
            "cpu_overhead_ms_per_step": cpu_overhead_ms,
        }
        with open(args.json, "w") as file:
            json.dump(record, file, indent=2)


if __name__ == "__main__":
    main()
