"""ForwardMode and ForwardBatch: what one model step needs, as tensors plus compile-time constants."""

from __future__ import annotations

import dataclasses
import enum
from typing import TYPE_CHECKING

import torch
import torch.utils._pytree as pytree

if TYPE_CHECKING:
    from radixc.engine.backends.base import AttentionBackend
    from radixc.engine.memory_pool import GDNPool, KVPool, ReqToTokenPool


class ForwardMode(str, enum.Enum):
    """Kind of model step. A str enum so Dynamo treats it as a constant and compiles one graph per mode."""

    EXTEND = "extend"
    DECODE = "decode"
    IDLE = "idle"

    def is_extend(self) -> bool:
        return self is ForwardMode.EXTEND

    def is_decode(self) -> bool:
        return self is ForwardMode.DECODE

    def is_idle(self) -> bool:
        return self is ForwardMode.IDLE


# Tensor fields whose first dim is the number of tokens T or of requests B: dynamic under torch.compile.
_TOKEN_FIELDS = ("input_ids", "positions", "out_cache_loc", "encoder_out_cache_loc")
_REQUEST_FIELDS = (
    "req_pool_indices",
    "seq_lens",
    "extend_prefix_lens",
    "extend_seq_lens",
    "extend_start_loc",
    "gdn_slots",
    "encoder_lens",
    "logits_indices",
)
_CONSTANT_FIELDS = ("forward_mode", "req_to_token_pool", "token_to_kv_pool", "gdn_pool", "attn_backend")


@dataclasses.dataclass
class ForwardBatch:
    """One step of a batch of requests: packed tokens `[T]`, per-request metadata `[B]`, pools and backend."""

    forward_mode: ForwardMode
    input_ids: torch.Tensor
    positions: torch.Tensor
    req_pool_indices: torch.Tensor
    seq_lens: torch.Tensor
    extend_prefix_lens: torch.Tensor
    extend_seq_lens: torch.Tensor
    extend_start_loc: torch.Tensor
    out_cache_loc: torch.Tensor
    req_to_token_pool: ReqToTokenPool | None
    token_to_kv_pool: KVPool | None
    attn_backend: AttentionBackend
    gdn_pool: GDNPool | None = None
    gdn_slots: torch.Tensor | None = None
    logits_indices: torch.Tensor | None = None
    encoder_lens: torch.Tensor | None = None
    encoder_out_cache_loc: torch.Tensor | None = None

    @classmethod
    def create(
        cls,
        *,
        forward_mode: ForwardMode,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        req_pool_indices: torch.Tensor,
        seq_lens: torch.Tensor,
        extend_prefix_lens: torch.Tensor,
        out_cache_loc: torch.Tensor,
        req_to_token_pool: ReqToTokenPool | None,
        token_to_kv_pool: KVPool | None,
        attn_backend: AttentionBackend,
        gdn_pool: GDNPool | None = None,
        gdn_slots: torch.Tensor | None = None,
        logits_indices: torch.Tensor | None = None,
        encoder_lens: torch.Tensor | None = None,
        encoder_out_cache_loc: torch.Tensor | None = None,
        extend_seq_lens: torch.Tensor | None = None,
        extend_start_loc: torch.Tensor | None = None,
        init_metadata: bool = True,
    ) -> ForwardBatch:
        """Build a batch, mark dynamic dims, plan the backend's metadata. Extend lengths and start rows are derived
        from the lengths unless given (a captured step's are static buffers, rewritten before each replay)."""
        if extend_seq_lens is None:
            extend_seq_lens = seq_lens - extend_prefix_lens
        if forward_mode.is_decode() and input_ids.shape[0] != seq_lens.shape[0]:
            raise ValueError(
                f"ForwardBatch(DECODE): one token per request expected, got {input_ids.shape[0]} tokens for "
                f"{seq_lens.shape[0]} requests"
            )
        if extend_start_loc is None:
            extend_start_loc = torch.cumsum(extend_seq_lens, 0) - extend_seq_lens
        batch = cls(
            forward_mode=forward_mode,
            input_ids=input_ids,
            positions=positions,
            req_pool_indices=req_pool_indices,
            seq_lens=seq_lens,
            extend_prefix_lens=extend_prefix_lens,
            extend_seq_lens=extend_seq_lens,
            extend_start_loc=extend_start_loc,
            out_cache_loc=out_cache_loc,
            req_to_token_pool=req_to_token_pool,
            token_to_kv_pool=token_to_kv_pool,
            attn_backend=attn_backend,
            gdn_pool=gdn_pool,
            gdn_slots=gdn_slots,
            logits_indices=logits_indices,
            encoder_lens=encoder_lens,
            encoder_out_cache_loc=encoder_out_cache_loc,
        )
        batch.mark_dynamic()
        if init_metadata:
            attn_backend.init_forward_metadata(batch)
        return batch

    @property
    def batch_size(self) -> int:
        return self.seq_lens.shape[0]

    @property
    def num_tokens(self) -> int:
        return self.input_ids.shape[0]

    def mark_dynamic(self) -> None:
        """Mark token and request dims dynamic so a new batch size or length never recompiles.

        Unbacked (not merely dynamic) so that a batch of one request or token does not specialise the graph.
        """
        for name in _TOKEN_FIELDS + _REQUEST_FIELDS:
            tensor = getattr(self, name)
            if tensor is not None:
                torch._dynamo.decorators.mark_unbacked(tensor, 0)


_TENSOR_FIELDS = tuple(f.name for f in dataclasses.fields(ForwardBatch) if f.name not in _CONSTANT_FIELDS)


def _flatten(batch: ForwardBatch):
    return [getattr(batch, name) for name in _TENSOR_FIELDS], tuple(
        getattr(batch, n) for n in _CONSTANT_FIELDS
    )


def _unflatten(children, context) -> ForwardBatch:
    return ForwardBatch(**dict(zip(_TENSOR_FIELDS, children)), **dict(zip(_CONSTANT_FIELDS, context)))


pytree.register_pytree_node(ForwardBatch, _flatten, _unflatten, serialized_type_name="radixc.ForwardBatch")
