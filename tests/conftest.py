"""Suite-wide settings: one intra-op thread (tiny tensors gain nothing from more, and on a shared 2-core machine
OpenMP threads contending with other processes make each op many times slower)."""

from __future__ import annotations

import torch


def pytest_configure(config) -> None:
    torch.set_num_threads(1)
