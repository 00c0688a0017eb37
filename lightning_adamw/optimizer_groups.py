"""Checks and repairs on an optimizer's parameter groups after it was built. Pure torch.

* :func:`check_group_hyperparameters`: refuse a group whose ``lr``, ``weight_decay``, ``eps`` or ``betas`` is
  non-finite or negative, whatever built the optimizer (torch checks only its constructor defaults, and accepts
  ``lr=inf`` and ``weight_decay=inf`` even there).
* :func:`name_added_group`: give a group added later with ``add_param_group`` the ``param_names`` that torch
  requires once any group has them (Lightning's ``BackboneFinetuning`` adds unnamed groups).
* :func:`untracked_tensors`: the tensors of a module that are in no group of the given optimizers.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from lightning_adamw.optimizer_state import group_label

__all__ = ["check_group_hyperparameters", "name_added_group", "named_tensor_ids", "untracked_tensors"]

# Hyperparameters that must be finite and >= 0 in every group that has them (AdamW, Adam, SGD, RMSprop, ...).
_NON_NEGATIVE = ("lr", "initial_lr", "weight_decay", "eps")


def _scalar(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        return float(value.item()) if value.numel() == 1 else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def check_group_hyperparameters(
    param_groups: Sequence[Mapping[str, Any]], owner: str = "optimizer", first_index: int = 0
) -> None:
    """Raise when a group holds a non-finite or negative ``lr`` / ``weight_decay`` / ``eps``, or ``betas`` outside
    ``[0, 1)``.

    Args:
        param_groups: ``optimizer.param_groups`` (or the groups about to be given to an optimizer).
        owner: how the optimizer is named in the message (e.g. its class name).
        first_index: index of ``param_groups[0]`` in its optimizer (for ``group<i>`` labels of unnamed groups).

    Raises:
        ValueError: naming the key, the value and the group (``"name"`` or ``group<i>``). ``eps`` may be a tuple
            (Adafactor's ``(eps1, eps2)``) whose entries may be ``None``.
    """
    for i, group in enumerate(param_groups, start=first_index):
        label = group_label(dict(group), i)
        for key in _NON_NEGATIVE:
            if key not in group or group[key] is None:
                continue
            values = group[key] if isinstance(group[key], (tuple, list)) else (group[key],)
            for value in values:
                number = _scalar(value)
                if value is None or number is None:
                    continue
                if not math.isfinite(number) or number < 0:
                    option = "lr" if key == "initial_lr" else key
                    raise ValueError(
                        f"{owner} parameter group `{label}` has `{key}`={group[key]!r}: `{key}` must be a finite "
                        f"number >= 0; check the option that set it (the optimizer's `{option}`, e.g. "
                        f"--optimizer.{option}, or the module's `{option}` setting)"
                    )
        betas = group.get("betas")
        if isinstance(betas, (tuple, list)):
            for j, beta in enumerate(betas):
                number = _scalar(beta)
                if number is not None and not (math.isfinite(number) and 0.0 <= number < 1.0):
                    raise ValueError(
                        f"{owner} parameter group `{label}` has `betas`={tuple(betas)!r}: betas[{j}] must be a "
                        "finite number in [0, 1)"
                    )


def named_tensor_ids(module: nn.Module) -> dict[int, str]:
    """``id(tensor) -> name`` for every parameter of ``module`` (first name of a tied tensor): the names
    :func:`~lightning_adamw.build_param_groups` gives, wrapper attributes left out only where a real wrapper holds
    them (see :func:`~lightning_adamw.param_groups.parameter_names`)."""
    from lightning_adamw.param_groups import parameter_names

    return {key: names[0] for key, names in parameter_names(module).items()}


def name_added_group(
    group: dict[str, Any], existing: Sequence[Mapping[str, Any]], names_by_id: Mapping[int, str]
) -> dict[str, Any]:
    """Fill ``param_names`` of a group about to be added to an optimizer whose groups carry names.

    Torch requires that all groups or none carry names. A group added without them (``{"params": [tensors]}``,
    what ``BackboneFinetuning`` and most hand-written unfreezing do) gets the module's names of its tensors; a
    tensor the module does not own gets ``added<g>.param<j>`` (``g`` = index the group will have). The group stays
    one group with the caller's keys, so code that later writes ``param_groups[-1]["lr"]`` keeps working.

    Returns:
        ``group`` itself when nothing needs filling (already named, a bare tensor, or the optimizer's groups carry
        no names), else a shallow copy with ``param_names`` and plain tensors in ``params``.
    """
    if not existing or not all("param_names" in g for g in existing):
        return group
    if not isinstance(group, dict) or "param_names" in group:
        return group
    params = group.get("params")
    if isinstance(params, torch.Tensor):
        params = [params]
    elif isinstance(params, set):
        return group  # torch refuses sets with its own clear message
    else:
        params = list(params) if params is not None else []
    if params and all(isinstance(p, tuple) and len(p) == 2 for p in params):
        return group  # (name, tensor) pairs: torch records the names itself
    index = len(existing)
    names = [
        names_by_id.get(id(p), f"added{index}.param{j}")
        if isinstance(p, torch.Tensor)
        else f"added{index}.param{j}"
        for j, p in enumerate(params)
    ]
    return {**group, "params": params, "param_names": names}


def untracked_tensors(
    named_parameters: Iterable[tuple[str, torch.Tensor]], param_groups: Iterable[Mapping[str, Any]]
) -> list[tuple[str, torch.Tensor]]:
    """The ``(name, tensor)`` pairs of ``named_parameters`` that are in none of ``param_groups`` (of any number of
    optimizers): tensors no optimizer would update even when they receive gradients."""
    tracked = {id(p) for group in param_groups for p in group["params"]}
    out: list[tuple[str, torch.Tensor]] = []
    seen: set[int] = set()
    for name, param in named_parameters:
        if id(param) in tracked or id(param) in seen:
            continue
        seen.add(id(param))
        out.append((name, param))
    return out
