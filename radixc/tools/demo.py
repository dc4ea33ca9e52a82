"""The radixc demo: a random-weight preset model, compiled, generating on the CPU (or the best device), then
what the compiler lowered each radixc op to. `python -m radixc.tools.demo [--model PRESET]`."""

from __future__ import annotations

import argparse
import random
import time
from collections.abc import Sequence

import torch

import radixc
from radixc.engine.llm import LLM
from radixc.engine.request import SamplingParams
from radixc.models import list_presets
from radixc.tools.graph_capture import GraphCapture
from radixc.tools.text_report import KERNEL_HEADERS, format_table, kernel_rows


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m radixc.tools.demo", description=__doc__)
    parser.add_argument("--model", default="tiny-qwen3.5", help=f"a preset ({', '.join(list_presets())})")
    parser.add_argument("--prompts", type=int, default=8, help="number of random prompts")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--device", default=None)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    rng = random.Random(0)
    capture = GraphCapture(radixc.passes.install())
    # the FX graph cache would skip the passes on a warm start, and the demo shows what they do
    with capture.attached(), torch._inductor.config.patch(fx_graph_cache=False):
        llm = LLM(args.model, backend=args.backend, device=args.device, compile=True, progress=False)
        vocab = llm.vocab_size or 100
        prompts = [[rng.randrange(vocab) for _ in range(rng.randint(4, 24))] for _ in range(args.prompts)]
        params = SamplingParams(max_new_tokens=args.max_new_tokens, ignore_eos=True)
        start = time.perf_counter()
        outputs = llm.generate(prompts, params)
        first = time.perf_counter() - start
        start = time.perf_counter()
        llm.generate(prompts, params)  # again, with both graphs compiled
        seconds = time.perf_counter() - start
    generated = sum(len(o.token_ids) for o in outputs)
    print(
        f"radixc demo: {args.model} ({type(llm.model).__name__}), backend {llm.attn_backend.name}, "
        f"device {llm.device}, torch {torch.__version__}"
    )
    for prompt, output in zip(prompts, outputs, strict=True):
        print(f"  prompt of {len(prompt):2d} tokens -> {output.token_ids} ({output.finish_reason})")
    print(
        f"{generated} tokens in {first:.1f} s with the compiles, {seconds:.2f} s once compiled "
        f"({generated / seconds:.0f} tokens/s)\n"
    )
    for graph in capture.graphs:
        counts = ", ".join(f"{r.pass_name}={r.rewrites}" for r in graph.records)
        print(f"{graph.label}: {counts}")
        for line in format_table(KERNEL_HEADERS, kernel_rows(graph)):
            print("  " + line)
        print(f"  output code: {graph.output_path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
