"""``DecoupledWeightDecayMixin``: a ``configure_optimizers`` that builds decay / no-decay groups.

The Lightning shell over :mod:`lightning_adamw.param_groups`. Put the mixin first in the bases::

    class MyModel(DecoupledWeightDecayMixin, LightningModule): ...

Where settings come from (one rule for every setting, :meth:`DecoupledWeightDecayMixin.adamw_setting`):

1. an attribute of the module that is not ``None`` and not a function (``self.lr = ...``; ``lr`` also as
   ``learning_rate``). Lightning's tools (``Tuner.lr_find(update_attr=True)``, ``BatchSizeFinder``) write with
   ``lightning_setattr``, which updates *every* holder that exists (attribute and ``hparams``), so an attribute
   that exists is never older than the hparam it mirrors;
2. ``self.hparams`` (``save_hyperparameters()``), ``lr`` also as ``learning_rate``;
3. :attr:`DecoupledWeightDecayMixin.adamw_defaults`.

``lr`` and ``learning_rate`` holding different values is an error naming both.

The optimizer is, in this order: the one LightningCLI was given at top level (``--optimizer``), the
``OptimizerCallable`` injected into ``__init__`` and stored as ``self.optimizer``, or ``torch.optim.AdamW`` built
from ``lr``, ``weight_decay``, ``betas`` and ``eps``.

Every optimizer the module hands to Lightning (from the mixin's ``configure_optimizers``, or from your own
``configure_optimizers`` in a subclass) is checked and equipped:

* a group with a non-finite or negative ``lr`` / ``weight_decay`` / ``eps``, or ``betas`` outside ``[0, 1)``, is
  refused, naming the key and the group;
* resume: optimizer state follows each tensor by parameter name into the current groups, and the groups keep the
  new run's hyperparameters (see :func:`lightning_adamw.optimizer_state.remap_state_dict`); schedulers keep their
  progress and follow the new base learning rates;
* ``optimizer.add_param_group({"params": [...]})`` works (names are filled in) and added groups default to the
  configured hyperparameters;
* a tensor of the module that gets a gradient but is in no optimizer group is named in a warning, once.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, OneCycleLR, ReduceLROnPlateau

from lightning_adamw.optim_checks import coupled_l2_message, is_coupled_l2
from lightning_adamw.optimizer_adoption import adopt, adopt_returned, returned_optimizers, same_value
from lightning_adamw.optimizer_groups import (
    check_group_hyperparameters,
)
from lightning_adamw.param_groups import (
    ParamDecision,
    apply_lr_scales,
    check_lr_scales,
    classify_parameters,
    describe_param_groups,
    group_hparams,
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
    "include_frozen",
    "group_overrides",
    "layer_decay",
    "num_layers",
)
# A setting that is itself a callable (name -> depth): read from the instance and hparams, never from a method of
# the class (a ``layer_id(self, name)`` method is the model hook, which the grouping finds by itself).
_CALLABLE_OPTIONS = ("layer_id",)
_LR_SPELLINGS = ("lr", "learning_rate")
_MISSING = object()


# ----------------------------------------------------------------------------------------------- the mixin


class DecoupledWeightDecayMixin:
    """Gives a ``LightningModule`` a ``configure_optimizers`` with decoupled weight decay done right.

    Norm weights, biases and other 1-D tensors go to a ``"no_decay"`` group with ``weight_decay=0``; every other
    trainable tensor to a ``"decay"`` group (see :func:`lightning_adamw.build_param_groups`); ``layer_decay`` and
    ``group_overrides`` split them further (``decay/layer_3``), and the mixin multiplies each group's lr by its
    ``lr_scale`` on whatever optimizer it builds, before the scheduler. The groups table is printed once on rank 0
    when fit starts and each group's size, lr scale, weight decay and depth are logged as hyperparameters.

    Settings (attribute, then hyperparameter, then class default; defaults in :attr:`adamw_defaults`; see
    :meth:`adamw_setting`):
        ``lr`` (alias ``learning_rate``), ``weight_decay``, ``betas``, ``eps`` for the default ``torch.optim.AdamW``
        (fused on CUDA, ``foreach`` elsewhere); the grouping options ``exclude_embeddings``,
        ``no_decay_patterns``, ``decay_patterns``, ``extra_norm_types``, ``norm_class_pattern``,
        ``use_model_hooks``, ``include_frozen`` (put tensors that are frozen now in their groups too, so that
        unfreezing them later with ``requires_grad_(True)`` trains them), ``group_overrides``, ``layer_decay``,
        ``num_layers`` and ``layer_id`` (a callable, read from the instance or ``hparams``; both only with
        ``layer_decay``: per-group learning rates, see :func:`lightning_adamw.build_param_groups`); ``lr_schedule`` (``"constant"`` or
        ``"cosine"``) with ``warmup_steps``, ``min_lr_ratio`` and ``total_steps`` (``None``: the trainer's
        ``estimated_stepping_batches``) for the built-in warm-up + cosine schedule, stepped every optimizer step.

    An optimizer given to LightningCLI, or injected as ``self.optimizer`` (an ``OptimizerCallable``), receives the
    groups instead; its own ``weight_decay`` applies to the decay group. A scheduler injected as
    ``self.lr_scheduler`` (or ``self.scheduler``) receives that optimizer.

    Resume (``Trainer.fit(ckpt_path=...)``): the new run's configuration wins. Each tensor's optimizer state
    follows its name into its current group (a changed grouping option moves it, with one info line); the groups
    the mixin built keep the new ``lr``, ``weight_decay``, ``betas``, ``eps``; a scheduler keeps its progress
    (``WarmupCosineLR`` follows the new ``total_steps`` from the step reached; others are rescaled to the new base
    lr), except ``ReduceLROnPlateau``, whose reduced lr is kept from the checkpoint (said in the info line).

    Groups added later with ``optimizer.add_param_group`` get ``param_names`` from the module and the configured
    optimizer's defaults; a tensor of the module that gets a gradient but is in no optimizer group is named in a
    warning (once), and so are norms / biases that an added group decays.

    Raises:
        ValueError: ``lr`` and ``learning_rate`` both set to different values; a non-finite or negative
            ``lr`` / ``weight_decay`` / ``eps`` or ``betas`` outside ``[0, 1)`` in any group of the optimizer,
            whatever built it; a resumed tensor whose optimizer state has another shape.

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
        "include_frozen": False,
        "group_overrides": None,
        "layer_decay": None,
        "layer_id": None,
        "num_layers": None,
        "lr_schedule": "constant",
        "warmup_steps": 0,
        "min_lr_ratio": 0.0,
        "total_steps": None,
        "lr_scheduler_interval": None,
        "print_param_groups": True,
    }

    # Set by lightning_adamw.cli.AdamWCLI when the optimizer / scheduler were given at top level.
    _lightning_adamw_optimizer_factory: OptimizerFactory | None = None
    _lightning_adamw_scheduler_factory: SchedulerFactory | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A subclass's own ``configure_optimizers`` (e.g. ``AdamW(self.decoupled_param_groups(), ...)``) is
        wrapped so that the optimizers and schedulers it returns get the same checks and resume rules."""
        super().__init_subclass__(**kwargs)
        own = cls.__dict__.get("configure_optimizers")
        if (
            own is None
            or isinstance(own, (staticmethod, classmethod))
            or not callable(own)
            or getattr(own, "_lightning_adamw_wrapped", False)
        ):
            return

        @functools.wraps(own)
        def configure_optimizers(self: Any, *args: Any, **kw: Any) -> Any:
            result = own(self, *args, **kw)
            adopt_returned(self, result)
            for optimizer in (o for o in returned_optimizers(result) if isinstance(o, Optimizer)):
                check_lr_scales(optimizer)  # e.g. OneCycleLR(max_lr=one value) over layer-decayed groups
            return result

        configure_optimizers._lightning_adamw_wrapped = True  # type: ignore[attr-defined]
        cls.configure_optimizers = configure_optimizers  # type: ignore[method-assign]

    # ------------------------------------------------------------------------------------------- settings

    def adamw_setting(self, name: str, default: Any = _MISSING) -> Any:
        """A setting: the module's attribute, then ``self.hparams``, then ``default`` / :attr:`adamw_defaults`.

        An attribute counts when it is not ``None`` and not a function or bound method (an injected
        ``OptimizerCallable`` is not a setting; a class, as in ``extra_norm_types``, is). ``lr`` is also read
        under its alias ``learning_rate`` (the LR finder's second spelling).

        Raises:
            ValueError: ``lr`` and ``learning_rate`` are both set and differ (the message names both).
        """
        if name == "lr":
            return self._lr_setting(default)
        value = self._attribute_setting(name)
        if value is not _MISSING:
            return value
        hparams = getattr(self, "hparams", None)
        if hparams is not None and name in hparams:
            return hparams[name]
        if default is not _MISSING:
            return default
        return self.adamw_defaults[name]

    def _attribute_setting(self, name: str) -> Any:
        try:
            value = getattr(self, name)
        except AttributeError:
            return _MISSING
        if value is None or isinstance(value, nn.Module):
            return _MISSING
        if callable(value) and not isinstance(value, type):
            return _MISSING
        return value

    def _lr_setting(self, default: Any) -> Any:
        hparams = getattr(self, "hparams", None)
        attributes = {s: v for s in _LR_SPELLINGS if (v := self._attribute_setting(s)) is not _MISSING}
        stored = {s: hparams[s] for s in _LR_SPELLINGS if hparams is not None and hparams.get(s) is not None}
        # Per spelling the attribute wins; across spellings the two must agree.
        where = {s: f"self.{s}" if s in attributes else f"self.hparams.{s}" for s in {*attributes, *stored}}
        value = {**stored, **attributes}
        if len(value) == 2 and not same_value(value["lr"], value["learning_rate"]):
            raise ValueError(
                f"the module sets the learning rate twice, `{where['lr']}`={value['lr']!r} and "
                f"`{where['learning_rate']}`={value['learning_rate']!r}: DecoupledWeightDecayMixin reads `lr` and "
                "its alias `learning_rate` and cannot tell which one is meant (Lightning's LR finder writes to `lr` "
                "when it exists). Keep one spelling."
            )
        for source in (attributes, stored):
            for spelling in _LR_SPELLINGS:
                if spelling in source:
                    return source[spelling]
        if default is not _MISSING:
            return default
        return self.adamw_defaults["lr"]

    def grouping_options(self) -> dict[str, Any]:
        """The options this module passes to :func:`~lightning_adamw.build_param_groups`."""
        options: dict[str, Any] = {}
        for name in _GROUPING_OPTIONS:
            value = self.adamw_setting(name, None)
            if value is not None:
                options[name] = value
        for name in _CALLABLE_OPTIONS:
            value = self.__dict__.get(name)
            if value is None:
                hparams = getattr(self, "hparams", None)
                value = hparams.get(name) if hparams is not None else None
            if value is not None:
                options[name] = value
        if options.get("layer_decay") is None:
            # Settings are read from any attribute or hparam of that name, and `num_layers` often names a
            # network's depth: without layer decay these two have nothing to act on.
            options.pop("num_layers", None)
            options.pop("layer_id", None)
        return options

    # ------------------------------------------------------------------------------------------- groups

    def decoupled_param_groups(
        self, weight_decay: Any = _MISSING, lr: float | None = None
    ) -> list[dict[str, Any]]:
        """The decay / no-decay groups of this module, for a ``configure_optimizers`` of your own.

        ``weight_decay`` defaults to the module's setting; pass ``None`` to let the optimizer's default apply.
        With ``layer_decay`` or ``group_overrides`` that scale the lr, pass the optimizer's ``lr`` too: each group
        then carries ``lr * lr_scale`` (a torch optimizer ignores ``lr_scale``; without ``lr`` that is an error).
        The optimizer you build from them and return from ``configure_optimizers`` gets the same checks and
        resume rules as the mixin's own.

        Example::

            def configure_optimizers(self):
                return torch.optim.AdamW(self.decoupled_param_groups(), lr=self.hparams.lr, betas=(0.9, 0.95))
        """
        if weight_decay is _MISSING:
            weight_decay = self.adamw_setting("weight_decay")
        decisions = self._classify()
        groups = groups_from_decisions(self, decisions, weight_decay, lr=lr)  # type: ignore[arg-type]
        self._report_groups(decisions, weight_decay, groups)
        return groups

    def _classify(self) -> list[ParamDecision]:
        trainer = getattr(self, "_trainer", None)
        wrapper = trainer.strategy.model if trainer is not None else None  # e.g. the FSDP root around self
        return classify_parameters(
            self,  # type: ignore[arg-type]
            wrapper=wrapper if wrapper is not self else None,
            **self.grouping_options(),
        )

    def _groups_and_decisions(
        self, weight_decay: Any = _MISSING
    ) -> tuple[list[dict[str, Any]], list[ParamDecision]]:
        """Groups whose lr scales are left for :func:`~lightning_adamw.param_groups.apply_lr_scales`, which
        :meth:`configure_optimizers` runs on whatever optimizer it builds, before any scheduler."""
        if weight_decay is _MISSING:
            weight_decay = self.adamw_setting("weight_decay")
        decisions = self._classify()
        groups = groups_from_decisions(self, decisions, weight_decay, defer_lr_scale=True)  # type: ignore[arg-type]
        return groups, decisions

    def _report_groups(
        self, decisions: list[ParamDecision], weight_decay: float | None, groups: list[dict[str, Any]]
    ) -> None:
        """Print the table once (rank 0) and log each group's size, lr scale, weight decay and depth.

        ``groups`` may be an optimizer's param_groups, so the decay logged is the one the optimizer really holds;
        ``weight_decay`` is the decay that groups without their own setting get (the optimizer's default)."""
        trainer = getattr(self, "_trainer", None)
        if trainer is None or getattr(self, "_lightning_adamw_reported", False):
            return
        self._lightning_adamw_reported = True
        if self.adamw_setting("print_param_groups"):
            table = describe_param_groups(decisions=decisions, weight_decay=weight_decay)
            rank_zero_info(f"lightning-adamw parameter groups:\n{table}")
        hparams = group_hparams(groups, decisions)
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
        weight_decay = self.adamw_setting("weight_decay")
        if weight_decay is not None:
            # Also the default of groups added later with add_param_group (torch's own default is 0.01).
            kwargs["weight_decay"] = float(weight_decay)
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
        total = self.adamw_setting("total_steps")
        return WarmupCosineLR(
            optimizer,
            warmup_steps=warmup,
            total_steps=int(total) if total is not None else None,
            min_lr_ratio=float(self.adamw_setting("min_lr_ratio")),
        )

    def configure_optimizers(self) -> dict[str, Any]:
        """Build the groups, the optimizer and (optionally) a step-interval scheduler."""
        factory = self._optimizer_factory()
        lr_setting: float | None = None
        if factory is None:
            groups, decisions = self._groups_and_decisions()
            optimizer = self._default_optimizer(groups)
            lr_setting = float(self.adamw_setting("lr"))
        else:
            # The optimizer's own weight_decay (from YAML / command line) applies to the decay group.
            groups, decisions = self._groups_and_decisions(weight_decay=None)
            optimizer = factory(groups)
            if not isinstance(optimizer, Optimizer):
                raise TypeError(
                    f"the optimizer callable returned {type(optimizer).__name__}, not a torch Optimizer"
                )
            self._check_groups_survived(optimizer, groups)
        # Layer decay and overrides: each group's lr (and a deferred weight_decay_scale) times its scale, on
        # whatever optimizer was built, before any scheduler records the groups' starting lr.
        apply_lr_scales(optimizer)
        check_group_hyperparameters(optimizer.param_groups, type(optimizer).__name__)
        self._report_groups(decisions, optimizer.defaults.get("weight_decay"), optimizer.param_groups)
        self._warn_if_coupled(optimizer)

        scheduler_factory = self._scheduler_factory()
        scheduler = (
            scheduler_factory(optimizer)
            if scheduler_factory is not None
            else self._built_in_scheduler(optimizer)
        )
        if scheduler is not None:
            self._fill_total_steps(scheduler)
            check_lr_scales(optimizer)  # OneCycleLR / CyclicLR with one max_lr would drop the scales
        inner = scheduler.get("scheduler") if isinstance(scheduler, dict) else scheduler
        adopt(self, optimizer, [inner] if inner is not None else [], lr_setting)
        if scheduler is None:
            return {"optimizer": optimizer}
        return {"optimizer": optimizer, "lr_scheduler": self._scheduler_config(scheduler)}

    def _check_groups_survived(self, optimizer: Optimizer, groups: list[dict[str, Any]]) -> None:
        names = [g.get("name") for g in optimizer.param_groups]
        if all(g["name"] in names for g in groups):
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
        total = self._estimated_total_steps()
        if total is not None:
            scheduler.set_total_steps(total)
            scheduler.__dict__["_lightning_adamw_auto_total"] = (
                True  # filled from the trainer: may be refreshed
            )
        elif scheduler.min_lr_ratio < 1.0:
            rank_zero_warn(
                "WarmupCosineLR has no `total_steps` and the trainer cannot estimate them (max_steps=-1 and an "
                "unsized dataloader?): the cosine part is skipped. Set `total_steps` or `max_steps`."
            )

    def _estimated_total_steps(self) -> int | None:
        trainer = getattr(self, "_trainer", None)
        total = trainer.estimated_stepping_batches if trainer is not None else math.inf
        if total is not None and math.isfinite(total) and total > 0:
            return int(total)
        return None

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
