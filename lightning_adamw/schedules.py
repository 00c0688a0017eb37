"""Learning-rate schedules that go with AdamW: linear warm-up, then cosine decay.

Pure torch. :class:`WarmupCosineLR` is an ordinary ``LRScheduler`` so LightningCLI can build it from YAML
(``lr_scheduler: {class_path: lightning_adamw.WarmupCosineLR, init_args: {warmup_steps: 100}}``). Leaving
``total_steps`` unset lets :class:`~lightning_adamw.DecoupledWeightDecayMixin` fill it in from
``trainer.estimated_stepping_batches`` once the trainer knows it.
"""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

__all__ = ["WarmupCosineLR", "warmup_cosine_factor"]


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
        optimizer: the wrapped optimizer (every group follows the same shape, each from its own base lr).
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
        super().__init__(optimizer, self._factor, last_epoch=last_epoch)

    def _factor(self, step: int) -> float:
        if self.total_steps is None:  # not known yet: warm up, then hold
            return min(1.0, (step + 1) / (self.warmup_steps + 1))
        return warmup_cosine_factor(step, self.warmup_steps, self.total_steps, self.min_lr_ratio)

    def set_total_steps(self, total_steps: int) -> None:
        """Fix the schedule's length once it is known, and re-apply the current factor."""
        if total_steps <= 0:
            raise ValueError(f"`total_steps` must be positive, got {total_steps!r}")
        self.total_steps = max(int(total_steps), self.warmup_steps)
        for group, base_lr in zip(self.optimizer.param_groups, self.base_lrs, strict=True):
            group["lr"] = base_lr * self._factor(self.last_epoch)
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        # LambdaLR would try to pickle the bound method; our factor is fully described by these fields.
        state = {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "lr_lambdas")}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        self.__dict__.update(state_dict)
