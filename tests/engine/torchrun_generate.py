"""Run by test_tensor_parallel under `python -m torch.distributed.run --nproc-per-node 2`: every rank builds
the same tensor-parallel LLM; rank 0 writes its greedy tokens, the other rank what its generate raised."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch.distributed as dist

from radixc.engine.llm import LLM
from radixc.engine.request import SamplingParams


def main(model: str, prompts_json: str, out_dir: str) -> None:
    dist.init_process_group("gloo")  # an already-initialised group is joined as it is
    llm = LLM(model, compile=False, device="cpu", tensor_parallel_size=2)
    rank = llm.tensor_parallel_rank
    if rank == 0:
        outputs = llm.generate(json.loads(prompts_json), SamplingParams(max_new_tokens=8, ignore_eos=True))
        llm.close()
        result = [o.token_ids for o in outputs]
    else:
        try:
            llm.generate([[1, 2, 3]])
            result = "generate did not raise"
        except RuntimeError as err:
            result = str(err)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:])
