"""A server gives the memory of freed large tensors back to the system (glibc keeps it otherwise)."""

from __future__ import annotations

import platform

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
