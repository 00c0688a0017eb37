"""The ``lightning-adamw`` command: a LightningCLI that keeps the decay / no-decay groups intact.

Stock LightningCLI turns a top-level ``optimizer:`` (or ``--optimizer AdamW``) into
``AdamW(model.parameters())`` and replaces the module's ``configure_optimizers``: the no-decay group is
silently lost and norms and biases are decayed. :class:`AdamWCLI` hands such an optimizer (and
``lr_scheduler``) to modules that use :class:`~lightning_adamw.DecoupledWeightDecayMixin` as factories instead,
so they receive the groups, built after the strategy has wrapped the model (FSDP-safe). Other modules get the
stock behaviour.

Run ``lightning-adamw fit --config configs/quickstart.yaml`` to train the built-in digits classifier
(``lightning_adamw.demo``) with the default CSV logger. The other configs in ``configs/`` (one GPU, DDP, many
nodes, FSDP, W&B, CPU override) compose with repeated ``--config``; ``docs/distributed.md`` has the command for
each case.

W&B is offline by default: when the logger is a ``WandbLogger`` and ``WANDB_MODE`` is unset, the CLI sets
``WANDB_MODE=offline`` before anything is built or launched, so every rank inherits it; ``WANDB_MODE=online``
logs live.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, instantiate_class
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities import rank_zero_info

from lightning_adamw.mixin import DecoupledWeightDecayMixin

__all__ = ["AdamWCLI", "main"]


class AdamWCLI(LightningCLI):
    """LightningCLI with group-preserving top-level optimizers and a CSV logger by default.

    Any LightningModule / LightningDataModule can be chosen with ``--model`` / ``--data`` (class paths), so a
    user's own model runs with the same configs. The default logger is a ``CSVLogger`` under
    ``lightning_logs/``.

    Example::

        lightning-adamw fit --config configs/quickstart.yaml
        lightning-adamw fit --optimizer AdamW --optimizer.lr 1e-3 --optimizer.weight_decay 0.1
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("subclass_mode_model", True)
        kwargs.setdefault("subclass_mode_data", True)
        kwargs.setdefault("seed_everything_default", 0)
        parser_kwargs = kwargs.setdefault("parser_kwargs", {})
        parser_kwargs.setdefault("prog", "lightning-adamw")
        super().__init__(*args, **kwargs)

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        # Only the logger gets a default. A default *model* would leak: jsonargparse keeps the init_args of the
        # default class that the user's class also accepts (lr, weight_decay, batch_size...) when --model
        # changes the class_path, so a user's model would silently train with the demo's hyperparameters.
        parser.set_defaults(
            {
                "trainer.logger": {
                    "class_path": f"{CSVLogger.__module__}.CSVLogger",
                    "init_args": {"save_dir": "."},
                }
            }
        )

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

    def _add_configure_optimizers_method_to_model(self, subcommand: str | None) -> None:
        if not isinstance(self.model, DecoupledWeightDecayMixin):
            super()._add_configure_optimizers_method_to_model(subcommand)
            return
        optimizer_init, scheduler_init = self._top_level_inits(subcommand)
        if optimizer_init is not None:
            self.model._lightning_adamw_optimizer_factory = _Factory(optimizer_init)
            init_args = optimizer_init.get("init_args") or {}
            shown = ", ".join(f"{k}={init_args[k]}" for k in ("lr", "weight_decay") if k in init_args)
            rank_zero_info(
                f"lightning-adamw: top-level optimizer {optimizer_init['class_path']}({shown}) receives the decay / "
                "no-decay parameter groups; the model's own lr / weight_decay / betas / eps settings are not used"
            )
        if scheduler_init is not None:
            self.model._lightning_adamw_scheduler_factory = _Factory(scheduler_init)

    def _top_level_inits(self, subcommand: str | None) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        """The ``optimizer`` / ``lr_scheduler`` configs LightningCLI registered as automatic, if given."""
        if not self.auto_configure_optimizers:
            return None, None
        parser = self._parser(subcommand)
        found: list[dict[str, Any] | None] = []
        for register in (parser._optimizers, parser._lr_schedulers):
            keys = [key for key, (_, link_to) in register.items() if link_to == "AUTOMATIC"]
            init = self._get(self.config_init, keys[0]) if len(keys) == 1 else None
            if init and not isinstance(init, dict):  # jsonargparse Namespace
                init = init.as_dict() if hasattr(init, "as_dict") else dict(init)
            found.append(init or None)
        return found[0], found[1]


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


class _Factory:
    """Instantiates a ``{class_path, init_args}`` config with a first positional argument (groups or optimizer)."""

    def __init__(self, init: dict[str, Any]) -> None:
        self.init = init

    def __call__(self, first: Any) -> Any:
        return instantiate_class(first, self.init)

    def __repr__(self) -> str:
        return f"_Factory({self.init.get('class_path')})"


def main(args: Sequence[str] | None = None) -> None:
    """Entry point of the ``lightning-adamw`` console script and ``python -m lightning_adamw``."""
    AdamWCLI(args=list(args) if args is not None else None)
