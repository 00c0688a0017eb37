"""``DecoupledWeightDecayMixin``: a ``configure_optimizers`` that builds decay / no-decay groups.

The Lightning shell over :mod:`lightning_adamw.param_groups`. Put the mixin first in the bases::

    class MyModel(DecoupledWeightDecayMixin, LightningModule): ...

Where settings come from (one rule for every setting, :meth:`DecoupledWeightDecayMixin.adamw_setting`):

1. an attribute of the module that holds a plain value: a number, bool, string, class, dict, or a list / tuple of
   those (``self.lr = ...``; ``lr`` also as ``learning_rate``). Tensors, buffers, modules and functions are the
   model's own state, never a setting (a DDPM noise schedule in the buffer ``betas`` is not AdamW's ``betas``). Lightning's tools (``Tuner.lr_find(update_attr=True)``, ``BatchSizeFinder``) write with
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
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, OneCycleLR, ReduceLROnPlateau

from lightning_adamw.mixin_settings import MISSING as _MISSING
from lightning_adamw.mixin_settings import AdamWSettings
from lightning_adamw.mixin_weight_decay import (
    check_decay_options,
    create_scheduler,
    decay_from_settings,
    decay_with_timescale,
    describe_weight_decay,
    steps_per_epoch,
    weight_decay_hparams,
)
from lightning_adamw.optim_checks import coupled_l2_message, is_coupled_l2
from lightning_adamw.optimizer_adoption import (
    adopt,
    adopt_returned,
    install_batch_sync,
    returned_optimizers,
)
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
from lightning_adamw.schedules import WarmupCosineLR, shorter_schedule_message
from lightning_adamw.weight_decay import BASE_KEY, TimescaleDecay, WeightDecayScheduler

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


def _factory_weight_decay(factory: Any) -> Any:
    """The ``weight_decay`` an optimizer factory was explicitly given (a ``functools.partial``), or ``None`` when
    it has none or it cannot be told (the CLI's factories carry the class defaults too: ``lightning-adamw``
    checks the options given on the command line before anything is built)."""
    keywords = getattr(factory, "keywords", None)
    if isinstance(keywords, dict):
        return keywords.get("weight_decay")
    return None


# ----------------------------------------------------------------------------------------------- the mixin


class DecoupledWeightDecayMixin(AdamWSettings):
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
        ``estimated_stepping_batches``; an explicit one shorter than that warns) for the built-in warm-up + cosine
        schedule, stepped every optimizer step; ``weight_decay_schedule`` (a name or a dict with options: a
        :class:`~lightning_adamw.weight_decay.WeightDecayScheduler`, created after the optimizer and its LR
        schedule), and ``ema_timescale_epochs`` / ``ema_timescale_fraction`` (λ = 1/(lr·τ) instead of
        ``weight_decay``; see :mod:`lightning_adamw.mixin_weight_decay`). The table printed at fit start ends with
        every setting that is not the default and where it came from (:meth:`settings_line`).

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

    Before every training batch (a callback placed first in the trainer), the groups are brought up to date: an lr
    changed by ``LearningRateFinder`` gets its layer-decay scales and schedule factor back, schedules a resumed
    checkpoint had no state for start at the step reached, and the weight decay schedule shows the value the
    step will use; so the first step and every callback (``LearningRateMonitor``) see the values that train.

    Raises:
        ValueError: ``lr`` and ``learning_rate`` both set to different values; a non-finite or negative
            ``lr`` / ``weight_decay`` / ``eps`` or ``betas`` outside ``[0, 1)`` in any group of the optimizer,
            whatever built it; a resumed tensor whose optimizer state has another shape; ``weight_decay`` given
            together with ``ema_timescale_*`` (naming both); an invalid ``weight_decay_schedule`` (naming the
            option); ``"independent"`` with a λ that is not a per-step decay (naming ``weight_decay``).

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
        "norm_class_pattern": None,
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
        "weight_decay_schedule": None,
        "ema_timescale_epochs": None,
        "ema_timescale_fraction": None,
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
            source = "weight_decay" if self.setting_given("weight_decay") else None
            for optimizer in (o for o in returned_optimizers(result) if isinstance(o, Optimizer)):
                check_lr_scales(optimizer)  # e.g. OneCycleLR(max_lr=one value) over layer-decayed groups
                # `weight_decay_schedule`, after the adoption; said in one line, as the mixin's own table does
                scheduler = create_scheduler(self, optimizer, source)
                if scheduler is not None and self.adamw_setting("weight_decay_schedule") is not None:
                    rank_zero_info(f"lightning-adamw: {scheduler.describe()}")
            install_batch_sync(self)
            return result

        configure_optimizers._lightning_adamw_wrapped = True  # type: ignore[attr-defined]
        cls.configure_optimizers = configure_optimizers  # type: ignore[method-assign]

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

        ``weight_decay`` defaults to the module's setting (or the λ its ``ema_timescale_epochs`` /
        ``ema_timescale_fraction`` gives at ``lr``, else at the module's ``lr``); pass ``None`` to let the
        optimizer's default apply. A ``weight_decay_schedule`` setting is applied to the optimizer you return.
        With ``layer_decay`` or ``group_overrides`` that scale the lr, pass the optimizer's ``lr`` too: each group
        then carries ``lr * lr_scale`` (a torch optimizer ignores ``lr_scale``; without ``lr`` that is an error
        that says so).
        The optimizer you build from them and return from ``configure_optimizers`` gets the same checks and
        resume rules as the mixin's own.

        Example::

            def configure_optimizers(self):
                return torch.optim.AdamW(self.decoupled_param_groups(), lr=self.hparams.lr, betas=(0.9, 0.95))
        """
        if weight_decay is _MISSING:
            decay = decay_from_settings(self, float(lr if lr is not None else self.adamw_setting("lr")))
            weight_decay = decay.weight_decay if decay is not None else self.adamw_setting("weight_decay")
        decisions = self._classify()
        scaled = sorted({f"{d.group} x{d.lr_scale:g}" for d in decisions if d.lr_scale != 1.0})
        if scaled and lr is None:
            # Choosing an lr here (the module's) would override the one given to the optimizer without a word.
            raise ValueError(
                f"`layer_decay` / `group_overrides` give these groups their own lr scale ({', '.join(scaled[:4])}"
                f"{', ...' if len(scaled) > 4 else ''}), which a torch optimizer cannot apply by itself: call "
                "`self.decoupled_param_groups(lr=<the lr you give the optimizer>)` so that each group carries "
                "lr * lr_scale before your optimizer and scheduler are built, e.g. `lr = self.hparams.lr; return "
                "torch.optim.AdamW(self.decoupled_param_groups(lr=lr), lr=lr)`; or drop your configure_optimizers "
                "and let DecoupledWeightDecayMixin build the optimizer"
            )
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
        self,
        decisions: list[ParamDecision],
        weight_decay: float | None,
        groups: list[dict[str, Any]],
        extra: list[str] | None = None,
        extra_hparams: dict[str, Any] | None = None,
    ) -> None:
        """Print the table once (rank 0) and log each group's size, lr scale, weight decay and depth.

        ``groups`` may be an optimizer's param_groups, so the decay logged is the one the optimizer really holds
        (a scheduled group's base decay λ, ``base_weight_decay``); ``weight_decay`` is the decay that groups
        without their own setting get (the optimizer's default). ``extra``: lines printed under the table (where
        each setting came from, the schedules)."""
        trainer = getattr(self, "_trainer", None)
        if trainer is None or getattr(self, "_lightning_adamw_reported", False):
            return
        self._lightning_adamw_reported = True
        if self.adamw_setting("print_param_groups"):
            # (a schedule's groups hold λ as base_weight_decay and another weight_decay: the column says λ)
            scheduled = any(BASE_KEY in g for g in groups)
            table = describe_param_groups(
                decisions=decisions,
                weight_decay=weight_decay,
                decay_header="λ" if scheduled else "weight_decay",
            )
            lines = "".join(f"\n{line}" for line in extra or () if line)
            rank_zero_info(f"lightning-adamw parameter groups:\n{table}{lines}")
        shown = [{**g, "weight_decay": g[BASE_KEY]} if BASE_KEY in g else g for g in groups]
        hparams = {**group_hparams(shown, decisions), **(extra_hparams or {})}
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

    def _default_optimizer(self, groups: list[dict[str, Any]], weight_decay: float | None) -> Optimizer:
        params = [p for g in groups for _, p in g["params"]]
        kwargs: dict[str, Any] = {
            "lr": float(self.adamw_setting("lr")),
            "betas": tuple(self.adamw_setting("betas")),
            "eps": float(self.adamw_setting("eps")),
        }
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
        """Build the groups, the optimizer, (optionally) a step-interval scheduler and a weight decay schedule."""
        factory = self._optimizer_factory()
        check_decay_options(self)  # both a timescale and weight_decay: an error before anything is built
        lr_setting: float | None = None
        decay: TimescaleDecay | None = None
        if factory is None:
            lr_setting = float(self.adamw_setting("lr"))
            decay = decay_from_settings(self, lr_setting)
            weight_decay = decay.weight_decay if decay is not None else self.adamw_setting("weight_decay")
            decay_source = (
                decay.source
                if decay is not None
                else ("weight_decay" if self.setting_given("weight_decay") else None)
            )
            groups, decisions = self._groups_and_decisions(weight_decay)
            optimizer = self._default_optimizer(groups, weight_decay)
        else:
            # The optimizer's own weight_decay (from YAML / command line) applies to the decay group.
            groups, decisions = self._groups_and_decisions(weight_decay=None)
            took_default = ["weight_decay" not in g for g in groups]
            optimizer = factory(groups)
            if not isinstance(optimizer, Optimizer):
                raise TypeError(
                    f"the optimizer callable returned {type(optimizer).__name__}, not a torch Optimizer"
                )
            self._check_groups_survived(optimizer, groups)
            decay = self._timescale_for_factory(factory, optimizer, took_default)
            decay_source = decay.source if decay is not None else "optimizer"
        # Layer decay and overrides: each group's lr (and a deferred weight_decay_scale) times its scale, on
        # whatever optimizer was built, before any scheduler records the groups' starting lr.
        apply_lr_scales(optimizer)
        check_group_hyperparameters(optimizer.param_groups, type(optimizer).__name__)
        self._warn_if_coupled(optimizer)

        scheduler_factory = self._scheduler_factory()
        scheduler = (
            scheduler_factory(optimizer)
            if scheduler_factory is not None
            else self._built_in_scheduler(optimizer)
        )
        if scheduler is not None:
            self._fill_total_steps(scheduler, built_in=scheduler_factory is None)
            check_lr_scales(optimizer)  # OneCycleLR / CyclicLR with one max_lr would drop the scales
        inner = scheduler.get("scheduler") if isinstance(scheduler, dict) else scheduler
        adopt(self, optimizer, [inner] if inner is not None else [], lr_setting)
        # After the adoption: its step pre-hook may change an lr (LR finder, resume), and the weight decay
        # schedule's pre-hook must see the final one (torch runs pre-hooks in registration order).
        wd_scheduler = create_scheduler(self, optimizer, decay_source)
        install_batch_sync(self)
        if (
            decay is None and wd_scheduler is not None
        ):  # an explicit λ under a schedule: show its timescale too
            base_lr = lr_setting if lr_setting is not None else float(optimizer.defaults.get("lr", 0.0))
            decay = decay_with_timescale(self, base_lr, optimizer.defaults.get("weight_decay"))
        self._report_groups(
            decisions,
            optimizer.defaults.get("weight_decay"),
            optimizer.param_groups,
            self._report_lines(
                factory is None,
                scheduler_factory is None and inner is not None,
                optimizer,
                wd_scheduler,
                decay,
            ),
            weight_decay_hparams(wd_scheduler, decay),
        )
        if scheduler is None:
            return {"optimizer": optimizer}
        return {"optimizer": optimizer, "lr_scheduler": self._scheduler_config(scheduler)}

    def _timescale_for_factory(
        self, factory: Any, optimizer: Optimizer, took_default: list[bool]
    ) -> TimescaleDecay | None:
        """``ema_timescale_*`` with an optimizer given by class: λ from that optimizer's lr, on the groups that
        took its default ``weight_decay`` (and as its default, for groups added later)."""
        if check_decay_options(self) not in ("ema_timescale_epochs", "ema_timescale_fraction"):
            return None
        own = _factory_weight_decay(factory)
        if own is not None:
            option = (
                "ema_timescale_epochs"
                if self.adamw_setting("ema_timescale_epochs") is not None
                else ("ema_timescale_fraction")
            )
            raise ValueError(
                f"`{option}` and the optimizer's own `weight_decay`={own!r} ({factory!r}) are both given: they are "
                "two ways to set the same decay (λ = 1/(lr·τ)); remove the optimizer's weight_decay, or the "
                "timescale"
            )
        decay = decay_from_settings(self, float(optimizer.defaults["lr"]))
        assert decay is not None
        for group, default in zip(optimizer.param_groups, took_default, strict=False):
            if default:  # a decay group (no_decay groups carry their 0 explicitly)
                group["weight_decay"] = decay.weight_decay
        optimizer.defaults["weight_decay"] = decay.weight_decay
        return decay

    def _report_lines(
        self,
        own_optimizer: bool,
        own_schedule: bool,
        optimizer: Optimizer,
        wd_scheduler: WeightDecayScheduler | None,
        decay: TimescaleDecay | None,
    ) -> list[str]:
        """Under the table: the settings that are not the default and where each came from, then the weight
        decay schedule and timescale (see :func:`~lightning_adamw.mixin_weight_decay.describe_weight_decay`)."""
        names: tuple[str, ...] = (
            *_GROUPING_OPTIONS,
            "weight_decay_schedule",
            "ema_timescale_epochs",
            "ema_timescale_fraction",
        )
        if own_optimizer:
            names = ("lr", "weight_decay", "betas", "eps", *names)
        if own_schedule:
            names = (*names, "lr_schedule", "warmup_steps", "min_lr_ratio", "total_steps")
        lines = []
        line = self.settings_line(names)
        if line:
            lines.append(f"settings: {line}")
        if wd_scheduler is not None or decay is not None:
            trainer = getattr(self, "_trainer", None)
            text = describe_weight_decay(
                optimizer,
                wd_scheduler,
                decay,
                steps_per_epoch(trainer, self),
                self._estimated_total_steps(),
            )
            if text:
                lines.append(text)
        return lines

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

    def _fill_total_steps(self, scheduler: Any, built_in: bool = False) -> None:
        """A ``WarmupCosineLR`` without ``total_steps`` runs over the trainer's planned steps; one whose explicit
        ``total_steps`` is shorter than them warns (the lr would sit at its floor for the rest of the run)."""
        if not isinstance(scheduler, WarmupCosineLR):
            return
        planned = self._estimated_total_steps()
        if scheduler.total_steps is not None:
            where = f"{self.setting_source('total_steps')}" if built_in else "the scheduler's own argument"
            message = shorter_schedule_message(scheduler, planned, where)
            if message:
                rank_zero_warn(f"lightning-adamw: {message}", category=UserWarning)
            return
        if planned is not None:
            scheduler.set_total_steps(planned)
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
