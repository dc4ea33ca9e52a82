"""The README's demo runs: it generates with a compiled preset and prints the kernels the compiler chose."""

from __future__ import annotations

from radixc.tools import demo


def test_demo_generates_and_names_the_lowered_kernels(capsys):
    assert (
        demo.main(["--model", "tiny-llama", "--prompts", "3", "--max-new-tokens", "4", "--device", "cpu"])
        == 0
    )
    out = capsys.readouterr().out
    assert out.count("(length)") == 3
    assert "radixc.native_extend_attention" in out and "radixc.native_decode_attention" in out
    assert "lower_radixc_ops=" in out
