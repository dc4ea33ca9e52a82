"""Paged extend and decode attention through FlashInfer's wrappers, with the native kernels' signatures.

FlashInfer splits attention into a host-side `plan` (page tables, work partition) and a device-side `run`. The
backend plans one wrapper per attention variant (causal, soft-cap, window, scale) before each step, outside any
compiled or captured code, and activates them here; the kernel ops only `run` the active wrapper of their variant,
so they hold no host work and can be captured in a CUDA graph.
"""

from __future__ import annotations

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class Variant:
    """What FlashInfer compiles and plans separately: causal mask, soft-cap, sliding window and softmax scale."""

    causal: bool
    logit_cap: float
    sliding_window: int
    scaling: float

    @property
    def window_left(self) -> int:
        """FlashInfer's inclusive left window: radixc's window W lets a query see keys less than W back."""
        return self.sliding_window - 1 if self.sliding_window > 0 else -1

    @property
    def soft_cap(self) -> float | None:
        return self.logit_cap if self.logit_cap > 0 else None


# (mode, variant) -> the planned wrapper the next kernel call of that mode and variant runs; page size of the plan
_ACTIVE: dict[tuple[str, Variant], object] = {}
_PAGE_SIZE = {"value": 0}


def activate(mode: str, wrappers: dict[Variant, object], page_size: int) -> None:
    """Make `wrappers` (planned for the coming step) the ones the kernels of `mode` run."""
    for variant, wrapper in wrappers.items():
        _ACTIVE[mode, variant] = wrapper
    _PAGE_SIZE["value"] = page_size


def _run(
    mode: str, variant: Variant, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor
) -> torch.Tensor:
    wrapper = _ACTIVE.get((mode, variant))
    if wrapper is None:
        raise RuntimeError(
            f"flashinfer {mode} attention for {variant} was not planned: the FlashInfer backend plans every layer "
            "variant in init_forward_metadata; was the backend given the model's layers (init_layers)?"
        )
    page_size = _PAGE_SIZE["value"]
    pages = (k_cache.view(-1, page_size, *k_cache.shape[1:]), v_cache.view(-1, page_size, *v_cache.shape[1:]))
    return wrapper.run(q, pages)


def _refuse_kv_start(kv_start: torch.Tensor | None) -> None:
    if kv_start is not None:
        raise NotImplementedError(
            "the flashinfer backend has no cross-attention / encoder-offset keys (kv_start)"
        )


def paged_extend_attention(
    q,
    k_cache,
    v_cache,
    req_to_token,
    req_pool_indices,
    seq_lens,
    extend_prefix_lens,
    extend_seq_lens,
    extend_start_loc,
    *,
    scaling,
    causal,
    logit_cap,
    sliding_window,
    kv_start=None,
) -> torch.Tensor:
    """Extend attention of the packed new tokens over each request's pages (prefix and new tokens)."""
    _refuse_kv_start(kv_start)
    return _run("extend", Variant(causal, logit_cap, sliding_window, scaling), q, k_cache, v_cache)


def paged_decode_attention(
    q,
    k_cache,
    v_cache,
    req_to_token,
    req_pool_indices,
    seq_lens,
    *,
    scaling,
    logit_cap,
    sliding_window,
    kv_start=None,
) -> torch.Tensor:
    """Decode attention of one query per request over its pages."""
    _refuse_kv_start(kv_start)
    return _run("decode", Variant(True, logit_cap, sliding_window, scaling), q, k_cache, v_cache)
