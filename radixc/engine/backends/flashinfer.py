"""The FlashInfer backend: FlashInfer's paged prefill and decode kernels, planned on the host once per step.

Planning is this backend's own work: `init_forward_metadata` builds each request's page list and plans one wrapper
per attention variant of the model's layers (learned in `init_layers`); captured decode gets wrappers with fixed
buffers per batch-size bucket, planned again before each replay. New K/V are written by the Triton rope + store
kernel (or the generic store), so FlashInfer only reads the cache.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence

import torch

from radixc.cache_spec import KVCacheSpec
from radixc.engine.backends.base import AttentionBackend
from radixc.forward_batch import ForwardBatch, ForwardMode
from radixc.ops.attention import AttentionType
from radixc.ops.kernel_ops import BackendKernels, lazy

HEAD_DIMS = (64, 128, 256)
WORKSPACE_BYTES = 128 << 20


class FlashInferBackend(AttentionBackend):
    """FlashInfer paged attention (CUDA only; head dims 64/128/256, equal K and V head dims, no cross-attention)."""

    name = "flashinfer"
    # after triton until its GPU test passes (it failed on its first H200 run, unexplained): opt in by name
    auto_rank = 30
    kernels = BackendKernels(
        extend_attention=lazy("radixc.ops.flashinfer.attention:paged_extend_attention"),
        decode_attention=lazy("radixc.ops.flashinfer.attention:paged_decode_attention"),
        rotary_and_store_kv=lazy("radixc.ops.triton.rope_kv_store:rotary_and_store_kv"),
    )

    @classmethod
    def unavailable_reason(cls, device: torch.device) -> str | None:
        if device.type != "cuda":
            return f"FlashInfer kernels run on CUDA devices only, not on {device.type}"
        for package in ("flashinfer", "triton"):
            if importlib.util.find_spec(package) is None:
                return f"{package} is not installed (pip install 'radixc[gpu]')"
        return None

    @classmethod
    def cache_spec_problem(cls, spec: KVCacheSpec) -> str | None:
        problem = super().cache_spec_problem(spec)
        if problem is None and spec.needs_kv_cache:
            if spec.head_dim not in HEAD_DIMS or spec.v_head_dim != spec.head_dim:
                problem = (
                    f"its kernels take head dims {HEAD_DIMS} with equal K and V head dims, not "
                    f"{spec.head_dim} / {spec.v_head_dim}"
                )
        return problem

    def __init__(self) -> None:
        self._layers: list = []
        self._pool = None
        self._workspace: torch.Tensor | None = None
        self._wrappers: dict[str, dict] = {"extend": {}, "decode": {}}
        self._graph_buffers: dict[str, torch.Tensor] = {}
        self._graph_wrappers: dict[int, dict] = {}
        self._req_to_token: torch.Tensor | None = None

    def init_model(self, layers: Sequence, req_to_token_pool, kv_pool) -> None:
        """Learn the layer variants to plan and the pools they read; cross-attention is refused here, at build time."""
        for layer in layers:
            if layer.is_cross_attention:
                raise ValueError(
                    f"the flashinfer backend has no cross-attention (layer_id={layer.layer_id}); use triton or native"
                )
        self._layers, self._pool = list(layers), kv_pool
        self._req_to_token = req_to_token_pool.req_to_token

    # -- planning ---------------------------------------------------------------------------------------------

    def _variants(self, mode: str):
        from radixc.ops.flashinfer.attention import Variant

        variants = set()
        for layer in self._layers:
            causal = mode == "decode" or layer.attn_type is AttentionType.DECODER
            variants.add(
                Variant(causal, float(layer.logit_cap), int(layer.sliding_window_size), float(layer.scaling))
            )
        return sorted(variants, key=repr)

    def _workspace_buffer(self, device: torch.device) -> torch.Tensor:
        if self._workspace is None:
            self._workspace = torch.zeros(WORKSPACE_BYTES, dtype=torch.uint8, device=device)
        return self._workspace

    def _geometry(self) -> tuple[int, int, int]:
        layer = self._layers[0]
        return layer.tp_q_head_num, layer.tp_k_head_num, layer.qk_head_dim

    def _new_wrapper(self, mode: str, device: torch.device, graph_buffers: dict | None = None):
        import flashinfer

        workspace = self._workspace_buffer(device)
        if mode == "extend":
            return flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace, "NHD")
        num_q, num_kv, _ = self._geometry()
        options = {"use_tensor_cores": num_q // num_kv >= 4}
        if graph_buffers is not None:
            options.update(
                use_cuda_graph=True,
                paged_kv_indptr_buffer=graph_buffers["indptr"],
                paged_kv_indices_buffer=graph_buffers["indices"],
                paged_kv_last_page_len_buffer=graph_buffers["last_page_len"],
            )
        return flashinfer.BatchDecodeWithPagedKVCacheWrapper(workspace, "NHD", **options)

    def _page_table(
        self, req_pool_indices: torch.Tensor, seq_lens: list[int], req_to_token: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(indptr, page indices, last page lengths) of the requests, int32 on the device; the pages are read off
        req_to_token on the device (every request's tokens fill its pages in order), their counts on the host."""
        page_size, device = self._pool.page_size, req_pool_indices.device
        num_pages = [-(-n // page_size) for n in seq_lens]
        counts = torch.tensor(num_pages, dtype=torch.int64).to(device, non_blocking=True)
        total = sum(num_pages)
        request = torch.repeat_interleave(
            torch.arange(len(num_pages), device=device), counts, output_size=total
        )
        first = torch.cumsum(counts, 0) - counts
        page = torch.arange(total, device=device) - first[request]
        indices = (req_to_token[req_pool_indices[request], page * page_size] // page_size).to(torch.int32)
        indptr = torch.tensor([0, *torch.tensor(num_pages).cumsum(0).tolist()], dtype=torch.int32)
        last = torch.tensor([n - (p - 1) * page_size for n, p in zip(seq_lens, num_pages)], dtype=torch.int32)
        return indptr.to(device, non_blocking=True), indices, last.to(device, non_blocking=True)

    def _plan(
        self,
        mode: str,
        wrappers: dict,
        req_pool_indices,
        seq_lens: list[int],
        req_to_token,
        extend_lens: list[int] | None = None,
    ) -> None:
        from radixc.ops.flashinfer.attention import activate

        num_q, num_kv, head_dim = self._geometry()
        indptr, indices, last = self._page_table(req_pool_indices, seq_lens, req_to_token)
        dtype, device = self._pool.dtype, req_pool_indices.device
        for variant in self._variants(mode):
            if variant not in wrappers:
                wrappers[variant] = self._new_wrapper(mode, device)
            common = dict(
                window_left=variant.window_left,
                logits_soft_cap=variant.soft_cap,
                sm_scale=variant.scaling,
                q_data_type=dtype,
                kv_data_type=dtype,
            )
            if mode == "extend":
                qo_indptr = torch.tensor(
                    [0, *torch.tensor(extend_lens).cumsum(0).tolist()], dtype=torch.int32
                )
                wrappers[variant].plan(
                    qo_indptr.to(device),
                    indptr,
                    indices,
                    last,
                    num_q,
                    num_kv,
                    head_dim,
                    self._pool.page_size,
                    causal=variant.causal,
                    **common,
                )
            else:
                wrappers[variant].plan(
                    indptr, indices, last, num_q, num_kv, head_dim, self._pool.page_size, **common
                )
        activate(mode, wrappers, self._pool.page_size)

    def init_forward_metadata(self, forward_batch: ForwardBatch) -> None:
        """Plan every layer variant of this step's mode (one device-to-host copy of the lengths)."""
        fb = forward_batch
        if not self._layers or fb.forward_mode is ForwardMode.IDLE or fb.token_to_kv_pool is None:
            return
        mode = "decode" if fb.forward_mode.is_decode() else "extend"
        lengths = torch.stack([fb.seq_lens, fb.extend_seq_lens]).tolist()
        self._plan(
            mode,
            self._wrappers[mode],
            fb.req_pool_indices,
            lengths[0],
            fb.req_to_token_pool.req_to_token,
            lengths[1],
        )

    # -- CUDA graphs: fixed page-table buffers, one set of decode wrappers per captured batch size ----------------

    def supports_cuda_graphs(self, mode: ForwardMode = ForwardMode.DECODE) -> bool:
        """Decode only: captured extend steps would need prefill wrappers planned per token bucket (not built)."""
        return mode.is_decode() and super().supports_cuda_graphs(mode)

    def init_cuda_graph_state(self, max_bs: int, max_num_tokens: int) -> None:
        device = self._pool.device
        max_pages = max_bs * -(-self._req_to_token.shape[1] // self._pool.page_size)
        self._graph_buffers = {
            "indptr": torch.zeros(max_bs + 1, dtype=torch.int32, device=device),
            "indices": torch.zeros(max_pages, dtype=torch.int32, device=device),
            "last_page_len": torch.zeros(max_bs, dtype=torch.int32, device=device),
        }

    def init_forward_metadata_capture_cuda_graph(
        self, bs: int, num_tokens: int, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, forward_mode
    ) -> None:
        buffers = {
            "indptr": self._graph_buffers["indptr"][: bs + 1],
            "indices": self._graph_buffers["indices"],
            "last_page_len": self._graph_buffers["last_page_len"][:bs],
        }
        device = req_pool_indices.device
        self._graph_wrappers[bs] = {
            v: self._new_wrapper("decode", device, buffers) for v in self._variants("decode")
        }
        fill = self.get_cuda_graph_seq_len_fill_value()
        self._plan("decode", self._graph_wrappers[bs], req_pool_indices, [fill] * bs, self._req_to_token)

    def init_forward_metadata_replay_cuda_graph(
        self, bs, req_pool_indices, seq_lens, seq_lens_sum, forward_mode, seq_lens_cpu=None
    ) -> None:
        host = (seq_lens_cpu if seq_lens_cpu is not None else seq_lens).tolist()
        self._plan("decode", self._graph_wrappers[bs], req_pool_indices, host, self._req_to_token)
