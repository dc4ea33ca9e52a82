"""The `radixc` op library: schemas of the generic ops and of the kernel ops they lower to.

A generic op (`radixc::attention`, `radixc::encoder_attention`, `radixc::gdn`, and `radixc::rope_store_kv`,
which a fusion pass creates) names its backend and forward mode as constants; its eager implementation calls the kernel op registered for that pair, and the lowering pass
rewrites the graph node to call that kernel op directly. Kernel ops share the generic schema minus those two
constants, so the rewrite only swaps the target.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

LIBRARY = torch.library.Library("radixc", "FRAGMENT")

GENERIC_CONSTANTS = ("backend", "forward_mode")

PAGED_ATTENTION_ARGS = (
    "Tensor q, Tensor? k, Tensor? v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor req_to_token, "
    "Tensor req_pool_indices, Tensor seq_lens, Tensor extend_prefix_lens, Tensor extend_seq_lens, "
    "Tensor extend_start_loc, Tensor out_cache_loc, Tensor? kv_start, *, float scaling, bool causal, "
    "float logit_cap, int sliding_window, bool save_kv_cache"
)
ENCODER_ATTENTION_ARGS = (
    "Tensor q, Tensor k, Tensor v, Tensor extend_start_loc, Tensor extend_seq_lens, *, float scaling, "
    "float logit_cap"
)
GDN_ARGS = (
    "Tensor mixed_qkv, Tensor a, Tensor b, Tensor conv_weight, Tensor A_log, Tensor dt_bias, "
    "Tensor(a!) conv_state, Tensor(b!) ssm_state, Tensor gdn_slots, Tensor extend_start_loc, "
    "Tensor extend_seq_lens, Tensor extend_prefix_lens, *, int num_k_heads, int num_v_heads, int head_k_dim, "
    "int head_v_dim"
)


def _paged_attention_fake(q, k, v, k_cache, v_cache, *args, **kwargs):
    return q.new_empty(q.shape[0], q.shape[1], v_cache.shape[-1])


def _encoder_attention_fake(q, k, v, *args, **kwargs):
    return q.new_empty(q.shape[0], q.shape[1], v.shape[-1])


def _gdn_fake(mixed_qkv, *args, num_v_heads, head_v_dim, **kwargs):
    return mixed_qkv.new_empty(mixed_qkv.shape[0], num_v_heads * head_v_dim)


# Made by the rope + KV-store fusion; q/k norm weights are None unless a per-head RMSNorm (Qwen3) was folded in.
ROPE_STORE_KV_ARGS = (
    "Tensor positions, Tensor q, Tensor k, Tensor v, Tensor cos_sin_cache, Tensor(a!) k_cache, "
    "Tensor(b!) v_cache, Tensor out_cache_loc, Tensor? q_norm_weight, Tensor? k_norm_weight, *, int head_size, "
    "bool is_neox, float norm_eps, bool norm_zero_centered"
)


def _rope_store_kv_fake(positions, q, *args, **kwargs):
    return q.new_empty(q.shape[0], q[0].numel())


# kind -> (kernel-op argument schema, returns, fake implementation shared by the generic op and its kernel ops)
OP_KINDS: dict[str, tuple[str, str, Callable]] = {
    "attention": (PAGED_ATTENTION_ARGS, "Tensor", _paged_attention_fake),
    "encoder_attention": (ENCODER_ATTENTION_ARGS, "Tensor", _encoder_attention_fake),
    "gdn": (GDN_ARGS, "Tensor", _gdn_fake),
    "rope_store_kv": (ROPE_STORE_KV_ARGS, "Tensor", _rope_store_kv_fake),
}

# Kernel-level kinds with no generic op: what lowering decomposes `radixc::gdn` into, and their fusions.
CONV_ARGS = (
    "Tensor x, Tensor weight, Tensor(a!) conv_state, Tensor gdn_slots, Tensor extend_start_loc, "
    "Tensor extend_seq_lens, Tensor extend_prefix_lens"
)
DELTA_RULE_ARGS = (
    "Tensor q, Tensor k, Tensor v, Tensor a, Tensor b, Tensor A_log, Tensor dt_bias, Tensor(a!) ssm_state, "
    "Tensor gdn_slots, Tensor extend_start_loc, Tensor extend_seq_lens, Tensor extend_prefix_lens, *, "
    "int num_k_heads, int num_v_heads, int head_k_dim, int head_v_dim"
)


KERNEL_KINDS: dict[str, tuple[str, str, Callable]] = {
    "causal_conv1d": (CONV_ARGS, "Tensor", lambda x, *args, **kwargs: torch.empty_like(x)),
    "causal_conv1d_silu": (CONV_ARGS, "Tensor", lambda x, *args, **kwargs: torch.empty_like(x)),
    "gated_delta_rule": (
        DELTA_RULE_ARGS,
        "Tensor",
        lambda q, k, v, *args, num_v_heads, head_v_dim, **kw: v.new_empty(
            v.shape[0], num_v_heads * head_v_dim
        ),
    ),
}

_kernels: dict[tuple[str, str, str], str] = {}
_kernel_identity: dict[str, tuple[str, str, tuple[str, ...]]] = {}


def define_op(
    name: str, args: str, returns: str, impl: Callable, fake: Callable, cudagraph_safe: bool = True
) -> None:
    """Define `radixc::<name>` with an implementation for every device and a fake for tracing.

    Ops that cannot be captured in a CUDA graph (they read sizes on the host) carry the `cudagraph_unsafe` tag,
    so Inductor's graph partitioning runs them outside the captured partitions.
    """
    tags = () if cudagraph_safe else (torch.Tag.cudagraph_unsafe,)
    LIBRARY.define(f"{name}({args}) -> {returns}", tags=tags)
    LIBRARY.impl(name, impl, "CompositeExplicitAutograd")
    torch.library.register_fake(f"radixc::{name}", fake, lib=LIBRARY)


def define_kernel_op(
    kind: str, name: str, impl: Callable, *, backend: str, modes: tuple[str, ...], cudagraph_safe: bool = True
) -> None:
    """Define a kernel op with the schema of generic op `kind` and register it for (backend, mode)."""
    args, returns, fake = OP_KINDS[kind] if kind in OP_KINDS else KERNEL_KINDS[kind]
    define_op(name, args, returns, impl, fake, cudagraph_safe)
    _kernel_identity[name] = (kind, backend, modes)
    for mode in modes:
        _kernels[(kind, backend, mode)] = name


def resolve_kernel(kind: str, backend: str, forward_mode: str) -> torch._ops.OpOverload:
    """The kernel op that implements generic op `kind` for a backend and forward mode."""
    name = _kernels.get((kind, backend, forward_mode))
    if name is None:
        known = sorted({b for k, b, m in _kernels if k == kind and m == forward_mode})
        raise NotImplementedError(
            f"radixc: no {kind} kernel for backend {backend!r} in {forward_mode} mode (available: {known})"
        )
    return getattr(torch.ops.radixc, name).default


def has_kernel(kind: str, backend: str, forward_mode: str) -> bool:
    return (kind, backend, forward_mode) in _kernels


def kernel_identity(op: torch._ops.OpOverload) -> tuple[str, str, tuple[str, ...]] | None:
    """(kind, backend, forward modes) of a registered kernel op, None for any other op."""
    return _kernel_identity.get(op._opname) if op.namespace == "radixc" else None


def _define_generic_op(kind: str) -> None:
    """Define generic op `radixc::<kind>`: the kernel-op schema plus the backend and forward-mode constants."""
    args, returns, fake = OP_KINDS[kind]

    def generic_impl(*args, backend: str, forward_mode: str, **kwargs):
        return resolve_kernel(kind, backend, forward_mode)(*args, **kwargs)

    def generic_fake(*args, backend: str, forward_mode: str, **kwargs):
        return fake(*args, **kwargs)

    define_op(kind, args + ", str backend, str forward_mode", returns, generic_impl, generic_fake)


for _kind in OP_KINDS:
    _define_generic_op(_kind)
