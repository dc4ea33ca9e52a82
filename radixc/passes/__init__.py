"""Inductor passes over radixc ops: fusions, lowering to backend kernels; installed on import of radixc."""

from radixc.passes.manager import PassConfig, RadixPassManager, config, install, set_switches

__all__ = ["PassConfig", "RadixPassManager", "config", "install", "set_switches"]
