"""Stage 3: the per-tensor sums table — every backend of the plan adds its tensors' sums into one table.

Each device's table starts from the plan's constant columns; each :class:`~lightning_adamw.update_split.backends.
Assignment` gets a :class:`~lightning_adamw.update_split.contract.SumsRequest` with this step's scalars and adds
into it (the contract). The tables of all devices are then added on the plan's device and, for sharded
parameters, across ranks; :func:`fetch` moves everything to the host in one transfer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from lightning_adamw.update_split.backends import BACKENDS
from lightning_adamw.update_split.contract import (
    SUM_COLUMNS,
    Col,
    RequestPart,
    StepScalars,
    SumsRequest,
    Tables,
    acc_dtype,
    host_to,
)
from lightning_adamw.update_split.plan import Plan
from lightning_adamw.update_split.reduce import ShardReduce
from lightning_adamw.update_split.state import current_grads, local_flat

__all__ = ["BackendFailure", "fetch", "sums_table"]


class BackendFailure(RuntimeError):
    """A fallible backend (Triton) failed at run time; the caller rebuilds the plan without it."""

    def __init__(self, backend: str, error: BaseException) -> None:
        super().__init__(f"the {backend} backend failed: {error!r}")
        self.backend = backend
        self.error = error


def sums_table(
    plan: Plan, scalars: Sequence[StepScalars], reduce: ShardReduce | None, grad_scale: Tensor | None
) -> Tensor:
    """The sums table (``plan.num_rows x NUM_COLUMNS``) on ``plan.device``, summed over devices and ranks.

    Raises :class:`BackendFailure` when a fallible backend fails and the plan chose it (not forced)."""
    tables = Tables(plan.num_rows, plan.base)
    for assignment in plan.assignments:
        parts = [
            RequestPart(
                items=items,
                scalars=scalars[gi],
                grads=current_grads(items) if Col.G in SUM_COLUMNS[assignment.kind] else None,
            )
            for gi, items in assignment.parts
        ]
        request = SumsRequest(kind=assignment.kind, parts=parts, grad_scale=grad_scale)
        backend = BACKENDS[assignment.backend]
        try:
            backend.add_sums(assignment.prepared, request, tables)
        except Exception as err:
            if backend.fallible and plan.choice[0] is None:
                raise BackendFailure(backend.name, err) from err
            raise
    _add_idle(plan, tables)
    main = plan.device
    if len(tables.tables) == 1 and main in tables.tables:
        table = tables.tables[main]  # one device: its table is the result (no copy)
    else:  # a model split over devices (or no item at all)
        table = tables.on(main).clone()
        for device, t in list(tables.tables.items()):
            if device != main:
                table += t.to(device=main, dtype=table.dtype)
    if reduce is not None:
        reduce.all_reduce(table, "sum")
    return table


def _add_idle(plan: Plan, tables: Tables) -> None:
    """``IDLE``: the squared norm of each trainable tensor the step did not update, in the table's dtype (one
    norm kernel per such tensor: they are few, and none in most steps), times its replica weight."""
    by_device: dict[torch.device, tuple[list[int], list[Tensor], list[float]]] = {}
    for work in plan.works:
        for row, param, weight in work.idle if work.items else ():  # (a group with no update is not reported)
            flat = local_flat(param)  # (read now: a cached plan must not hold a copy of the weights)
            rows, norms, weights = by_device.setdefault(flat.device, ([], [], []))
            rows.append(row)
            norms.append(torch.linalg.vector_norm(flat, dtype=acc_dtype(flat.device)))
            weights.append(weight)
    for device, (rows, norms, weights) in by_device.items():
        table = tables.on(device)
        squares = torch.stack(norms).square_().mul_(host_to(weights, table.dtype, device))
        table[:, Col.IDLE].index_add_(0, host_to(rows, torch.int64, device), squares)


def fetch(parts: Sequence[Tensor], device: torch.device) -> list[float]:
    """The one device-to-host transfer of a call: ``parts`` flattened and concatenated, as Python floats."""
    flat = [p.detach().reshape(-1).to(device=device, dtype=acc_dtype(device)) for p in parts]
    return (torch.cat(flat) if len(flat) > 1 else flat[0]).cpu().tolist()
