"""What the mixin does to every optimizer it hands to Lightning ("adoption"): checks, resume rules, later groups.

The Lightning shell around the pure-torch helpers of :mod:`lightning_adamw.optimizer_state` (state remapped by
parameter name) and :mod:`lightning_adamw.optimizer_groups` (hyperparameter checks, names of added groups, tensors in
no group). :class:`~lightning_adamw.DecoupledWeightDecayMixin` calls :func:`adopt` on the optimizers of its own
``configure_optimizers`` and :func:`adopt_returned` on what a subclass's own ``configure_optimizers`` returns. An
adopted optimizer:

* refuses a group with a non-finite or negative ``lr`` / ``weight_decay`` / ``eps`` or ``betas`` outside ``[0, 1)``;
* on ``load_state_dict`` moves each tensor's state by name into its current group and keeps the new run's
  hyperparameters (one info line says what moved); its schedulers keep their progress and follow the new base lrs;
* fills ``param_names`` of groups added later with ``add_param_group`` and warns when such a group decays tensors
  the grouping rules do not decay;
* warns once, naming them, about tensors of the module that get a gradient but are in no group.

What the mixin keeps about an optimizer lives on the optimizer (``optimizer.__dict__``), so the module stays
picklable and the state goes away with the optimizer.
"""

from __future__ import annotations

import copy
import functools
import math
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from lightning_adamw.optimizer_groups import (
    check_group_hyperparameters,
    name_added_group,
    named_tensor_ids,
    untracked_tensors,
)
from lightning_adamw.optimizer_state import LrRule, remap_state_dict
from lightning_adamw.param_groups import NO_DECAY
from lightning_adamw.schedules import WarmupCosineLR

__all__ = [
    "Adoption",
    "adopt",
    "adopt_returned",
    "adoption_of",
    "rescale_scheduler_base",
    "returned_optimizers",
    "same_value",
]

_SHOWN_NAMES = 5  # tensor names shown in a warning before "... (+n more)"


def _names_line(names: list[str]) -> str:
    shown = ", ".join(names[:_SHOWN_NAMES])
    return shown + (f", ... (+{len(names) - _SHOWN_NAMES} more)" if len(names) > _SHOWN_NAMES else "")


def same_value(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # a tensor of several elements: compare as values
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and torch.equal(a, b)


# ----------------------------------------------------------------------------------------------- adoption


class Adoption:
    """What the mixin keeps about one optimizer it handed out (stored on the optimizer, not on the module, so the
    module stays picklable)."""

    def __init__(
        self, module: nn.Module, optimizer: Optimizer, schedulers: list[Any], lr_setting: float | None
    ) -> None:
        self.module_ref = weakref.ref(module)
        # The configuration: every group's hyperparameters right after the optimizer and its schedulers were built
        # (a scheduler sets `initial_lr` and the first lr). Resume applies these, not the checkpoint's.
        self.configured: list[dict[str, Any]] = [
            {k: copy.deepcopy(v) for k, v in g.items() if k not in ("params", "param_names")}
            for g in optimizer.param_groups
        ]
        self.scheduler_refs = [weakref.ref(s) for s in schedulers]
        self.lr_rule: LrRule
        if not schedulers:
            self.lr_rule = "configured"
        elif all("initial_lr" in g for g in optimizer.param_groups):
            self.lr_rule = "schedule"
        else:  # ReduceLROnPlateau and other schedulers whose progress lives only in the groups' lr
            self.lr_rule = "checkpoint"
        # The module's lr setting the groups were built from (default AdamW only; a factory has its own lr).
        self.lr_setting = lr_setting
        self.check_lr = True  # compare the module's lr setting at the next step (an LR finder may change it)
        self.after_load = False  # a checkpoint was loaded: reconcile schedulers at the next step
        self.loaded_lrs: list[Any] | None = None  # the groups' lr right after the last load
        self.warned_mixed = False

    def schedulers(self) -> list[Any]:
        return [s for s in (r() for r in self.scheduler_refs) if s is not None]

    def configured_for(self, index: int, group: dict[str, Any]) -> dict[str, Any] | None:
        """The configured hyperparameters of a current group, or ``None`` for a group added later."""
        if index < len(self.configured) and self.configured[index].get("name") == group.get("name"):
            return self.configured[index]
        return None


def adoption_of(optimizer: Optimizer) -> Adoption | None:
    return optimizer.__dict__.get("_lightning_adamw")


def _load_pre_hook(optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any] | None:
    adoption = adoption_of(optimizer)
    if adoption is None:
        return None
    configured = [adoption.configured_for(i, g) for i, g in enumerate(optimizer.param_groups)]
    remapped, report = remap_state_dict(state_dict, optimizer.param_groups, configured, adoption.lr_rule)
    if adoption.lr_rule == "schedule":
        # The scheduler sets the lr from its restored progress and the new base; report the base, not the lr.
        report.changed = [c for c in report.changed if c[1] != "lr"]
    optimizer.__dict__["_lightning_adamw_report"] = report
    return remapped


def _load_post_hook(optimizer: Optimizer) -> None:
    adoption = adoption_of(optimizer)
    report = optimizer.__dict__.pop("_lightning_adamw_report", None)
    if adoption is None:
        return
    adoption.after_load = True
    adoption.check_lr = True
    adoption.loaded_lrs = [copy.deepcopy(g["lr"]) for g in optimizer.param_groups]
    check_group_hyperparameters(optimizer.param_groups, type(optimizer).__name__)
    message = report.message() if report is not None else None
    if message:
        rank_zero_info(message)


def _step_pre_hook(optimizer: Optimizer, args: Any, kwargs: Any) -> None:
    adoption = adoption_of(optimizer)
    module = adoption.module_ref() if adoption is not None else None
    if adoption is None or module is None:
        return
    before_step(module, optimizer, adoption)


def returned_optimizers(result: Any) -> Iterator[Any]:
    """Optimizers and schedulers anywhere in a ``configure_optimizers`` return value (every Lightning format)."""
    if isinstance(result, (Optimizer, LRScheduler, ReduceLROnPlateau)):
        yield result
    elif isinstance(result, dict):
        for value in result.values():
            yield from returned_optimizers(value)
    elif isinstance(result, (list, tuple)):
        for value in result:
            yield from returned_optimizers(value)


class _Untracked:
    """Per module: tensors in no optimizer group, recomputed only when the groups change."""

    def __init__(self) -> None:
        self.signature: tuple[Any, ...] | None = None
        self.tensors: list[tuple[str, torch.Tensor]] = []
        self.warned: set[str] = set()


_UNTRACKED: weakref.WeakKeyDictionary[nn.Module, _Untracked] = weakref.WeakKeyDictionary()


def adopt_returned(module: Any, result: Any) -> None:
    """Adopt the optimizers (with their schedulers) of a ``configure_optimizers`` return value."""
    found = list(returned_optimizers(result))
    schedulers = [s for s in found if not isinstance(s, Optimizer)]
    for optimizer in (o for o in found if isinstance(o, Optimizer)):
        adopt(module, optimizer, [s for s in schedulers if getattr(s, "optimizer", None) is optimizer], None)


def adopt(module: Any, optimizer: Optimizer, schedulers: list[Any], lr_setting: float | None) -> None:
    """Check ``optimizer``'s groups and install the resume, add_param_group and step hooks (once)."""
    if adoption_of(optimizer) is not None:
        return
    check_group_hyperparameters(optimizer.param_groups, type(optimizer).__name__)
    optimizer.__dict__["_lightning_adamw"] = Adoption(module, optimizer, schedulers, lr_setting)  # type: ignore[arg-type]
    optimizer.register_load_state_dict_pre_hook(_load_pre_hook)
    optimizer.register_load_state_dict_post_hook(_load_post_hook)
    optimizer.register_step_pre_hook(_step_pre_hook)
    _wrap_add_param_group(module, optimizer)


def _wrap_add_param_group(module: Any, optimizer: Optimizer) -> None:
    # An instance attribute: torch's Optimizer.__getstate__ does not pickle it, and only this optimizer changes.
    original = optimizer.add_param_group
    module_ref = weakref.ref(module)

    @functools.wraps(original)
    def add_param_group(param_group: dict[str, Any]) -> None:
        module = module_ref()
        if module is not None and isinstance(param_group, dict):
            param_group = name_added_group(param_group, optimizer.param_groups, named_tensor_ids(module))
        original(param_group)
        try:
            index = len(optimizer.param_groups) - 1
            check_group_hyperparameters(optimizer.param_groups[-1:], type(optimizer).__name__, index)
        except ValueError:
            optimizer.param_groups.pop()  # leave the optimizer as it was
            raise
        if module is not None:
            _warn_if_added_group_mixes(module, optimizer, optimizer.param_groups[-1])

    optimizer.__dict__["add_param_group"] = add_param_group


def _warn_if_added_group_mixes(module: Any, optimizer: Optimizer, group: dict[str, Any]) -> None:
    """Warn once when a group added later decays tensors that the grouping rules would not decay."""
    adoption = adoption_of(optimizer)
    if adoption is None or adoption.warned_mixed or not float(group.get("weight_decay", 0.0) or 0.0) > 0:
        return
    names = set(group.get("param_names") or ())
    try:
        decisions = module._classify()
    except (ValueError, TypeError):  # the grouping options no longer apply; configure_optimizers said why
        return
    undecayed = [f"{d.name} ({d.reason})" for d in decisions if d.name in names and d.group == NO_DECAY]
    if not undecayed:
        return
    adoption.warned_mixed = True
    rank_zero_warn(
        f"lightning-adamw: optimizer.add_param_group added a group with weight_decay={group['weight_decay']:g} "
        f"that holds {len(undecayed)} tensor(s) the grouping rules do not decay (norms, biases, 1-D gains), "
        f"so they are decayed: {_names_line(undecayed)}. One added group has one weight decay. To keep them "
        "undecayed, add them as a separate group with weight_decay=0.0, or (for tensors you unfreeze by hand "
        "with requires_grad_(True)) set `include_frozen=True` on the module so they sit in their decay / "
        "no_decay groups from the start and need no add_param_group.",
        category=UserWarning,
    )


# ------------------------------------------------------------------------------------------- every step


def before_step(module: Any, optimizer: Optimizer, adoption: Adoption) -> None:
    """Step pre-hook of every adopted optimizer: cheap checks that need the state right before a step."""
    if adoption.check_lr:
        adoption.check_lr = False
        _apply_changed_lr(module, optimizer, adoption)
    if adoption.after_load:
        adoption.after_load = False
        _reconcile_schedulers(module, optimizer, adoption)
    _warn_untracked(module, optimizer)


def _apply_changed_lr(module: Any, optimizer: Optimizer, adoption: Adoption) -> None:
    """The module's lr changed after the optimizer was built (the LR finder writes its suggestion after
    restoring its checkpoint): the groups the mixin built and their schedule take the new value."""
    if adoption.lr_setting is None:
        return
    try:
        new = float(module.adamw_setting("lr"))
    except (TypeError, ValueError):
        return
    old = adoption.lr_setting
    if new == old or not math.isfinite(new) or new <= 0 or old <= 0:
        return
    ratio = new / old
    adoption.lr_setting = new
    for i, group in enumerate(optimizer.param_groups):
        configured = adoption.configured_for(i, group)
        if configured is None:
            continue
        for entry in (group, configured):
            if "initial_lr" in entry:
                entry["initial_lr"] = entry["initial_lr"] * ratio
        loaded = adoption.loaded_lrs[i] if adoption.loaded_lrs and i < len(adoption.loaded_lrs) else None
        if same_value(group["lr"], new) and loaded is not None:
            # The LR finder restored its checkpoint, then wrote the bare value into every group: the lr the
            # schedule had there (e.g. a warm-up factor), on the new base.
            group["lr"] = loaded * ratio
        elif not same_value(group["lr"], new):
            group["lr"] = group["lr"] * ratio
        configured["lr"] = configured["lr"] * ratio
    adoption.loaded_lrs = None
    for scheduler in adoption.schedulers():
        rescale_scheduler_base(scheduler, optimizer)
    rank_zero_info(
        f"lightning-adamw: the module's lr changed from {old:.6g} to {new:.6g} after the optimizer was built "
        "(e.g. by the LR finder): the optimizer groups and their schedule now use it"
    )


def _reconcile_schedulers(module: Any, optimizer: Optimizer, adoption: Adoption) -> None:
    """After a checkpoint load: schedulers keep their progress and follow the configured base lrs."""
    for scheduler in adoption.schedulers():
        if isinstance(scheduler, WarmupCosineLR):
            if scheduler.__dict__.get("_lightning_adamw_auto_total"):
                total = module._estimated_total_steps()  # e.g. BatchSizeFinder changed the batch size
                if total is not None and total != scheduler.total_steps:
                    old_total = scheduler.total_steps
                    scheduler.set_total_steps(total)
                    rank_zero_info(
                        f"WarmupCosineLR: total_steps {old_total} -> {total} (the trainer's number of steps "
                        "changed after configure_optimizers, e.g. a batch size finder)"
                    )
            if scheduler.resume_note:
                rank_zero_info(scheduler.resume_note)
                scheduler.resume_note = None
        else:
            rescale_scheduler_base(scheduler, optimizer)


def _warn_untracked(module: Any, optimizer: Optimizer) -> None:
    """Warn once, naming them, about tensors of this module that have a gradient but are in no optimizer."""
    trainer = getattr(module, "_trainer", None)
    optimizers = list(getattr(trainer, "optimizers", None) or []) if trainer is not None else []
    if optimizer not in optimizers:
        optimizers.append(optimizer)
    cache = _UNTRACKED.get(module)  # type: ignore[call-overload]
    if cache is None:
        cache = _UNTRACKED[module] = _Untracked()  # type: ignore[index]
    signature = tuple(
        (id(o), id(o.param_groups), *(len(g["params"]) for g in o.param_groups)) for o in optimizers
    )
    if signature != cache.signature:
        cache.signature = signature
        names = named_tensor_ids(module)  # type: ignore[arg-type]
        named = ((names[id(p)], p) for p in module.parameters())  # type: ignore[attr-defined]
        groups = [g for o in optimizers for g in o.param_groups]
        cache.tensors = [(n, p) for n, p in untracked_tensors(named, groups) if n not in cache.warned]
    if not cache.tensors:
        return
    hot = [n for n, p in cache.tensors if p.grad is not None]
    if not hot:
        return
    cache.warned.update(hot)
    cache.tensors = [(n, p) for n, p in cache.tensors if n not in cache.warned]
    rank_zero_warn(
        f"lightning-adamw: {len(hot)} tensor(s) of {type(module).__name__} get gradients but are in no optimizer "
        f"group, so the optimizer never updates them: {_names_line(hot)}. They were frozen (requires_grad=False) "
        "when configure_optimizers built the groups. Set `include_frozen=True` on the module (hyperparameter or "
        "attribute) to put frozen tensors in their groups from the start, so that unfreezing trains them; or add "
        "them with optimizer.add_param_group(...).",
        category=UserWarning,
    )


def rescale_scheduler_base(scheduler: Any, optimizer: Optimizer) -> None:
    """Set a scheduler's ``base_lrs`` (and those of the schedulers it chains) to the groups' ``initial_lr``."""
    children = getattr(scheduler, "_schedulers", None)
    if isinstance(children, (list, tuple)):
        for child in children:
            rescale_scheduler_base(child, optimizer)
    base_lrs = getattr(scheduler, "base_lrs", None)
    if not isinstance(base_lrs, list):
        return
    groups = optimizer.param_groups
    new = [g["initial_lr"] if "initial_lr" in g else b for g, b in zip(groups, base_lrs, strict=False)]
    scheduler.base_lrs = new + base_lrs[len(new) :]
    if isinstance(scheduler, WarmupCosineLR):
        # The closed form: lr = base * factor(step), so the groups follow the new base at once.
        for group, base in zip(groups, scheduler.base_lrs, strict=False):
            group["lr"] = base * scheduler._factor(scheduler.last_epoch)
    if hasattr(scheduler, "_last_lr"):
        scheduler._last_lr = [g["lr"] for g in groups]
