"""Host memory the server process gives back to the system once it is done with it.

glibc's malloc serves a large allocation with its own mmap only while it is above a threshold that
it raises (up to 32 MiB) each time such a block is freed; after that, the activations of a request
and the random block that the throughput benchmark builds come from the heap, and what is freed
there mostly stays with the process. A server holding 1.6 GiB of Llama-2-70B weights kept 0.27
GiB more after its throughput benchmark and one 2 x 256-token forward. A fixed threshold keeps every
large tensor in its own mapping, unmapped when freed: one mmap and its page faults per tensor of a
request, against that request's matmuls.

oneDNN, which runs bf16 matmuls on a CPU, keeps a compiled kernel for every matmul shape it has run
(in PyTorch's ideep cache and its own primitive cache, 1,024 entries each by default, ~0.3 MiB an
entry at Qwen3-30B-A3B's expert shapes). An MoE block gives each expert a different number of a
request's tokens, so one long forward is hundreds of new shapes: a real-shape qwen3_moe server kept
0.16 GiB after one 8 x 512 forward. Servers bound both caches; decoding repeats a few shapes only.
"""

from __future__ import annotations

import ctypes
import logging
import os

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3      # mallopt's parameter number (malloc.h)
MMAP_THRESHOLD = 1 << 20   # allocations from this size up get their own mapping (a one-row decoding step's are smaller)
KERNEL_CACHE_ENTRIES = 64  # matmul shapes oneDNN keeps compiled (in each of its two caches)


def return_freed_memory() -> None:
    """Make large allocations their own mappings from now on (glibc only; elsewhere nothing changes), and bound
    oneDNN's kernel caches (read at its first matmul: call this before any, unless the environment sets them)."""
    os.environ.setdefault("LRU_CACHE_CAPACITY", str(KERNEL_CACHE_ENTRIES))
    os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(KERNEL_CACHE_ENTRIES))
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the C library the process runs with
    except (OSError, AttributeError):  # no mallopt (macOS), or no C library to ask (Windows)
        mallopt = None
    if mallopt is None or mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) != 1:
        logger.debug("malloc's mmap threshold left as it is: freed host memory may stay with the process")
