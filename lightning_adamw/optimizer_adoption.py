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
  the grouping rules do not decay; its schedulers accept the added group and leave its lr to whoever added it
  (``OneCycleLR`` / ``CyclicLR`` refuse it, naming themselves);
* after a checkpoint load, starts a schedule the checkpoint had no state for at the step reached;
* is brought up to date before every training batch by a callback placed first in the trainer
  (:func:`install_batch_sync`): an lr changed by the LR finder, a load, the weight decay schedule's next value;
* warns once, naming them, about tensors of the module that get a gradient but are in no group.

What the mixin keeps about an optimizer lives on the optimizer (``optimizer.__dict__``), so the module stays
picklable and the state goes away with the optimizer.
"""

from __future__ import annotations

import copy
import functools
import math
import warnings
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import CyclicLR, LRScheduler, MultiplicativeLR, OneCycleLR, ReduceLROnPlateau

from lightning_adamw.mixin_weight_decay import continue_without_state, refresh_total_steps
from lightning_adamw.optimizer_groups import (
    check_group_hyperparameters,
    name_added_group,
    named_tensor_ids,
    untracked_tensors,
)
from lightning_adamw.optimizer_state import LrRule, remap_state_dict
from lightning_adamw.param_groups import NO_DECAY
from lightning_adamw.schedules import WarmupCosineLR
from lightning_adamw.weight_decay import WeightDecayScheduler

__all__ = [
    "Adoption",
    "adopt",
    "adopt_returned",
    "adoption_of",
    "install_batch_sync",
    "rescale_scheduler_base",
    "returned_optimizers",
    "same_value",
    "sync",
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
        # Each scheduler's position when it was built: one still there after a checkpoint load got no state from
        # the checkpoint (a schedule new in this run), see _start_new_schedulers.
        self.created_at = [getattr(s, "last_epoch", None) for s in schedulers]
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
        try:
            _cover_added_groups(optimizer)
        except ValueError:
            optimizer.param_groups.pop()
            raise
        if module is not None:
            _warn_if_added_group_mixes(module, optimizer, optimizer.param_groups[-1])

    optimizer.__dict__["add_param_group"] = add_param_group


def _keep_lr(group: dict[str, Any], base: float) -> Any:
    """A LambdaLR factor that leaves ``group``'s lr as it is (a function: LambdaLR saves no state for it)."""

    def factor(step: int) -> float:
        return float(group["lr"]) / base if base else 1.0

    return factor


def _unchanged(step: int) -> float:
    """A MultiplicativeLR factor that leaves a group's lr as it is."""
    return 1.0


def _cover_added_groups(optimizer: Optimizer) -> None:
    """Make the adopted schedulers accept groups added after they were built, leaving those groups' lr to
    whoever added them (``BackboneFinetuning`` ramps it). ``WarmupCosineLR`` does so by itself; torch's schedulers
    with per-group lists (``LambdaLR``, ``MultiplicativeLR``; ``base_lrs`` of every scheduler) would fail at their
    next step with "zip() argument 2 is shorter than argument 1". ``OneCycleLR`` / ``CyclicLR`` set every group
    from per-group peaks that an added group has none of: refused, naming them."""
    adoption = adoption_of(optimizer)
    if adoption is None:
        return
    pending = list(adoption.schedulers())
    while pending:
        scheduler = pending.pop()
        pending.extend(getattr(scheduler, "_schedulers", None) or [])  # SequentialLR, ChainedScheduler
        if isinstance(scheduler, WarmupCosineLR) or isinstance(scheduler, ReduceLROnPlateau):
            continue  # keeps added groups' lr / reduces every group (min_lrs: torch says how to fix it)
        groups = optimizer.param_groups
        base_lrs = getattr(scheduler, "base_lrs", None)
        if not isinstance(base_lrs, list) or len(base_lrs) >= len(groups):
            continue
        if isinstance(scheduler, (OneCycleLR, CyclicLR)):
            raise ValueError(
                f"{type(scheduler).__name__} cannot schedule a parameter group added after it was built "
                f"(optimizer.add_param_group, e.g. BackboneFinetuning): it sets every group from its own per-group "
                "peaks. Build the scheduler after adding the group, or use a schedule that keeps added groups' "
                "lr (lightning_adamw.WarmupCosineLR)"
            )
        lambdas = getattr(scheduler, "lr_lambdas", None)
        for group in groups[len(base_lrs) :]:
            base = float(group["lr"])
            base_lrs.append(base)
            if isinstance(lambdas, list) and len(lambdas) < len(base_lrs):
                lambdas.append(
                    _unchanged if isinstance(scheduler, MultiplicativeLR) else _keep_lr(group, base)
                )
        if hasattr(scheduler, "_last_lr"):
            scheduler._last_lr = [g["lr"] for g in groups]


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


def sync(module: Any, optimizer: Optimizer, adoption: Adoption) -> None:
    """Bring the groups up to date with what changed since they were built or loaded: the module's lr (an LR
    finder), a checkpoint load (schedulers keep their progress on the new base lrs; schedules new in this run
    start at the step reached). Cheap when nothing changed (two flags)."""
    if adoption.check_lr:
        adoption.check_lr = False
        _apply_changed_lr(module, optimizer, adoption)
    if adoption.after_load:
        adoption.after_load = False
        _reconcile_schedulers(module, optimizer, adoption)


def before_step(module: Any, optimizer: Optimizer, adoption: Adoption) -> None:
    """Step pre-hook of every adopted optimizer: :func:`sync` (already done before the batch under Lightning,
    see :func:`install_batch_sync`; here for plain training loops), then the untracked-tensor check."""
    sync(module, optimizer, adoption)
    _warn_untracked(module, optimizer)


class _BatchSync(Callback):
    """Runs :func:`sync` and refreshes the weight decay schedule before anything reads the groups of a batch.

    Lightning calls callbacks before the module and in list order, and this one is first: so
    ``LearningRateMonitor`` (which logs ``lr`` and ``weight_decay`` at batch start) and every callback see the
    values the step will use, from the very first step (the ``LearningRateFinder`` callback writes the bare
    suggestion into every group just before training starts).
    """

    def _sync_all(self, trainer: Any, pl_module: Any) -> None:
        for optimizer in trainer.optimizers:
            adoption = adoption_of(optimizer)
            if adoption is not None:
                module = adoption.module_ref()
                if module is not None:
                    sync(module, optimizer, adoption)
            scheduler = WeightDecayScheduler.of(optimizer)
            if scheduler is not None:
                scheduler.refresh()

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._sync_all(trainer, pl_module)

    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        self._sync_all(trainer, pl_module)

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._sync_all(trainer, pl_module)


def install_batch_sync(module: Any) -> None:
    """Put the :class:`_BatchSync` callback first in the module's trainer (once per trainer)."""
    trainer = getattr(module, "_trainer", None)
    callbacks = getattr(trainer, "callbacks", None)
    if not isinstance(callbacks, list) or any(isinstance(c, _BatchSync) for c in callbacks):
        return
    callbacks.insert(0, _BatchSync())


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
    """After a checkpoint load: schedulers keep their progress and follow the configured base lrs; schedules
    the checkpoint had no state for start at the step reached."""
    trainer = getattr(module, "_trainer", None)
    _start_new_schedulers(trainer, adoption)
    refresh_total_steps(module, optimizer)
    continue_without_state(optimizer, getattr(trainer, "global_step", None) if trainer is not None else None)
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


def _scheduler_position(trainer: Any, scheduler: Any) -> int | None:
    """Where a scheduler stepped every ``frequency`` steps or epochs would be now, from the trainer's restored
    progress (``None`` when the trainer does not step it: not in its scheduler configs)."""
    for config in getattr(trainer, "lr_scheduler_configs", None) or []:
        if config.scheduler is scheduler:
            done = trainer.global_step if config.interval == "step" else trainer.current_epoch
            return int(done) // max(int(config.frequency or 1), 1)
    return None


def _start_new_schedulers(trainer: Any, adoption: Adoption) -> None:
    """A scheduler the checkpoint had no state for (new in this run: ``lr_schedule`` changed from "constant" to
    "cosine", an ``--lr_scheduler`` added) would start at its own step 0 in the middle of training: it starts at
    the step reached instead (``WarmupCosineLR``: its closed form there; others: stepped that many times), with
    one line."""
    if trainer is None:
        return
    for scheduler, created in zip(adoption.schedulers(), adoption.created_at, strict=False):
        if created is None or isinstance(scheduler, ReduceLROnPlateau) or scheduler.last_epoch != created:
            continue  # restored from the checkpoint (its position moved), or no position to move
        position = _scheduler_position(trainer, scheduler)
        if position is None or position <= created:
            continue
        name = type(scheduler).__name__
        before = [g["lr"] for g in scheduler.optimizer.param_groups]
        if isinstance(scheduler, WarmupCosineLR):
            scheduler.apply_step(position)
        else:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
                    for _ in range(position - created):
                        scheduler.step()
            except ValueError as err:  # OneCycleLR past its total_steps, ...
                raise ValueError(
                    f"{name} is new in this resumed run (the checkpoint holds no state for it) and cannot start at "
                    f"the step reached, {position}: {err}"
                ) from err
        after = [g["lr"] for g in scheduler.optimizer.param_groups]
        rank_zero_info(
            f"lightning-adamw: {name} is new in this resumed run (the checkpoint holds no state for it): it "
            f"starts at the step reached, {position}, not at its own step 0 (lr {_fmt_lr(before[0])} -> "
            f"{_fmt_lr(after[0])} in the first group)"
        )


def _fmt_lr(value: Any) -> str:
    return f"{float(value):.6g}"


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
