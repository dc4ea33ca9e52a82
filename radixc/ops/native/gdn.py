"""Torch-native Gated DeltaNet kernels: causal conv1d with state, gating, chunked and recurrent delta rule.

Plain torch on any device: the eager/CPU path of `radixc::gdn` and the reference twin of the Triton kernels
(radixc.ops.kernel_ops composes them into the GDN forward).
Ragged batches are packed along the token dim; per-request loops use host-side lengths (these run eagerly).
"""

from __future__ import annotations

from typing import NoReturn

import torch
import torch.nn.functional as F

_L2NORM_EPS = 1e-6


def _fail(func: str, name: str, expected: str, tensor: torch.Tensor) -> NoReturn:
    raise ValueError(f"{func}: expected {name} {expected}, got {list(tensor.shape)} {tensor.dtype}")


def _check_shape(
    func: str, name: str, tensor: torch.Tensor, shape: tuple[int | None, ...], dims: str
) -> None:
    """Raise a ValueError naming `name` unless `tensor` has `shape` (None matches any size)."""
    ok = tensor.dim() == len(shape) and all(s in (None, t) for s, t in zip(shape, tensor.shape, strict=True))
    if not ok:
        sizes = ", ".join(d if s is None else f"{d}={s}" for d, s in zip(dims.split(), shape, strict=True))
        _fail(func, name, f"of shape [{sizes}]", tensor)


def _requests(
    func: str,
    num_tokens: int,
    gdn_slots: torch.Tensor,
    extend_start_loc: torch.Tensor,
    extend_seq_lens: torch.Tensor,
    has_initial_state: torch.Tensor,
) -> list[tuple[int, slice, bool]]:
    """(state slot, packed token rows, has initial state) per request of a ragged extend batch, validated."""
    batch = {
        "gdn_slots": gdn_slots,
        "extend_start_loc": extend_start_loc,
        "extend_seq_lens": extend_seq_lens,
        "has_initial_state": has_initial_state,
    }
    for name, tensor in batch.items():
        _check_shape(func, name, tensor, (gdn_slots.shape[0],), "B")
    requests = []
    for slot, start, length, has_init in zip(*(t.tolist() for t in batch.values()), strict=True):
        if start < 0 or length < 0 or start + length > num_tokens:
            raise ValueError(
                f"{func}: request rows {start}..{start + length} fall outside the {num_tokens} packed tokens"
            )
        requests.append((slot, slice(start, start + length), bool(has_init)))
    return requests


def _conv_weight_2d(func: str, weight: torch.Tensor, C: int) -> torch.Tensor:
    """Depthwise conv weight as `[C, K]`, accepting nn.Conv1d's `[C, 1, K]`."""
    if weight.dim() == 3 and weight.shape[1] == 1:
        weight = weight.squeeze(1)
    if weight.dim() != 2 or weight.shape[0] != C or weight.shape[1] < 1:
        _fail(func, "weight", f"of shape [C={C}, K] or [C={C}, 1, K]", weight)
    return weight


def _activate(y: torch.Tensor, activation: str | None) -> torch.Tensor:
    return F.silu(y) if activation == "silu" else y


def _check_activation(func: str, activation: str | None) -> None:
    if activation not in (None, "silu"):
        raise ValueError(f"{func}: activation must be None or 'silu', got {activation!r}")


def _check_conv_state(func: str, conv_state: torch.Tensor, C: int, K: int) -> None:
    _check_shape(func, "conv_state", conv_state, (None, C, K - 1), "S C K-1")


def causal_conv1d_extend(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_state: torch.Tensor,
    gdn_slots: torch.Tensor,
    extend_start_loc: torch.Tensor,
    extend_seq_lens: torch.Tensor,
    has_initial_state: torch.Tensor,
    *,
    activation: str | None = "silu",
) -> torch.Tensor:
    """Causal depthwise conv1d over packed requests, continuing each request's conv state (updated in place).

    x `[num_tokens, C]`, weight `[C, K]`, conv_state `[num_slots, C, K-1]` (last K-1 inputs, oldest first).
    """
    func = "causal_conv1d_extend"
    _check_activation(func, activation)
    _check_shape(func, "x", x, (None, None), "T C")
    T, C = x.shape
    weight = _conv_weight_2d(func, weight, C).float()
    K = weight.shape[1]
    _check_conv_state(func, conv_state, C, K)
    out = torch.zeros_like(x)  # rows of no request (a captured step's padding) stay zero
    requests = _requests(func, T, gdn_slots, extend_start_loc, extend_seq_lens, has_initial_state)
    for slot, rows, has_init in requests:
        if has_init:
            history = conv_state[slot].float()  # [C, K-1]
        else:
            history = x.new_zeros(C, K - 1, dtype=torch.float32)
        padded = torch.cat([history, x[rows].float().t()], dim=1)  # [C, K-1+L]
        if padded.shape[1] >= K:  # a request with no new token only has its state (re)written
            windows = padded.unfold(1, K, 1)  # [C, L, K]
            y = torch.einsum("clk,ck->lc", windows, weight)
            out[rows] = _activate(y, activation).to(x.dtype)
        conv_state[slot] = padded[:, padded.shape[1] - (K - 1) :].to(conv_state.dtype)
    return out


def causal_conv1d_decode(
    x: torch.Tensor,
    weight: torch.Tensor,
    conv_state: torch.Tensor,
    gdn_slots: torch.Tensor,
    *,
    activation: str | None = "silu",
) -> torch.Tensor:
    """One conv1d step per request: x `[batch, C]`; shifts the input into conv_state `[num_slots, C, K-1]`."""
    func = "causal_conv1d_decode"
    _check_activation(func, activation)
    _check_shape(func, "x", x, (None, None), "B C")
    B, C = x.shape
    weight = _conv_weight_2d(func, weight, C).float()
    K = weight.shape[1]
    _check_conv_state(func, conv_state, C, K)
    _check_shape(func, "gdn_slots", gdn_slots, (B,), "B")
    window = torch.cat([conv_state[gdn_slots].float(), x.float().unsqueeze(-1)], dim=-1)  # [B, C, K]
    y = (window * weight).sum(-1)
    conv_state[gdn_slots] = window[:, :, 1:].to(conv_state.dtype)
    return _activate(y, activation).to(x.dtype)


def gdn_gating(A_log: torch.Tensor, a: torch.Tensor, dt_bias: torch.Tensor) -> torch.Tensor:
    """Per-token log-decay g = -exp(A_log) * softplus(a + dt_bias), float32 `[num_tokens, num_v_heads]`."""
    _check_shape("gdn_gating", "a", a, (None, None), "T Hv")
    Hv = a.shape[1]
    _check_shape("gdn_gating", "A_log", A_log, (Hv,), "Hv")
    _check_shape("gdn_gating", "dt_bias", dt_bias, (Hv,), "Hv")
    return -torch.exp(A_log.float()) * F.softplus(a.float() + dt_bias.float())


def _l2norm(x: torch.Tensor) -> torch.Tensor:
    return x * torch.rsqrt((x * x).sum(-1, keepdim=True) + _L2NORM_EPS)


def _check_rule_inputs(
    func: str,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    ssm_state: torch.Tensor,
) -> None:
    _check_shape(func, "q", q, (None, None, None), "T Hk Dk")
    T, Hk, Dk = q.shape
    _check_shape(func, "k", k, (T, Hk, Dk), "T Hk Dk")
    _check_shape(func, "v", v, (T, None, None), "T Hv Dv")
    Hv, Dv = v.shape[1:]
    if Hv % Hk != 0:
        _fail(func, "v", f"with a multiple of Hk={Hk} heads", v)
    _check_shape(func, "g", g, (T, Hv), "T Hv")
    _check_shape(func, "beta", beta, (T, Hv), "T Hv")
    _check_shape(func, "ssm_state", ssm_state, (None, Hv, Dk, Dv), "S Hv Dk Dv")
    if ssm_state.dtype != torch.float32:
        _fail(func, "ssm_state", "in float32", ssm_state)


def _prepare_qk(
    q: torch.Tensor, k: torch.Tensor, Hv: int, scale: float, use_qk_l2norm: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """float32 q, k `[tokens, Hv, Dk]`: optionally L2-normalised, q scaled, q/k heads repeated per v head."""
    q, k = q.float(), k.float()
    if use_qk_l2norm:
        q, k = _l2norm(q), _l2norm(k)
    group = Hv // q.shape[1]
    return (q * scale).repeat_interleave(group, dim=1), k.repeat_interleave(group, dim=1)


def _to_chunks(x: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """`[L, H, ...]` -> `[H, num_chunks, chunk_size, ...]`, zero-padding the tail to whole chunks."""
    pad = -x.shape[0] % chunk_size
    x = F.pad(x, (0, 0) * (x.dim() - 1) + (0, pad))
    return x.reshape(x.shape[0] // chunk_size, chunk_size, *x.shape[1:]).movedim(2, 0)


def _chunk_delta_rule_one_request(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor,
    chunk_size: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Chunked delta rule for one request (float32): q, k `[L, H, Dk]`, v `[L, H, Dv]`, g, beta `[L, H]`,
    state `[H, Dk, Dv]`. Returns o `[L, H, Dv]` and the final state."""
    L, H, Dv = v.shape
    Dk = k.shape[-1]
    # Zero padding of the last chunk is exact: g=0 keeps the decay, k=beta=0 leave the state untouched.
    q, k, v, g, beta = (_to_chunks(t, chunk_size) for t in (q, k, v, g, beta))  # [H, N, C, ...]
    num_chunks = g.shape[1]
    G = g.cumsum(-1)  # [H, N, C] log-decay from the chunk start through each token
    causal = torch.ones(chunk_size, chunk_size, dtype=torch.bool, device=g.device).tril()
    # decay[i, j] = exp(G_i - G_j) for j <= i; masking before exp keeps it from overflowing.
    decay = torch.exp((G.unsqueeze(-1) - G.unsqueeze(-2)).masked_fill(~causal, float("-inf")))  # [H, N, C, C]

    # Within a chunk, u_i = beta_i (v_i - k_i^T S'_{i-1}) couples to earlier u_j through
    # (I + A) U = beta V - beta exp(G) K S0 with A = tril(beta_i exp(G_i - G_j) k_i.k_j, -1).
    # Solving once per chunk (the UT transform) gives U = U_v - W S0 for any chunk-start state S0.
    A = (beta.unsqueeze(-1) * (k @ k.mT) * decay).tril(-1)
    rhs = torch.cat([beta.unsqueeze(-1) * v, (beta * torch.exp(G)).unsqueeze(-1) * k], dim=-1)
    # unitriangular: the zero diagonal of A is read as ones, so this solves (I + A) X = rhs.
    solved = torch.linalg.solve_triangular(A, rhs, upper=False, unitriangular=True)
    u_v, w = solved.split([Dv, Dk], dim=-1)  # [H, N, C, Dv], [H, N, C, Dk]

    attn = (q @ k.mT) * decay  # [H, N, C, C], diagonal included: o_i sees its own update
    q_decayed = q * torch.exp(G).unsqueeze(-1)
    k_to_end = k * torch.exp(G[..., -1:] - G).unsqueeze(-1)  # each key decayed to the chunk end
    chunk_decay = torch.exp(G[..., -1])  # [H, N]
    o = v.new_empty(H, num_chunks, chunk_size, Dv)
    for n in range(num_chunks):
        u = u_v[:, n] - w[:, n] @ state  # [H, C, Dv]
        o[:, n] = q_decayed[:, n] @ state + attn[:, n] @ u
        state = chunk_decay[:, n, None, None] * state + k_to_end[:, n].mT @ u
    return o.movedim(0, 2).reshape(-1, H, Dv)[:L], state


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    ssm_state: torch.Tensor,
    gdn_slots: torch.Tensor,
    extend_start_loc: torch.Tensor,
    extend_seq_lens: torch.Tensor,
    has_initial_state: torch.Tensor,
    *,
    scale: float,
    use_qk_l2norm: bool = True,
    chunk_size: int = 64,
) -> torch.Tensor:
    """Gated delta rule over packed requests in chunked (WY / UT-transform) form; float32 math.

    q, k `[num_tokens, Hk, Dk]`, v `[num_tokens, Hv, Dv]`, g (log-decay), beta `[num_tokens, Hv]`;
    ssm_state `[num_slots, Hv, Dk, Dv]` float32, each request's final state written to its slot.
    Returns o `[num_tokens, Hv, Dv]` in v.dtype.
    """
    func = "chunk_gated_delta_rule"
    _check_rule_inputs(func, q, k, v, g, beta, ssm_state)
    if chunk_size < 1:
        raise ValueError(f"{func}: chunk_size must be positive, got {chunk_size}")
    T = v.shape[0]
    requests = _requests(func, T, gdn_slots, extend_start_loc, extend_seq_lens, has_initial_state)
    q, k = _prepare_qk(q, k, v.shape[1], scale, use_qk_l2norm)
    v32, g, beta = v.float(), g.float(), beta.float()
    out = torch.zeros_like(v)  # rows of no request (a captured step's padding) stay zero
    for slot, rows, has_init in requests:
        state = ssm_state[slot] if has_init else torch.zeros_like(ssm_state[slot])
        o, state = _chunk_delta_rule_one_request(
            q[rows], k[rows], v32[rows], g[rows], beta[rows], state, chunk_size
        )
        out[rows] = o.to(v.dtype)
        ssm_state[slot] = state
    return out


def recurrent_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    ssm_state: torch.Tensor,
    gdn_slots: torch.Tensor,
    *,
    scale: float,
    use_qk_l2norm: bool = True,
) -> torch.Tensor:
    """One delta-rule step per request (q, k `[batch, Hk, Dk]`, v `[batch, Hv, Dv]`), updating ssm_state."""
    func = "recurrent_gated_delta_rule"
    _check_rule_inputs(func, q, k, v, g, beta, ssm_state)
    _check_shape(func, "gdn_slots", gdn_slots, (v.shape[0],), "B")
    q, k = _prepare_qk(q, k, v.shape[1], scale, use_qk_l2norm)
    state = ssm_state[gdn_slots] * torch.exp(g.float())[..., None, None]  # [B, Hv, Dk, Dv]
    error = v.float() - torch.einsum("bhkv,bhk->bhv", state, k)
    state = state + k.unsqueeze(-1) * (beta.float().unsqueeze(-1) * error).unsqueeze(-2)
    ssm_state[gdn_slots] = state
    return torch.einsum("bhkv,bhk->bhv", state, q).to(v.dtype)
