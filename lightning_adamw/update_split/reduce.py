"""Sharded parameters (FSDP, DTensor): every rank sums its local shards, then the sums are added across ranks.

Every metric is a function of sums (:mod:`lightning_adamw.update_split.contract`), so the sums of a sharded tensor
are the sums of its shards; square roots and ratios are taken only after the all-reduce. Every rank issues the
same collectives in the same order (one ``"sum"`` of the sums table, and for Adam + L2 groups one ``"max"`` and
three ``"sum"`` reductions of the denominator statistics).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

__all__ = ["ShardReduce", "dtensor_weight"]


@dataclass
class ShardReduce:
    """How to combine per-rank sums when parameters are sharded (FSDP, DTensor).

    Args:
        all_reduce: ``all_reduce(tensor, op)`` in place with ``op`` in ``{"sum", "max"}``; called with the same
            shapes in the same order on every rank.
        weight: ``weight(param) -> float`` multiplies that parameter's local sums before the sum, ``1/r`` for a
            parameter replicated on ``r`` of the ranks taking part (so the total counts it once).
    """

    all_reduce: Callable[[Tensor, str], None]
    weight: Callable[[Tensor], float] = field(default=lambda p: 1.0)

    @classmethod
    def torch_distributed(
        cls, group: Any = None, weight: Callable[[Tensor], float] | None = None
    ) -> ShardReduce:
        """A reducer over a ``torch.distributed`` process group (default: the world)."""
        import torch.distributed as dist

        def all_reduce(t: Tensor, op: str) -> None:
            dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX, group=group)

        return cls(all_reduce=all_reduce, weight=weight or dtensor_weight)


def dtensor_weight(param: Tensor) -> float:
    """``1 / (number of replicas)`` of a DTensor parameter (1.0 for plain tensors and fully sharded ones)."""
    placements = getattr(param, "placements", None)
    mesh = getattr(param, "device_mesh", None)
    if placements is None or mesh is None:
        return 1.0
    replicas = 1
    for dim, placement in enumerate(placements):
        if placement.is_replicate():
            replicas *= mesh.size(dim)
    return 1.0 / replicas
