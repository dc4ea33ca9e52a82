"""Decode steps of the whole engine, `LLM.generate` (scheduling, building the batch, the model or its replayed
CUDA graph, sampling, applying the tokens), with overlapped scheduling off and on, against the memory floor.

ms per decode step is the engine's busy time in decode steps over their count (`LLM.step_stats`): with steps in
order a step is its host work plus its device work; overlapped, the host work of step N+1 runs while the device
computes step N. One engine serves every batch size and both modes, each run on fresh random prompts. The
header gives the engine's set-up time (load, compile, tune, capture); `--extend-graph-max-tokens 0` captures no
extend graphs, which shortens it for A/B runs of decode (prompts then run uncaptured, decode steps as before).

    python3 benchmarks/engine_decode.py --model llama-1b --dtype bfloat16 --batch-sizes 1,32 --context 1024
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from radixc.engine.llm import LLM
from radixc.engine.request import SamplingParams
from radixc.engine.runner import model_cache_spec
from radixc.passes import set_switches
from radixc.tools.bench_floor import copy_bandwidth, state_bytes, weight_bytes

MODES = {"in order": False, "overlapped": True}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llama", help="a preset name or a checkpoint directory")
    parser.add_argument("--batch-sizes", default="1,32", help="comma-separated")
    parser.add_argument("--context", type=int, default=1024, help="prompt tokens of each request")
    parser.add_argument("--new-tokens", type=int, default=65, help="tokens each request generates")
    parser.add_argument("--repeats", type=int, default=3, help="timed generate runs per batch size and mode")
    parser.add_argument("--device")
    parser.add_argument("--dtype")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--no-compile", action="store_true")
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument(
        "--passes", default="", help="pass switches to set first, e.g. fuse_rms_norm_linear=0"
    )
    parser.add_argument(
        "--extend-graph-max-tokens",
        type=int,
        help="LLM's extend_graph_max_tokens (default: the engine's; 0: no extend graphs)",
    )
    return parser.parse_args()


def decode_ms(llm: LLM, batch_size: int, args: argparse.Namespace, gen: torch.Generator) -> float:
    """ms per decode step of one generate run over batch_size fresh prompts."""
    prompts = torch.randint(0, llm.vocab_size, (batch_size, args.context), generator=gen).tolist()
    before = llm.step_stats.copy()
    outputs = llm.generate(prompts, SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True))
    failed = [o.error for o in outputs if o.error]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, first: {failed[0]}")
    stats = llm.step_stats.since(before)
    return 1e3 * stats.decode_seconds / stats.decode_steps


def floor_ms(llm: LLM, batch_size: int, args: argparse.Namespace, bandwidth: float) -> float:
    """The memory floor of a decode step at the run's middle context."""
    dtype = next(llm.model.parameters()).dtype
    context = args.context + args.new_tokens // 2
    moved = weight_bytes(llm.model, batch_size) + state_bytes(
        model_cache_spec(llm.model), dtype, [context] * batch_size
    )
    return 1e3 * moved / bandwidth


def main() -> None:
    args = parse_args()
    set_switches(args.passes)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    start = time.perf_counter()
    llm = LLM(
        args.model,
        backend=args.backend,
        device=args.device,
        dtype=args.dtype,
        compile=not args.no_compile,
        max_batch_size=max(sizes),
        max_context_len=args.context + args.new_tokens + 1,
        extend_graph_max_tokens=args.extend_graph_max_tokens,
        progress=False,
    )
    setup_s = time.perf_counter() - start
    gen = torch.Generator().manual_seed(0)
    bandwidth = copy_bandwidth(llm.device)
    graphs = llm.runner.decode_graphs
    extend_graphs = llm.runner.extend_graphs
    print(
        f"{args.model} on {llm.device}, backend {llm.attn_backend.name}, set up in {setup_s:.1f} s, CUDA graphs "
        f"{graphs.captured_sizes if graphs else 'off'} (extend: "
        f"{extend_graphs.captured_sizes if extend_graphs else 'off'}), context {args.context}, "
        f"{args.new_tokens} new tokens, "
        f"copy bandwidth {bandwidth / 1e12:.2f} TB/s; ms per decode step, median of {args.repeats} runs"
    )
    results = []
    for size in sizes:
        row = {"batch": size, "floor_ms": floor_ms(llm, size, args, bandwidth)}
        for name, overlap in MODES.items():
            llm.overlap_scheduling = overlap
            decode_ms(llm, size, args, gen)  # warm-up: compile, tune, first replays
            row[name] = statistics.median(decode_ms(llm, size, args, gen) for _ in range(args.repeats))
        results.append(row)
        print(
            f"batch {size:4d}: in order {row['in order']:.3f}, overlapped {row['overlapped']:.3f} "
            f"({row['in order'] / row['overlapped']:.2f}x), floor {row['floor_ms']:.3f}, overlapped / floor "
            f"{row['overlapped'] / row['floor_ms']:.2f}x",
            flush=True,
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "args": vars(args),
                    "setup_s": setup_s,
                    "bandwidth_bytes_per_s": bandwidth,
                    "results": results,
                },
                f,
                indent=1,
            )


if __name__ == "__main__":
    main()
