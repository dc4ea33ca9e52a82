"""Run by test_pdl.py in a process without the Triton interpreter: compile radixc's decode kernels for sm90 (no
GPU needed) and print, as JSON, how many global loads, bulk L2 prefetches and next-kernel launches
(griddepcontrol.launch_dependents) each issues before its PDL wait (griddepcontrol.wait), and how many of the
last two in all."""

from __future__ import annotations

import json

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from radixc.ops.triton import attention_decode, causal_conv1d, gdn_recurrent, gemv, linear_rope, rope_kv_store


def _sm90_ptx(kernel, pointers: dict[str, str], floats: tuple[str, ...], constexprs: dict, **options) -> str:
    """The kernel compiled for sm90 (no GPU needed): pointer arguments typed by name and 16-byte aligned (as a
    launch with torch's tensors specialises them), floats as fp32, other arguments as i32."""
    signature = {name: pointers.get(name, "fp32" if name in floats else "i32") for name in kernel.arg_names}
    signature.update({name: "constexpr" for name in constexprs})
    aligned = {
        (index,): [["tt.divisibility", 16]] for index, name in enumerate(kernel.arg_names) if name in pointers
    }
    source = ASTSource(kernel, signature, {**constexprs, "USE_PDL": True}, aligned)
    return triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["ptx"]


def _recurrent_case():
    pointers = dict.fromkeys(("Q", "K", "V", "G", "Beta", "Out"), "*bf16")
    pointers.update(ALog="*fp32", DtBias="*fp32", SsmState="*fp32", GdnSlots="*i32")
    constexprs = dict(K_DIM=128, V_DIM=128, BLOCK_K=128, BLOCK_V=32, USE_L2NORM=True, RAW_GATES=True)
    return gdn_recurrent._recurrent_step_kernel, pointers, ("scale", "eps"), constexprs


def _conv_case():
    pointers = dict(X="*bf16", Weight="*bf16", ConvState="*bf16", GdnSlots="*i32", Out="*bf16")
    constexprs = dict(KERNEL_SIZE=4, BLOCK_C=256, BLOCK_HIST=4, SILU=True)
    return causal_conv1d._conv1d_decode_kernel, pointers, (), constexprs


def _attention_case(early: bool = False):
    pointers = dict.fromkeys(("Q", "K", "V"), "*bf16")
    pointers.update(ReqToToken="*i32", ReqPoolIndices="*i64", SeqLens="*i64", KvStart="*i64")
    pointers.update(PartialOut="*fp32", PartialLse="*fp32")
    constexprs = dict(
        HEAD_DIM=64,
        V_HEAD_DIM=64,
        BLOCK_H=16,
        BLOCK_N=128,
        BLOCK_D=64,
        BLOCK_DV=64,
        SOFT_CAP=False,
        HAS_KV_START=False,
        WRITE_LSE=True,
        DOT_PRECISION="tf32",
        EARLY_LAUNCH=early,
    )
    return attention_decode._decode_partial_kernel, pointers, ("sm_scale", "logit_cap"), constexprs


def _merge_case(early: bool = False):
    pointers = dict(PartialOut="*fp32", PartialLse="*fp32", Out="*bf16")
    constexprs = dict(V_HEAD_DIM=64, BLOCK_S=32, BLOCK_DV=64, EARLY_LAUNCH=early)
    return attention_decode._decode_merge_kernel, pointers, (), constexprs


def _rope_case():
    pointers = dict.fromkeys(("Q", "K", "V", "KCache", "VCache", "QOut", "QNormW", "KNormW"), "*bf16")
    pointers.update(Positions="*i64", CosSin="*fp32", OutCacheLoc="*i64")
    constexprs = dict(
        HEAD_SIZE=64,
        V_HEAD_DIM=64,
        ROT_HALF=32,
        IS_NEOX=True,
        BLOCK_HQ=32,
        BLOCK_HK=8,
        BLOCK_HALF=32,
        BLOCK_PASS=1,
        BLOCK_DV=64,
        HAS_NORM=False,
        ZERO_CENTERED=False,
    )
    return rope_kv_store._rope_kv_store_kernel, pointers, ("norm_eps",), constexprs


def _gemv_case(prefetch: bool, rows: int = 1, gated: bool = False, tiles=gemv.ONE_ROW_TILES[0]):
    pointers = dict.fromkeys(("X", "W", "Bias", "Residual", "NormWeight", "InputGate", "Out"), "*bf16")
    pointers.update(Partials="*fp32", Arrivals="*i32")
    constexprs = dict(
        BLOCK_M=1 if rows == 1 else 32,
        BLOCK_N=tiles.block_n,
        BLOCK_K=tiles.block_k,
        HAS_BIAS=False,
        HAS_RESIDUAL=not gated,
        HAS_NORM=True,
        NORM_ZERO_CENTERED=False,
        HAS_INPUT_GATE=False,
        GATED=gated,
        SPLIT_K=tiles.split_k,
        USE_DOT=rows > 1,
        DOT_PRECISION="tf32",
        PREFETCH_L2=prefetch,
    )
    return gemv._small_batch_linear_kernel, pointers, ("norm_eps",), constexprs


def _linear_rope_case(prefetch: bool, is_neox: bool = True):
    pointers = dict.fromkeys(("X", "W", "Bias", "NormWeight", "KCache", "VCache", "QOut"), "*bf16")
    pointers.update(Positions="*i64", CosSin="*fp32", Slots="*i64")
    constexprs = dict(
        NUM_Q_HEADS=32,
        NUM_KV_HEADS=8,
        HEAD_SIZE=64,
        IS_NEOX=is_neox,
        BLOCK_M=1,
        BLOCK_N=2,
        BLOCK_K=2048,
        HAS_BIAS=False,
        HAS_NORM=True,
        NORM_ZERO_CENTERED=False,
        USE_DOT=False,
        DOT_PRECISION="tf32",
        PREFETCH_L2=prefetch,
    )
    return linear_rope._linear_rope_store_kernel, pointers, ("norm_eps",), constexprs


CASES = {
    "gdn_recurrent": _recurrent_case,
    "conv": _conv_case,
    "attention": _attention_case,
    "attention_early": lambda: _attention_case(early=True),
    "merge": _merge_case,
    "merge_early": lambda: _merge_case(early=True),
    "rope_kv_store": _rope_case,
    "gemv": lambda: _gemv_case(False),
    "gemv_prefetch": lambda: _gemv_case(True),
    "gemv_gated_prefetch": lambda: _gemv_case(True, rows=32, gated=True, tiles=gemv.DOT_TILES[0]),
    "gemv_split_k_prefetch": lambda: _gemv_case(True, rows=32, tiles=gemv.SPLIT_K_TILES[0]),
    "linear_rope": lambda: _linear_rope_case(False),
    "linear_rope_prefetch": lambda: _linear_rope_case(True),
    "linear_rope_gptj_prefetch": lambda: _linear_rope_case(True, is_neox=False),
}
L2_PREFETCH = "cp.async.bulk.prefetch.L2"


def main() -> None:
    counts = {}
    for name, case in CASES.items():
        ptx = _sm90_ptx(*case(), num_warps=4, num_stages=2)
        before_wait = ptx.split("griddepcontrol.wait", 1)[0] if "griddepcontrol.wait" in ptx else ""
        counts[name] = {
            "loads_before_wait": before_wait.count("ld.global"),
            "l2_prefetches_before_wait": before_wait.count(L2_PREFETCH),
            "l2_prefetches": ptx.count(L2_PREFETCH),
            "launches_before_wait": before_wait.count("griddepcontrol.launch_dependents"),
            "launches": ptx.count("griddepcontrol.launch_dependents"),
        }
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
