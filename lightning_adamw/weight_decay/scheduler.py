r"""``WeightDecayScheduler``: sets each group's ``weight_decay`` for every optimizer step. Pure torch.

The formulas are in :mod:`lightning_adamw.weight_decay.schedules`; this module applies them to an optimizer
through its step hooks, so that the value a step uses is exactly the one computed for it, whatever order a
training loop (or Lightning) steps the optimizer and the LR scheduler in.

Timing contract (``k`` is the 0-based index of the step about to run, :attr:`WeightDecayScheduler.step_count`):

1. **Creation** writes, for every followed group, the value for step ``k`` (0, or the loaded counter) from the
   group's current ``lr``.
2. **Step pre-hook** (inside ``optimizer.step()``, before the update; after the LR scheduler set this step's lr)
   recomputes it from the group's ``lr`` at that moment and ``k``: the step uses exactly that value.
3. **Step post-hook** increments ``k`` (not for a step a fused optimizer skipped on a ``GradScaler`` overflow)
   and leaves ``weight_decay`` alone, so whoever reads the groups right after the step (``WeightDecayMonitor``,
   :func:`lightning_adamw.update_split.update_split`) sees the value that step applied.
4. :meth:`WeightDecayScheduler.refresh`, called after the LR scheduler stepped, recomputes the value for the
   next step from the new lr, so the groups show what the next step will use (Lightning's
   ``LearningRateMonitor(log_weight_decay=True)`` logs at the start of the batch). Between the post-hook and
   ``refresh()`` the groups hold the value of the step just taken; without ``refresh()`` the pre-hook still
   applies the right value.
"""

from __future__ import annotations

import fnmatch
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from torch.optim import Optimizer

from lightning_adamw.optim_checks import _group_decoupled, is_adam_family
from lightning_adamw.weight_decay.schedules import (
    WeightDecaySchedule,
    describe_schedule,
    parse_weight_decay_schedule,
    scheduled_weight_decay,
)

__all__ = ["BASE_KEY", "SCHEDULE_KEY", "GroupSelector", "WeightDecayScheduler"]

#: Group key holding the group's base decay λ (the configured value the schedule scales).
BASE_KEY = "base_weight_decay"
#: Group key holding the name of the schedule the group follows (absent: the group is not scheduled).
SCHEDULE_KEY = "weight_decay_schedule"

GroupSelector = str | Sequence[str] | Callable[[dict[str, Any]], bool] | None

# An lr above lr_max by more than this (relative) is reported. Far above the float64 rounding of the few
# operations a scheduler needs to reach its peak (about 1e-15), far below any real schedule overshoot.
_LR_SLACK = 1e-12
_GUARD = "_lightning_adamw_wd_scheduler"


def _group_label(group: dict[str, Any], index: int) -> str:
    return str(group.get("name") or f"group{index}")


def _selector(groups: GroupSelector, optimizer: Optimizer) -> Callable[[dict[str, Any], int], bool]:
    """``groups=`` as a predicate on ``(group, index)``; names and glob patterns must match a group now."""
    if groups is None:
        return lambda group, index: True
    if callable(groups):
        return lambda group, index: bool(groups(group))  # type: ignore[operator]
    patterns = [groups] if isinstance(groups, str) else list(groups)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(
            f"`groups` must be group names (str, glob patterns allowed) or a callable on the group dict, got "
            f"{groups!r}"
        )
    labels = [_group_label(g, i) for i, g in enumerate(optimizer.param_groups)]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(label, p) for label in labels)]
    if unmatched:
        raise ValueError(
            f"`groups` entries {unmatched} match no parameter group of the optimizer (groups: {labels})"
        )
    return lambda group, index: any(fnmatch.fnmatchcase(_group_label(group, index), p) for p in patterns)


class WeightDecayScheduler:
    r"""Sets each group's ``weight_decay`` for every optimizer step, following a schedule.

    Only groups with a non-zero base decay that ``groups`` selects *follow* the schedule; the others (the
    ``no_decay`` group, groups left out by ``groups``) are never written, so a zero stays exactly zero. A group
    follows from the moment the scheduler first sees it: at creation, or at the first step / :meth:`refresh`
    after ``optimizer.add_param_group`` (``BackboneFinetuning``), with its own ``weight_decay`` as base.

    Schedules (see :mod:`lightning_adamw.weight_decay.schedules` for the formulas and sources):
    ``"constant"`` (λ), ``"independent"`` (per-step decay λ·lr_t/lr_max: the AdamW paper's / Composer's fully
    decoupled decay; **λ is the per-step decay at the peak lr**, e.g. 1e-4, and the torch-level
    ``weight_decay`` becomes λ/lr_max), ``"adamc"`` (λ·lr_t/lr_max, Defazio 2025), ``"cosine"`` and
    ``"linear"`` (λ·f(step), held during ``warmup_steps``, down to ``final_ratio``·λ at ``total_steps``).

    Each followed group carries ``base_weight_decay`` (λ, the truth the schedule scales: set it to change λ
    from the next step on) and ``weight_decay_schedule`` (the schedule's name); ``weight_decay`` holds the
    torch-level value of the current step. torch saves these keys in the optimizer's state dict.

    ``lr_max`` (``independent`` / ``adamc``): the group's peak lr over the planned schedule. Resolved per group,
    at every step: the ``lr_max`` option (one number, or ``{group name: lr}``); else ``group["max_lr"]``
    (``OneCycleLR``'s peak); else ``group["initial_lr"]`` (the base lr every torch LR scheduler records, which
    ``WarmupCosineLR`` and ``CosineAnnealingLR`` never exceed); else, for a group present at creation, its lr at
    creation, stored as its ``initial_lr`` (as torch's LR schedulers and Composer do, so an LR finder that
    rescales ``initial_lr`` rescales it too); for a group added later, the largest ``lr_max`` of the followed
    groups present at creation (``BackboneFinetuning`` adds the backbone at a fraction of the lr and ramps it
    towards the others'). A step whose lr is above its ``lr_max`` warns once per group (``CyclicLR`` or a
    custom schedule peaking above ``initial_lr``: pass ``lr_max``).

    AdamC targets *normalized* layers (their output is followed by a normalization, so the function does not
    depend on their scale); for LLMs the paper treats every linear layer as normalized except the output layer.
    The scheduler cannot see which layers are normalized: by default every group with non-zero decay follows,
    the output layer's too. To follow the paper, give the head its own group (``build_param_groups(head, wd,
    group_prefix="head")``, or a ``group_overrides`` entry with a ``name``) and leave it out:
    ``groups=lambda g: not g["name"].startswith("head")`` (or list the groups that follow); a group left out
    keeps ordinary AdamW decay (the paper's :math:`c_t = \gamma_t`).

    Args:
        optimizer: the optimizer; its groups' ``weight_decay`` at creation are the base decays (or their
            ``base_weight_decay`` when present: an optimizer restored from a scheduled checkpoint).
        schedule: a name from :data:`~lightning_adamw.weight_decay.SCHEDULES`, or a mapping
            ``{"name": ..., <options>, "groups": ...}`` (YAML), or a
            :class:`~lightning_adamw.weight_decay.WeightDecaySchedule`.
        groups: which groups follow: ``None`` (every group with non-zero decay), group names or glob patterns
            (each must match a group now), or a callable on the group dict.
        warmup_steps, total_steps, final_ratio: ``cosine`` / ``linear`` only (``total_steps`` may be set later,
            :meth:`set_total_steps`).
        lr_max: ``independent`` / ``adamc`` only.

    Raises:
        ValueError: unknown schedule (listing the names); an option negative, non-finite, out of range, given
            twice or to a schedule that does not use it (naming it); a ``groups`` entry matching no group; a
            followed group whose ``weight_decay`` is negative or non-finite, or (``independent``) at least 1 (a
            per-step decay that zeroes the weights at the peak: probably torch's units), or whose ``lr_max``
            is 0 (naming the group); ``independent`` / ``adamc`` on Adam with coupled L2
            (``decoupled_weight_decay=False``), where no decoupled decay exists to correct.
        RuntimeError: the optimizer already has a scheduler (call :meth:`remove` on it first).

    Example:
        >>> import torch
        >>> from lightning_adamw import WarmupCosineLR, build_param_groups
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        >>> opt = torch.optim.AdamW(build_param_groups(model, 0.1), lr=1e-3)
        >>> lr_sched = WarmupCosineLR(opt, warmup_steps=0, total_steps=4)
        >>> wd_sched = WeightDecayScheduler(opt, "adamc")
        >>> applied = []
        >>> for _ in range(4):
        ...     opt.step(); applied.append(round(opt.param_groups[0]["weight_decay"], 4))
        ...     lr_sched.step(); _ = wd_sched.refresh()
        >>> applied  # 0.1 * lr_t / lr_max, the no-decay group stays 0
        [0.1, 0.0854, 0.05, 0.0146]
        >>> opt.param_groups[1]["weight_decay"]
        0.0
    """

    def __init__(
        self,
        optimizer: Optimizer,
        schedule: str | Mapping[str, Any] | WeightDecaySchedule = "constant",
        *,
        groups: GroupSelector = None,
        warmup_steps: int | None = None,
        total_steps: int | None = None,
        final_ratio: float | None = None,
        lr_max: float | Mapping[str, float] | None = None,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"`optimizer` must be a torch Optimizer, got {type(optimizer).__name__}")
        existing = optimizer.__dict__.get(_GUARD)
        if existing is not None:
            raise RuntimeError(
                "this optimizer already has a WeightDecayScheduler: two would overwrite each other's "
                "weight_decay; call .remove() on the first one before creating another"
            )
        self.schedule, groups = parse_weight_decay_schedule(
            schedule,
            groups=groups,
            warmup_steps=warmup_steps,
            total_steps=total_steps,
            final_ratio=final_ratio,
            lr_max=lr_max,
        )
        self.optimizer = optimizer
        self._select = _selector(groups, optimizer)
        self._check_lr_max_names()
        #: One line about what a resume changed (see :meth:`load_state_dict`), or ``None``.
        self.resume_note: str | None = None
        #: The ``weight_decay`` each group used in the latest step (``None``: not followed / no step yet).
        self.last_weight_decays: list[float | None] = []
        self._steps = 0
        self._calls_pending = 0  # steps a fused optimizer may have skipped, resolved lazily (no host sync)
        self._skips_pending: torch.Tensor | None = None
        self._followed: list[bool] = []  # per group index, decided when the group is first seen
        self._bases: list[float] = []  # per group index: its weight_decay when first seen (the configuration)
        self._warned_above: set[int] = set()
        self._initial_groups = len(optimizer.param_groups)
        decisions = [self._decide(i, g) for i, g in enumerate(optimizer.param_groups)]  # all checks first
        for index, group in enumerate(optimizer.param_groups):
            self._track(index, group, decisions[index])
        self._handles = [
            optimizer.register_step_pre_hook(self._step_pre_hook),
            optimizer.register_step_post_hook(self._step_post_hook),
            optimizer.register_load_state_dict_post_hook(self._optimizer_load_post_hook),
        ]
        optimizer.__dict__[_GUARD] = self
        self.refresh()

    @staticmethod
    def of(optimizer: Optimizer) -> WeightDecayScheduler | None:
        """The scheduler attached to ``optimizer`` (kept on the optimizer, so a module that creates one stays
        picklable), or ``None``."""
        found = optimizer.__dict__.get(_GUARD)
        return found if isinstance(found, WeightDecayScheduler) else None

    # ------------------------------------------------------------------------------------------ the counter

    @property
    def step_count(self) -> int:
        """Optimizer steps applied since the schedule started (the 0-based index of the next step). Assign it
        to start a schedule part-way (e.g. a resumed run whose checkpoint has no scheduler state)."""
        if self._calls_pending:
            skipped = int(self._skips_pending.item()) if self._skips_pending is not None else 0
            self._steps += self._calls_pending - skipped
            self._calls_pending, self._skips_pending = 0, None
        return self._steps

    @step_count.setter
    def step_count(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"`step_count` must be an int >= 0, got {value!r}")
        self._steps, self._calls_pending, self._skips_pending = value, 0, None

    # ----------------------------------------------------------------------------------------- the groups

    def _check_lr_max_names(self) -> None:
        lr_max = self.schedule.lr_max
        if isinstance(lr_max, Mapping):
            labels = [_group_label(g, i) for i, g in enumerate(self.optimizer.param_groups)]
            unknown = [k for k in lr_max if k not in labels]
            if unknown:
                raise ValueError(
                    f"`lr_max` names groups {unknown} the optimizer does not have (groups: {labels})"
                )

    def _decide(self, index: int, group: dict[str, Any]) -> tuple[bool, float]:
        """Whether a group follows the schedule, and its base decay; every check, no write."""
        label = _group_label(group, index)
        base = self._check_base(group.get(BASE_KEY, group.get("weight_decay", 0.0)), label)
        follows = base > 0.0 and self._select(group, index)
        if not follows or not self.schedule.uses_lr:
            return follows, base
        name = self.schedule.name
        if is_adam_family(self.optimizer) and not _group_decoupled(self.optimizer, group):
            raise ValueError(
                f"the {name!r} weight decay schedule corrects decoupled weight decay, but group {label!r} of "
                f"{type(self.optimizer).__name__} applies weight_decay as coupled L2 through Adam's moments: "
                "use torch.optim.AdamW (or Adam(decoupled_weight_decay=True))"
            )
        if name == "independent" and base >= 1.0:
            raise ValueError(
                f"group {label!r} has weight_decay={base:g} with the 'independent' schedule, whose λ is the "
                "per-step decay at the peak lr (Loshchilov & Hutter's / Composer's units, typically "
                f"1e-5 to 1e-3): {base:g} multiplies the weights by {1 - base:g} at the peak. Give λ in "
                "per-step units (torch's weight_decay times the peak lr)"
            )
        self._lr_max(index, group)  # validated now, not at the first step
        return follows, base

    def _track(self, index: int, group: dict[str, Any], decision: tuple[bool, float] | None = None) -> None:
        """Record, once, whether a group follows the schedule and its base decay, and mark the group."""
        follows, base = decision if decision is not None else self._decide(index, group)
        self._followed.append(follows)
        self._bases.append(base)
        self.last_weight_decays.append(None)
        if not follows:
            if BASE_KEY in group or SCHEDULE_KEY in group:
                # Restored from a scheduled checkpoint but not scheduled here: back to its base, not the
                # scheduled value saved with it.
                group["weight_decay"] = base
                group.pop(BASE_KEY, None)
                group.pop(SCHEDULE_KEY, None)
            return
        if self.schedule.uses_lr and index < self._initial_groups and not self._has_lr_max(index, group):
            # No LR scheduler recorded the base lr: record it as torch's schedulers do (setdefault), so an LR
            # scheduler created later and an LR finder that rescales initial_lr agree with it.
            lr = group["lr"]
            group["initial_lr"] = lr.clone() if isinstance(lr, torch.Tensor) else float(lr)
        group[BASE_KEY] = base
        group[SCHEDULE_KEY] = self.schedule.name

    @staticmethod
    def _check_base(value: Any, label: str) -> float:
        try:
            base = float(value)
        except (TypeError, ValueError):
            raise TypeError(f"group {label!r} has weight_decay={value!r}: it must be a number") from None
        if not math.isfinite(base) or base < 0:
            raise ValueError(f"group {label!r} has weight_decay={value!r}: it must be finite and >= 0")
        return base

    def _explicit_lr_max(self, label: str) -> float | None:
        lr_max = self.schedule.lr_max
        if isinstance(lr_max, Mapping):
            return lr_max.get(label)
        return lr_max

    def _lr_max(self, index: int, group: dict[str, Any]) -> float:
        """The group's peak lr (see the class docstring for the order)."""
        label = _group_label(group, index)
        explicit = self._explicit_lr_max(label)
        if explicit is not None:
            return float(explicit)
        for key in ("max_lr", "initial_lr"):
            if key in group:
                value = float(group[key])
                if not (math.isfinite(value) and value > 0):
                    raise ValueError(
                        f"group {label!r} has {key}={value!r}: the {self.schedule.name!r} weight decay schedule "
                        "divides by the group's peak lr; give a positive `lr_max`"
                    )
                return value
        if index >= self._initial_groups:
            # Added later (BackboneFinetuning) without a recorded base lr: its lr is usually a ramp towards the
            # others' (a fraction of it at first), so its peak is the optimizer's planned peak.
            peaks = [
                self._lr_max(i, g)
                for i, g in enumerate(self.optimizer.param_groups[: self._initial_groups])
                if i < len(self._followed) and self._followed[i]
            ]
            if peaks:
                return max(peaks)
        value = float(group["lr"])  # at creation: _track records this lr as the group's initial_lr
        if not (math.isfinite(value) and value > 0):
            raise ValueError(
                f"group {label!r} has lr={value!r} and no initial_lr: the {self.schedule.name!r} weight decay "
                "schedule divides by the group's peak lr; give a positive `lr_max`"
            )
        return value

    def _has_lr_max(self, index: int, group: dict[str, Any]) -> bool:
        explicit = self._explicit_lr_max(_group_label(group, index))
        return explicit is not None or any(k in group for k in ("max_lr", "initial_lr"))

    def _value(self, index: int, group: dict[str, Any], step: int) -> float:
        label = _group_label(group, index)
        base = self._check_base(group.get(BASE_KEY, self._bases[index]), label)
        lr = float(group["lr"])
        lr_max = None
        if self.schedule.uses_lr:
            lr_max = self._lr_max(index, group)
            if lr > lr_max * (1.0 + _LR_SLACK) and index not in self._warned_above:
                self._warned_above.add(index)
                warnings.warn(
                    f"WeightDecayScheduler: group {label!r} has lr {lr:.6g}, above its lr_max {lr_max:.6g}: "
                    f"the {self.schedule.name!r} schedule's lr_t/lr_max is above 1, so this group decays more "
                    "than at the peak. If the LR schedule peaks above the group's initial_lr (CyclicLR, a custom "
                    "schedule), pass lr_max=<peak lr>",
                    UserWarning,
                    stacklevel=3,
                )
        return scheduled_weight_decay(self.schedule, base, lr=lr, lr_max=lr_max, step=step)

    def _apply(self, *, record: bool) -> list[float]:
        # Only cosine / linear read the counter: resolving it may sync with the device (fused steps a GradScaler
        # may have skipped), which the other schedules, refreshed before every batch by the mixin, never need.
        step = self.step_count if self.schedule.uses_step else 0
        groups = self.optimizer.param_groups
        for index in range(len(self._followed), len(groups)):  # added with add_param_group
            self._track(index, groups[index])
        for index, group in enumerate(groups):
            if self._followed[index]:
                group["weight_decay"] = self._value(index, group, step)
                if record:
                    self.last_weight_decays[index] = group["weight_decay"]
        return [g.get("weight_decay", 0.0) for g in groups]

    def refresh(self) -> list[float]:
        """Recompute every followed group's ``weight_decay`` for the next step from its current ``lr``.

        Call it after the LR scheduler stepped (and after anything else that changed an lr), so the groups show
        the value the next step will use. Returns every group's ``weight_decay`` (followed or not)."""
        return self._apply(record=False)

    # ------------------------------------------------------------------------------------------------ hooks

    def _step_pre_hook(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        self._apply(record=True)

    def _step_post_hook(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        found_inf = getattr(optimizer, "found_inf", None)  # set by GradScaler for a fused optimizer's step
        if isinstance(found_inf, torch.Tensor):
            skipped = (found_inf.detach().reshape(-1).sum() > 0).to(torch.int64)
            self._skips_pending = skipped if self._skips_pending is None else self._skips_pending + skipped
            self._calls_pending += 1
        else:
            self._steps += 1

    def _optimizer_load_post_hook(self, optimizer: Optimizer) -> None:
        """After ``optimizer.load_state_dict``: the configuration wins over the checkpoint's groups.

        torch restores every group key from the checkpoint: a followed group's λ (``base_weight_decay``) goes
        back to this scheduler's; a group this configuration does not schedule but the checkpoint did gets back
        the ``weight_decay`` it had here (not the scheduled value saved with it) and loses the schedule's keys.
        """
        for index, group in enumerate(optimizer.param_groups[: len(self._followed)]):
            if self._followed[index]:
                group[BASE_KEY] = self._bases[index]
                group[SCHEDULE_KEY] = self.schedule.name
            elif BASE_KEY in group or SCHEDULE_KEY in group:
                group["weight_decay"] = self._bases[index]
                group.pop(BASE_KEY, None)
                group.pop(SCHEDULE_KEY, None)
        self.refresh()

    def remove(self) -> None:
        """Detach from the optimizer (its hooks); the groups keep their current values and keys."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        if self.optimizer.__dict__.get(_GUARD) is self:
            del self.optimizer.__dict__[_GUARD]

    # ------------------------------------------------------------------------------------------- settings

    def set_total_steps(self, total_steps: int) -> None:
        """Set the length of a ``cosine`` / ``linear`` schedule once it is known, and refresh the groups.

        Raises ``ValueError`` for other schedules (they have no length) or an invalid value (naming it)."""
        if not self.schedule.uses_step:
            raise ValueError(f"the {self.schedule.name!r} weight decay schedule has no `total_steps`")
        self.schedule = self.schedule.with_total_steps(total_steps)
        self.refresh()

    # --------------------------------------------------------------------------------------------- resume

    def state_dict(self) -> dict[str, Any]:
        """Progress and configuration: ``step_count``, the schedule and its options, and per group (by index)
        its name, whether it follows, and its base decay. A callable ``groups`` is not saved (its result is)."""
        groups = self.optimizer.param_groups
        return {
            "version": 1,
            "step_count": self.step_count,
            "schedule": self.schedule.name,
            "options": self.schedule.options(),
            "group_names": [_group_label(g, i) for i, g in enumerate(groups[: len(self._followed)])],
            "followed": list(self._followed),
            "base_weight_decays": [
                float(groups[i].get(BASE_KEY, b)) if f else b
                for i, (f, b) in enumerate(zip(self._followed, self._bases, strict=True))
            ],
        }

    def load_state_dict(self, state_dict: Mapping[str, Any]) -> None:
        """Continue from a saved scheduler: restores the *progress* (``step_count``); the configuration of this
        instance wins (schedule, options, which groups follow, base decays), as everywhere in lightning-adamw on
        resume, and applies from the step reached. ``total_steps`` comes from the checkpoint only when this
        instance has none and both schedules use it. When anything differs, :attr:`resume_note` says so in one
        line; otherwise it is ``None``. The groups are refreshed for the next step.

        Raises:
            ValueError: a state dict without ``step_count`` (not from a ``WeightDecayScheduler``).
        """
        if "step_count" not in state_dict:
            raise ValueError("not a WeightDecayScheduler state dict: it has no `step_count`")
        self.step_count = int(state_dict["step_count"])
        old_name = state_dict.get("schedule", self.schedule.name)
        old_options = dict(state_dict.get("options") or {})
        if (
            self.schedule.uses_step
            and self.schedule.total_steps is None
            and old_options.get("total_steps") is not None
            and old_name in ("cosine", "linear")
        ):
            self.schedule = self.schedule.with_total_steps(int(old_options["total_steps"]))
        changes: list[str] = []
        if old_name != self.schedule.name:
            changes.append(f"schedule {old_name!r} -> {self.schedule.name!r}")
        new_options = self.schedule.options()
        for key in sorted(set(old_options) | set(new_options)):
            if old_name == self.schedule.name and old_options.get(key) != new_options.get(key):
                changes.append(f"{key} {old_options.get(key)!r} -> {new_options.get(key)!r}")
        old_bases = dict(
            zip(state_dict.get("group_names") or [], state_dict.get("base_weight_decays") or [], strict=False)
        )
        old_followed = dict(
            zip(state_dict.get("group_names") or [], state_dict.get("followed") or [], strict=False)
        )
        groups = self.optimizer.param_groups
        for index, follows in enumerate(self._followed):
            label = _group_label(groups[index], index)
            if label in old_followed and bool(old_followed[label]) != follows:
                changes.append(
                    f"group {label!r} {'now follows' if follows else 'no longer follows'} the schedule"
                )
            elif follows and label in old_bases and float(old_bases[label]) != self._bases[index]:
                changes.append(
                    f"base weight_decay of {label!r} {float(old_bases[label]):g} -> {self._bases[index]:g}"
                )
        self.resume_note = None
        if changes:
            self.resume_note = (
                f"WeightDecayScheduler: {', '.join(changes)}; the new configuration applies from step "
                f"{self.step_count}"
            )
        self.refresh()

    # ------------------------------------------------------------------------------------------- reporting

    def followed_groups(self) -> list[str]:
        """Names of the groups that follow the schedule."""
        groups = self.optimizer.param_groups
        return [_group_label(groups[i], i) for i, f in enumerate(self._followed) if f and i < len(groups)]

    def group_rows(self) -> list[dict[str, Any]]:
        """Per group, for tables and monitors: ``name``, ``follows``, ``base_weight_decay`` (λ),
        ``weight_decay`` (torch-level, what the next step uses after :meth:`refresh`), ``lr``, ``lr_max``
        (``independent`` / ``adamc``, else ``None``) and ``per_step_decay`` (``lr·weight_decay``)."""
        rows = []
        for index, group in enumerate(self.optimizer.param_groups):
            follows = index < len(self._followed) and self._followed[index]
            wd = float(group.get("weight_decay", 0.0))
            lr = float(group["lr"])
            rows.append(
                {
                    "name": _group_label(group, index),
                    "follows": follows,
                    "base_weight_decay": float(group.get(BASE_KEY, wd)) if follows else wd,
                    "weight_decay": wd,
                    "lr": lr,
                    "lr_max": self._lr_max(index, group) if follows and self.schedule.uses_lr else None,
                    "per_step_decay": lr * wd,
                }
            )
        return rows

    def describe(self) -> str:
        """One line for the group table, e.g.
        ``weight decay schedule: adamc (λ·lr_t/lr_max, lr_max=0.003) on groups decay``."""
        rows = [r for r in self.group_rows() if r["follows"]]
        lr_max = {r["name"]: r["lr_max"] for r in rows if r["lr_max"] is not None}
        return describe_schedule(self.schedule, [r["name"] for r in rows], lr_max or None)

    def __repr__(self) -> str:
        return f"WeightDecayScheduler({self.schedule!r}, step_count={self.step_count}, groups={self.followed_groups()})"
