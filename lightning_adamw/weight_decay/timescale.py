r"""Weight decay set by its EMA timescale (Wang & Aitchison, 2024). Pure Python.

Wang & Aitchison, "How to set AdamW's weight decay as you scale model and dataset size" (2024, arXiv
2405.13698): with decoupled decay, :math:`w_t = (1 - \eta\lambda) w_{t-1} - \eta u_t`, so the weights are an
exponential moving average of the updates :math:`-u_t/\lambda` with timescale

.. math:: \tau = \frac{1}{\eta\lambda} \quad\text{optimizer steps,}

and it is this timescale, not λ, that should stay fixed when the dataset, the model or the learning rate
change: they find the best timescale, measured in epochs, roughly constant across model and dataset sizes, and
give two guidelines — τ should not be much shorter than one epoch (the average must cover every datapoint) nor
much longer than the whole run (early updates must be forgotten). So λ is derived from the τ you choose:
:math:`\lambda = 1/(\eta\,\tau_{steps})`, with τ in epochs or as a fraction of the planned optimizer steps;
:func:`timescale_warning` checks the two guidelines.

Which lr: :math:`\eta` is the group's **peak (base) learning rate**, the value an LR schedule multiplies
(``initial_lr``; the module's ``lr`` setting). The timescale describes the bulk of training, where the lr is at or
near its base; the warm-up's smaller lr would inflate λ by the warm-up factor, and under a decaying schedule the
instantaneous timescale :math:`1/(\eta_t\lambda)` only lengthens from there (the monitor logs it per step).

Under the ``"independent"`` schedule λ is already the per-step decay at the peak lr
(:mod:`lightning_adamw.weight_decay.schedules`), so :math:`\tau = 1/\lambda` and :math:`\lambda = 1/\tau`, with no lr.

Steps are *optimizer* steps (with gradient accumulation, batches / accumulation), as in
``trainer.estimated_stepping_batches``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

__all__ = [
    "TIMESCALE_OPTIONS",
    "GroupTimescale",
    "TimescaleDecay",
    "check_timescale_options",
    "describe_timescale",
    "group_timescales",
    "peak_lr",
    "resolve_weight_decay",
    "timescale_in_steps",
    "timescale_steps",
    "timescale_warning",
    "weight_decay_from_timescale",
]

#: The three ways to set the decay; at most one may be given.
TIMESCALE_OPTIONS: tuple[str, ...] = ("weight_decay", "ema_timescale_epochs", "ema_timescale_fraction")


def _positive(value: Any, option: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{option}` must be a number, got {value!r}")
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"`{option}` must be finite and > 0, got {value!r}")
    return value


def _per_step_units(schedule: str) -> bool:
    return schedule == "independent"


def timescale_steps(lr: float, weight_decay: float, *, schedule: str = "constant") -> float:
    r""":math:`\tau = 1/(\eta\lambda)` in optimizer steps (``1/λ`` under ``"independent"``); ``inf`` when
    there is no decay (``weight_decay == 0`` or ``lr == 0``).

    Raises:
        ValueError: ``lr`` or ``weight_decay`` negative or non-finite (naming it).
    """
    for value, option in ((lr, "lr"), (weight_decay, "weight_decay")):
        if not math.isfinite(float(value)) or float(value) < 0:
            raise ValueError(f"`{option}` must be finite and >= 0, got {value!r}")
    rate = float(weight_decay) if _per_step_units(schedule) else float(lr) * float(weight_decay)
    return math.inf if rate == 0.0 else 1.0 / rate


def weight_decay_from_timescale(lr: float, tau_steps: float, *, schedule: str = "constant") -> float:
    r""":math:`\lambda = 1/(\eta\,\tau)` for a timescale of ``tau_steps`` optimizer steps at peak lr ``lr``
    (``1/τ`` under ``"independent"``, whose λ is the per-step decay).

    Raises:
        ValueError: ``lr`` or ``tau_steps`` not finite and positive (naming it).
    """
    tau = _positive(tau_steps, "tau_steps")
    if _per_step_units(schedule):
        return 1.0 / tau
    return 1.0 / (_positive(lr, "lr") * tau)


def check_timescale_options(
    weight_decay: float | None = None,
    ema_timescale_epochs: float | None = None,
    ema_timescale_fraction: float | None = None,
) -> str | None:
    """Which of the three ways to set the decay was used (``None`` = not given): the option's name, or ``None``
    when none was. Call it as soon as the settings are known (before the trainer knows its steps), so a
    conflict fails early.

    Raises:
        ValueError: two or more given, naming them (``weight_decay`` here means an explicit one, not a default).
        TypeError / ValueError: a timescale that is not a finite positive number (naming it).
    """
    given = {
        k: v
        for k, v in zip(
            TIMESCALE_OPTIONS, (weight_decay, ema_timescale_epochs, ema_timescale_fraction), strict=True
        )
        if v is not None
    }
    if len(given) > 1:
        names = [f"`{k}`" for k in given]
        both = " and ".join(names) + (" are both given" if len(names) == 2 else " are all given")
        raise ValueError(
            f"{both}: each sets the same decay (λ = 1/(lr·τ) for a timescale τ), so give only one of"
            " `weight_decay`, `ema_timescale_epochs` and `ema_timescale_fraction`"
        )
    for option in ("ema_timescale_epochs", "ema_timescale_fraction"):
        if option in given:
            _positive(given[option], option)
    return next(iter(given), None)


def timescale_in_steps(
    *,
    ema_timescale_epochs: float | None = None,
    ema_timescale_fraction: float | None = None,
    steps_per_epoch: float | None = None,
    total_steps: float | None = None,
) -> float:
    """The timescale in optimizer steps from exactly one of ``ema_timescale_epochs`` (times
    ``steps_per_epoch``) or ``ema_timescale_fraction`` (of the planned ``total_steps``).

    Raises:
        ValueError: none or both given; the needed trainer quantity unknown (``None``) or not positive (naming
            the option that needs it).
    """
    if (ema_timescale_epochs is None) == (ema_timescale_fraction is None):
        raise ValueError("give exactly one of `ema_timescale_epochs` and `ema_timescale_fraction`")
    if ema_timescale_epochs is not None:
        epochs = _positive(ema_timescale_epochs, "ema_timescale_epochs")
        if steps_per_epoch is None:
            raise ValueError(
                "`ema_timescale_epochs` needs the number of optimizer steps per epoch, which is not known "
                "(an unsized dataloader?): use `ema_timescale_fraction` with `max_steps`, or `weight_decay`"
            )
        return epochs * _positive(steps_per_epoch, "steps_per_epoch")
    fraction = _positive(ema_timescale_fraction, "ema_timescale_fraction")
    if total_steps is None:
        raise ValueError(
            "`ema_timescale_fraction` needs the planned number of optimizer steps, which is not known (set "
            "`max_steps`, or `max_epochs` with a sized dataloader), or use `ema_timescale_epochs`"
        )
    return fraction * _positive(total_steps, "total_steps")


@dataclasses.dataclass(frozen=True)
class TimescaleDecay:
    """A decay and its timescale, for the group table and the monitor.

    Attributes:
        weight_decay: λ (torch's units; per-step units under ``"independent"``).
        lr: the peak lr it was computed with.
        tau_steps: :math:`1/(lr·λ)` in optimizer steps (``inf`` without decay).
        tau_epochs: ``tau_steps / steps_per_epoch`` (``None`` when unknown).
        tau_fraction: ``tau_steps / total_steps``, the ``ema_timescale_fraction`` (``None`` when unknown).
        source: the option that set it: ``"weight_decay"``, ``"ema_timescale_epochs"`` or
            ``"ema_timescale_fraction"``.
        schedule: the weight decay schedule name.
    """

    weight_decay: float
    lr: float
    tau_steps: float
    tau_epochs: float | None
    tau_fraction: float | None
    source: str
    schedule: str = "constant"


def resolve_weight_decay(
    lr: float,
    *,
    weight_decay: float | None = None,
    ema_timescale_epochs: float | None = None,
    ema_timescale_fraction: float | None = None,
    steps_per_epoch: float | None = None,
    total_steps: float | None = None,
    schedule: str = "constant",
) -> TimescaleDecay:
    """λ from whichever of ``weight_decay`` / ``ema_timescale_epochs`` / ``ema_timescale_fraction`` is given
    (at most one), with its timescale in steps, epochs and as a fraction of training.

    Args:
        lr: the peak (base) learning rate λ refers to (see the module docstring).
        weight_decay: an explicit λ (``None``: not given; a default value is not "given").
        ema_timescale_epochs, ema_timescale_fraction: the timescale.
        steps_per_epoch, total_steps: optimizer steps per epoch and planned in all (``None``: unknown).
        schedule: the weight decay schedule (``"independent"`` takes λ in per-step units).

    Raises:
        ValueError: see :func:`check_timescale_options`, :func:`timescale_in_steps`; none of the three given.
    """
    source = check_timescale_options(weight_decay, ema_timescale_epochs, ema_timescale_fraction)
    if source is None:
        raise ValueError(f"give one of {', '.join(f'`{k}`' for k in TIMESCALE_OPTIONS)}")
    if source == "weight_decay":
        assert weight_decay is not None
        wd = float(weight_decay)
        tau = timescale_steps(lr, wd, schedule=schedule)
    else:
        tau = timescale_in_steps(
            ema_timescale_epochs=ema_timescale_epochs,
            ema_timescale_fraction=ema_timescale_fraction,
            steps_per_epoch=steps_per_epoch,
            total_steps=total_steps,
        )
        if not tau > 1.0:
            # AdamW multiplies the weights by 1 - lr·λ = 1 - 1/τ per step: 0 at τ = 1, a sign flip below
            given = ema_timescale_epochs if source == "ema_timescale_epochs" else ema_timescale_fraction
            raise ValueError(
                f"`{source}`={given!r} gives an EMA timescale of τ = {tau:.4g} optimizer steps, so every step "
                f"would multiply the weights by 1 - lr·λ = 1 - 1/τ = {1.0 - 1.0 / tau:.3g}: τ must be more "
                f"than one step (a useful one spans at least an epoch); raise `{source}`"
            )
        wd = weight_decay_from_timescale(lr, tau, schedule=schedule)
    epochs = tau / steps_per_epoch if steps_per_epoch and math.isfinite(tau) else None
    fraction = tau / total_steps if total_steps and math.isfinite(tau) else None
    return TimescaleDecay(
        weight_decay=wd,
        lr=float(lr),
        tau_steps=tau,
        tau_epochs=epochs,
        tau_fraction=fraction,
        source=source,
        schedule=schedule,
    )


def describe_timescale(decay: TimescaleDecay) -> str:
    """One line for the group table, e.g.
    ``λ = 0.0333 (from ema_timescale_fraction=0.25): τ = 1/(lr·λ) = 300 steps = 3 epochs = 0.25 of training``."""
    if not math.isfinite(decay.tau_steps):
        return f"λ = {decay.weight_decay:.4g}: no decay (τ = ∞)"
    formula = "1/λ" if _per_step_units(decay.schedule) else f"1/(lr·λ), lr={decay.lr:.4g}"
    parts = [f"{decay.tau_steps:.4g} steps"]
    if decay.tau_epochs is not None:
        parts.append(f"{decay.tau_epochs:.4g} epochs")
    if decay.tau_fraction is not None:
        fraction = decay.tau_fraction
        parts.append(
            f"{fraction:.4g} of training" if fraction <= 1 else f"{fraction:.4g} times the whole run"
        )
    origin = "" if decay.source == "weight_decay" else f" (from {decay.source})"
    return f"λ = {decay.weight_decay:.4g}{origin}: τ = {formula} = {' = '.join(parts)}"


def timescale_warning(
    tau_steps: float, *, total_steps: float | None = None, steps_per_epoch: float | None = None
) -> str | None:
    """A plain-words warning when the timescale cannot do what decay is for, else ``None``:

    * longer than the whole run (``tau_steps > total_steps``): the decay cannot reach its equilibrium, and the
      weights are not an average over training (they still carry their initialization);
    * shorter than one epoch (``tau_steps < steps_per_epoch``): the weights average the updates of less than
      one pass over the data and forget the rest.

    ``inf`` (no decay) and unknown quantities (``None``) give no warning.
    """
    if not math.isfinite(tau_steps) or tau_steps <= 0:
        return None
    messages = []
    if total_steps and tau_steps > total_steps:
        messages.append(
            f"the weight decay EMA timescale τ = 1/(lr·λ) = {tau_steps:.4g} optimizer steps is longer than the "
            f"whole run ({total_steps:.4g} steps): the decay cannot reach its equilibrium and the weights are "
            "not an average over training (they still carry their initialization); shorten τ: raise weight_decay "
            "(or, with DecoupledWeightDecayMixin, set ema_timescale_fraction below 1)"
        )
    if steps_per_epoch and tau_steps < steps_per_epoch:
        messages.append(
            f"the weight decay EMA timescale τ = 1/(lr·λ) = {tau_steps:.4g} optimizer steps is shorter than one "
            f"epoch ({steps_per_epoch:.4g} steps): the weights average the updates of less than one pass over "
            "the data and forget the rest; lengthen τ: lower weight_decay (or, with DecoupledWeightDecayMixin, "
            "raise ema_timescale_epochs / ema_timescale_fraction)"
        )
    return "; and ".join(messages) if messages else None


def peak_lr(group: Mapping[str, Any], lr_max: float | None = None) -> float:
    """A group's peak lr, the one its timescale is quoted at: ``lr_max`` when known (a weight decay scheduler's),
    else the first of the group's ``max_lr`` (``OneCycleLR``), ``initial_lr`` (any torch LR scheduler) and
    ``lr`` that is set and > 0; 0.0 when none is."""
    if lr_max:
        return float(lr_max)
    for key in ("max_lr", "initial_lr", "lr"):
        value = group.get(key)
        if value is not None and float(value) > 0:
            return float(value)
    return 0.0


@dataclasses.dataclass(frozen=True)
class GroupTimescale:
    """The EMA timescale of one AdamW parameter group that decays, at its peak learning rate."""

    #: position of the group in ``optimizer.param_groups``
    index: int
    #: λ as set by the user: ``base_weight_decay`` under a :class:`~.scheduler.WeightDecayScheduler`, else the
    #: group's ``weight_decay``
    base_weight_decay: float
    #: the group's peak lr (the scheduler's ``lr_max``; else ``max_lr``, ``initial_lr`` or ``lr``)
    peak_lr: float
    #: the weight decay schedule the group follows (``"constant"`` without a scheduler)
    schedule: str
    #: :math:`\tau = 1/(\eta_{peak}\lambda)` in optimizer steps (``1/λ`` under ``"independent"``)
    tau_steps: float


def group_timescales(optimizer: Any) -> list[GroupTimescale]:
    """The timescale of every decoupled-decay (AdamW) group of ``optimizer`` whose λ is > 0.

    The timescale the ``ema_timescale_*`` options set: at the group's peak lr and its base λ (see the module
    docstring for why the peak). Groups of Adam with coupled L2 and of other optimizers have no such timescale
    and are left out.
    """
    from lightning_adamw.optim_checks import _group_decoupled, is_adam_family
    from lightning_adamw.weight_decay.scheduler import WeightDecayScheduler

    if not is_adam_family(optimizer):
        return []
    scheduler = WeightDecayScheduler.of(optimizer)
    rows = scheduler.group_rows() if scheduler is not None else []
    found = []
    for index, group in enumerate(optimizer.param_groups):
        if not _group_decoupled(optimizer, group) and float(group.get("weight_decay", 0.0)) != 0.0:
            continue  # Adam + L2: the decay goes through the moments, not an EMA
        row = rows[index] if index < len(rows) and rows[index]["follows"] else None
        lam = float(row["base_weight_decay"]) if row else float(group.get("weight_decay", 0.0))
        if not (math.isfinite(lam) and lam > 0):
            continue
        peak = peak_lr(group, row["lr_max"] if row else None)
        schedule = scheduler.schedule.name if row and scheduler is not None else "constant"
        tau = timescale_steps(float(peak), lam, schedule=schedule)
        found.append(GroupTimescale(index, lam, float(peak), schedule, tau))
    return found
