"""The process heap's policy for forge's long jobs (glibc only; elsewhere nothing): large tensors mapped on their
own, and freed memory handed back after each written shard.

Called by the `forge` entry point and each distributed rank (`map_large_allocations`), and by the shard writer
after each shard (`release_free_memory`).
"""

import ctypes
import functools

MMAP_THRESHOLD_BYTES = 4 * 1024**2
"""Allocations from this size on get memory mapped of their own (see `map_large_allocations`)."""


@functools.cache
def _libc():
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def map_large_allocations() -> None:
    """Fix glibc's mmap threshold, so every tensor of 4 MiB or more is mapped on its own and returns to the system
    when freed. By default glibc raises the threshold each time it frees a mapped block (up to 32 MiB), then serves
    such sizes from its heap, where memory freed below a block still in use is never returned. Loading frees many
    tensors of a few MiB to tens of MiB between ones it keeps:
    - AutoEP converts one layer at a time and each rank's expert reads are staged: on 2 ranks that kept a rank at
      2.1x its load bound, against 1.06x with the threshold fixed (bench/expert_parallel.py --load);
    - the compressed-tensors export packs each expert through int64 temporaries between the packed tensors it
      keeps: +3.2 GB against +1.3 GB fixed, two Qwen3-30B-A3B-width layers (bench/export_memory.py).
    Not glibc (no `mallopt`): nothing."""
    libc = _libc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(-3, MMAP_THRESHOLD_BYTES)  # M_MMAP_THRESHOLD (malloc.h); setting it ends the dynamic adjustment


def release_free_memory() -> None:
    """Return the heap's free pages to the system (`malloc_trim`): what a written shard's small tensors held is
    otherwise kept below the allocations still in use."""
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
