r"""Weight-decay schedules as pure functions: what ``weight_decay`` a group holds for one optimizer step.

Pure Python (no torch, no Lightning). Everything is stated in torch's terms: torch's ``AdamW`` (and
``Adam(decoupled_weight_decay=True)``) multiplies every weight by ``1 - lr_t * weight_decay`` at each step, so the
*per-step decay* is ``lr_t * weight_decay``. For a group whose configured (base) decay is :math:`\lambda > 0`,
the value written into ``group["weight_decay"]`` for the step about to run is:

- ``constant``: ``weight_decay_t = λ``; per-step decay ``λ·lr_t`` (torch's AdamW).
- ``independent``: ``weight_decay_t = λ/lr_max``; per-step decay ``λ·lr_t/lr_max = λ·η_t`` (Loshchilov &
  Hutter, 2019; Composer).
- ``adamc``: ``weight_decay_t = λ·lr_t/lr_max``; per-step decay ``λ·lr_t²/lr_max`` (Defazio, 2025).
- ``cosine`` / ``linear``: ``weight_decay_t = λ·f(t)``; per-step decay ``λ·f(t)·lr_t`` (λ scheduled directly,
  :func:`decay_factor`).

* ``independent`` is the fully decoupled decay of the AdamW paper (Loshchilov & Hutter, ICLR 2019, Alg. 2: the
  decay is :math:`\eta_t\lambda`, the schedule multiplier times λ, independent of the base learning rate) and of
  MosaicML Composer's ``DecoupledAdamW`` (decay scaled by ``lr_t / initial_lr``). Here :math:`\lambda` is **the
  per-step decay at the peak learning rate** — a different unit from torch's (typical values 1e-5 ... 1e-3, not
  0.01 ... 0.1): changing the base lr leaves the decay alone, so the optimum of a λ sweep stops moving when the
  lr changes. The torch-level ``weight_decay`` the group then holds is :math:`\lambda / lr_{max}`, a different
  number than λ (e.g. λ = 1e-4 at lr_max = 1e-3 gives ``weight_decay`` 0.1); the group keeps λ under
  ``base_weight_decay``.
* ``adamc`` is the corrected decay of Defazio, "Why Gradients Rapidly Increase Near the End of Training"
  (2025, arXiv 2506.02285): :math:`\theta_t = \theta_{t-1} - \gamma_t \hat m/(\sqrt{\hat v}+\epsilon)
  - c_t\lambda\theta_{t-1}` with :math:`c_t = \gamma_t^2/\gamma_{max}` for normalized layers, so the
  steady-state ratio of gradient norm to weight norm no longer grows as the lr cools down. In torch's terms
  ``weight_decay_t = λ·lr_t/lr_max``: at the peak it equals AdamW, below it it decays less. λ keeps torch's unit.
* ``cosine`` / ``linear`` scale λ itself by :func:`decay_factor` (users who schedule λ directly); the lr still
  multiplies it as in torch.

``lr_max`` is the group's peak learning rate over the planned schedule (the lr at which the schedule multiplier
:math:`\eta_t = lr_t / lr_{max}` is 1); :class:`~lightning_adamw.weight_decay.WeightDecayScheduler` resolves it
per group (explicit ``lr_max``, else the scheduler's ``max_lr``, else ``initial_lr``, else the lr at creation).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

__all__ = [
    "SCHEDULES",
    "WeightDecaySchedule",
    "decay_factor",
    "describe_schedule",
    "parse_weight_decay_schedule",
    "scheduled_weight_decay",
]

#: The schedule names (public API).
SCHEDULES: tuple[str, ...] = ("constant", "independent", "adamc", "cosine", "linear")

# Which options each schedule takes; an option given to a schedule that does not use it is an error, never
# silently ignored.
_STEP_SCHEDULES = ("cosine", "linear")
_LR_SCHEDULES = ("independent", "adamc")
_OPTIONS_OF: dict[str, tuple[str, ...]] = {
    "constant": (),
    "independent": ("lr_max",),
    "adamc": ("lr_max",),
    "cosine": ("warmup_steps", "total_steps", "final_ratio"),
    "linear": ("warmup_steps", "total_steps", "final_ratio"),
}
_ALL_OPTIONS = ("warmup_steps", "total_steps", "final_ratio", "lr_max")

LrMax = float | Mapping[str, float] | None


def _check_name(name: Any) -> str:
    if not isinstance(name, str) or name not in SCHEDULES:
        raise ValueError(
            f"unknown weight decay schedule {name!r}: `weight_decay_schedule` must be one of "
            f"{', '.join(repr(s) for s in SCHEDULES)}"
        )
    return name


def _finite_number(value: Any, option: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{option}` must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"`{option}` must be finite, got {value!r}")
    return value


def _int_option(value: Any, option: str, *, positive: bool) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"`{option}` must be an int, got {value!r}")
    if value < (1 if positive else 0):
        raise ValueError(f"`{option}` must be {'> 0' if positive else '>= 0'}, got {value!r}")
    return value


def _check_lr_max(value: Any) -> LrMax:
    if value is None:
        return None
    if isinstance(value, Mapping):
        out: dict[str, float] = {}
        for key, v in value.items():
            if not isinstance(key, str):
                raise TypeError(f"`lr_max` keys must be group names (str), got {key!r}")
            out[key] = _positive(v, f"lr_max[{key!r}]")
        return out
    return _positive(value, "lr_max")


def _positive(value: Any, option: str) -> float:
    value = _finite_number(value, option)
    if value <= 0:
        raise ValueError(f"`{option}` must be > 0, got {value!r}")
    return value


@dataclasses.dataclass(frozen=True)
class WeightDecaySchedule:
    """A validated schedule: its name and the options it uses (the others keep their defaults).

    Attributes:
        name: one of :data:`SCHEDULES`.
        warmup_steps: ``cosine`` / ``linear``: optimizer steps during which λ is held (``>= 0``).
        total_steps: ``cosine`` / ``linear``: the step at which λ reaches ``final_ratio·λ`` (optimizer steps,
            ``> 0``, ``>= warmup_steps``); ``None`` until it is known: λ is exact up to step ``warmup_steps``
            (:math:`f = 1` there whatever the length), and a later step without ``total_steps`` is an error, never
            a silently constant λ.
        final_ratio: ``cosine`` / ``linear``: λ at ``total_steps`` as a fraction of λ, in ``[0, 1]``.
        lr_max: ``independent`` / ``adamc``: the peak learning rate, one value for every followed group or a
            mapping ``{group name: lr}``; ``None`` resolves it per group (see the module docstring).

    Raises (from :meth:`create`): ``ValueError`` naming the schedule (unknown name, listing the names) or the
    option (negative, non-finite, out of range, or given to a schedule that does not use it); ``TypeError`` for
    a wrong type.
    """

    name: str = "constant"
    warmup_steps: int = 0
    total_steps: int | None = None
    final_ratio: float = 0.0
    lr_max: LrMax = None

    @classmethod
    def create(cls, name: str, **options: Any) -> WeightDecaySchedule:
        """Validate ``name`` and ``options`` (``None`` = not given) and build the schedule."""
        name = _check_name(name)
        unknown = [k for k in options if k not in _ALL_OPTIONS]
        if unknown:
            raise ValueError(
                f"unknown weight decay schedule option(s) {', '.join(map(repr, unknown))}: the options are "
                f"{', '.join(_ALL_OPTIONS)} (and `groups`)"
            )
        given = {k: v for k, v in options.items() if v is not None}
        misplaced = [k for k in given if k not in _OPTIONS_OF[name]]
        if misplaced:
            users = sorted({s for s in SCHEDULES if any(k in _OPTIONS_OF[s] for k in misplaced)})
            raise ValueError(
                f"weight decay schedule {name!r} does not use {', '.join(f'`{k}`' for k in misplaced)} "
                f"(only {', '.join(map(repr, users))} do{'' if len(users) > 1 else 'es'}); remove it"
                + (" or choose one of those schedules" if users else "")
            )
        warmup = _int_option(given.get("warmup_steps", 0), "warmup_steps", positive=False)
        total = given.get("total_steps")
        if total is not None:
            total = _int_option(total, "total_steps", positive=True)
            if total < warmup:
                raise ValueError(f"`total_steps` ({total}) must be >= `warmup_steps` ({warmup})")
        ratio = _finite_number(given.get("final_ratio", 0.0), "final_ratio")
        if not 0.0 <= ratio <= 1.0:
            raise ValueError(f"`final_ratio` must be in [0, 1] (λ decays to final_ratio·λ), got {ratio!r}")
        return cls(
            name=name,
            warmup_steps=warmup,
            total_steps=total,
            final_ratio=ratio,
            lr_max=_check_lr_max(given.get("lr_max")),
        )

    @property
    def uses_lr(self) -> bool:
        """``independent`` / ``adamc``: the value depends on the group's lr and its peak ``lr_max``."""
        return self.name in _LR_SCHEDULES

    @property
    def uses_step(self) -> bool:
        """``cosine`` / ``linear``: the value depends on the step counter."""
        return self.name in _STEP_SCHEDULES

    def options(self) -> dict[str, Any]:
        """The options this schedule uses, as given (for ``state_dict`` and messages)."""
        out = {k: getattr(self, k) for k in _OPTIONS_OF[self.name]}
        if isinstance(out.get("lr_max"), Mapping):
            out["lr_max"] = dict(out["lr_max"])
        return out

    def with_total_steps(self, total_steps: int) -> WeightDecaySchedule:
        """The same schedule with ``total_steps`` set (``ValueError`` naming it when invalid)."""
        return WeightDecaySchedule.create(self.name, **{**self.options(), "total_steps": total_steps})


def parse_weight_decay_schedule(
    schedule: str | Mapping[str, Any] | WeightDecaySchedule | None, **options: Any
) -> tuple[WeightDecaySchedule, Any]:
    """A schedule from what a user writes: a name, or a mapping ``{"name": ..., <options>, "groups": ...}``
    (YAML / command line: ``--model.weight_decay_schedule adamc``,
    ``--model.weight_decay_schedule '{name: cosine, warmup_steps: 100}'``), plus keyword ``options``
    (``None`` = not given). ``None`` means ``"constant"``.

    Returns:
        ``(schedule, groups)``: the validated :class:`WeightDecaySchedule` and the ``groups`` selection
        (``None`` when not given).

    Raises:
        ValueError: an option given both in the mapping and as a keyword (naming it), a mapping without
            ``name``, or anything :meth:`WeightDecaySchedule.create` refuses.
    """
    groups = options.pop("groups", None)
    if schedule is None:
        schedule = "constant"
    if isinstance(schedule, WeightDecaySchedule):
        base: dict[str, Any] = {"name": schedule.name, **schedule.options()}
    elif isinstance(schedule, Mapping):
        base = dict(schedule)
        if "name" not in base:
            raise ValueError(
                f"a weight decay schedule given as a mapping needs a `name` (one of "
                f"{', '.join(map(repr, SCHEDULES))}), got keys {sorted(base)}"
            )
    else:
        base = {"name": schedule}
    if "groups" in base:
        if groups is not None:
            raise ValueError(
                "`groups` is given twice: in the schedule mapping and as an option; give it once"
            )
        groups = base.pop("groups")
    twice = [k for k, v in options.items() if v is not None and base.get(k) is not None]
    if twice:
        raise ValueError(
            f"{', '.join(f'`{k}`' for k in twice)} given twice: in the schedule mapping and as an option; "
            "give each once"
        )
    merged = {
        **{k: v for k, v in base.items() if k != "name"},
        **{k: v for k, v in options.items() if v is not None},
    }
    return WeightDecaySchedule.create(base["name"], **merged), groups


def decay_factor(name: str, step: int, *, warmup_steps: int, total_steps: int, final_ratio: float) -> float:
    r"""Multiplier :math:`f(t)` of λ at optimizer step ``step`` (0-based) for ``"cosine"`` and ``"linear"``.

    :math:`f = 1` during the first ``warmup_steps`` steps (λ is *held*, not ramped: the lr warm-up already
    ramps the per-step decay ``lr_t·λ`` from near 0, and ramping λ too would make it quadratic); then, with
    :math:`p = \min(1, (t - w)/\max(1, T - w))`, cosine :math:`r + (1 - r)\tfrac12(1 + \cos\pi p)` or linear
    :math:`1 - (1 - r)p`, reaching ``final_ratio`` :math:`r` at ``total_steps`` :math:`T` and holding it after.
    The same progress as :func:`lightning_adamw.schedules.warmup_cosine_factor`, so a λ schedule given the
    LR schedule's ``warmup_steps`` / ``total_steps`` starts and ends with it.
    """
    if name not in _STEP_SCHEDULES:
        raise ValueError(f"decay_factor is for the 'cosine' and 'linear' schedules, got {name!r}")
    if step < warmup_steps:
        return 1.0
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if name == "cosine":
        return final_ratio + (1.0 - final_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0 - (1.0 - final_ratio) * progress


def scheduled_weight_decay(
    schedule: WeightDecaySchedule,
    base_weight_decay: float,
    *,
    lr: float,
    lr_max: float | None = None,
    step: int = 0,
) -> float:
    """The torch-level ``weight_decay`` of a group for one step (see the module docstring's list).

    Args:
        schedule: the schedule.
        base_weight_decay: the group's λ (``>= 0``; 0 gives 0 under every schedule).
        lr: the learning rate of the step (the group's ``lr`` after the LR scheduler set it).
        lr_max: the group's peak lr (``independent`` / ``adamc`` only; ``> 0``).
        step: the 0-based index of the step among the optimizer steps applied (``cosine`` / ``linear``).

    Raises:
        ValueError: ``lr_max`` missing or not positive for ``independent`` / ``adamc``; ``total_steps`` not set
            for ``cosine`` / ``linear`` at a step past ``warmup_steps`` (up to it λ is exact without it).
    """
    if base_weight_decay == 0.0:
        return 0.0
    name = schedule.name
    if name == "constant":
        return base_weight_decay
    if schedule.uses_lr:
        if lr_max is None or not lr_max > 0:
            raise ValueError(f"the {name!r} weight decay schedule needs a positive `lr_max`, got {lr_max!r}")
        if name == "independent":
            return base_weight_decay / lr_max
        return base_weight_decay * (lr / lr_max)
    if schedule.total_steps is None:
        if step <= schedule.warmup_steps:  # f = 1 up to the end of the hold, whatever total_steps will be
            return base_weight_decay
        raise ValueError(
            f"the {name!r} weight decay schedule has no `total_steps`: set it (the mixin fills it from the "
            "trainer's estimated_stepping_batches), otherwise λ would silently stay constant"
        )
    return base_weight_decay * decay_factor(
        name,
        step,
        warmup_steps=schedule.warmup_steps,
        total_steps=schedule.total_steps,
        final_ratio=schedule.final_ratio,
    )


def _fmt(x: float) -> str:
    return f"{x:.4g}"


def describe_schedule(
    schedule: WeightDecaySchedule, groups: list[str], lr_max: Mapping[str, float] | None = None
) -> str:
    """One line for the parameter-group table, e.g.
    ``weight decay schedule: adamc (λ·lr_t/lr_max, lr_max=0.003) on groups decay``.

    Args:
        schedule: the schedule.
        groups: names of the groups that follow it (the others keep their own constant ``weight_decay``).
        lr_max: the resolved peak lr per followed group (``independent`` / ``adamc``); shown as one value when
            all are equal.
    """
    name = schedule.name
    if name == "constant":
        what = "constant (torch weight_decay = λ every step)"
    elif schedule.uses_lr:
        values = sorted({float(v) for v in (lr_max or {}).values()})
        peak = (
            f"lr_max={_fmt(values[0])}"
            if len(values) == 1
            else "lr_max per group: " + ", ".join(f"{g}={_fmt(v)}" for g, v in (lr_max or {}).items())
            if values
            else "lr_max=the group's peak lr"
        )
        if name == "independent":
            what = (
                f"independent (per-step decay λ·lr_t/lr_max, λ in per-step units; torch weight_decay = "
                f"λ/lr_max; {peak})"
            )
        else:
            what = f"adamc (λ·lr_t/lr_max, {peak})"
    else:
        total = "total_steps not set yet" if schedule.total_steps is None else f"step {schedule.total_steps}"
        hold = f"λ held for {schedule.warmup_steps} warm-up steps, then " if schedule.warmup_steps else ""
        final = "0" if schedule.final_ratio == 0 else f"{schedule.final_ratio:g}·λ"
        what = f"{name} ({hold}{name} to {final} at {total})"
    on = ", ".join(groups) if groups else "(none: no group with non-zero weight decay selected)"
    return f"weight decay schedule: {what} on groups {on}"
