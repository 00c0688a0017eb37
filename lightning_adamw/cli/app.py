"""The ``lightning-adamw`` command: a LightningCLI that keeps the decay / no-decay groups and runs what it is told.

Stock LightningCLI turns a top-level ``optimizer:`` (or ``--optimizer AdamW``) into
``AdamW(model.parameters())`` and replaces the module's ``configure_optimizers``: the no-decay group is
silently lost and norms and biases are decayed. :class:`AdamWCLI` hands such an optimizer (and
``lr_scheduler``) to modules that use :class:`~lightning_adamw.DecoupledWeightDecayMixin` as factories instead,
so they receive the groups, built after the strategy has wrapped the model (FSDP-safe). Other modules get the
stock behaviour, with a warning when their norms and biases are decayed.

What the command line says is what runs (``lightning_adamw.cli.parser``, ``lightning_adamw.cli.checks``):

* a class changed after a config (``--config configs/quickstart.yaml --model my_pkg.MyModel``) starts from its
  own defaults plus what is given for it after the change; an info line lists what was not carried over;
* abbreviated options (``--trainer.max_epoch``) are errors that name the options they could mean;
* ``inf`` / ``nan`` in an optimizer's or scheduler's arguments, and a top-level optimizer given together with
  one injected into the model, are errors that name the options;
* a module's own ``configure_optimizers`` is replaced, with a warning, when a top-level ``--optimizer`` is
  given (as stock LightningCLI does), and gets the groups through the mixin's ``configure_optimizers``;
* a top-level ``WarmupCosineLR`` (or ``OneCycleLR``) is stepped every optimizer step over the whole run, also
  for modules without the mixin.

``lightning-adamw fit`` with no config trains the built-in digits classifier (``lightning_adamw.demo``, the
same job as ``configs/quickstart.yaml``). The other configs in ``configs/`` (one GPU, DDP, many nodes, FSDP,
W&B, CPU override) compose with repeated ``--config``; ``docs/distributed.md`` has the command for each case.

W&B is offline by default: when the logger is a ``WandbLogger`` and ``WANDB_MODE`` is unset, the CLI sets
``WANDB_MODE=offline`` before anything is built or launched, so every rank inherits it; ``WANDB_MODE=online``
logs live.
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from types import MethodType
from typing import Any, NoReturn

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, LRSchedulerTypeUnion
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.optim import Optimizer

from lightning_adamw.cli.checks import (
    MODEL_OPTIMIZER_SETTINGS,
    _model_args,
    check_conflicting_optimizers,
    check_finite_settings,
    check_model_settings_used,
    check_weight_decay_options,
    optimizer_replaces_model_settings,
    unused_settings_message,
)
from lightning_adamw.cli.given import command_line_model_settings, given_config, given_model_args, model_args
from lightning_adamw.cli.optimizers import (
    ClassConfig,
    Factory,
    Registration,
    automatic_registrations,
    registered_config,
    step_interval_scheduler_config,
)
from lightning_adamw.cli.parser import AdamWArgumentParser, class_change_rules, import_path, same_class
from lightning_adamw.cli.resume import split_checkpoint_hparams
from lightning_adamw.mixin import DecoupledWeightDecayMixin
from lightning_adamw.weight_decay import WeightDecayScheduler

__all__ = ["BUILT_IN_JOB", "AdamWCLI", "main"]

# `lightning-adamw fit` with no config: the built-in digits job (configs/quickstart.yaml without the CPU pin).
# The model class only: its own __init__ defaults are the job's settings, so a class given with --model
# starts from *its* defaults (see lightning_adamw.cli.parser). DigitsClassifier brings its own data when no --data is given.
BUILT_IN_JOB: dict[str, Any] = {
    "model": {"class_path": "lightning_adamw.demo.DigitsClassifier"},
    "trainer.max_epochs": 8,
    "trainer.log_every_n_steps": 10,
}


class AdamWCLI(LightningCLI):
    """LightningCLI with group-preserving top-level optimizers, checked options and a CSV logger by default.

    Any LightningModule / LightningDataModule can be chosen with ``--model`` / ``--data`` (class paths). Without
    ``--model`` (or a config that sets it), the built-in job runs: :class:`~lightning_adamw.demo.DigitsClassifier`
    on scikit-learn's digits for 8 epochs. The default logger is a ``CSVLogger`` under ``lightning_logs/``.

    Args:
        *args: as for ``LightningCLI``.
        **kwargs: as for ``LightningCLI``; ``subclass_mode_model`` / ``subclass_mode_data`` default to ``True``,
            ``seed_everything_default`` to ``0`` and ``parser_class`` to
            :class:`~lightning_adamw.cli.parser.AdamWArgumentParser`.

    Errors (exit code 2, message naming the options): abbreviated options, non-finite optimizer or scheduler
    arguments, a top-level optimizer (scheduler) together with one injected into the model, a top-level
    scheduler that no optimizer would use.

    Example::

        lightning-adamw fit                                      # the built-in job
        lightning-adamw fit --config configs/quickstart.yaml --optimizer AdamW --optimizer.weight_decay 0.1
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("seed_everything_default", 0)
        kwargs.setdefault("parser_class", AdamWArgumentParser)
        parser_kwargs = kwargs.setdefault("parser_kwargs", {})
        parser_kwargs.setdefault("prog", "lightning-adamw")
        super().__init__(*args, **kwargs)

    # ------------------------------------------------------------------------------------------- parsing

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        defaults: dict[str, Any] = {
            "trainer.logger": {
                "class_path": f"{CSVLogger.__module__}.CSVLogger",
                "init_args": {"save_dir": "."},
            }
        }
        if self.model_class is None:  # the generic command, not a CLI made for one model
            defaults.update(BUILT_IN_JOB)
        parser.set_defaults(defaults)
        parser.add_argument(
            "--weight_decay_schedule",
            type=dict[str, Any] | str | None,
            default=None,
            help=(
                "Weight decay over time for a DecoupledWeightDecayMixin model, whatever its __init__ takes: "
                "constant, independent, adamc, cosine, linear, or a dict with options ({name: cosine, "
                "final_ratio: 0.1}). Same as the model's own weight_decay_schedule setting; giving both is an error."
            ),
        )

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        """Parse so that a changed class starts from its own defaults, then check the result (see module doc)."""
        self._lightning_adamw_args = args
        self._lightning_adamw_given: dict[str, Any] | bool | None = False  # computed on first use
        with class_change_rules(report=lambda change: rank_zero_info(change.message())):
            super().parse_arguments(parser, args)
        subcommand = self.config.get("subcommand")
        config = self.config.get(subcommand) if subcommand else self.config
        target = self._parser(subcommand)
        try:
            optimizer, scheduler = (
                automatic_registrations(target) if self.auto_configure_optimizers else (None, None)
            )
            plain = config.as_dict() if hasattr(config, "as_dict") else dict(config)
            mixin = self._mixin_model(plain)
            check_finite_settings(plain, optimizer, scheduler, mixin_model=mixin)
            check_conflicting_optimizers(plain, optimizer, scheduler)
            if mixin and optimizer_replaces_model_settings(plain, optimizer):
                self._check_model_settings_used(plain, optimizer, subcommand)
            model_init, _ = _model_args(plain)
            if plain.get("weight_decay_schedule") is not None or any(
                model_init.get(k) is not None
                for k in ("weight_decay_schedule", "ema_timescale_epochs", "ema_timescale_fraction")
            ):
                if plain.get("weight_decay_schedule") is not None and not mixin:
                    raise ValueError(
                        "--weight_decay_schedule needs a model that uses DecoupledWeightDecayMixin (the model "
                        f"class {model_args(plain)[0]} does not)"
                    )
                has_timescale = any(
                    model_init.get(k) is not None for k in ("ema_timescale_epochs", "ema_timescale_fraction")
                )
                given = self._given() if has_timescale else None
                section = given.get(subcommand) if given is not None and subcommand else given
                check_weight_decay_options(plain, section, optimizer, plain.get("weight_decay_schedule"))
        except ValueError as err:
            target.error(f"lightning-adamw: {err}")

    def _check_model_settings_used(
        self, config: dict[str, Any], optimizer: Any, subcommand: str | None
    ) -> None:
        """A model ``lr`` / ``weight_decay`` / ``betas`` / ``eps`` that the optimizer given by class would not read:
        given on the command line, an error; set in a config file, a warning naming them."""
        command_line = command_line_model_settings(self._lightning_adamw_args, MODEL_OPTIMIZER_SETTINGS)
        check_model_settings_used(config, command_line, optimizer)
        _, given = given_model_args(self._given(), subcommand)
        message = unused_settings_message(config, {k for k in given if k not in command_line}, optimizer)
        if message:
            rank_zero_warn(message, category=UserWarning)

    def _given(self) -> dict[str, Any] | None:
        """What this command gives (command line and config files, no defaults); see
        :mod:`lightning_adamw.cli.given`. Parsed once, on first use."""
        if self._lightning_adamw_given is False:
            self._lightning_adamw_given = given_config(self.parser, self._lightning_adamw_args)
        return self._lightning_adamw_given  # type: ignore[return-value]

    def _parse_ckpt_path(self) -> None:
        """``--ckpt_path``: the checkpoint's hyperparameters fill in what this run does not give (stock
        LightningCLI lets them overwrite the command line); one info line says what came from where."""
        subcommand = self.config.get("subcommand")
        if not subcommand:
            return
        ckpt_path = self.config[subcommand].get("ckpt_path")
        if not ckpt_path or not Path(ckpt_path).is_file():
            return
        checkpoint = torch.load(ckpt_path, weights_only=True, map_location="cpu")
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        hparams.pop("_instantiator", None)
        if not hparams:
            return
        given = self._given()
        current_class, current_args = model_args(self.config[subcommand])
        if given is None:
            # Cannot tell what was given: count every argument that differs from the class's default as given.
            given_class, given_args = None, _non_default_args(current_class, current_args)
        else:
            given_class, given_args = given_model_args(given, subcommand)
        split = split_checkpoint_hparams(
            hparams, current_class, current_args, given_class, given_args, same_class=same_class
        )
        message = split.message(str(ckpt_path))
        if split.other_class is None and split.applied:
            try:
                # A silent class-change rule: a class taken from the checkpoint starts from its own defaults.
                with class_change_rules():
                    self.config = self.parser.parse_object(
                        {subcommand: {"model": split.config()}}, self.config
                    )
            except SystemExit:
                sys.stderr.write("Parsing of ckpt_path hyperparameters failed!\n")
                raise
        if message:
            rank_zero_info(message)

    def _mixin_model(self, config: dict[str, Any]) -> bool:
        """Whether the configured model class uses the mixin (``False`` if it cannot be told before it is built)."""
        model = config.get("model")
        cls = (
            import_path(model["class_path"]) if isinstance(model, dict) and model.get("class_path") else None
        )
        if cls is None:
            cls = self.model_class
        return isinstance(cls, type) and issubclass(cls, DecoupledWeightDecayMixin)

    def after_instantiate_classes(self) -> None:
        """Hand a top-level ``--weight_decay_schedule`` to the model (it wins over nothing: both given is a parse
        error); the model's record of passed arguments is dropped (see ``AdamWSettings.argument_passed``)."""
        if isinstance(getattr(self, "model", None), DecoupledWeightDecayMixin):
            # jsonargparse passes every argument, defaults too: which ones the user gave is the CLI's to check
            self.model.forget_passed_arguments()
        config_init = getattr(self, "config_init", None)  # absent when a subclass builds nothing
        value = self._get(config_init, "weight_decay_schedule") if config_init is not None else None
        if value is not None and isinstance(getattr(self, "model", None), DecoupledWeightDecayMixin):
            self.model.override_setting("weight_decay_schedule", value, "--weight_decay_schedule")

    def before_instantiate_classes(self) -> None:
        """Default W&B to offline (through ``WANDB_MODE``) before the logger is built."""
        config = self.config.get(self.subcommand) if self.subcommand else self.config
        logger = config.get("trainer", {}).get("logger") if config is not None else None
        if _uses_wandb(logger) and not os.environ.get("WANDB_MODE"):
            # An environment variable, not the logger's `offline` flag: child processes inherit it, and
            # `WANDB_MODE=online` (or `wandb offline/online`-style tooling) switches without editing configs.
            os.environ["WANDB_MODE"] = "offline"
            rank_zero_info(
                "lightning-adamw: W&B runs offline (WANDB_MODE was unset, now 'offline'); runs are written under "
                "the logger's save_dir. Set WANDB_MODE=online to log live, or `wandb sync` the run directory."
            )

    # ------------------------------------------------------------------------------------------- results

    def after_fit(self) -> None:
        """Print the final validation metrics, so a run ends with its result."""
        self._print_metrics("fit", prefixes=("val",))

    def after_validate(self) -> None:
        self._print_metrics("validate", prefixes=("val",))

    def after_test(self) -> None:
        self._print_metrics("test", prefixes=("test",))

    def _print_metrics(self, stage: str, prefixes: tuple[str, ...]) -> None:
        metrics = {
            k: float(v)
            for k, v in sorted(self.trainer.callback_metrics.items())
            if k.startswith(prefixes) and getattr(v, "numel", lambda: 1)() == 1
        }
        if metrics:
            shown = ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
            rank_zero_info(f"lightning-adamw {stage} finished: {shown}")

    # ------------------------------------------------------------------------------------------- optimizers

    @staticmethod
    def configure_optimizers(
        lightning_module: LightningModule,
        optimizer: Optimizer,
        lr_scheduler: LRSchedulerTypeUnion | None = None,
    ) -> Any:
        """LightningCLI's ``configure_optimizers`` for modules without the mixin, with per-step schedules
        (``WarmupCosineLR``, ``OneCycleLR``) stepped every optimizer step over the whole run."""
        config = step_interval_scheduler_config(lr_scheduler, getattr(lightning_module, "_trainer", None))
        if config is not None:
            return {"optimizer": optimizer, "lr_scheduler": config}
        return LightningCLI.configure_optimizers(lightning_module, optimizer, lr_scheduler)

    def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
        if not self.auto_configure_optimizers:
            return
        optimizer_reg, scheduler_reg = automatic_registrations(self._parser(subcommand))
        optimizer = self._registered(optimizer_reg)
        scheduler = self._registered(scheduler_reg)
        if isinstance(self.model, DecoupledWeightDecayMixin):
            self._configure_mixin_module(optimizer, scheduler)
            return
        name = type(self.model).__qualname__
        if scheduler is not None and optimizer is None:
            self._error(
                f"{scheduler.option} {scheduler.class_path} is given without a top-level optimizer: {name} does "
                "not use DecoupledWeightDecayMixin and LightningCLI applies a top-level scheduler only together "
                f"with a top-level optimizer. Give --optimizer too, or drop {scheduler.option}"
            )
        if optimizer is not None:
            _warn_decays_everything(name, optimizer)
        super()._add_configure_optimizers_method_to_model(subcommand)

    def _registered(self, registration: Registration | None) -> ClassConfig | None:
        if registration is None:
            return None
        return registered_config(registration, self._get(self.config_init, registration.key))

    def _configure_mixin_module(self, optimizer: ClassConfig | None, scheduler: ClassConfig | None) -> None:
        """Hand the top-level optimizer / scheduler to the mixin as factories (the groups go to them).

        Contract with :class:`~lightning_adamw.DecoupledWeightDecayMixin`: ``_lightning_adamw_optimizer_factory``
        (groups -> optimizer) and ``_lightning_adamw_scheduler_factory`` (optimizer -> scheduler) on the module
        win over its own settings and injected callables.
        """
        if optimizer is None and scheduler is None:
            return
        model = self.model
        name = type(model).__qualname__
        own = _own_configure_optimizers(type(model))
        if own is not None and optimizer is None and scheduler is not None:
            self._error(
                f"{scheduler.option} {scheduler.class_path} would not be used: {name} writes its own "
                "configure_optimizers, which builds its own optimizer and schedule. Give a top-level --optimizer "
                f"too (both then replace {name}.configure_optimizers), or drop {scheduler.option}"
            )
        if optimizer is not None:
            model._lightning_adamw_optimizer_factory = Factory(optimizer)
            if own is not None:
                defined = (
                    "" if own.__qualname__ == f"{name}.configure_optimizers" else f" ({own.__qualname__})"
                )
                rank_zero_warn(
                    f"lightning-adamw: `{name}.configure_optimizers`{defined} is overridden by the "
                    f"top-level {optimizer.option} {optimizer.shown()}: the run uses DecoupledWeightDecayMixin."
                    f"configure_optimizers, which gives {_short(optimizer.class_path)} the decay / no-decay "
                    f"groups of {name}. Drop {optimizer.option} to train with {name}.configure_optimizers.",
                    category=UserWarning,
                )
        if scheduler is not None:
            model._lightning_adamw_scheduler_factory = Factory(scheduler)
        method = _reporting(DecoupledWeightDecayMixin.configure_optimizers, optimizer, scheduler)
        model.configure_optimizers = MethodType(method, model)  # an instance attribute, as LightningCLI does

    def _error(self, message: str) -> NoReturn:
        self._parser(self.subcommand).error(f"lightning-adamw: {message}")
        raise AssertionError("unreachable")  # parser.error exits or raises


def _short(class_path: str) -> str:
    return class_path.rsplit(".", 1)[-1]


def _own_configure_optimizers(cls: type) -> Callable[..., Any] | None:
    """The ``configure_optimizers`` a module class defines in place of the mixin's, or ``None``.

    The first class in the MRO that defines the method decides. ``LightningModule``'s own stub (the mixin listed
    after ``LightningModule`` in the bases) is not a user's method: the mixin's is what the user meant.
    """
    for klass in inspect.getmro(cls):
        if "configure_optimizers" in vars(klass):
            if klass is DecoupledWeightDecayMixin or klass is LightningModule:
                return None
            return vars(klass)["configure_optimizers"]
    return None


def _reporting(
    configure: Callable[..., Any], optimizer: ClassConfig | None, scheduler: ClassConfig | None
) -> Callable[..., Any]:
    """``configure`` plus one info line, from the objects it built, on what trains: optimizer, groups, schedule."""

    def configure_optimizers(module: Any) -> Any:
        result = configure(module)
        rank_zero_info(_describe(result, optimizer, scheduler))
        return result

    configure_optimizers.__doc__ = configure.__doc__
    return configure_optimizers


def _describe(result: Any, optimizer_config: ClassConfig | None, scheduler_config: ClassConfig | None) -> str:
    optimizer = result["optimizer"] if isinstance(result, dict) else result
    groups = ", ".join(
        f"{g.get('name', i)} (lr={g.get('initial_lr', g['lr']):g}, weight_decay={g.get('weight_decay', 0.0):g}, "
        f"{len(g['params'])} tensors)"
        for i, g in enumerate(optimizer.param_groups)
    )
    cls = type(optimizer)
    line = f"lightning-adamw: optimizer {cls.__module__}.{cls.__qualname__}"
    if optimizer_config is not None:
        line += f" from the top-level {optimizer_config.option} (the model's own lr / weight_decay / betas / eps are not used)"
    line += f", groups {groups}; "
    scheduler = result.get("lr_scheduler") if isinstance(result, dict) else None
    if scheduler is None:
        line += "no lr scheduler"
    else:
        sched = scheduler["scheduler"] if isinstance(scheduler, dict) else scheduler
        interval = scheduler.get("interval", "epoch") if isinstance(scheduler, dict) else "epoch"
        where = (
            f"the top-level {scheduler_config.option}"
            if scheduler_config is not None
            else "the model's own settings (lr_scheduler / lr_schedule)"
        )
        line += f"lr scheduler {type(sched).__qualname__} from {where}, stepped every {interval}"
    wd_scheduler = WeightDecayScheduler.of(optimizer)
    if wd_scheduler is not None:
        line += f"; {wd_scheduler.describe()}"
    return line


def _non_default_args(class_path: str | None, args: dict[str, Any]) -> dict[str, Any]:
    """The arguments that differ from the class's ``__init__`` defaults (all of them if those cannot be read)."""
    cls = import_path(class_path) if class_path else None
    try:
        parameters = inspect.signature(cls).parameters if isinstance(cls, type) else {}
    except (TypeError, ValueError):
        parameters = {}
    return {
        k: v
        for k, v in args.items()
        if k not in parameters
        or parameters[k].default is inspect.Parameter.empty
        or parameters[k].default != v
    }


def _warn_decays_everything(model_name: str, optimizer: ClassConfig) -> None:
    """Stock LightningCLI gives a module without the mixin ``model.parameters()`` as one group: say so when that
    group is decayed."""
    weight_decay = optimizer.init_args.get("weight_decay")
    if weight_decay is None:
        try:
            parameter = inspect.signature(import_path(optimizer.class_path)).parameters.get("weight_decay")
            weight_decay = parameter.default if parameter is not None else 0.0
        except (TypeError, ValueError):  # no signature: say it conditionally rather than not at all
            weight_decay = None
    if weight_decay == 0:
        return
    shown = "" if weight_decay is None else f" at weight_decay={weight_decay}"
    rank_zero_warn(
        f"lightning-adamw: {model_name} does not use DecoupledWeightDecayMixin, so the top-level "
        f"{optimizer.option} {optimizer.class_path} gets model.parameters() as one group (stock LightningCLI): "
        f"norm weights and biases are decayed too{shown}. Put DecoupledWeightDecayMixin first in its bases for "
        "decay / no-decay groups.",
        category=UserWarning,
    )


def _uses_wandb(logger: Any) -> bool:
    """Whether a ``trainer.logger`` config value (class path, config dict, instance or list of them) is W&B."""
    if isinstance(logger, (list, tuple)):
        return any(_uses_wandb(item) for item in logger)
    if logger is None or isinstance(logger, bool):
        return False
    if isinstance(logger, str):
        class_path = logger
    elif hasattr(logger, "get"):  # jsonargparse Namespace or dict
        class_path = logger.get("class_path") or ""
    else:  # an instance
        class_path = f"{type(logger).__module__}.{type(logger).__qualname__}"
    return str(class_path).rsplit(".", 1)[-1] == "WandbLogger"


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightning-adamw`` console script and ``python -m lightning_adamw``."""
    AdamWCLI(args=list(args) if args is not None else None)
