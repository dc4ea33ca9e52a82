"""Tensor parallelism inside a model: which rank holds which rows of a weight, the layers that hold a shard,
and the collectives that join the shards, as `torch.ops._c10d_functional` ops so Dynamo traces them into the
one graph (fullgraph, no breaks) on gloo (CPU) and NCCL (CUDA) alike.

Megatron-style: a column-parallel projection (fused qkv, gate_up) keeps this rank's output rows and needs no
communication; the row-parallel projection after it (o_proj, down_proj) keeps the matching input columns and
all-reduces its partial sums. Attention heads follow the qkv rows: each rank runs `num_heads / size` query heads
and `num_kv_heads / size` KV heads, or the one KV head its query heads share when there are fewer KV heads than
ranks (replicated). The embedding and LM head are split by vocabulary rows. Gated DeltaNet layers split by head
(`qwen3_5.py`) and MoE experts by intermediate rows (`qwen3_next.py`) with the same pieces.

A model is built for a rank inside `tensor_parallel(...)`; each sharded parameter carries a `Shard` (its rows
of the full tensor, `radixc.models.weights.Shard`), which the loader and the preset init use to copy only this rank's part of a full weight.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence, Set

import torch
import torch.nn.functional as F
from torch import nn

from radixc.models.weights import Shard, WeightSpec, parent_prefix, set_shard


@dataclasses.dataclass(frozen=True)
class TensorParallel:
    """This process's place in a tensor-parallel group; `group_name` names the c10d group for the collectives."""

    rank: int = 0
    size: int = 1
    group_name: str = ""

    def __post_init__(self) -> None:
        if self.size < 1 or not 0 <= self.rank < self.size:
            raise ValueError(f"TensorParallel: rank {self.rank} is not in a group of size {self.size}")
        if self.size > 1 and not self.group_name:
            raise ValueError(
                f"TensorParallel(size={self.size}): a group of several ranks needs its group_name"
            )

    def split(self, total: int, what: str) -> tuple[int, int]:
        """(start, count) of this rank's equal part of `total` items; ValueError naming `what` if uneven."""
        if total % self.size:
            raise ValueError(f"tensor_parallel_size={self.size} does not divide {what} ({total})")
        count = total // self.size
        return self.rank * count, count


SINGLE = TensorParallel()
_current = SINGLE


def current_tensor_parallel() -> TensorParallel:
    """The group the model under construction is built for (SINGLE outside `tensor_parallel(...)`)."""
    return _current


@contextlib.contextmanager
def tensor_parallel(tp: TensorParallel) -> Iterator[TensorParallel]:
    """Build models for rank `tp.rank` of `tp.size` inside this block: layers read it when constructed."""
    global _current
    previous, _current = _current, tp
    try:
        yield tp
    finally:
        _current = previous


def check_tensor_parallel(num_heads: int, num_kv_heads: int, size: int, owner: str) -> None:
    """ValueError unless `size` ranks can split `num_heads` query heads and split or replicate the KV heads."""
    if size < 1:
        raise ValueError(f"{owner}: tensor_parallel_size must be >= 1, got {size}")
    if num_heads % size:
        raise ValueError(
            f"{owner}: tensor_parallel_size={size} does not divide the {num_heads} attention heads "
            f"(at most {num_heads} ranks, and a divisor of {num_heads})"
        )
    if num_kv_heads % size and size % num_kv_heads:
        raise ValueError(
            f"{owner}: tensor_parallel_size={size} neither divides the {num_kv_heads} KV heads nor is a multiple "
            "of them (fewer KV heads than ranks are replicated, which needs a multiple)"
        )


@dataclasses.dataclass(frozen=True)
class HeadSplit:
    """This rank's query heads [q_start, q_start + num_heads) and KV heads [kv_start, kv_start + num_kv_heads)."""

    q_start: int
    num_heads: int
    kv_start: int
    num_kv_heads: int


def split_heads(num_heads: int, num_kv_heads: int, tp: TensorParallel, owner: str) -> HeadSplit:
    """Query heads split evenly; KV heads split evenly, or (fewer than ranks) the one this rank's queries use."""
    check_tensor_parallel(num_heads, num_kv_heads, tp.size, owner)
    local = num_heads // tp.size
    if num_kv_heads >= tp.size:
        local_kv = num_kv_heads // tp.size
        return HeadSplit(tp.rank * local, local, tp.rank * local_kv, local_kv)
    # query head h reads KV head h // (num_heads / num_kv_heads); all of this rank's queries share one
    return HeadSplit(tp.rank * local, local, tp.rank * local // (num_heads // num_kv_heads), 1)


def all_reduce(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """Sum of `x` over the ranks (x itself on one rank), a functional collective Dynamo keeps in the graph."""
    if tp.size == 1:
        return x
    return torch.ops._c10d_functional.wait_tensor(
        torch.ops._c10d_functional.all_reduce(x, "sum", tp.group_name)
    )


def all_gather_last_dim(x: torch.Tensor, tp: TensorParallel) -> torch.Tensor:
    """`[R, n]` on each rank -> `[R, size * n]`, the ranks' columns side by side in rank order."""
    if tp.size == 1:
        return x
    gathered = torch.ops._c10d_functional.wait_tensor(
        torch.ops._c10d_functional.all_gather_into_tensor(x.contiguous(), tp.size, tp.group_name)
    )  # [size * R, n], rank-major
    rows, cols = x.shape
    return gathered.view(tp.size, rows, cols).permute(1, 0, 2).reshape(rows, tp.size * cols)


class NoInit:
    """Skip torch's default init: parameters are filled by the loader or by a preset's init."""

    def reset_parameters(self) -> None:
        return None


class MergedLinear(NoInit, nn.Linear):
    """One GEMM for several checkpoint projections of the same input, their outputs concatenated in order;
    column-parallel when given `shards`: then each part keeps only this rank's rows.

    `parts` are (sibling checkpoint module name, full output size), e.g. (("q_proj", 2048), ("k_proj", 512));
    `shards[i]` are the (start, length) row ranges of part i this rank holds (None: all of every part), counted
    in our row order; `reorders[i]`, when given, is the dim-0 gather that puts part i's checkpoint rows in that
    order (a Hugging Face layout that interleaves what we keep apart).
    """

    def __init__(
        self,
        in_features: int,
        parts: Sequence[tuple[str, int]],
        bias: bool = False,
        shards: Sequence[tuple[tuple[int, int], ...]] | None = None,
        reorders: Sequence[torch.Tensor | None] | None = None,
    ):
        shards = tuple(shards) if shards is not None else tuple(((0, size),) for _, size in parts)
        reorders = tuple(reorders) if reorders is not None else (None,) * len(parts)
        if len(shards) != len(parts) or len(reorders) != len(parts):
            raise ValueError(
                f"MergedLinear: {len(parts)} parts but {len(shards)} shards and {len(reorders)} reorders"
            )
        local_sizes = [sum(length for _, length in ranges) for ranges in shards]
        super().__init__(in_features, sum(local_sizes), bias=bias)
        self.parts, self.shards, self.reorders = tuple(parts), shards, reorders
        full_rows, ranges, start = sum(size for _, size in parts), [], 0
        for (_, size), part_ranges in zip(parts, shards):
            ranges.extend((start + s, length) for s, length in part_ranges)
            start += size
        if sum(local_sizes) != full_rows:
            set_shard(self.weight, Shard(0, (full_rows, in_features), tuple(ranges)))
            if self.bias is not None:
                set_shard(self.bias, Shard(0, (full_rows,), tuple(ranges)))

    def checkpoint_specs(self, prefix: str, names: Set[str]) -> dict[str, WeightSpec]:
        specs, start, parent = {}, 0, parent_prefix(prefix)
        for (part, size), ranges, reorder in zip(self.parts, self.shards, self.reorders):
            local = sum(length for _, length in ranges)
            rows = (slice(start, start + local),)
            sharded = local != size
            weight_shard = Shard(0, (size, self.in_features), ranges) if sharded else None
            specs[f"{parent}{part}.weight"] = WeightSpec(
                prefix + "weight", (size, self.in_features), rows, rows=reorder, shard=weight_shard
            )
            if self.bias is not None:
                bias_shard = Shard(0, (size,), ranges) if sharded else None
                specs[f"{parent}{part}.bias"] = WeightSpec(
                    prefix + "bias", (size,), rows, rows=reorder, shard=bias_shard
                )
            start += local
        return specs


class RowParallelLinear(NoInit, nn.Linear):
    """y = all_reduce(x_shard @ W_shard^T) + b: this rank holds the input columns matching the column-parallel
    projection before it, `[out_features, in_features / size]`; the bias is added once, after the sum.

    `reduce=False` returns this rank's partial sum, for a caller that joins several of them in one all-reduce
    (it then has no bias)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        owner: str = "RowParallelLinear",
        reduce: bool = True,
    ):
        tp = current_tensor_parallel()
        start, local = tp.split(in_features, f"{owner}'s {in_features} input features")
        if bias and not reduce:
            raise ValueError(f"{owner}: a row-parallel projection with a bias must all-reduce its output")
        super().__init__(local, out_features, bias=bias)
        self.tp, self.reduce = tp, reduce
        if self.tp.size > 1:
            set_shard(self.weight, Shard(1, (out_features, in_features), ((start, local),)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight)
        if not self.reduce:
            return out
        out = all_reduce(out, self.tp)
        return out if self.bias is None else out + self.bias


class VocabParallelEmbedding(NoInit, nn.Embedding):
    """Embedding (and tied or untied LM head weight) split by vocabulary rows: rank r holds rows
    [r * per_rank, (r + 1) * per_rank), per_rank = ceil(vocab / size), zero-padded past the vocabulary."""

    def __init__(self, num_embeddings: int, embedding_dim: int):
        tp = current_tensor_parallel()
        per_rank = -(-num_embeddings // tp.size)
        super().__init__(per_rank, embedding_dim)
        self.tp, self.vocab_size, self.vocab_start = tp, num_embeddings, tp.rank * per_rank
        if self.tp.size > 1:
            length = max(0, min(per_rank, num_embeddings - self.vocab_start))
            set_shard(self.weight, Shard(0, (num_embeddings, embedding_dim), ((self.vocab_start, length),)))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        outside = (local < 0) | (local >= self.num_embeddings)
        hidden = F.embedding(local.masked_fill(outside, 0), self.weight)
        return all_reduce(hidden.masked_fill(outside.unsqueeze(-1), 0), self.tp)

    def gather_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Each rank's logits over its vocabulary rows `[R, per_rank]` -> the full `[R, vocab]`."""
        if self.tp.size == 1:
            return logits
        return all_gather_last_dim(logits, self.tp)[:, : self.vocab_size]
