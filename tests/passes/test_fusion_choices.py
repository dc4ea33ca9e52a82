"""The fusion choices radixc installs: a residual add + RMSNorm over an unbacked token dim becomes one Triton kernel
(Inductor's own choices leave the sum of squares and the scaling apart), on both torch versions."""

from __future__ import annotations

import pytest
import torch
import torch._inductor.config as inductor_config
from torch._inductor.choices import InductorChoices
from torch._inductor.scheduler import Scheduler
from torch._inductor.virtualized import V

import radixc  # noqa: F401  (installs the choices)
from radixc.passes.fusion_choices import UnbackedSizeFusionChoices


class ScheduledKernels(Exception):
    """Raised from the scheduler's codegen with the kernels it was about to generate (stops the compile there:
    without a GPU there is no Triton driver to build them)."""

    def __init__(self, kernels: list[str]):
        super().__init__(kernels)
        self.kernels = kernels


def add_rms_norm(x, residual, weight):
    summed = x + residual
    x32 = summed.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)
    return weight * normed.to(summed.dtype), summed


def scheduled_kernels(choices: InductorChoices, monkeypatch) -> list[str]:
    """The kernels Inductor's Triton backend schedules for add_rms_norm with an unbacked row count."""

    def record(scheduler):
        raise ScheduledKernels([node.get_name() for node in scheduler.nodes if not node.is_extern()])

    monkeypatch.setattr(Scheduler, "codegen", record)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(5, 256, dtype=torch.bfloat16, device=device)
    residual, weight = torch.randn_like(x), torch.randn(256, dtype=torch.bfloat16, device=device)
    for tensor in (x, residual):
        torch._dynamo.decorators.mark_unbacked(tensor, 0)
    torch._dynamo.reset()
    with (
        V.set_choices_handler(choices),
        inductor_config.patch(cpu_backend="triton", fx_graph_cache=False),
        pytest.raises(Exception) as raised,
    ):
        torch.compile(add_rms_norm, fullgraph=True)(x, residual, weight)
    error = raised.value
    while error is not None and not isinstance(error, ScheduledKernels):
        error = error.__cause__ or error.__context__
    assert error is not None, f"the compile failed before codegen: {raised.value!r}"
    return error.kernels


def test_radixc_installs_its_fusion_choices():
    assert inductor_config.inductor_choices_class is UnbackedSizeFusionChoices


def test_add_and_rms_norm_over_an_unbacked_dim_is_one_kernel(monkeypatch):
    assert len(scheduled_kernels(InductorChoices(), monkeypatch)) >= 2  # Inductor alone: no shared data
    assert len(scheduled_kernels(UnbackedSizeFusionChoices(), monkeypatch)) == 1


def test_the_choices_uuid_follows_the_source():
    first, second = UnbackedSizeFusionChoices().uuid(), UnbackedSizeFusionChoices().uuid()
    assert first == second and len(first) == 64
