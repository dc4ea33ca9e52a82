"""Triton compiles a kernel again for every new specialisation of its integer arguments (== 1, multiple of 16):
an argument that changes with the batch would cost a compile per class in the middle of serving (the GDN chunk
prepare kernel takes 5 s to compile for sm90 on a 2-core host). Each radixc kernel leaves such counts
unspecialised."""

from __future__ import annotations

import importlib
import inspect
import pkgutil

import pytest
import triton

import radixc.ops.triton as triton_ops

# arguments that change with the batch rather than the model: rows of a GEMV, requests of a prefill, KV splits
PER_CALL_COUNTS = {"M", "num_reqs", "num_splits"}


def _kernels() -> dict[str, object]:
    kernels = {}
    for module_info in pkgutil.iter_modules(triton_ops.__path__):
        module = importlib.import_module(f"{triton_ops.__name__}.{module_info.name}")
        for name, value in vars(module).items():
            if name.endswith("_kernel") and hasattr(value, "fn") and value.fn.__module__ == module.__name__:
                kernels[f"{module_info.name}.{name}"] = value
    return kernels


def _unspecialised(kernel) -> set[str]:
    """Names the kernel does not specialise on: the JIT function's, or the interpreter's (which keeps them)."""
    if isinstance(kernel, triton.runtime.jit.JITFunction):
        return {param.name for param in kernel.params if param.do_not_specialize}
    return set(kernel.kwargs.get("do_not_specialize") or ())


def _runtime_ints(kernel) -> set[str]:
    parameters = inspect.signature(kernel.fn).parameters.values()
    return {p.name for p in parameters if "constexpr" not in str(p.annotation)}


KERNELS = _kernels()


def test_every_kernel_module_is_found():
    """The scan sees the kernels this test is about (a rename would otherwise empty it)."""
    expected = {
        "gemv._small_batch_linear_kernel",
        "attention_extend._extend_kernel",
        "gdn_chunk._chunk_prepare_kernel",
        "attention_decode._decode_partial_kernel",
    }
    assert expected <= set(KERNELS)


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_per_call_counts_are_not_specialised(name):
    kernel = KERNELS[name]
    specialised = (_runtime_ints(kernel) & PER_CALL_COUNTS) - _unspecialised(kernel)
    assert not specialised, f"{name} specialises on {sorted(specialised)}: add them to do_not_specialize"
