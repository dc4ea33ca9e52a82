"""radixc.ops.triton loads its kernels lazily and reports whether triton can run here."""

from __future__ import annotations

import subprocess
import sys

import pytest

import radixc.ops.triton as triton_ops


def _run_python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


def test_importing_the_package_loads_no_launcher_module_and_survives_without_triton():
    code = (
        "import sys\n"
        "sys.modules['triton'] = None  # any `import triton` now raises ImportError\n"
        "import radixc.ops.triton as t\n"
        "loaded = {f'radixc.ops.triton.{m}' for m in t._LAUNCHERS.values()} & set(sys.modules)\n"
        "assert not loaded, loaded\n"
        "assert t.is_available() is False\n"
    )
    result = _run_python(code)
    assert result.returncode == 0, result.stderr


def test_is_available_under_the_interpreter_or_on_a_gpu():
    assert triton_ops.is_available()


def test_every_launcher_resolves_lazily_and_unknown_names_raise():
    for name in triton_ops.__all__:
        assert callable(getattr(triton_ops, name))
    with pytest.raises(AttributeError, match="no attribute"):
        triton_ops.flash_attention  # noqa: B018
