"""Learning-rate schedules that go with AdamW: linear warm-up, then cosine decay.

Pure torch. :class:`WarmupCosineLR` is an ordinary ``LRScheduler`` so LightningCLI can build it from YAML
(``lr_scheduler: {class_path: lightning_adamw.WarmupCosineLR, init_args: {warmup_steps: 100}}``). Leaving
``total_steps`` unset lets :class:`~lightning_adamw.DecoupledWeightDecayMixin` fill it in from
``trainer.estimated_stepping_batches`` once the trainer knows it.

On resume (``load_state_dict``) the schedule restores only its progress: the new run's configuration (base
learning rates, ``warmup_steps``, ``min_lr_ratio``, ``total_steps``) wins, so a run extended with more epochs
follows the longer schedule from the step it reached.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["WarmupCosineLR", "shorter_schedule_message", "warmup_cosine_factor"]


def warmup_cosine_factor(step: int, warmup_steps: int, total_steps: int, min_lr_ratio: float = 0.0) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based).

    Linear from ``1/(warmup_steps+1)`` up to 1 over ``warmup_steps`` steps, then a half cosine from 1 down to
    ``min_lr_ratio`` at ``total_steps``; constant at ``min_lr_ratio`` afterwards.
    """
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosineLR(LambdaLR):
    """Linear warm-up followed by cosine decay, stepped once per optimizer step.

    Args:
        optimizer: the wrapped optimizer (every group follows the same shape, each from its own base lr; a group
            added later with ``add_param_group`` keeps the lr it is given: see :meth:`get_lr`).
        warmup_steps: number of warm-up steps (``>= 0``).
        total_steps: length of the whole schedule in optimizer steps; ``None`` means "not known yet": the
            mixin sets it from ``trainer.estimated_stepping_batches``. Until then the factor after warm-up is 1.
        min_lr_ratio: final learning rate as a fraction of the base one, in ``[0, 1]``.

    Example:
        >>> import torch
        >>> opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
        >>> sched = WarmupCosineLR(opt, warmup_steps=2, total_steps=6)
        >>> lrs = []
        >>> for _ in range(6):
        ...     lrs.append(round(opt.param_groups[0]["lr"], 3)); opt.step(); sched.step()
        >>> lrs
        [0.333, 0.667, 1.0, 0.854, 0.5, 0.146]
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int = 0,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise ValueError(f"`warmup_steps` must be an int >= 0, got {warmup_steps!r}")
        if total_steps is not None and (
            isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps <= 0
        ):
            raise ValueError(f"`total_steps` must be a positive int or None, got {total_steps!r}")
        if not 0.0 <= float(min_lr_ratio) <= 1.0:
            raise ValueError(f"`min_lr_ratio` must be in [0, 1], got {min_lr_ratio!r}")
        if total_steps is not None and total_steps < warmup_steps:
            raise ValueError(f"`total_steps` ({total_steps}) must be >= `warmup_steps` ({warmup_steps})")
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = float(min_lr_ratio)
        #: One line about what a resume changed (see :meth:`load_state_dict`), or ``None``.
        self.resume_note: str | None = None
        super().__init__(optimizer, self._factor, last_epoch=last_epoch)

    def _factor(self, step: int) -> float:
        return self._factor_for(step, self.total_steps, self.warmup_steps, self.min_lr_ratio)

    def get_lr(self) -> list[float]:  # type: ignore[override]
        """The factor times each base lr, for the groups the schedule was created with; groups added later
        (``optimizer.add_param_group``: Lightning's ``BackboneFinetuning``) keep their lr, which whoever added
        them manages (``BackboneFinetuning`` ramps it)."""
        values = list(super().get_lr())
        return values + [group["lr"] for group in self.optimizer.param_groups[len(values) :]]

    def set_total_steps(self, total_steps: int) -> None:
        """Fix the schedule's length once it is known, and re-apply the current factor."""
        if total_steps <= 0:
            raise ValueError(f"`total_steps` must be positive, got {total_steps!r}")
        self.total_steps = max(int(total_steps), self.warmup_steps)
        self.apply_step(self.last_epoch)

    def apply_step(self, step: int) -> None:
        """Put the schedule at ``step`` (0-based optimizer steps taken): its closed form ``base · factor(step)``
        for the groups it schedules (a resumed run whose checkpoint had no state for this schedule starts where
        training is, not at the schedule's own step 0)."""
        self.last_epoch = int(step)
        self._step_count = int(step) + 1
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs, strict=False):
            group["lr"] = base_lr * self._factor(self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        # LambdaLR would try to pickle the bound method; our factor is fully described by these fields. The mixin's
        # bookkeeping (`_lightning_adamw_*`) and the resume note are not part of the schedule.
        return {
            k: v
            for k, v in self.__dict__.items()
            if k not in ("optimizer", "lr_lambdas", "resume_note") and not k.startswith("_lightning_adamw")
        }

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore the schedule's *progress* (``last_epoch``, ``_step_count``) and keep this instance's
        configuration.

        The new run's configuration wins on resume: ``base_lrs`` (the optimizer's current base learning rates),
        ``warmup_steps``, ``min_lr_ratio`` and ``total_steps`` stay those of this instance; ``total_steps`` comes
        from the checkpoint only when this instance has none. The factor at the restored step is re-applied to the
        groups, so a longer resumed run follows the longer schedule from the step it reached (the same learning
        rate the longer schedule has at that step). When anything differs from the checkpoint, :attr:`resume_note`
        says so in one line (the mixin prints it); otherwise it is ``None``.
        """
        old_total = state_dict.get("total_steps")
        old_bases = list(state_dict.get("base_lrs") or [])
        old_warmup = state_dict.get("warmup_steps", self.warmup_steps)
        old_ratio = state_dict.get("min_lr_ratio", self.min_lr_ratio)
        last = int(state_dict.get("last_epoch", self.last_epoch))
        old_factor = self._factor_for(last, old_total, old_warmup, old_ratio)
        self.last_epoch = last
        self._step_count = int(state_dict.get("_step_count", last + 1))
        if self.total_steps is None and old_total is not None:
            self.total_steps = int(old_total)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs, strict=False):
            group["initial_lr"] = base_lr
            group["lr"] = base_lr * self._factor(self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

        changes: list[str] = []
        if old_total != self.total_steps:
            longer = (
                " (the resumed trainer is longer)"
                if old_total is not None and self.total_steps is not None and self.total_steps > old_total
                else " (the resumed trainer is shorter)"
                if old_total is not None and self.total_steps is not None
                else ""
            )
            changes.append(f"total_steps {old_total} -> {self.total_steps}{longer}")
        if old_warmup != self.warmup_steps:
            changes.append(f"warmup_steps {old_warmup} -> {self.warmup_steps}")
        if float(old_ratio) != self.min_lr_ratio:
            changes.append(f"min_lr_ratio {old_ratio:g} -> {self.min_lr_ratio:g}")
        if old_bases and any(
            not math.isclose(float(a), float(b), rel_tol=1e-12)
            for a, b in zip(old_bases, self.base_lrs, strict=False)
        ):
            pairs = dict.fromkeys(  # one entry per distinct change (groups usually share their base lr)
                f"{float(a):.6g} -> {float(b):.6g}" for a, b in zip(old_bases, self.base_lrs, strict=False)
            )
            changes.append(f"base lr {', '.join(pairs)}")
        self.resume_note = None
        if changes:
            new_factor = self._factor(self.last_epoch)
            keep = (
                f"; give the schedule total_steps={old_total} to keep the old length"
                if old_total is not None and old_total != self.total_steps
                else ""
            )
            self.resume_note = (
                f"WarmupCosineLR: {', '.join(changes)}; the learning rate follows the "
                f"{self.total_steps or 'open-ended'}-step schedule from step {self.last_epoch} (lr factor "
                f"{old_factor:.4g} -> {new_factor:.4g}){keep}"
            )

    @staticmethod
    def _factor_for(step: int, total: int | None, warmup: int, ratio: float) -> float:
        if total is None:  # not known yet: warm up, then hold
            return min(1.0, (step + 1) / (warmup + 1))
        return warmup_cosine_factor(step, warmup, max(int(total), warmup), float(ratio))


def shorter_schedule_message(scheduler: WarmupCosineLR, planned_steps: int | None, where: str) -> str | None:
    """A plain-words warning when a schedule's explicit ``total_steps`` ends before the planned training does
    (the lr would then sit at its floor, ``min_lr_ratio`` times the base lr, for the rest of the run), else ``None``.

    Args:
        scheduler: the schedule (its ``total_steps``, ``min_lr_ratio``).
        planned_steps: the optimizer steps the run will take (``trainer.estimated_stepping_batches``), or
            ``None`` when not known.
        where: where ``total_steps`` was set, for the message (``"attribute self.total_steps"``, ...).
    """
    total = scheduler.total_steps
    if total is None or planned_steps is None or total >= planned_steps or scheduler.min_lr_ratio >= 1.0:
        return None
    return (
        f"WarmupCosineLR `total_steps`={total} ({where}) is shorter than the trainer's planned {planned_steps} "
        f"optimizer steps: the learning rate reaches its floor (min_lr_ratio={scheduler.min_lr_ratio:g} x the base "
        f"lr) at step {total} and stays there for the last {planned_steps - total} steps. Leave `total_steps` "
        f"unset to follow the trainer, or set it to {planned_steps}"
    )
