r"""Exact split of an optimizer step into its decoupled-decay part and its gradient part.

The functional core behind :class:`~lightning_adamw.monitor.WeightDecayMonitor`: torch only, never Lightning,
callable on any optimizer right after ``optimizer.step()`` (for example from ``register_step_post_hook``).

For AdamW (``torch.optim.AdamW``, ``torch.optim.Adam(decoupled_weight_decay=True)``; Loshchilov & Hutter, 2019)
one step is

.. math::

    w_{new} = w_{old}\,(1 - \eta\lambda) - \eta\,u, \qquad u = \frac{\hat m}{\sqrt{\hat v} + \epsilon}

Everything on the right except :math:`w_{old}` is still in the optimizer after the step (``exp_avg``,
``exp_avg_sq``, ``step``, ``lr``, ``weight_decay``), so the step is reconstructed exactly, without having copied
any parameter. One call follows four stages, one module each:

1. :mod:`~lightning_adamw.update_split.state` — read the optimizer's state: the updated tensors and their rows
   (with :mod:`~lightning_adamw.update_split.plan`, which caches that and the backends' layouts per optimizer);
2. :mod:`~lightning_adamw.update_split.scalars` — this step's scalars: the bias corrections replayed as the
   optimizer computed them;
3. :mod:`~lightning_adamw.update_split.sums` — the per-tensor sums table, filled by the backends of
   :mod:`~lightning_adamw.update_split.backends` under one contract (:mod:`~lightning_adamw.update_split.contract`),
   and for Adam + L2 the denominators' statistics (:mod:`~lightning_adamw.update_split.median`), fetched with
   one device-to-host transfer;
4. :mod:`~lightning_adamw.update_split.results` — the result types, with every metric derived from the sums by
   its formula in :mod:`~lightning_adamw.update_split.metrics`.

Sharded parameters (FSDP, DTensor) are handled by summing the local sums across ranks
(:class:`~lightning_adamw.update_split.reduce.ShardReduce`) before any root is taken. ``docs/update_split.md`` is
the map: where to change a formula, add a backend, or add a metric that needs a new sum.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from lightning_adamw.optim_checks import is_adam_family
from lightning_adamw.update_split.labels import (
    KIND_PREFIX,
    Kind,
    group_kind,
    group_label,
    group_labels,
    layer_labels,
    param_labels,
)
from lightning_adamw.update_split.median import denominator_stats
from lightning_adamw.update_split.metrics import (
    ADAM_L2_GROUP_METRICS,
    ADAM_L2_LAYER_METRICS,
    ADAMW_GROUP_METRICS,
    ADAMW_LAYER_METRICS,
    ADAMW_W_OLD_METRICS,
    GENERIC_METRICS,
    W_OLD_MAX_RELATIVE_ERROR,
    derive_metrics,
    w_old_reconstructible,
)
from lightning_adamw.update_split.plan import PlanCache, plan_for
from lightning_adamw.update_split.reduce import ShardReduce, dtensor_weight
from lightning_adamw.update_split.results import GroupSplit, TensorSplit, UpdateSplit, assemble
from lightning_adamw.update_split.scalars import step_scalars
from lightning_adamw.update_split.state import take_snapshot
from lightning_adamw.update_split.sums import BackendFailure, fetch, sums_table

__all__ = [
    "ADAMW_GROUP_METRICS",
    "ADAMW_LAYER_METRICS",
    "ADAMW_W_OLD_METRICS",
    "ADAM_L2_GROUP_METRICS",
    "ADAM_L2_LAYER_METRICS",
    "GENERIC_METRICS",
    "KIND_PREFIX",
    "W_OLD_MAX_RELATIVE_ERROR",
    "GroupSplit",
    "Kind",
    "PlanCache",
    "ShardReduce",
    "TensorSplit",
    "UpdateSplit",
    "adamw_update_split",
    "derive_metrics",
    "dtensor_weight",
    "generic_update_split",
    "group_kind",
    "group_label",
    "group_labels",
    "layer_labels",
    "param_labels",
    "take_snapshot",
    "update_split",
    "w_old_reconstructible",
]


def update_split(
    optimizer: torch.optim.Optimizer,
    *,
    snapshot: Mapping[Tensor, Tensor] | None = None,
    steps_per_epoch: float | None = None,
    chunk_numel: int | None = None,
    reduce: ShardReduce | None = None,
    triton: bool = True,
    backend: str | None = None,
    cache: PlanCache | None = None,
) -> UpdateSplit:
    r"""Split the step ``optimizer`` has just taken; call it right after ``optimizer.step()``.

    ``torch.optim.Adam`` / ``AdamW`` groups are reconstructed from the optimizer state (no copy of any parameter):
    AdamW groups (and Adam groups with ``weight_decay == 0``) into :math:`\|\eta\lambda w_{old}\|` and
    :math:`\|\eta u\|`; Adam groups with coupled L2 into the statistics of the per-coordinate decay
    :math:`\eta\lambda / (\sqrt{\hat v} + \epsilon)` that L2 inside Adam applies. Other optimizers need
    ``snapshot``; without it their groups are left out. Every metric, its unit and its source:
    :mod:`lightning_adamw.update_split.metrics`.

    Args:
        optimizer: the optimizer, after its step. Its groups' ``"name"`` and ``"param_names"`` label the metrics
            (:func:`group_labels`, :func:`layer_labels`).
        snapshot: ``{param: copy of its weights before the step}`` (:func:`take_snapshot`) for optimizers
            without Adam state; its buffers are used as scratch space and hold garbage afterwards.
        steps_per_epoch: optimizer steps per epoch, for ``ema_timescale_epochs`` (left out when ``None``).
        chunk_numel: elements per chunk of the torch backends' scratch buffers (bounds the extra memory);
            ``None`` picks about 1/16 of the parameters.
        reduce: how to add the sums of sharded parameters across ranks (FSDP, DTensor); every rank must call.
        triton: ``False`` keeps the fused Triton kernel out of the automatic choice (as
            ``LIGHTNING_ADAMW_TRITON=0`` does); on CUDA with Triton installed it sums AdamW groups.
        backend: force one backend of :data:`~lightning_adamw.update_split.backends.BACKENDS` for every group
            (``"reference"``, ``"foreach"``, ``"packed"``, ``"triton"``); ``None`` lets the dispatch table choose.
        cache: a :class:`PlanCache` owned by the caller, to reuse this optimizer's plan (which tensors, layouts)
            from call to call; without one every call builds its own plan (same numbers, slower on models with
            many tensors). A backend that fails at run time is recorded there and not used again.

    Returns:
        The :class:`UpdateSplit`; ``UpdateSplit(skipped=True)`` when a fused optimizer's step was skipped by the
        ``GradScaler`` (``optimizer.found_inf`` set).

    Raises:
        ValueError: ``backend`` unknown, or unable to take a group or tensor of this optimizer.

    Example::

        >>> import torch
        >>> model = torch.nn.Linear(4, 2)
        >>> opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
        >>> model(torch.randn(8, 4)).square().mean().backward()
        >>> opt.step()
        >>> split = update_split(opt)
        >>> sorted(split.metrics())[:3]
        ['adamw/group0/angular_update', 'adamw/group0/cos_grad_update_weight', 'adamw/group0/decay_norm']
    """
    return _split(
        optimizer.param_groups,
        optimizer.state,
        adam_family=is_adam_family(optimizer),
        snapshot=snapshot,
        steps_per_epoch=steps_per_epoch,
        chunk_numel=chunk_numel,
        reduce=reduce,
        found_inf=getattr(optimizer, "found_inf", None),
        grad_scale=getattr(optimizer, "grad_scale", None),
        triton=triton,
        backend=backend,
        cache=cache,
        key=optimizer,
    )


def _split(
    param_groups: Sequence[Mapping[str, Any]],
    state: Mapping[Tensor, Mapping[str, Any]],
    *,
    adam_family: bool,
    snapshot: Mapping[Tensor, Tensor] | None = None,
    steps_per_epoch: float | None = None,
    chunk_numel: int | None = None,
    reduce: ShardReduce | None = None,
    found_inf: Tensor | None = None,
    grad_scale: Tensor | None = None,
    triton: bool = True,
    backend: str | None = None,
    cache: PlanCache | None = None,
    key: Any = None,
) -> UpdateSplit:
    plan_args = {
        "adam_family": adam_family,
        "snapshot": snapshot,
        "reduce": reduce,
        "chunk_numel": chunk_numel,
        "triton": triton,
        "backend": backend,
        "key": key,
    }
    with torch.no_grad():
        plan = plan_for(param_groups, state, cache=cache, **plan_args)  # 1. state (and the plan)
        scalars = step_scalars(plan.works, param_groups)  # 2. this step's scalars
        try:
            table = sums_table(plan, scalars, reduce, grad_scale)  # 3. the sums table
        except (
            BackendFailure
        ) as failure:  # a Triton that cannot compile or launch here: a new plan without it
            cache = cache if cache is not None else PlanCache()
            cache.record_failure(failure.backend, failure.error)
            plan = plan_for(param_groups, state, cache=cache, **plan_args)
            table = sums_table(plan, scalars, reduce, grad_scale)
        parts = [table]
        stats = denominator_stats(plan.works, scalars, plan.device, reduce, chunk_numel)  # (Adam + L2)
        if stats is not None:
            parts.append(stats)
        if found_inf is not None:  # a fused optimizer's skipped-step flag (GradScaler)
            parts.append(found_inf)
        host = fetch(parts, plan.device)  # the one device -> host transfer
    if found_inf is not None and host[-1] > 0:
        return UpdateSplit(groups=[], skipped=True)
    return assemble(plan.works, scalars, host, plan.num_rows, steps_per_epoch=steps_per_epoch)  # 4. results


def adamw_update_split(
    param_groups: Sequence[Mapping[str, Any]],
    state: Mapping[Tensor, Mapping[str, Any]],
    *,
    per_layer: bool = False,
    steps_per_epoch: float | None = None,
    chunk_numel: int | None = None,
    reduce: ShardReduce | None = None,
) -> dict[str, float]:
    """Metrics of an Adam/AdamW step from its ``param_groups`` and ``state`` (post-step), as a flat dict.

    Groups with decoupled decay (or ``weight_decay == 0``) give ``adamw/<group>/<metric>``; groups of
    ``torch.optim.Adam`` with coupled L2 give the ``adam_l2/<group>/<metric>`` statistics. Arguments as
    :func:`update_split`.
    """
    split = _split(
        param_groups,
        state,
        adam_family=True,
        steps_per_epoch=steps_per_epoch,
        chunk_numel=chunk_numel,
        reduce=reduce,
    )
    return split.metrics(per_layer=per_layer)


def generic_update_split(
    optimizer: torch.optim.Optimizer,
    snapshot: Mapping[Tensor, Tensor],
    *,
    per_layer: bool = False,
    chunk_numel: int | None = None,
    reduce: ShardReduce | None = None,
) -> dict[str, float]:
    """Weight norm, update norm, update-to-weight ratio and angular update of any optimizer's last step.

    ``snapshot`` holds the weights before the step (:func:`take_snapshot`). The snapshot buffers are used as
    scratch space and hold garbage afterwards.
    """
    split = _split(
        optimizer.param_groups,
        optimizer.state,
        adam_family=False,
        snapshot=snapshot,
        chunk_numel=chunk_numel,
        reduce=reduce,
    )
    return split.metrics(per_layer=per_layer)
