"""Checks of a parsed ``lightning-adamw`` config that stop the run before anything is built.

Each one is a setting that would otherwise be dropped or break training without a word:

* a non-finite number (``inf``, ``nan``; ``1e400`` parses to ``inf``) in the init args of an optimizer or
  scheduler, top-level (``--optimizer.weight_decay``) or injected into the model (``--model.optimizer.lr``),
  or in the optimizer settings a :class:`~lightning_adamw.DecoupledWeightDecayMixin` model reads
  (``--model.lr``, ``--model.betas``...): AdamW accepts ``weight_decay=inf`` and ``lr=inf`` and trains the
  weights to NaN;
* a top-level optimizer (or scheduler) and one injected into the model at the same time: only one of them can
  be used, and which one wins is not visible from the command line;
* a model-level ``lr`` / ``weight_decay`` / ``betas`` / ``eps`` given in this run (command line or config file)
  while the optimizer that trains is a top-level or injected one, which does not read them: it cannot be told
  which of the two values is meant.

Plain functions over the config as a dict; they raise ``ValueError`` with a message that names the options.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

from lightning_adamw.cli.optimizers import Registration, registered_config

__all__ = [
    "check_conflicting_optimizers",
    "check_finite_settings",
    "check_model_settings_used",
    "check_weight_decay_options",
    "injected_settings",
    "optimizer_replaces_model_settings",
    "unused_settings_message",
]

# Model init args LightningCLI injects optimizers / schedulers through (DecoupledWeightDecayMixin reads these).
INJECTED_OPTIMIZER = ("optimizer",)
INJECTED_SCHEDULER = ("lr_scheduler", "scheduler")
# The numeric optimizer / schedule settings DecoupledWeightDecayMixin reads from a model's hyperparameters.
MIXIN_NUMBERS = ("lr", "learning_rate", "weight_decay", "betas", "eps", "min_lr_ratio")
# The settings of the mixin's default AdamW, which an optimizer given by class (top-level or injected) replaces.
MODEL_OPTIMIZER_SETTINGS = ("lr", "learning_rate", "weight_decay", "betas", "eps")


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


def _replacing_optimizers(
    config: Mapping[str, Any], optimizer: Registration | None
) -> list[tuple[str, str, dict]]:
    """``(option, class path, init args)`` of the optimizers given by class that the mixin would build instead of
    its default AdamW: the top-level one and the one injected into the model."""
    found = []
    if optimizer is not None:
        top = registered_config(optimizer, config.get(optimizer.key))
        if top is not None:
            found.append((top.option, top.class_path, dict(top.init_args)))
    for key, value in injected_settings(config, INJECTED_OPTIMIZER).items():
        if isinstance(value, Mapping):
            found.append((_option(key), str(value.get("class_path")), dict(value.get("init_args") or {})))
        else:
            found.append((_option(key), str(value), {}))
    return found


def optimizer_replaces_model_settings(config: Mapping[str, Any], optimizer: Registration | None) -> bool:
    """Whether an optimizer given by class (top-level or injected) replaces the model's lr / weight_decay /
    betas / eps in this config."""
    return bool(_replacing_optimizers(config, optimizer))


def _unused_settings(
    config: Mapping[str, Any], names: Any, optimizer: Registration | None
) -> tuple[dict[str, Any], tuple[str, str, dict]] | None:
    args, _ = _model_args(config)
    given = {k: args.get(k) for k in MODEL_OPTIMIZER_SETTINGS if k in names}
    replacing = _replacing_optimizers(config, optimizer)
    if not given or not replacing:
        return None
    return given, replacing[0]


def _describe_optimizer(option: str, class_path: str, init_args: dict) -> str:
    own = ", ".join(f"{k}={init_args[k]}" for k in ("lr", "weight_decay", "betas", "eps") if k in init_args)
    return f"{option} {class_path}{f' ({own})' if own else ''}"


def check_model_settings_used(config: Mapping[str, Any], names: Any, optimizer: Registration | None) -> None:
    """Refuse model-level optimizer settings given on the command line that the optimizer which trains does not
    read.

    A :class:`~lightning_adamw.DecoupledWeightDecayMixin` model builds its default AdamW from its ``lr``,
    ``weight_decay``, ``betas`` and ``eps``; a top-level ``--optimizer`` (for instance from ``configs/gpu.yaml``)
    or an injected ``--model.optimizer`` is built from its own arguments instead. ``--model.lr 0.1`` given
    together with one of them would be accepted, recorded in ``hparams.yaml`` and not used.

    Args:
        config: the parsed config of the subcommand, as a dict.
        names: the model settings given on the command line (see
            :func:`lightning_adamw.cli.given.command_line_model_settings`).
        optimizer: the automatic optimizer registration, or ``None``.

    Raises:
        ValueError: naming the model options, the optimizer option and its values, and the two ways out.
    """
    found = _unused_settings(config, names, optimizer)
    if found is None:
        return
    given, (option, class_path, init_args) = found
    _, prefix = _model_args(config)
    shown = " and ".join(f"{_option(f'{prefix}.{k}')} {v}" for k, v in given.items())
    into = " ".join(f"{option}.{'lr' if k == 'learning_rate' else k} {v}" for k, v in given.items())
    raise ValueError(
        f"{shown} given, but the optimizer that trains is {_describe_optimizer(option, class_path, init_args)}, "
        f"which is built from its own arguments and does not read the model's {' / '.join(given)}: it cannot be "
        f"told which value is meant. Give the value{'s' if len(given) > 1 else ''} to that optimizer ({into}), "
        f"or drop it ({option} null) to train with the model's own AdamW"
    )


def unused_settings_message(
    config: Mapping[str, Any], names: Any, optimizer: Registration | None
) -> str | None:
    """A warning for model-level optimizer settings set in a config file (not on the command line) that the
    optimizer which trains does not read, naming them and the optimizer; ``None`` when there are none.

    A config that writes out a model's settings (``configs/quickstart.yaml``) combined with a top-level
    ``--optimizer`` is a documented way to swap the optimizer, so this is a warning, not an error."""
    found = _unused_settings(config, names, optimizer)
    if found is None:
        return None
    given, (option, class_path, init_args) = found
    shown = ", ".join(f"{k}={v}" for k, v in given.items())
    return (
        f"lightning-adamw: the model's {shown} (set in a config file) are not used: the optimizer that trains is "
        f"{_describe_optimizer(option, class_path, init_args)}, built from its own arguments. To train with "
        f"them, give them to it ({', '.join(f'{option}.{k}' for k in given)}) or drop {option}"
    )


def check_weight_decay_options(
    config: Mapping[str, Any],
    given: Mapping[str, Any] | None,
    optimizer: Registration | None,
    top_level_schedule: Any = None,
) -> None:
    """Refuse, before anything is built, a weight decay schedule the core refuses and two ways of setting λ.

    Checks ``weight_decay_schedule`` (the model's argument and the top-level ``--weight_decay_schedule``) with
    :func:`lightning_adamw.weight_decay.parse_weight_decay_schedule`, both given with different values, and
    ``ema_timescale_epochs`` / ``ema_timescale_fraction`` given together with each other, with the model's
    ``weight_decay`` given in this run, or with an optimizer given by class whose own ``weight_decay`` is set.

    Args:
        config: the parsed config of the subcommand, as a dict.
        given: the config of the subcommand as this run gives it, without defaults (see
            :func:`lightning_adamw.cli.given.given_config`; ``None``: unknown, then no ``weight_decay`` is
            compared and the mixin still refuses a timescale with an explicit model ``weight_decay``).
        optimizer: the automatic optimizer registration, or ``None``.
        top_level_schedule: the value of the top-level ``--weight_decay_schedule``.

    Raises:
        ValueError: naming the options.
    """
    from lightning_adamw.weight_decay import check_timescale_options, parse_weight_decay_schedule

    args, prefix = _model_args(config)
    schedules = [
        (_option(f"{prefix}.weight_decay_schedule"), args.get("weight_decay_schedule")),
        ("--weight_decay_schedule", top_level_schedule),
    ]
    for option, value in schedules:
        if value is not None:
            try:
                parse_weight_decay_schedule(value)
            except (TypeError, ValueError) as err:
                raise ValueError(f"{option}: {err}") from None
    if all(v is not None for _, v in schedules) and schedules[0][1] != schedules[1][1]:
        raise ValueError(
            f"{schedules[0][0]} {schedules[0][1]!r} and --weight_decay_schedule {schedules[1][1]!r} are both "
            "given; give one"
        )
    timescales = {
        k: args.get(k) for k in ("ema_timescale_epochs", "ema_timescale_fraction") if args.get(k) is not None
    }
    if not timescales:
        return
    given_model, _ = _model_args(given or {})
    explicit = given_model.get("weight_decay")
    try:
        check_timescale_options(
            explicit, timescales.get("ema_timescale_epochs"), timescales.get("ema_timescale_fraction")
        )
    except (TypeError, ValueError) as err:
        names = (["weight_decay"] if explicit is not None else []) + list(timescales)
        raise ValueError(f"{' and '.join(_option(f'{prefix}.{k}') for k in names)}: {err}") from None
    # The optimizer's own weight_decay counts when this run gives it (jsonargparse fills in the class default).
    for option, class_path, init_args in _replacing_optimizers(given or {}, optimizer):
        if init_args.get("weight_decay") is not None:
            name = next(iter(timescales))
            raise ValueError(
                f"{_option(f'{prefix}.{name}')} and {option}.weight_decay ({class_path}, weight_decay="
                f"{init_args['weight_decay']}) are both given: they are two ways to set the same decay "
                f"(λ = 1/(lr·τ), with the optimizer's lr); drop {option}.weight_decay from the optimizer's "
                "arguments, or the timescale"
            )
