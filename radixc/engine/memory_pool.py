"""Memory pools: request -> token slot table, the paged KV cache, and the GDN state slots."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from radixc.engine.queued_copy import queued_tensor


class PoolExhaustedError(RuntimeError):
    """A pool has too few free entries for an allocation; the caller may wait, preempt or fail the request."""


class _FreeList:
    """Free indices of a pool; index 0 stays reserved (padding entry for CUDA-graph batches)."""

    def __init__(self, size: int, pool_name: str, unit: str):
        if size < 2:
            raise ValueError(
                f"{pool_name}: needs at least 2 {unit}s (one is reserved for padding), got {size}"
            )
        self.pool_name, self.unit, self.capacity = pool_name, unit, size - 1
        self._free = list(range(size - 1, 0, -1))
        self._in_use: set[int] = set()

    def require(self, count: int) -> None:
        """Raise PoolExhaustedError unless count entries are free."""
        if count > len(self._free):
            raise PoolExhaustedError(
                f"{self.pool_name} exhausted: asked for {count} {self.unit}(s), {len(self._free)} of "
                f"{self.capacity} free"
            )

    def take(self, count: int) -> list[int]:
        self.require(count)
        taken = [self._free.pop() for _ in range(count)]
        self._in_use.update(taken)
        return taken

    def give_back(self, indices: Sequence[int]) -> None:
        for index in indices:
            if index not in self._in_use:
                raise ValueError(f"{self.pool_name}: {self.unit} {index} is not allocated (double free?)")
            self._in_use.remove(index)
            self._free.append(index)

    @property
    def num_free(self) -> int:
        return len(self._free)


class ReqToTokenPool:
    """Per-request rows mapping token position -> KV slot: `req_to_token [size, max_context_len]` int32."""

    def __init__(self, size: int, max_context_len: int, device: torch.device | str = "cpu"):
        self.size, self.max_context_len = size, max_context_len
        self.req_to_token = torch.zeros(size, max_context_len, dtype=torch.int32, device=device)
        self._free = _FreeList(size, "ReqToTokenPool", "request row")
        # when a list: every write() also appends its `[3, n]` (rows, positions, slots), for tensor-parallel
        # workers to replay on their own tables
        self.journal: list[torch.Tensor] | None = None

    def write(self, rows: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor) -> None:
        """req_to_token[rows[i], positions[i]] = slots[i] (int64 `[n]` tensors on the table's device)."""
        self.req_to_token[rows, positions] = slots.to(torch.int32)
        if self.journal is not None:
            self.journal.append(torch.stack((rows, positions, slots.to(torch.int64))))

    def alloc(self) -> int:
        return self._free.take(1)[0]

    def free(self, index: int) -> None:
        self._free.give_back([index])

    @property
    def num_free(self) -> int:
        return self._free.num_free


class KVPool:
    """Paged KV cache: one `[num_pages * page_size, num_kv_heads, head_dim]` K and V buffer per attention layer.

    Pages are the allocation unit; kernels address token slots (`page * page_size + offset`). Layers not in
    `layer_ids` (e.g. GDN layers of a hybrid model) get no buffer.
    """

    def __init__(
        self,
        num_pages: int,
        page_size: int,
        num_layers: int,
        num_kv_heads: int,
        head_dim: int,
        dtype: torch.dtype,
        device: torch.device | str = "cpu",
        v_head_dim: int | None = None,
        layer_ids: Sequence[int] | None = None,
    ):
        if page_size < 1:
            raise ValueError(f"KVPool: page_size must be >= 1, got {page_size}")
        self.num_pages, self.page_size, self.num_layers = num_pages, page_size, num_layers
        self.num_kv_heads, self.head_dim = num_kv_heads, head_dim
        self.v_head_dim = head_dim if v_head_dim is None or v_head_dim < 0 else v_head_dim
        self.dtype, self.device = dtype, torch.device(device)
        layer_ids = set(range(num_layers) if layer_ids is None else layer_ids)
        num_slots = num_pages * page_size

        def buffer(dim: int, layer_id: int) -> torch.Tensor | None:
            if layer_id not in layer_ids:
                return None
            return torch.zeros(num_slots, num_kv_heads, dim, dtype=dtype, device=self.device)

        # Separate tensors per layer (not views of one block): a mutated custom-op argument then is its own base.
        self.k_buffer = [buffer(head_dim, i) for i in range(num_layers)]
        self.v_buffer = [buffer(self.v_head_dim, i) for i in range(num_layers)]
        self._free = _FreeList(num_pages, "KVPool", "page")

    def layer_buffers(self, layer_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        """K and V buffers of one layer, with a clear error for a layer the pool does not hold."""
        if not 0 <= layer_id < self.num_layers or self.k_buffer[layer_id] is None:
            held = [i for i, b in enumerate(self.k_buffer) if b is not None]
            raise ValueError(f"KVPool has no KV buffer for layer_id={layer_id} (holds layers {held})")
        return self.k_buffer[layer_id], self.v_buffer[layer_id]

    def require_pages(self, count: int) -> None:
        """Raise PoolExhaustedError unless count pages are free (check before allocating for many requests)."""
        self._free.require(count)

    def alloc_pages(self, count: int) -> torch.Tensor:
        return torch.tensor(self._free.take(count), dtype=torch.int64)

    def free_pages(self, pages: torch.Tensor | Sequence[int]) -> None:
        self._free.give_back([int(p) for p in pages])

    @property
    def num_free_pages(self) -> int:
        return self._free.num_free

    @property
    def memory_bytes(self) -> int:
        """Bytes of every layer's K and V buffers."""
        return sum(b.numel() * b.element_size() for b in self.k_buffer + self.v_buffer if b is not None)

    @property
    def capacity_pages(self) -> int:
        return self._free.capacity

    def pages_for(self, num_tokens: int) -> int:
        """Pages needed to hold `num_tokens` tokens."""
        return -(-num_tokens // self.page_size)

    def slots(self, pages: torch.Tensor | Sequence[int], start: int, end: int) -> torch.Tensor:
        """KV slots of token positions start..end-1 of a request whose pages, in order, are `pages`."""
        pages = torch.as_tensor(pages, dtype=torch.int64)
        positions = torch.arange(start, end, dtype=torch.int64)
        if end > len(pages) * self.page_size:
            raise ValueError(f"KVPool: positions up to {end} need more than the {len(pages)} page(s) given")
        return pages[positions // self.page_size] * self.page_size + positions % self.page_size


class GDNPool:
    """Per-request Gated DeltaNet state for every GDN layer: conv window and float32 recurrent state."""

    def __init__(
        self,
        num_slots: int,
        num_gdn_layers: int,
        conv_dim: int,
        conv_kernel_size: int,
        num_v_heads: int,
        head_k_dim: int,
        head_v_dim: int,
        conv_dtype: torch.dtype,
        device: torch.device | str = "cpu",
    ):
        self.num_slots, self.num_gdn_layers = num_slots, num_gdn_layers
        self.conv_dim, self.conv_kernel_size = conv_dim, conv_kernel_size
        self.num_v_heads, self.head_k_dim, self.head_v_dim = num_v_heads, head_k_dim, head_v_dim
        self.conv_dtype, self.device = conv_dtype, torch.device(device)
        self.conv_state = [
            torch.zeros(num_slots, conv_dim, conv_kernel_size - 1, dtype=conv_dtype, device=self.device)
            for _ in range(num_gdn_layers)
        ]
        self.ssm_state = [
            torch.zeros(
                num_slots, num_v_heads, head_k_dim, head_v_dim, dtype=torch.float32, device=self.device
            )
            for _ in range(num_gdn_layers)
        ]
        self._free = _FreeList(num_slots, "GDNPool", "state slot")

    def layer_states(self, gdn_layer_idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Conv and recurrent state buffers of one GDN layer, with a clear error for an unknown index."""
        if not 0 <= gdn_layer_idx < self.num_gdn_layers:
            raise ValueError(
                f"GDNPool has {self.num_gdn_layers} GDN layers, no gdn_layer_idx={gdn_layer_idx}"
            )
        return self.conv_state[gdn_layer_idx], self.ssm_state[gdn_layer_idx]

    @classmethod
    def like(cls, other: GDNPool, num_slots: int) -> GDNPool:
        """A pool of num_slots slots with `other`'s geometry, dtype and device (e.g. prefix-cache checkpoints)."""
        return cls(
            num_slots,
            other.num_gdn_layers,
            other.conv_dim,
            other.conv_kernel_size,
            other.num_v_heads,
            other.head_k_dim,
            other.head_v_dim,
            other.conv_dtype,
            other.device,
        )

    @property
    def slot_bytes(self) -> int:
        """Bytes of one slot's state over all GDN layers."""
        tensors = [*self.conv_state, *self.ssm_state]
        return sum(t[0].numel() * t.element_size() for t in tensors)

    def alloc(self, clear: bool = True) -> int:
        """Take a slot, zeroed unless `clear` is False (the caller overwrites it whole)."""
        slot = self._free.take(1)[0]
        if clear:
            self.clear(slot)
        return slot

    def copy_states(self, slots: Sequence[int], source: GDNPool, source_slots: Sequence[int]) -> None:
        """Overwrite each of `slots` with `source`'s slot at the same position of `source_slots`, in every GDN
        layer (saving or restoring checkpoints): one copy per layer state for all of them. The slots must differ."""
        if (
            source.num_gdn_layers,
            source.conv_dim,
            source.num_v_heads,
            source.head_k_dim,
            source.head_v_dim,
        ) != (self.num_gdn_layers, self.conv_dim, self.num_v_heads, self.head_k_dim, self.head_v_dim):
            raise ValueError("GDNPool.copy_states: the source pool's GDN geometry differs from this pool's")
        if len(set(slots)) != len(slots) or len(slots) != len(source_slots):
            raise ValueError(
                f"GDNPool.copy_states: distinct slots, one source each, expected; got {slots} <- {source_slots}"
            )
        device = self.ssm_state[0].device
        index = queued_tensor(slots, torch.int64, device)
        source_index = queued_tensor(source_slots, torch.int64, device)
        for conv, ssm, source_conv, source_ssm in zip(
            self.conv_state, self.ssm_state, source.conv_state, source.ssm_state
        ):
            conv.index_copy_(0, index, source_conv.index_select(0, source_index))
            ssm.index_copy_(0, index, source_ssm.index_select(0, source_index))

    def clear(self, slot: int) -> None:
        for conv, ssm in zip(self.conv_state, self.ssm_state):
            conv[slot].zero_()
            ssm[slot].zero_()

    def free(self, slot: int) -> None:
        self._free.give_back([slot])

    @property
    def num_free(self) -> int:
        return self._free.num_free
