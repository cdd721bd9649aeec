//! Linux platform layer for rvhost: guest memory mapping, hugepage DMA memory, NUMA-aware reactor pinning, SPSC control rings, eventfds.
