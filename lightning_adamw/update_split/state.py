r"""Stage 1: read the optimizer's state after its step.

For each parameter group: its label and kind (:mod:`~lightning_adamw.update_split.labels`), and for each tensor
the step updated, a :class:`~lightning_adamw.update_split.contract.TensorWork` with flat local views of
:math:`w_{new}`, ``exp_avg`` and the denominator's ``v`` (Adam family), or of the snapshot :math:`w_{old}`
(other optimizers), and the row of the sums table its sums go to. Nothing is copied: every view is of the
optimizer's own tensors (a non-contiguous tensor's flat view is a copy; such plans are never cached, see
:mod:`~lightning_adamw.update_split.plan`).

A tensor without a gradient was skipped by the optimizer and is left out (no item; its row stays empty).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_adamw.update_split.contract import TensorWork, compute_dtype
from lightning_adamw.update_split.labels import Kind, group_kind, group_labels, layer_labels, param_labels
from lightning_adamw.update_split.reduce import ShardReduce

__all__ = ["GroupWork", "current_grads", "local_flat", "read_state", "take_snapshot", "v_key"]


@dataclass
class GroupWork:
    """One parameter group: its labels and kind, the rows of its tensors, and the tensors this step updated."""

    index: int
    label: str
    kind: Kind
    #: per tensor of the group (updated or not): name, per-layer label, row of the sums table, and the machine
    #: epsilon of its dtype (0 for non-float tensors)
    names: list[str]
    keys: list[str]
    rows: list[int]
    rounding: list[float]
    #: the tensors this step updated
    items: list[TensorWork] = field(default_factory=list)
    #: the trainable tensors (``requires_grad``) this step did not update, as ``(row, parameter, replica weight)``:
    #: their squared norm goes to the ``IDLE`` column (the group's weight vector still holds them)
    idle: list[tuple[int, Tensor, float]] = field(default_factory=list)
    #: position among the coupled-L2 groups (their denominator statistics), -1 for other kinds
    coupled_index: int = -1


def v_key(group: Mapping[str, Any]) -> str:
    """The state key of the denominator's second moment: ``max_exp_avg_sq`` under amsgrad."""
    return "max_exp_avg_sq" if group.get("amsgrad", False) else "exp_avg_sq"


def local_flat(t: Tensor) -> Tensor:
    """A DTensor's local shard (we reduce ourselves: no implicit collectives), complex as its real view, flat."""
    to_local = getattr(t, "to_local", None)
    if to_local is not None:
        t = to_local()
    if t.is_complex():
        t = torch.view_as_real(t)
    return t.detach().reshape(-1)


def read_state(
    param_groups: Sequence[Mapping[str, Any]],
    state: Mapping[Tensor, Mapping[str, Any]],
    *,
    adam_family: bool,
    snapshot: Mapping[Tensor, Tensor] | None,
    reduce: ShardReduce | None,
) -> tuple[list[GroupWork], int]:
    """The groups and the tensors this step updated, with their rows; returns ``(groups, number of rows)``."""
    works: list[GroupWork] = []
    labels = group_labels(param_groups)
    keys = layer_labels(param_groups)
    row = 0
    coupled = 0
    for gi, group in enumerate(param_groups):
        kind = group_kind(group, adam_family)
        work = GroupWork(
            index=gi,
            label=labels[gi],
            kind=kind,
            names=param_labels(group, gi, label=labels[gi]),
            keys=keys[gi],
            rows=[],
            rounding=[],
        )
        if kind == "adam_l2":
            work.coupled_index = coupled
            coupled += 1
        v_name = v_key(group)
        for p in group["params"]:
            work.rows.append(row)
            work.rounding.append(float(torch.finfo(p.dtype).eps) if p.dtype.is_floating_point else 0.0)
            item = _item(p, row, kind, state, v_name, snapshot, reduce)
            if item is not None:
                work.items.append(item)
            elif p.requires_grad:
                work.idle.append((row, p, reduce.weight(p) if reduce is not None else 1.0))
            row += 1
        works.append(work)
    return works, row


def _item(
    p: Tensor,
    row: int,
    kind: Kind,
    state: Mapping[Tensor, Mapping[str, Any]],
    v_name: str,
    snapshot: Mapping[Tensor, Tensor] | None,
    reduce: ShardReduce | None,
) -> TensorWork | None:
    # optimizers skip parameters without a gradient: this step did not update them
    if p.grad is None:
        return None
    flat = local_flat(p)
    common = {
        "row": row,
        "weight": reduce.weight(p) if reduce is not None else 1.0,
        "param": p,
        "p": flat,
        "compute_dtype": compute_dtype(p.shape, flat.dtype, flat.device),
    }
    if kind == "generic":
        snap = None if snapshot is None else snapshot.get(p)
        return None if snap is None else TensorWork(**common, snap=local_flat(snap))
    st = state.get(p, {})
    if "exp_avg" not in st or "step" not in st:
        return None  # never stepped
    return TensorWork(**common, m=local_flat(st["exp_avg"]), v=local_flat(st[v_name]), state=st)


def current_grads(items: Sequence[TensorWork]) -> list[Tensor]:
    """The flat local gradients of ``items`` now (each ``zero_grad`` may have made new tensors)."""
    return [local_flat(it.param.grad) for it in items]  # type: ignore[arg-type]


def take_snapshot(
    params: Iterable[Tensor] | torch.optim.Optimizer, *, only_local: bool = True
) -> dict[Tensor, Tensor]:
    """Copies of the parameters (the local shard of a DTensor), the weights before the step for optimizers
    without Adam state.

    This costs one copy of the parameters, so the monitor takes it only on logging steps and frees it right after
    the step (see :class:`~lightning_adamw.monitor.WeightDecayMonitor`).
    """
    if isinstance(params, torch.optim.Optimizer):
        params = [p for g in params.param_groups for p in g["params"]]
    out: dict[Tensor, Tensor] = {}
    with torch.no_grad():
        for p in params:
            local = p.to_local() if (only_local and hasattr(p, "to_local")) else p
            out[p] = local.detach().clone()
    return out
