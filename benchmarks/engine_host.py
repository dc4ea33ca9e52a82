"""Host time of the engine's decode steps around the model: per decode step, what scheduling, planning the batch
(pages and slots), sampling and applying the tokens cost next to the model call itself, by batch size.

The engine runs with overlapped scheduling off here, so that every step is scheduled, built, run and applied
in turn and each part can be timed; on a GPU each of these then adds to the step time (overlapped scheduling
hides them behind the device's work: benchmarks/engine_decode.py measures that). The model call is timed to its
end (synchronized on CUDA), so sampling is not charged for it.

    python3 benchmarks/engine_host.py --model tiny-llama --batch-sizes 1,8,64
"""

from __future__ import annotations

import argparse
import collections
import json
import time

import torch

from radixc.engine.llm import LLM
from radixc.engine.request import SamplingParams

# the parts of a decode step that are timed; "build and run" is the runner's decode call, which plans the batch
PARTS = ("schedule", "plan batch", "build and run", "sample", "apply tokens")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="tiny-llama", help="a preset name or a checkpoint directory")
    parser.add_argument("--batch-sizes", default="1,8,64", help="comma-separated")
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64, help="tokens each request generates")
    parser.add_argument("--repeats", type=int, default=3, help="timed generate runs per batch size (median)")
    parser.add_argument("--device")
    parser.add_argument("--dtype")
    parser.add_argument("--backend", default="auto")
    parser.add_argument(
        "--compile",
        action="store_true",
        help="compile the model (off by default: the host parts do not change)",
    )
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    parser.add_argument("--json", help="also write the results here")
    return parser.parse_args()


class DecodeStepTimer:
    """Wall time of decode steps and of their parts, while it is entered: it wraps the engine objects' methods
    (as instance attributes, restored on exit). A step's wall runs from one `schedule` call to the next."""

    def __init__(self, llm: LLM):
        self.part_seconds: collections.Counter[str] = collections.Counter()
        self.step_seconds, self.steps = 0.0, 0
        self._mode, self._step_start = None, None
        self._saved: list[tuple[object, str, object]] = []
        synchronize = torch.cuda.synchronize if llm.device.type == "cuda" else None
        scheduler, runner = llm.scheduler, llm.runner
        self._wrap(scheduler, "schedule", "schedule", on_start=self._next_step, on_result=self._note_mode)
        self._wrap(runner.builder, "_plan", "plan batch")
        self._wrap(runner, "decode", "build and run", sync=synchronize)
        self._wrap(llm, "sampler", "sample")
        self._wrap(scheduler, "update", "apply tokens")

    def __enter__(self) -> DecodeStepTimer:
        return self

    def __exit__(self, *exc) -> None:
        self._next_step(time.perf_counter())  # the last step ends here
        self._mode = None
        for owner, name, original in reversed(self._saved):
            if original is None:
                delattr(owner, name)
            else:
                setattr(owner, name, original)

    def _next_step(self, now: float) -> None:
        if self._mode is not None and self._mode.is_decode():
            self.step_seconds += now - self._step_start
            self.steps += 1
        self._step_start = now

    def _note_mode(self, step) -> None:
        self._mode = None if step is None else step.mode

    def _wrap(self, owner, name: str, part: str, sync=None, on_start=None, on_result=None) -> None:
        inner = getattr(owner, name)
        self._saved.append((owner, name, owner.__dict__.get(name)))

        def timed(*args, **kwargs):
            start = time.perf_counter()
            if on_start is not None:
                on_start(start)
            result = inner(*args, **kwargs)
            if sync is not None:
                sync()
            if on_result is not None:
                on_result(result)
            if self._mode is not None and self._mode.is_decode():
                self.part_seconds[part] += time.perf_counter() - start
            return result

        setattr(owner, name, timed)


def measure(llm: LLM, batch_size: int, args: argparse.Namespace, gen: torch.Generator) -> dict[str, float]:
    """Median over --repeats generate runs of the decode steps' wall and parts, milliseconds per step."""
    params = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)

    def prompts() -> list[list[int]]:  # fresh each run: no prefix-cache hits between runs
        return torch.randint(2, llm.vocab_size, (batch_size, args.prompt_len), generator=gen).tolist()

    llm.generate(prompts(), params)  # compiles and warms this batch size
    runs = []
    for _ in range(args.repeats):
        with DecodeStepTimer(llm) as timer:
            llm.generate(prompts(), params)
        per_step = {part: timer.part_seconds[part] / timer.steps * 1e3 for part in PARTS}
        runs.append({"steps": timer.steps, "wall": timer.step_seconds / timer.steps * 1e3, **per_step})
    return {key: sorted(run[key] for run in runs)[len(runs) // 2] for key in runs[0]}


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    sizes = [int(size) for size in args.batch_sizes.split(",")]
    llm = LLM(
        args.model,
        backend=args.backend,
        device=args.device,
        dtype=args.dtype,
        compile=args.compile,
        max_batch_size=max(sizes),
        progress=False,
        overlap_scheduling=False,
    )
    gen = torch.Generator().manual_seed(0)
    results = {size: measure(llm, size, args, gen) for size in sizes}
    print(
        f"{args.model} on {llm.device}, compile={args.compile}: ms per decode step, medians of {args.repeats} runs "
        f"of {args.new_tokens} tokens per request"
    )
    columns = ["batch", "wall", "schedule", "plan batch", "model", "sample", "apply tokens", "other", "host"]
    print("  ".join(f"{c:>12}" for c in columns))
    for size, parts in results.items():
        model = parts["build and run"] - parts["plan batch"]
        timed = sum(parts[p] for p in PARTS if p != "plan batch")  # the runner's call includes the plan
        row = [parts["schedule"], parts["plan batch"], model, parts["sample"], parts["apply tokens"]]
        row += [parts["wall"] - timed, parts["wall"] - model]
        print("  ".join([f"{size:>12}", f"{parts['wall']:>12.3f}", *(f"{v:>12.3f}" for v in row)]))
    if args.json:
        with open(args.json, "w") as file:
            json.dump({"args": vars(args), "results": results}, file, indent=2)


if __name__ == "__main__":
    main()
