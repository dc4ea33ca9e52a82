"""FlashInfer paged attention kernels: wrappers planned on the host each step by the FlashInfer backend."""
