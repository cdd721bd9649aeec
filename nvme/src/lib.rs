//! A user-space VFIO NVMe driver: admin and I/O queue pairs, polled completions, zero-copy PRP/SGL from guest memory.
