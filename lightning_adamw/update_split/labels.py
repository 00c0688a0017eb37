"""Names and kinds of parameter groups and tensors: the labels in the metric keys, and which split a group gets.

Metric keys are ``<prefix>/<group label>/<metric>`` and ``<prefix>_layer/<tensor label>/<metric>``. Labels are
unique within an optimizer, so two groups or two tensors never share one series.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

from torch import Tensor

__all__ = [
    "KIND_PREFIX",
    "Kind",
    "as_float",
    "group_kind",
    "group_label",
    "group_labels",
    "layer_labels",
    "param_labels",
]

#: ``"adamw"``: decoupled weight decay (or no decay); ``"adam_l2"``: Adam with L2 through the moments;
#: ``"generic"``: an optimizer without Adam state (measured from a snapshot of the weights).
Kind = Literal["adamw", "adam_l2", "generic"]

#: Metric prefix per kind of group: ``<prefix>/<group>/<metric>`` and ``<prefix>_layer/<param>/<metric>``.
KIND_PREFIX: dict[str, str] = {"adamw": "adamw", "adam_l2": "adam_l2", "generic": "optim"}


def as_float(value: Any) -> float:
    """A hyperparameter as a Python float. ``lr`` / ``betas`` may be tensors (capturable optimizers): reading one
    is the only host sync outside the final transfer, and it is rare."""
    if isinstance(value, Tensor):
        return float(value.item())
    return float(value)


def group_kind(group: Mapping[str, Any], adam_family: bool) -> Kind:
    """Classify a parameter group.

    ``"adamw"`` for decoupled weight decay, and also for Adam with ``weight_decay == 0`` (then Adam and AdamW are
    the same algorithm); ``"adam_l2"`` for Adam with coupled L2 (``weight_decay > 0``, not decoupled);
    ``"generic"`` for every optimizer that is not Adam-family.
    """
    if not adam_family:
        return "generic"
    if group.get("decoupled_weight_decay", False) or as_float(group.get("weight_decay", 0.0)) == 0.0:
        return "adamw"
    return "adam_l2"


def group_label(group: Mapping[str, Any], index: int) -> str:
    """The name of a parameter group: its ``"name"`` key, else ``group{index}``."""
    name = group.get("name")
    return str(name) if name not in (None, "") else f"group{index}"


def param_labels(group: Mapping[str, Any], index: int, label: str | None = None) -> list[str]:
    """Names of a group's parameters: torch's ``"param_names"`` when present, else ``<group>.param{j}``
    (``<group>`` is ``label`` when given, else :func:`group_label`)."""
    names = group.get("param_names")
    params = group["params"]
    if names is not None and len(names) == len(params):
        return [str(n) for n in names]
    label = group_label(group, index) if label is None else label
    return [f"{label}.param{j}" for j in range(len(params))]


def group_labels(param_groups: Sequence[Mapping[str, Any]]) -> list[str]:
    """The labels of an optimizer's groups, unique within the optimizer.

    Each group is :func:`group_label` (its ``"name"``, else ``group{i}``); a label that an earlier group already
    has gets the first free suffix ``_1``, ``_2``, ... (two ``build_param_groups`` calls give ``decay``,
    ``no_decay``, ``decay_1``, ``no_decay_1``). Metric keys ``<prefix>/<label>/<metric>`` therefore never merge
    two groups.
    """
    return _unique_labels([group_label(g, i) for i, g in enumerate(param_groups)])


def layer_labels(param_groups: Sequence[Mapping[str, Any]]) -> list[list[str]]:
    """Per-tensor labels for the per-layer metric keys ``<prefix>_layer/<label>/<metric>``, one list per group.

    A tensor's label is its name (:func:`param_labels`) when no other group of the optimizer has a tensor of that
    name. A name found in more than one group (two ``build_param_groups`` calls on a backbone and a head both
    name their first weight ``0.weight``) is qualified with the group's label from :func:`group_labels` in
    *every* group that has it: ``backbone_decay/0.weight``, ``head_decay/0.weight`` (``decay/0.weight``,
    ``decay_1/0.weight`` when the groups share their names too). A name repeated inside one group (groups
    assembled by hand) gets the suffixes of :func:`group_labels`. The labels are unique within the optimizer.
    """
    groups = group_labels(param_groups)
    names = [param_labels(g, i, label=groups[i]) for i, g in enumerate(param_groups)]
    owners: dict[str, set[int]] = {}
    for gi, group_names in enumerate(names):
        for name in group_names:
            owners.setdefault(name, set()).add(gi)
    flat = _unique_labels(
        [
            f"{groups[gi]}/{name}" if len(owners[name]) > 1 else name
            for gi, group_names in enumerate(names)
            for name in group_names
        ]
    )
    out: list[list[str]] = []
    start = 0
    for group_names in names:
        out.append(flat[start : start + len(group_names)])
        start += len(group_names)
    return out


def _unique_labels(labels: Sequence[str]) -> list[str]:
    """The first occurrence of a label keeps it; a repeat gets the first suffix ``_k`` (k = 1, 2, ...) that is
    neither another label of the list nor already given out (so ``[a, a, a_1]`` gives ``a, a_2, a_1``)."""
    taken = set(labels)
    first: set[str] = set()
    out = []
    for label in labels:
        if label not in first:
            first.add(label)
            out.append(label)
            continue
        k = 1
        while f"{label}_{k}" in taken:
            k += 1
        taken.add(f"{label}_{k}")
        out.append(f"{label}_{k}")
    return out
