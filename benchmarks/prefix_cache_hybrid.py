"""Prefix cache on vs off for a (hybrid) model: time to first token, end-to-end time and throughput.

Two workloads of the same shape: `shared` (every request starts with the same prefix, then a unique suffix) and
`unique` (no shared prefix). Each runs with the prefix cache off and on, `--repeats` times on an emptied cache
(after one untimed warm-up run that also compiles), all requests submitted at once. Prints a table, writes JSON.

    python benchmarks/prefix_cache_hybrid.py --model tiny-qwen3.5 --device cpu --threads 1 --json out.json
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from radixc.engine.llm import LLM
from radixc.engine.request import SamplingParams
from radixc.models import list_presets, load_model, preset_config
from radixc.models.presets import init_random_weights
from radixc.models.registry import build_model, model_config


@dataclasses.dataclass
class Run:
    """One timed generate(): seconds end to end, each request's time to first token, tokens out, cache hits."""

    seconds: float
    ttft: list[float]
    output_tokens: int
    hit_tokens: int
    lookup_tokens: int


def workload(args: argparse.Namespace, shared: bool, vocab: int) -> list[list[int]]:
    """Prompts of prefix_len + a suffix in [suffix_min, suffix_max] random ids; shared: one common prefix."""
    gen = torch.Generator().manual_seed(args.seed)
    ids = lambda n: torch.randint(2, vocab, (n,), generator=gen).tolist()  # noqa: E731
    prefix = ids(args.prefix_len)
    lengths = torch.randint(args.suffix_min, args.suffix_max + 1, (args.requests,), generator=gen).tolist()
    return [(prefix if shared else ids(args.prefix_len)) + ids(n) for n in lengths]


def build(model: str, device: torch.device, context: int) -> torch.nn.Module:
    """A checkpoint directory, or a preset (random weights) whose position limit is raised to `context` if
    below it (the tiny presets stop at 512; their rotary embedding extends to any length)."""
    if Path(model).is_dir():
        return load_model(model, None, device)
    if model not in list_presets():
        raise SystemExit(
            f"--model {model!r} is neither a checkpoint directory nor a preset ({list_presets()})"
        )
    raw = preset_config(model)
    raw["max_position_embeddings"] = max(raw.get("max_position_embeddings", 0), context)
    model_cls, config = model_config(raw)
    module = build_model(model_cls, config, config.dtype or torch.float32, device)
    init_random_weights(module)
    return module


def timed_run(llm: LLM, prompts: list[list[int]], params: SamplingParams) -> Run:
    """Stream every prompt at once from an emptied prefix cache, noting when each first token arrives."""
    llm.clear_prefix_cache()
    before = llm.prefix_cache_stats()
    first: dict[int, float] = {}
    outputs = 0
    start = time.perf_counter()
    for index, tokens in llm.stream(prompts, params):
        first.setdefault(index, time.perf_counter() - start)
        outputs += len(tokens)
    if llm.device.type == "cuda":
        torch.cuda.synchronize(llm.device)
    seconds = time.perf_counter() - start
    after = llm.prefix_cache_stats()
    hits = lookups = 0
    if after is not None:
        hits, lookups = after.hit_tokens - before.hit_tokens, after.lookup_tokens - before.lookup_tokens
    return Run(seconds, [first[i] for i in sorted(first)], outputs, hits, lookups)


def run_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    context = args.prefix_len + args.suffix_max + args.max_new_tokens + 1
    model = build(args.model, device, context)
    vocab = model.config.vocab_size
    params = SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)
    results: dict[str, Any] = {
        "model": args.model,
        "device": str(device),
        "compile": args.compile,
        "rows": [],
    }
    for name in ("shared", "unique"):
        prompts = workload(args, name == "shared", vocab)
        for cache in (False, True):
            llm = LLM(
                model,
                compile=args.compile,
                page_size=args.page_size,
                max_context_len=context,
                max_batch_size=args.max_batch_size,
                enable_prefix_cache=cache,
                progress=False,
            )
            timed_run(llm, prompts, params)  # warm-up (and compilation)
            runs = [timed_run(llm, prompts, params) for _ in range(args.repeats)]
            best = min(runs, key=lambda r: r.seconds)
            stats = llm.prefix_cache_stats()
            # tokens of the shared prefix after the first request, and how many the cache served
            shared_after_first = (len(prompts) - 1) * args.prefix_len if name == "shared" else 0
            results["rows"].append(
                {
                    "workload": name,
                    "prefix_cache": cache,
                    "seconds": statistics.median(r.seconds for r in runs),
                    "best_seconds": best.seconds,
                    "mean_ttft_s": statistics.median(statistics.fmean(r.ttft) for r in runs),
                    "p50_ttft_s": statistics.median(statistics.median(r.ttft) for r in runs),
                    "output_tokens_per_s": statistics.median(r.output_tokens / r.seconds for r in runs),
                    "hit_tokens": best.hit_tokens,
                    "lookup_tokens": best.lookup_tokens,
                    "shared_served": best.hit_tokens / shared_after_first if shared_after_first else None,
                    "gdn_checkpoints_capacity": None if stats is None else stats.gdn_checkpoint_capacity,
                    "gdn_checkpoint_bytes_held": None if stats is None else stats.gdn_checkpoint_bytes,
                    "gdn_checkpoints_evicted": None if stats is None else stats.gdn_checkpoints_evicted,
                }
            )
    by_key = {(r["workload"], r["prefix_cache"]): r for r in results["rows"]}
    results["speedup_shared"] = by_key["shared", False]["seconds"] / by_key["shared", True]["seconds"]
    results["slowdown_unique"] = by_key["unique", True]["seconds"] / by_key["unique", False]["seconds"]
    return results


def print_table(results: dict[str, Any]) -> None:
    print(f"{results['model']} on {results['device']}, compile={results['compile']}")
    header = f"{'workload':<8} {'cache':<5} {'e2e s':>8} {'mean TTFT s':>12} {'p50 TTFT s':>11} {'out tok/s':>10} {'hits':>14} {'shared served':>14}"
    print(header)
    for r in results["rows"]:
        served = "-" if r["shared_served"] is None or not r["prefix_cache"] else f"{r['shared_served']:.1%}"
        print(
            f"{r['workload']:<8} {'on' if r['prefix_cache'] else 'off':<5} {r['seconds']:>8.3f} "
            f"{r['mean_ttft_s']:>12.3f} {r['p50_ttft_s']:>11.3f} {r['output_tokens_per_s']:>10.1f} "
            f"{r['hit_tokens']:>6}/{r['lookup_tokens']:<7} {served:>14}"
        )
    print(
        f"shared prefix: {results['speedup_shared']:.2f}x faster with the cache; "
        f"no shared prefix: {results['slowdown_unique']:.3f}x the time without it"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="tiny-qwen3.5", help="preset name or checkpoint directory")
    parser.add_argument("--device", help="device (default: cuda when available, else cpu)")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (default: eager)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per configuration (default 3)")
    parser.add_argument("--requests", type=int, default=64, help="requests per workload (default 64)")
    parser.add_argument("--prefix-len", type=int, default=1024, help="prefix tokens (default 1024)")
    parser.add_argument("--suffix-min", type=int, default=16, help="shortest unique suffix (default 16)")
    parser.add_argument("--suffix-max", type=int, default=256, help="longest unique suffix (default 256)")
    parser.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per request")
    parser.add_argument("--page-size", type=int, default=16, help="KV page size (default 16)")
    parser.add_argument("--max-batch-size", type=int, help="engine batch limit (default: the device's)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random token ids")
    parser.add_argument("--json", type=Path, help="also write the results as JSON to this file")
    return parser


def main() -> None:
    args = build_parser().parse_args()
    for name in ("repeats", "requests", "prefix_len", "suffix_min", "max_new_tokens", "page_size"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.suffix_max < args.suffix_min:
        raise SystemExit(f"--suffix-max ({args.suffix_max}) is below --suffix-min ({args.suffix_min})")
    results = run_benchmark(args)
    print_table(results)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
