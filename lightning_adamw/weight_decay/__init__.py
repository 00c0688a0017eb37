"""Weight decay over time: schedules, the scheduler that applies them, and decay set by its EMA timescale.

Pure torch, no Lightning import (the mixin, the CLI and the monitor are thin layers over this package).
Stages, one module each:

- :mod:`.schedules`: the schedules as pure functions (names :data:`SCHEDULES`: ``"constant"``,
  ``"independent"``, ``"adamc"``, ``"cosine"``, ``"linear"``), their validation and one-line description;
- :mod:`.scheduler`: :class:`WeightDecayScheduler`, which sets every group's ``weight_decay`` for each optimizer
  step through the optimizer's step hooks, with ``state_dict`` / ``load_state_dict``;
- :mod:`.timescale`: λ from the EMA timescale τ = 1/(lr·λ) (Wang & Aitchison, 2024) and back, in steps, epochs
  and fractions of training, with the plain-words checks of the timescale.
"""

from __future__ import annotations

from lightning_adamw.weight_decay.scheduler import (
    BASE_KEY,
    SCHEDULE_KEY,
    GroupSelector,
    WeightDecayScheduler,
)
from lightning_adamw.weight_decay.schedules import (
    SCHEDULES,
    WeightDecaySchedule,
    decay_factor,
    describe_schedule,
    parse_weight_decay_schedule,
    scheduled_weight_decay,
)
from lightning_adamw.weight_decay.timescale import (
    TIMESCALE_OPTIONS,
    GroupTimescale,
    TimescaleDecay,
    check_timescale_options,
    describe_timescale,
    group_timescales,
    peak_lr,
    resolve_weight_decay,
    timescale_in_steps,
    timescale_steps,
    timescale_warning,
    weight_decay_from_timescale,
)

__all__ = [
    "BASE_KEY",
    "SCHEDULES",
    "SCHEDULE_KEY",
    "TIMESCALE_OPTIONS",
    "GroupSelector",
    "GroupTimescale",
    "TimescaleDecay",
    "WeightDecaySchedule",
    "WeightDecayScheduler",
    "check_timescale_options",
    "decay_factor",
    "describe_schedule",
    "describe_timescale",
    "group_timescales",
    "parse_weight_decay_schedule",
    "peak_lr",
    "resolve_weight_decay",
    "scheduled_weight_decay",
    "timescale_in_steps",
    "timescale_steps",
    "timescale_warning",
    "weight_decay_from_timescale",
]
