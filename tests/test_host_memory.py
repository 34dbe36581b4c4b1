"""A server gives the memory of freed large tensors back to the system (glibc keeps it otherwise), and bounds
oneDNN's caches of compiled matmul kernels."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import psutil
import pytest
import torch

from swarmtune.server import host_memory

MiB = 1 << 20


@pytest.mark.skipif(platform.system() != "Linux", reason="glibc's malloc")
def test_freed_large_tensors_leave_the_process():
    host_memory.return_freed_memory()
    bump = torch.ones(30 * MiB, dtype=torch.uint8)  # freed, this would raise glibc's own threshold to 30 MiB
    del bump
    tensors = [torch.ones(8 * MiB, dtype=torch.uint8) for _ in range(32)]
    before = psutil.Process().memory_info().rss
    del tensors[::2]  # holes between live tensors: on the heap, glibc would keep all 128 MiB
    assert before - psutil.Process().memory_info().rss >= 100 * MiB


_KERNEL_CACHE_PROBE = """
import psutil, torch
from swarmtune.server import host_memory
host_memory.return_freed_memory()
torch.set_num_threads(1)
w = torch.randn(256, 256, dtype=torch.bfloat16)
torch.nn.functional.linear(torch.randn(1, 256, dtype=torch.bfloat16), w)
before = psutil.Process().memory_info().rss
for rows in range(2, 302):  # as an MoE block's experts get a different number of tokens each
    torch.nn.functional.linear(torch.randn(rows, 256, dtype=torch.bfloat16), w)
print(psutil.Process().memory_info().rss - before)
"""


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="oneDNN runs the bf16 matmuls")
def test_kernel_caches_stay_bounded_over_many_matmul_shapes():
    """300 bf16 matmul shapes: oneDNN's default caches keep a compiled kernel for each (~0.6 MiB a shape); a
    server's bounded caches keep ~60 MiB however many shapes run."""
    def grown(env: dict[str, str]) -> int:
        out = subprocess.run([sys.executable, "-c", _KERNEL_CACHE_PROBE], capture_output=True, text=True,
                             timeout=120, check=True, env={**os.environ, **env})
        return int(out.stdout.split()[-1])

    bounded = grown({})
    default = grown({"LRU_CACHE_CAPACITY": "1024", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"})
    assert bounded <= 100 * MiB and default >= 2 * bounded, (bounded / MiB, default / MiB)
