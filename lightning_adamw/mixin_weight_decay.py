"""Weight decay over time in the mixin: ``weight_decay_schedule`` and the EMA-timescale options.

The Lightning shell over the pure-torch :mod:`lightning_adamw.weight_decay` (see its docstrings for the
schedules and formulas). :class:`~lightning_adamw.DecoupledWeightDecayMixin` calls, in its
``configure_optimizers``:

1. :func:`decay_from_settings` before building the groups: λ from ``weight_decay`` or from
   ``ema_timescale_epochs`` / ``ema_timescale_fraction`` (λ = 1/(lr·τ), Wang & Aitchison 2024), once the
   trainer knows its steps per epoch and planned steps; both a timescale and an explicit ``weight_decay`` is an
   error naming them;
2. :func:`create_scheduler` after the optimizer, its LR scheduler and the adoption exist (the adoption's step
   pre-hook, which may change an lr, then runs before the scheduler's, which reads it);
3. :func:`describe_weight_decay` for the lines under the group table.

Checkpoints: the scheduler's ``state_dict`` travels inside the optimizer's own state dict (key
:data:`STATE_KEY`, through torch's optimizer state-dict hooks), so every path that saves and restores the
optimizer (``Trainer.fit(ckpt_path=...)``, the LR finder's and batch-size finder's own checkpoints, a plain torch
loop) continues the schedule, whatever hooks the module overrides. A checkpoint without it (a run without a
schedule) continues from the trainer's global step, said in one line (:func:`continue_without_state`).
"""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.optim import Optimizer

from lightning_adamw.weight_decay import (
    BASE_KEY,
    TimescaleDecay,
    WeightDecayScheduler,
    check_timescale_options,
    describe_timescale,
    parse_weight_decay_schedule,
    peak_lr,
    resolve_weight_decay,
    timescale_steps,
)

__all__ = [
    "INDEPENDENT_LIMIT",
    "STATE_KEY",
    "attach_checkpointing",
    "continue_without_state",
    "create_scheduler",
    "decay_from_settings",
    "decay_with_timescale",
    "describe_weight_decay",
    "weight_decay_hparams",
]

#: Key of the scheduler's state inside the optimizer's state dict.
STATE_KEY = "lightning_adamw_weight_decay_scheduler"
#: Under ``"independent"`` λ is the per-step decay at the peak lr (typically 1e-5 ... 1e-3). A λ this large or
#: larger shrinks the weights by at least 1 % every step (a timescale of at most 100 steps): almost surely a
#: value in torch's units (0.01 ... 0.1), so it is refused unless it comes from an explicit timescale.
INDEPENDENT_LIMIT = 0.01

_PENDING = "_lightning_adamw_wd_loaded"
_MISSING_STATE = "_lightning_adamw_wd_state_missing"
_AUTO_TOTAL = "_lightning_adamw_wd_auto_total"
_TIMESCALE_OPTIONS = ("ema_timescale_epochs", "ema_timescale_fraction")


# ----------------------------------------------------------------------------------------------- λ


def _schedule_name(module: Any) -> str:
    schedule, _ = parse_weight_decay_schedule(module.adamw_setting("weight_decay_schedule"))
    return schedule.name


def check_decay_options(module: Any) -> str | None:
    """Which of ``weight_decay`` (given: see ``DecoupledWeightDecayMixin.setting_given``) / ``ema_timescale_epochs`` /
    ``ema_timescale_fraction`` sets λ, or ``None`` (the default ``weight_decay``).

    Raises:
        ValueError: two of them given (naming both), or a timescale that is not a positive number.
    """
    explicit = module.setting_given("weight_decay")
    source = check_timescale_options(
        module.adamw_setting("weight_decay") if explicit else None,
        module.adamw_setting("ema_timescale_epochs"),
        module.adamw_setting("ema_timescale_fraction"),
    )
    if source in _TIMESCALE_OPTIONS and not explicit and module.argument_passed("weight_decay"):
        # passed on purpose, but equal to the __init__ default: as good as not given, so the timescale sets λ;
        # say so rather than quietly train with another λ than the one written
        if not module.__dict__.get("_lightning_adamw_said_passed_default"):
            module.__dict__["_lightning_adamw_said_passed_default"] = True
            value = module.adamw_setting("weight_decay")
            rank_zero_warn(
                f"lightning-adamw: `weight_decay={value!r}` was passed to {type(module).__name__}, but it equals"
                f" the default of its __init__ and `{source}` is given too: λ is set from `{source}` (see the"
                f" group table), not {value!r}. Pass only one of them: both given is otherwise an error.",
                category=UserWarning,
            )
    return source


def steps_per_epoch(trainer: Any, module: Any) -> float | None:
    """Optimizer steps per epoch (``ceil(batches / accumulate_grad_batches)``), loading the training data when the
    trainer has not yet (a ``max_steps`` run skips it in ``estimated_stepping_batches``); ``None`` when an epoch
    has no fixed length (an iterable dataset) or the module steps by itself (manual optimization). The same rule
    as the monitor's ``lightning_adamw.monitor_trainer.steps_per_epoch``."""
    if trainer is None:
        return None
    if trainer.train_dataloader is None:
        trainer.fit_loop.setup_data()  # what estimated_stepping_batches does when it needs the length
    batches = trainer.num_training_batches
    if not module.automatic_optimization or not math.isfinite(batches) or batches <= 0:
        return None
    return float(math.ceil(batches / max(int(trainer.accumulate_grad_batches), 1)))


def decay_from_settings(module: Any, lr: float) -> TimescaleDecay | None:
    """λ from an EMA timescale option (``None`` when ``weight_decay`` sets it: the caller reads it as before).

    Args:
        module: the mixin module (attached to its trainer).
        lr: the peak (base) learning rate λ refers to: the module's ``lr``, or the optimizer's when one is given
            by class.

    Raises:
        ValueError: see :func:`check_decay_options` and
            :func:`lightning_adamw.weight_decay.timescale_in_steps` (the trainer quantity a timescale needs is
            unknown, naming the option).
    """
    source = check_decay_options(module)
    if source not in _TIMESCALE_OPTIONS:
        return None
    trainer = getattr(module, "_trainer", None)
    epochs = module.adamw_setting("ema_timescale_epochs")
    fraction = module.adamw_setting("ema_timescale_fraction")
    return resolve_weight_decay(
        lr,
        ema_timescale_epochs=epochs,
        ema_timescale_fraction=fraction,
        steps_per_epoch=steps_per_epoch(trainer, module),
        total_steps=module._estimated_total_steps(),
        schedule=_schedule_name(module),
    )


def decay_with_timescale(module: Any, lr: float, weight_decay: float | None) -> TimescaleDecay | None:
    """An explicit λ with its timescale τ = 1/(lr·λ), for the table and the logged hparams (``None`` without a
    positive lr or a λ)."""
    if weight_decay is None or not lr > 0:
        return None
    return resolve_weight_decay(
        lr,
        weight_decay=float(weight_decay),
        steps_per_epoch=steps_per_epoch(getattr(module, "_trainer", None), module),
        total_steps=module._estimated_total_steps(),
        schedule=_schedule_name(module),
    )


def weight_decay_hparams(
    scheduler: WeightDecayScheduler | None, decay: TimescaleDecay | None
) -> dict[str, Any]:
    """Hyperparameters to log, under ``weight_decay/`` (Lightning logs the module's own hparams after these, so
    their names must differ): ``schedule``, ``lambda`` (the base decay that trains, e.g. derived from a
    timescale) and ``ema_timescale_{steps,epochs,fraction}``."""
    out: dict[str, Any] = {}
    if scheduler is not None:
        out["weight_decay/schedule"] = scheduler.schedule.name
    if decay is not None and math.isfinite(decay.tau_steps):
        out["weight_decay/lambda"] = decay.weight_decay
        out["weight_decay/ema_timescale_steps"] = decay.tau_steps
        if decay.tau_epochs is not None:
            out["weight_decay/ema_timescale_epochs"] = decay.tau_epochs
        if decay.tau_fraction is not None:
            out["weight_decay/ema_timescale_fraction"] = decay.tau_fraction
    return out


# ----------------------------------------------------------------------------------------------- the scheduler


def create_scheduler(
    module: Any, optimizer: Optimizer, decay_source: str | None
) -> WeightDecayScheduler | None:
    """The :class:`~lightning_adamw.weight_decay.WeightDecayScheduler` the module's ``weight_decay_schedule``
    asks for (``None`` when it is unset and none exists), with checkpointing through the optimizer's state dict.

    An optimizer that already has one (created by a ``configure_optimizers`` of your own) keeps it: then only
    checkpointing is added, and a ``weight_decay_schedule`` setting as well is an error.

    Args:
        module: the mixin module.
        optimizer: the optimizer, after its LR scheduler and the adoption.
        decay_source: what set λ: ``None`` (the class default), ``"weight_decay"``, ``"ema_timescale_*"``, or
            ``"optimizer"`` (an optimizer given by class and its own ``weight_decay``).

    Raises:
        ValueError: an invalid schedule (from the core, naming the option); ``cosine`` / ``linear`` without
            ``total_steps`` when the trainer cannot estimate its steps; ``independent`` with the class-default
            ``weight_decay`` or with a λ of at least :data:`INDEPENDENT_LIMIT` not derived from a timescale.
    """
    setting = module.adamw_setting("weight_decay_schedule")
    existing = WeightDecayScheduler.of(optimizer)
    if existing is not None:
        if setting is not None:
            raise ValueError(
                f"`weight_decay_schedule`={setting!r} is set, but the optimizer returned by configure_optimizers "
                "already has a WeightDecayScheduler: remove one of them"
            )
        attach_checkpointing(optimizer)
        return existing
    if setting is None:
        return None
    schedule, groups = parse_weight_decay_schedule(setting)
    auto_total = False
    if schedule.uses_step and schedule.total_steps is None:
        total = module._estimated_total_steps()
        if total is None:
            raise ValueError(
                f"`weight_decay_schedule` {schedule.name!r} needs `total_steps`, and the trainer cannot estimate "
                "its optimizer steps (max_steps=-1 and an unsized dataloader?): give it, e.g. "
                f"{{name: {schedule.name}, total_steps: 1000}}, or set the trainer's max_steps"
            )
        schedule = schedule.with_total_steps(total)
        auto_total = True
    scheduler = WeightDecayScheduler(optimizer, schedule, groups=groups)
    try:
        if schedule.name == "independent":
            _check_independent(module, scheduler, decay_source)
    except ValueError:
        scheduler.remove()
        raise
    scheduler.__dict__[_AUTO_TOTAL] = auto_total
    attach_checkpointing(optimizer)
    return scheduler


def _check_independent(module: Any, scheduler: WeightDecayScheduler, decay_source: str | None) -> None:
    if decay_source in _TIMESCALE_OPTIONS:
        return  # λ = 1/τ from a timescale the user chose
    rows = [r for r in scheduler.group_rows() if r["follows"]]
    if decay_source is None:
        value = module.adamw_setting("weight_decay")
        # (None leaves λ to the optimizer's own default: what the groups hold now is what it would use)
        used = value if value is not None else (rows[0]["base_weight_decay"] if rows else None)
        default = f"the default {value!r}" if value is not None else "None, the optimizer's own default"
        shrink = (
            f" would shrink the weights by {_percent(float(used))} every step" if used is not None else ""
        )
        raise ValueError(
            f"`weight_decay_schedule` 'independent' takes λ as the per-step decay at the peak lr (typically 1e-5 "
            f"to 1e-3), and `weight_decay` is not given ({default}{shrink}): give `weight_decay` in per-step "
            "units, or `ema_timescale_epochs` / `ema_timescale_fraction`"
        )
    big = [r for r in rows if r["base_weight_decay"] >= INDEPENDENT_LIMIT]
    if big:
        row = big[0]
        lam = row["base_weight_decay"]
        where = "the optimizer's `weight_decay`" if decay_source == "optimizer" else "`weight_decay`"
        lr_max = row["lr_max"] or row["lr"]
        raise ValueError(
            f"`weight_decay_schedule` 'independent' takes λ as the per-step decay at the peak lr, and {where} "
            f"is {lam:g} for group {row['name']!r}: the weights would shrink by {_percent(lam)} every step (timescale "
            f"{1 / lam:.3g} steps). If {lam:g} is in torch's units, the per-step λ is {lam:g}·lr_max = "
            f"{lam * lr_max:.3g}: give that, or use `ema_timescale_epochs` / `ema_timescale_fraction` "
            f"(a per-step λ of at least {INDEPENDENT_LIMIT:g} is refused)"
        )


def _percent(fraction: float) -> str:
    """``0.001`` as ``0.1%``, ``0.05`` as ``5%``, ``2.0`` as ``200%``: never a misleading ``0%``."""
    percent = 100.0 * fraction
    return f"{percent:.0f}%" if abs(percent) >= 10 else f"{percent:.2g}%"


def refresh_total_steps(module: Any, optimizer: Optimizer) -> None:
    """The trainer's planned steps changed after ``configure_optimizers`` (a batch-size finder): a schedule
    whose length was filled from the trainer follows, with one line."""
    scheduler = WeightDecayScheduler.of(optimizer)
    if scheduler is None or not scheduler.__dict__.get(_AUTO_TOTAL):
        return
    total = module._estimated_total_steps()
    if total is not None and total != scheduler.schedule.total_steps:
        old = scheduler.schedule.total_steps
        scheduler.set_total_steps(total)
        rank_zero_info(
            f"WeightDecayScheduler: total_steps {old} -> {total} (the trainer's number of steps changed after "
            "configure_optimizers, e.g. a batch size finder)"
        )


# ----------------------------------------------------------------------------------------------- checkpoints


def attach_checkpointing(optimizer: Optimizer) -> None:
    """Save the scheduler's state inside the optimizer's state dict and restore it on load (once per optimizer)."""
    if optimizer.__dict__.get("_lightning_adamw_wd_checkpointing"):
        return
    optimizer.__dict__["_lightning_adamw_wd_checkpointing"] = True
    optimizer.register_state_dict_post_hook(_save_state)
    optimizer.register_load_state_dict_pre_hook(_load_state_pre)
    optimizer.register_load_state_dict_post_hook(_load_state_post)


def _save_state(optimizer: Optimizer, state_dict: dict[str, Any]) -> dict[str, Any]:
    scheduler = WeightDecayScheduler.of(optimizer)
    if scheduler is not None:
        state_dict[STATE_KEY] = scheduler.state_dict()
    return state_dict


def _load_state_pre(optimizer: Optimizer, state_dict: dict[str, Any]) -> None:
    optimizer.__dict__[_PENDING] = state_dict.get(STATE_KEY)


def _load_state_post(optimizer: Optimizer) -> None:
    saved = optimizer.__dict__.pop(_PENDING, None)
    scheduler = WeightDecayScheduler.of(optimizer)
    if scheduler is None:
        return
    if saved is None:
        # A checkpoint of a run without a schedule: the position is the trainer's global step, known once the
        # loops are restored (see continue_without_state).
        optimizer.__dict__[_MISSING_STATE] = True
        return
    optimizer.__dict__.pop(_MISSING_STATE, None)
    scheduler.load_state_dict(saved)
    if scheduler.resume_note:
        rank_zero_info(scheduler.resume_note)
        scheduler.resume_note = None


def continue_without_state(optimizer: Optimizer, global_step: int | None) -> None:
    """After a load whose checkpoint held no scheduler state: start the schedule at ``global_step`` (one line)."""
    if not optimizer.__dict__.pop(_MISSING_STATE, False):
        return
    scheduler = WeightDecayScheduler.of(optimizer)
    if scheduler is None or not global_step:
        return
    scheduler.step_count = int(global_step)
    scheduler.refresh()
    rank_zero_info(
        f"WeightDecayScheduler: the checkpoint holds no weight decay schedule (its run had none), so the "
        f"{scheduler.schedule.name!r} schedule starts at the step reached, {global_step} (counting every "
        "optimizer step of the earlier run as applied), not at its own step 0"
    )


# ----------------------------------------------------------------------------------------------- the table


def _fmt(value: float | None, spec: str = ".4g") -> str:
    if value is None:
        return "-"
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return format(value, spec)


def describe_weight_decay(
    optimizer: Optimizer,
    scheduler: WeightDecayScheduler | None,
    decay: TimescaleDecay | None,
    steps_per_epoch: float | None,
    total_steps: int | None,
) -> str | None:
    """Lines for the group table: the schedule, where λ came from, and per decayed group λ, the torch value
    its next step uses, and the EMA timescale τ = 1/(lr·λ) in steps, epochs and as a fraction of training
    (``lr`` = the group's peak lr; under ``"independent"`` τ = 1/λ).

    ``None`` when there is nothing to say (no schedule and no timescale option)."""
    if scheduler is None and (decay is None or decay.source == "weight_decay"):
        return None
    lines = []
    if scheduler is not None:
        lines.append(scheduler.describe())
    if decay is not None:
        lines.append(describe_timescale(decay))
    name = scheduler.schedule.name if scheduler is not None else "constant"
    rows = scheduler.group_rows() if scheduler is not None else None
    header = ("group", "λ", "weight_decay now", "peak lr", "τ steps", "τ epochs", "τ/run")
    table = [header]
    for index, group in enumerate(optimizer.param_groups):
        row = rows[index] if rows is not None else None
        lam = (
            float(row["base_weight_decay"])
            if row is not None
            else float(group.get(BASE_KEY, group.get("weight_decay", 0.0)))
        )
        if lam == 0.0:
            continue
        torch_value = float(group.get("weight_decay", 0.0))
        peak = peak_lr(group, (row or {}).get("lr_max"))
        tau = timescale_steps(peak, lam, schedule=name)
        table.append(
            (
                str(group.get("name", f"group{index}")),
                _fmt(lam),
                _fmt(torch_value),
                _fmt(peak),
                _fmt(tau, ".4g"),
                _fmt(tau / steps_per_epoch if steps_per_epoch and math.isfinite(tau) else None),
                _fmt(tau / total_steps if total_steps and math.isfinite(tau) else None),
            )
        )
    if len(table) > 1:
        widths = [max(len(r[i]) for r in table) for i in range(len(header))]
        lines.extend(
            "  ".join(
                cell.ljust(w) if i == 0 else cell.rjust(w)
                for i, (cell, w) in enumerate(zip(r, widths, strict=True))
            )
            for r in table
        )
    return "\n".join(lines)
