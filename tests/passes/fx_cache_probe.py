"""Run by test_fx_cache.py in fresh processes: compile a small radixc module once, print JSON stats."""

from __future__ import annotations

import json
import sys
import time

import torch
from torch import nn
from torch._dynamo.utils import counters

import radixc
from radixc.engine import KVPool, NativeBackend, ReqToTokenPool
from radixc.engine.batch_builder import BatchBuilder
from radixc.ops import RadixAttention, rotary_embedding


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(64, 32)
        self.qkv = nn.Linear(32, 64)
        self.attn = RadixAttention(4, 8, 8**-0.5, 2, layer_id=0)
        freqs = torch.outer(torch.arange(64).float(), torch.rand(4))
        self.register_buffer("cos_sin", torch.cat([freqs.cos(), freqs.sin()], dim=-1))

    def forward(self, input_ids, positions, forward_batch):
        q, k, v = self.qkv(self.embed(input_ids)).split([32, 16, 16], -1)
        q, k = rotary_embedding(positions, q, k, self.cos_sin, 8)
        return self.attn(q, k, v, forward_batch)


if __name__ == "__main__":
    if len(sys.argv) > 1:
        setattr(radixc.passes.config, sys.argv[1], False)
    torch.manual_seed(0)
    builder = BatchBuilder(ReqToTokenPool(4, 64), KVPool(16, 4, 1, 2, 8, torch.float32), NativeBackend())
    batch = builder.extend([builder.new_request()], [[1, 2, 3]])
    start = time.perf_counter()
    with torch.inference_mode():
        torch.compile(Block(), fullgraph=True)(batch.input_ids, batch.positions, batch)
    seconds = time.perf_counter() - start
    print(
        json.dumps({"seconds": seconds, **{k: v for k, v in counters["inductor"].items() if "fxgraph" in k}})
    )
