"""``DecoupledWeightDecayMixin``: a ``configure_optimizers`` that builds decay / no-decay groups.

The Lightning shell over :mod:`lightning_adamw.param_groups`. Put the mixin first in the bases::

    class MyModel(DecoupledWeightDecayMixin, LightningModule): ...

Settings are read, in this order, from ``self.hparams`` (``save_hyperparameters()``), from attributes of the
module, and from the class defaults in :attr:`DecoupledWeightDecayMixin.adamw_defaults`. The optimizer is, in
this order: the one LightningCLI was given at top level (``--optimizer``), the ``OptimizerCallable`` injected
into ``__init__`` and stored as ``self.optimizer``, or ``torch.optim.AdamW`` built from ``lr``,
``weight_decay``, ``betas`` and ``eps``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, OneCycleLR, ReduceLROnPlateau

from lightning_adamw.optim_checks import coupled_l2_message, is_coupled_l2
from lightning_adamw.param_groups import (
    DECAY,
    ParamDecision,
    classify_parameters,
    describe_param_groups,
    group_sizes,
    groups_from_decisions,
)
from lightning_adamw.schedules import WarmupCosineLR

__all__ = ["DecoupledWeightDecayMixin", "OptimizerFactory", "SchedulerFactory"]

OptimizerFactory = Callable[[list[dict[str, Any]]], Optimizer]
SchedulerFactory = Callable[[Optimizer], Any]

_GROUPING_OPTIONS = (
    "exclude_embeddings",
    "no_decay_patterns",
    "decay_patterns",
    "extra_norm_types",
    "norm_class_pattern",
    "use_model_hooks",
)
_MISSING = object()


class DecoupledWeightDecayMixin:
    """Gives a ``LightningModule`` a ``configure_optimizers`` with decoupled weight decay done right.

    Norm weights, biases and other 1-D tensors go to a ``"no_decay"`` group with ``weight_decay=0``; every other
    trainable tensor to a ``"decay"`` group (see :func:`lightning_adamw.build_param_groups`). The groups table is
    printed once on rank 0 when fit starts and the group sizes are logged as hyperparameters.

    Settings (hyperparameter, attribute or class default; defaults in :attr:`adamw_defaults`):
        ``lr``, ``weight_decay``, ``betas``, ``eps`` for the default ``torch.optim.AdamW`` (fused on CUDA,
        ``foreach`` elsewhere); the grouping options ``exclude_embeddings``, ``no_decay_patterns``,
        ``decay_patterns``, ``extra_norm_types``, ``norm_class_pattern``, ``use_model_hooks``;
        ``lr_schedule`` (``"constant"`` or ``"cosine"``) with ``warmup_steps`` and ``min_lr_ratio`` for the built-in
        warm-up + cosine schedule (stepped every optimizer step, length ``trainer.estimated_stepping_batches``).

    An optimizer given to LightningCLI, or injected as ``self.optimizer`` (an ``OptimizerCallable``), receives the
    groups instead; its own ``weight_decay`` applies to the decay group. A scheduler injected as
    ``self.lr_scheduler`` (or ``self.scheduler``) receives that optimizer.

    Example:
        >>> import torch, lightning as L
        >>> class Net(DecoupledWeightDecayMixin, L.LightningModule):
        ...     def __init__(self, lr: float = 1e-3, weight_decay: float = 0.1):
        ...         super().__init__()
        ...         self.save_hyperparameters()
        ...         self.body = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.LayerNorm(8), torch.nn.Linear(8, 1))
        >>> optimizer = Net().configure_optimizers()["optimizer"]
        >>> [(g["name"], g["weight_decay"], len(g["params"])) for g in optimizer.param_groups]
        [('decay', 0.1, 2), ('no_decay', 0.0, 4)]
    """

    adamw_defaults: ClassVar[dict[str, Any]] = {
        "lr": 1e-3,
        "weight_decay": 1e-2,
        "betas": (0.9, 0.999),
        "eps": 1e-8,
        "exclude_embeddings": False,
        "no_decay_patterns": None,
        "decay_patterns": None,
        "extra_norm_types": None,
        "use_model_hooks": True,
        "lr_schedule": "constant",
        "warmup_steps": 0,
        "min_lr_ratio": 0.0,
        "lr_scheduler_interval": None,
        "print_param_groups": True,
    }

    # Set by lightning_adamw.cli.AdamWCLI when the optimizer / scheduler were given at top level.
    _lightning_adamw_optimizer_factory: OptimizerFactory | None = None
    _lightning_adamw_scheduler_factory: SchedulerFactory | None = None

    # ------------------------------------------------------------------------------------------- settings

    def adamw_setting(self, name: str, default: Any = _MISSING) -> Any:
        """Look a setting up in ``self.hparams``, then attributes, then :attr:`adamw_defaults`."""
        hparams = getattr(self, "hparams", None)
        if hparams is not None and name in hparams:
            return hparams[name]
        if name == "lr" and hparams is not None and "learning_rate" in hparams:
            return hparams["learning_rate"]
        value = getattr(self, name, _MISSING)
        if value is not _MISSING and not callable(value):
            return value
        if default is not _MISSING:
            return default
        return self.adamw_defaults[name]

    def grouping_options(self) -> dict[str, Any]:
        """The options this module passes to :func:`~lightning_adamw.build_param_groups`."""
        options: dict[str, Any] = {}
        for name in _GROUPING_OPTIONS:
            value = self.adamw_setting(name, None)
            if value is not None:
                options[name] = value
        return options

    # ------------------------------------------------------------------------------------------- groups

    def decoupled_param_groups(self, weight_decay: Any = _MISSING) -> list[dict[str, Any]]:
        """The decay / no-decay groups of this module, for a ``configure_optimizers`` of your own.

        ``weight_decay`` defaults to the module's setting; pass ``None`` to let the optimizer's default apply.

        Example::

            def configure_optimizers(self):
                return torch.optim.AdamW(self.decoupled_param_groups(), lr=self.hparams.lr, betas=(0.9, 0.95))
        """
        groups, decisions = self._groups_and_decisions(weight_decay)
        self._report_groups(decisions, groups)
        return groups

    def _groups_and_decisions(
        self, weight_decay: Any = _MISSING
    ) -> tuple[list[dict[str, Any]], list[ParamDecision]]:
        if weight_decay is _MISSING:
            weight_decay = self.adamw_setting("weight_decay")
        trainer = getattr(self, "_trainer", None)
        wrapper = trainer.strategy.model if trainer is not None else None  # e.g. the FSDP root around self
        decisions = classify_parameters(
            self,  # type: ignore[arg-type]
            wrapper=wrapper if wrapper is not self else None,
            **self.grouping_options(),
        )
        return groups_from_decisions(self, decisions, weight_decay), decisions  # type: ignore[arg-type]

    def _report_groups(self, decisions: list[ParamDecision], groups: list[dict[str, Any]]) -> None:
        """Print the table once (rank 0) and log group sizes; ``groups`` may be an optimizer's param_groups,
        so the decay shown is the one the optimizer really holds."""
        trainer = getattr(self, "_trainer", None)
        if trainer is None or getattr(self, "_lightning_adamw_reported", False):
            return
        self._lightning_adamw_reported = True
        weight_decay = next((g.get("weight_decay") for g in groups if g.get("name") == DECAY), None)
        if self.adamw_setting("print_param_groups"):
            table = describe_param_groups(decisions=decisions, weight_decay=weight_decay)
            rank_zero_info(f"lightning-adamw parameter groups:\n{table}")
        sizes = group_sizes(decisions)
        hparams = {f"param_groups/{g}/{k}": v for g, s in sizes.items() for k, v in s.items()}
        for logger in trainer.loggers:
            logger.log_hyperparams(hparams)

    # ------------------------------------------------------------------------------------------- optimizer

    def _optimizer_factory(self) -> OptimizerFactory | None:
        if self._lightning_adamw_optimizer_factory is not None:
            return self._lightning_adamw_optimizer_factory
        injected = self.__dict__.get("optimizer", None)
        if injected is None:
            hparams = getattr(self, "hparams", None)
            injected = hparams.get("optimizer") if hparams is not None else None
        if injected is None:
            return None
        if isinstance(injected, Optimizer):
            raise TypeError(
                "`optimizer` must be a callable that takes parameter groups (LightningCLI's OptimizerCallable), "
                "not an optimizer instance: an instance was built with `self.parameters()` and has no decay groups"
            )
        if not callable(injected):
            raise TypeError(f"`optimizer` must be callable, got {type(injected).__name__}")
        return injected

    def _scheduler_factory(self) -> SchedulerFactory | None:
        if self._lightning_adamw_scheduler_factory is not None:
            return self._lightning_adamw_scheduler_factory
        for name in ("lr_scheduler", "scheduler"):
            injected = self.__dict__.get(name, None)
            if injected is None:
                hparams = getattr(self, "hparams", None)
                injected = hparams.get(name) if hparams is not None else None
            if injected is not None:
                if not callable(injected):
                    raise TypeError(
                        f"`{name}` must be a callable that takes the optimizer, got {type(injected).__name__}"
                    )
                return injected
        return None

    def _default_optimizer(self, groups: list[dict[str, Any]]) -> Optimizer:
        params = [p for g in groups for _, p in g["params"]]
        kwargs: dict[str, Any] = {
            "lr": float(self.adamw_setting("lr")),
            "betas": tuple(self.adamw_setting("betas")),
            "eps": float(self.adamw_setting("eps")),
        }
        # fused is the fastest AdamW on CUDA; elsewhere the multi-tensor (foreach) path is.
        if params and all(p.is_cuda and p.is_floating_point() for p in params):
            kwargs["fused"] = True
        else:
            kwargs["foreach"] = True
        return torch.optim.AdamW(groups, **kwargs)

    def _built_in_scheduler(self, optimizer: Optimizer) -> LRScheduler | None:
        schedule = self.adamw_setting("lr_schedule")
        warmup = int(self.adamw_setting("warmup_steps"))
        if schedule in (None, "constant", "none"):
            if warmup > 0:
                return WarmupCosineLR(optimizer, warmup_steps=warmup, total_steps=None, min_lr_ratio=1.0)
            return None
        if schedule != "cosine":
            raise ValueError(f"`lr_schedule` must be 'constant' or 'cosine', got {schedule!r}")
        return WarmupCosineLR(
            optimizer, warmup_steps=warmup, min_lr_ratio=float(self.adamw_setting("min_lr_ratio"))
        )

    def configure_optimizers(self) -> dict[str, Any]:
        """Build the groups, the optimizer and (optionally) a step-interval scheduler."""
        factory = self._optimizer_factory()
        if factory is None:
            groups, decisions = self._groups_and_decisions()
            optimizer = self._default_optimizer(groups)
        else:
            # The optimizer's own weight_decay (from YAML / command line) applies to the decay group.
            groups, decisions = self._groups_and_decisions(weight_decay=None)
            optimizer = factory(groups)
            if not isinstance(optimizer, Optimizer):
                raise TypeError(
                    f"the optimizer callable returned {type(optimizer).__name__}, not a torch Optimizer"
                )
            self._check_groups_survived(optimizer)
        self._report_groups(decisions, optimizer.param_groups)
        self._warn_if_coupled(optimizer)

        scheduler_factory = self._scheduler_factory()
        scheduler = (
            scheduler_factory(optimizer)
            if scheduler_factory is not None
            else self._built_in_scheduler(optimizer)
        )
        if scheduler is None:
            return {"optimizer": optimizer}
        self._fill_total_steps(scheduler)
        return {"optimizer": optimizer, "lr_scheduler": self._scheduler_config(scheduler)}

    def _check_groups_survived(self, optimizer: Optimizer) -> None:
        names = [g.get("name") for g in optimizer.param_groups]
        if DECAY in names or "no_decay" in names:
            return
        raise ValueError(
            f"the optimizer {type(optimizer).__name__} dropped the parameter groups it was given "
            f"(group names now {names}); it must accept a list of parameter-group dicts"
        )

    def _warn_if_coupled(self, optimizer: Optimizer) -> None:
        if is_coupled_l2(optimizer) and not getattr(self, "_lightning_adamw_warned_l2", False):
            self._lightning_adamw_warned_l2 = True
            rank_zero_warn(coupled_l2_message(optimizer), category=UserWarning)

    def _fill_total_steps(self, scheduler: Any) -> None:
        if not isinstance(scheduler, WarmupCosineLR) or scheduler.total_steps is not None:
            return
        trainer = getattr(self, "_trainer", None)
        total = trainer.estimated_stepping_batches if trainer is not None else math.inf
        if total is not None and math.isfinite(total) and total > 0:
            scheduler.set_total_steps(int(total))
        elif scheduler.min_lr_ratio < 1.0:
            rank_zero_warn(
                "WarmupCosineLR has no `total_steps` and the trainer cannot estimate them (max_steps=-1 and an "
                "unsized dataloader?): the cosine part is skipped. Set `total_steps` or `max_steps`."
            )

    def _scheduler_config(self, scheduler: Any) -> dict[str, Any]:
        if isinstance(scheduler, dict):  # already a Lightning scheduler config
            return scheduler
        config: dict[str, Any] = {"scheduler": scheduler}
        interval = self.adamw_setting("lr_scheduler_interval")
        if interval is None:
            interval = "step" if isinstance(scheduler, (WarmupCosineLR, OneCycleLR)) else "epoch"
        config["interval"] = interval
        if isinstance(scheduler, ReduceLROnPlateau):
            config["monitor"] = getattr(scheduler, "monitor", None) or self.adamw_setting(
                "monitor", "val_loss"
            )
        return config
