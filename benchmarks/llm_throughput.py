"""Offline generation throughput of `radixc.LLM`, compiled against eager (and CUDA graphs when built), in one run.

Each engine generates for the same random prompts twice; the second run is timed (the first pays compilation and
capture and is reported as the cold run). Output tokens per second counts generated tokens only.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time
from pathlib import Path

import torch

import radixc


def _prompts(vocab_size: int, count: int, low: int, high: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(vocab_size) for _ in range(rng.randint(low, high))] for _ in range(count)]


def _timed_generate(
    llm: radixc.LLM, prompts: list[list[int]], params: radixc.SamplingParams
) -> tuple[float, int]:
    if llm.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    outputs = llm.generate(prompts, params)
    if llm.device.type == "cuda":
        torch.cuda.synchronize()
    failed = [o.error for o in outputs if o.error]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, first: {failed[0]}")
    return time.perf_counter() - start, sum(len(o.token_ids) for o in outputs)


def measure(args: argparse.Namespace, variant: str) -> dict:
    """Build one engine (`eager`; `compiled` without CUDA graphs; `cudagraphs`: compiled, decode replayed from
    CUDA graphs) and time two generate runs of the prompts."""
    options = {"compile": variant != "eager", "cuda_graphs": variant == "cudagraphs"}
    start = time.perf_counter()
    llm = radixc.LLM(args.model, backend=args.backend, device=args.device, dtype=args.dtype, **options)
    build_s = time.perf_counter() - start
    prompts = _prompts(llm.vocab_size, args.prompts, args.min_len, args.max_len, args.seed)
    params = radixc.SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
    cold_s, _ = _timed_generate(llm, prompts, params)
    warm_s, tokens = _timed_generate(llm, prompts, params)
    result = {
        "variant": variant,
        "backend": llm.attn_backend.name,
        "build_s": round(build_s, 2),
        "first_run_s": round(cold_s, 2),
        "second_run_s": round(warm_s, 3),
        "output_tok_s": round(tokens / warm_s, 1),
    }
    del llm
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="llama-1b", help="preset or checkpoint directory")
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--prompts", type=int, default=64)
    parser.add_argument("--min-len", type=int, default=512)
    parser.add_argument("--max-len", type=int, default=543)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--variants", default="eager,compiled,cudagraphs", help="comma list of eager, compiled, cudagraphs"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    results = []
    for variant in args.variants.split(","):
        results.append(measure(args, variant))
        print(json.dumps({"model": args.model, **results[-1]}), flush=True)
    if args.json:
        args.json.write_text(
            json.dumps(
                {"model": args.model, "args": vars(args) | {"json": str(args.json)}, "results": results},
                indent=1,
            )
        )


if __name__ == "__main__":
    main()
