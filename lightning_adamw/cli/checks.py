"""Checks of a parsed ``lightning-adamw`` config that stop the run before anything is built.

Each one is a setting that would otherwise be dropped or break training without a word:

* a non-finite number (``inf``, ``nan``; ``1e400`` parses to ``inf``) in the init args of an optimizer or
  scheduler, top-level (``--optimizer.weight_decay``) or injected into the model (``--model.optimizer.lr``),
  or in the optimizer settings a :class:`~lightning_adamw.DecoupledWeightDecayMixin` model reads
  (``--model.lr``, ``--model.betas``...): AdamW accepts ``weight_decay=inf`` and ``lr=inf`` and trains the
  weights to NaN;
* a top-level optimizer (or scheduler) and one injected into the model at the same time: only one of them can
  be used, and which one wins is not visible from the command line.

Plain functions over the config as a dict; they raise ``ValueError`` with a message that names the options.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

from lightning_adamw.cli.optimizers import Registration, registered_config

__all__ = ["check_conflicting_optimizers", "check_finite_settings", "injected_settings"]

# Model init args LightningCLI injects optimizers / schedulers through (DecoupledWeightDecayMixin reads these).
INJECTED_OPTIMIZER = ("optimizer",)
INJECTED_SCHEDULER = ("lr_scheduler", "scheduler")
# The numeric optimizer / schedule settings DecoupledWeightDecayMixin reads from a model's hyperparameters.
MIXIN_NUMBERS = ("lr", "learning_rate", "weight_decay", "betas", "eps", "min_lr_ratio")


def _model_args(config: Mapping[str, Any]) -> tuple[Mapping[str, Any], str]:
    """The model's init args and their key prefix (``model.init_args`` in subclass mode, else ``model``)."""
    model = config.get("model")
    if not isinstance(model, Mapping):
        return {}, "model"
    if "class_path" in model:
        return model.get("init_args") or {}, "model.init_args"
    return model, "model"


def injected_settings(config: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """``{config key: value}`` of the model init args in ``names`` that hold a class config (not ``None``)."""
    args, prefix = _model_args(config)
    return {f"{prefix}.{name}": args[name] for name in names if args.get(name) not in (None, {})}


def _option(key: str) -> str:
    """The command-line spelling of a config key: ``model.init_args.optimizer.init_args.lr`` ->
    ``--model.optimizer.lr`` (jsonargparse accepts both)."""
    return "--" + key.replace(".init_args.", ".")


def _nonfinite(value: Any, key: str) -> Iterator[tuple[str, Any]]:
    if isinstance(value, bool):
        return
    if isinstance(value, float):
        if not math.isfinite(value):
            yield key, value
    elif isinstance(value, (list, tuple)):
        if any(isinstance(v, float) and not isinstance(v, bool) and not math.isfinite(v) for v in value):
            yield key, value
    elif isinstance(value, Mapping):
        for sub_key, sub_value in value.items():
            yield from _nonfinite(sub_value, f"{key}.{sub_key}")


def _class_settings(
    config: Mapping[str, Any],
    optimizer: Registration | None,
    scheduler: Registration | None,
    mixin_model: bool,
) -> Iterator[tuple[str, Mapping[str, Any]]]:
    """``(key prefix, settings)`` of every optimizer / scheduler config the run may build."""
    for registration in (optimizer, scheduler):
        if registration is None:
            continue
        value = config.get(registration.key)
        if registered_config(registration, value) is None:
            continue
        if registration.fixed_class is not None:
            yield registration.key, value
        else:
            yield f"{registration.key}.init_args", value.get("init_args") or {}
    for key, value in injected_settings(config, INJECTED_OPTIMIZER + INJECTED_SCHEDULER).items():
        if isinstance(value, Mapping):
            yield f"{key}.init_args", value.get("init_args") or {}
    if mixin_model:
        args, prefix = _model_args(config)
        yield prefix, {name: args[name] for name in MIXIN_NUMBERS if name in args}


def check_finite_settings(
    config: Mapping[str, Any],
    optimizer: Registration | None,
    scheduler: Registration | None,
    mixin_model: bool = False,
) -> None:
    """Refuse ``inf`` / ``nan`` in the optimizer and scheduler settings of a parsed config.

    Args:
        config: the parsed config of the subcommand, as a dict.
        optimizer: the automatic optimizer registration (see :func:`~lightning_adamw.cli.optimizers.
            automatic_registrations`), or ``None``.
        scheduler: the automatic scheduler registration, or ``None``.
        mixin_model: whether the model uses :class:`~lightning_adamw.DecoupledWeightDecayMixin`; then its
            ``lr`` / ``weight_decay`` / ``betas`` / ``eps`` / ``min_lr_ratio`` arguments are checked too.

    Raises:
        ValueError: naming every offending option, e.g. ``--optimizer.weight_decay (optimizer.init_args.
            weight_decay) must be a finite number, got inf``.
    """
    problems = []
    for prefix, settings in _class_settings(config, optimizer, scheduler, mixin_model):
        for key, value in _nonfinite(dict(settings), prefix):
            what = "hold finite numbers" if isinstance(value, (list, tuple)) else "be a finite number"
            hint = " (1e400 and .inf are read as inf)" if "inf" in str(value) else ""
            problems.append(f"{_option(key)} ({key}) must {what}, got {value}{hint}")
    if problems:
        raise ValueError("; ".join(problems))


def check_conflicting_optimizers(
    config: Mapping[str, Any], optimizer: Registration | None, scheduler: Registration | None
) -> None:
    """Refuse a top-level optimizer (scheduler) given together with one injected into the model.

    Raises:
        ValueError: naming both options and how to drop one.
    """
    problems = []
    for registration, names, what in (
        (optimizer, INJECTED_OPTIMIZER, "optimizer"),
        (scheduler, INJECTED_SCHEDULER, "scheduler"),
    ):
        if registration is None:
            continue
        top = registered_config(registration, config.get(registration.key))
        if top is None:
            continue
        for key, value in injected_settings(config, names).items():
            injected = value.get("class_path") if isinstance(value, Mapping) else value
            drop = f"{_option(key)} null"
            if registration.fixed_class is None:  # a fixed-class option cannot be set to null
                drop = f"{top.option} null, or {drop}"
            problems.append(
                f"two {what}s are given: the top-level {top.option} ({top.class_path}) and {_option(key)} "
                f"({key}: {injected}); only one of them can be used. Drop one: {drop}"
            )
    if problems:
        raise ValueError("; ".join(problems))
