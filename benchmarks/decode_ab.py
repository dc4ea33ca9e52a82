"""A/B of engine decode steps: `engine_decode.py` for each variant in a fresh process, the variants interleaved
round by round on one machine, so that drift of the machine (its copy bandwidth moved 3.5-3.9 TB/s between runs
of one session) spreads over all of them; prints each variant's median overlapped ms per step and its ratio to
the first variant's.

A variant is a name and what sets it: environment assignments, then engine_decode arguments, e.g.

    python3 benchmarks/decode_ab.py --model llama-1b --rounds 2 \\
        --variant "default" --variant "no split-K: RADIXC_GEMV_SPLIT_K=0" \\
        --variant "no qkv rope fusion: --passes fuse_linear_rope_store_kv=0"

The processes share Inductor's and the tuner's caches (TORCHINDUCTOR_CACHE_DIR), so only each variant's first
process compiles and tunes.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ENGINE_DECODE = Path(__file__).resolve().parent / "engine_decode.py"


@dataclass(frozen=True)
class Variant:
    """One side of the A/B: its name, environment assignments and engine_decode arguments."""

    name: str
    env: dict[str, str]
    args: list[str]


def parse_variant(text: str) -> Variant:
    """`name: ENV=value ... --engine-decode-args`, or a bare name for the defaults."""
    name, _, spec = text.partition(":")
    tokens = shlex.split(spec)
    env = {}
    while tokens and not tokens[0].startswith("-"):
        key, eq, value = tokens.pop(0).partition("=")
        if not eq or not key:
            raise argparse.ArgumentTypeError(
                f"variant {name.strip()!r}: {key!r} is not an ENV=value assignment"
            )
        env[key] = value
    if not name.strip():
        raise argparse.ArgumentTypeError(f"variant {text!r} has no name")
    return Variant(name.strip(), env, tokens)


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--variant", type=parse_variant, action="append", required=True, dest="variants")
    parser.add_argument("--rounds", type=int, default=2, help="processes per variant, interleaved")
    parser.add_argument("--json", help="also write every run's results here")
    args, engine_args = parser.parse_known_args()
    if len(args.variants) < 2:
        parser.error("an A/B needs at least two --variant")
    if len({v.name for v in args.variants}) != len(args.variants):
        parser.error("variant names must differ")
    args.engine_args = engine_args
    return args


def run_engine_decode(variant: Variant, engine_args: list[str]) -> dict:
    """One engine_decode process of a variant: its JSON report."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "decode.json"
        command = [sys.executable, str(ENGINE_DECODE), *engine_args, *variant.args, "--json", str(out)]
        result = subprocess.run(command, env={**os.environ, **variant.env}, capture_output=True, text=True)
        if result.returncode != 0:
            raise RuntimeError(f"variant {variant.name!r}: engine_decode failed:\n{result.stderr[-4000:]}")
        return json.loads(out.read_text())


def summarize(variants: list[Variant], runs: dict[str, list[dict]]) -> list[dict]:
    """Per batch size and variant: the median overlapped ms over its runs, the ratio to the first variant's, and
    the median floor."""
    base = variants[0].name
    rows = []
    batches = [r["batch"] for r in runs[base][0]["results"]]
    for batch in batches:
        medians = {}
        for variant in variants:
            results = [next(r for r in run["results"] if r["batch"] == batch) for run in runs[variant.name]]
            medians[variant.name] = (
                statistics.median(r["overlapped"] for r in results),
                statistics.median(r["floor_ms"] for r in results),
            )
        for variant in variants:
            ms, floor = medians[variant.name]
            rows.append(
                {
                    "batch": batch,
                    "variant": variant.name,
                    "overlapped_ms": ms,
                    "floor_ms": floor,
                    "vs_first": ms / medians[base][0],
                }
            )
    return rows


def main() -> None:
    args = parse_args()
    runs: dict[str, list[dict]] = {v.name: [] for v in args.variants}
    for round_index in range(args.rounds):
        for variant in args.variants:
            report = runs[variant.name]
            report.append(run_engine_decode(variant, args.engine_args))
            times = ", ".join(f"b{r['batch']} {r['overlapped']:.3f}" for r in report[-1]["results"])
            print(
                f"round {round_index + 1}, {variant.name}: set up {report[-1]['setup_s']:.0f} s; {times}",
                flush=True,
            )
    print("batch  variant                          overlapped ms  vs first  / floor")
    rows = summarize(args.variants, runs)
    for row in rows:
        print(
            f"{row['batch']:5d}  {row['variant'][:32]:32s} {row['overlapped_ms']:13.3f}  {row['vs_first']:8.3f}"
            f"  {row['overlapped_ms'] / row['floor_ms']:6.2f}x"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"engine_args": args.engine_args, "runs": runs, "summary": rows}, f, indent=1)


if __name__ == "__main__":
    main()
