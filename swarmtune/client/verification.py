"""Checking servers against each other: do two results agree, and who is the odd one out?

Servers are untrusted. With `verify_fraction`, the client re-runs some span requests on a second
server covering the same blocks; results must agree within a tolerance that depends on the
servers' dtype and quantization. On a mismatch a third server decides, and whoever disagrees with
the majority is banned.
"""

from __future__ import annotations

import torch

from swarmtune.records import ServerInfo

_DTYPE_TOLERANCE = {"float32": 1e-4, "float16": 1e-2, "bfloat16": 3e-2}
_QUANT_TOLERANCE = {"none": 0.0, "int8": 6e-2, "nf4": 1.2e-1}


def tolerance(*servers: ServerInfo) -> float:
    """Relative error allowed between honest servers of these kinds."""
    return max(_DTYPE_TOLERANCE.get(s.dtype, 3e-2) + _QUANT_TOLERANCE.get(s.quant, 1.2e-1) for s in servers)


def agree(a: torch.Tensor, b: torch.Tensor, tol: float) -> bool:
    if a.shape != b.shape:
        return False
    a, b = a.float(), b.float()
    return bool((a - b).norm() <= tol * (0.5 * (a.norm() + b.norm()) + 1e-6))


def odd_ones_out(results: dict[str, torch.Tensor], tol: float) -> tuple[str, list[str]] | None:
    """(a peer of the largest agreeing group, the peers outside it) if that group is a strict majority, else None."""
    peers = list(results)
    groups = [[q for q in peers if agree(results[p], results[q], tol)] for p in peers]
    best = max(groups, key=len)
    if 2 * len(best) <= len(peers):
        return None
    return best[0], [p for p in peers if p not in best]
