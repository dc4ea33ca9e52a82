"""Run by test_pdl.py in a process without the Triton interpreter: compile radixc's decode kernels for sm90 (no
GPU needed) and print, as JSON, how many global loads each issues before its PDL wait (griddepcontrol.wait)."""

from __future__ import annotations

import json

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from radixc.ops.triton import attention_decode, causal_conv1d, gdn_recurrent, rope_kv_store


def _sm90_ptx(kernel, pointers: dict[str, str], floats: tuple[str, ...], constexprs: dict, **options) -> str:
    """The kernel compiled for sm90 (no GPU needed): pointer arguments typed by name, floats as fp32, other
    arguments as i32."""
    signature = {name: pointers.get(name, "fp32" if name in floats else "i32") for name in kernel.arg_names}
    signature.update({name: "constexpr" for name in constexprs})
    source = ASTSource(kernel, signature, {**constexprs, "USE_PDL": True})
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


def _attention_case():
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
    )
    return attention_decode._decode_partial_kernel, pointers, ("sm_scale", "logit_cap"), constexprs


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


CASES = {
    "gdn_recurrent": _recurrent_case,
    "conv": _conv_case,
    "attention": _attention_case,
    "rope_kv_store": _rope_case,
}


def main() -> None:
    loads = {}
    for name, case in CASES.items():
        ptx = _sm90_ptx(*case(), num_warps=4, num_stages=2)
        before_wait = ptx.split("griddepcontrol.wait", 1)[0] if "griddepcontrol.wait" in ptx else ""
        loads[name] = before_wait.count("ld.global")
    print(json.dumps(loads))


if __name__ == "__main__":
    main()
