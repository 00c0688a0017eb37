"""The top-level optimizer and scheduler of the ``lightning-adamw`` CLI: which ones were registered, what to build.

LightningCLI registers the ``optimizer`` / ``lr_scheduler`` options in ``parser._optimizers`` /
``parser._lr_schedulers`` (``{key: (class or tuple of classes, link_to)}``). A tuple of classes (the default,
``--optimizer AdamW``) gives a ``{class_path, init_args}`` config; one class (a CLI subclass calling
``parser.add_optimizer_args(torch.optim.AdamW)``) gives the init args alone and the class is fixed. Entries
with ``link_to="AUTOMATIC"`` are the ones the CLI itself applies; others are linked into the model by
jsonargparse and left to the model's own ``configure_optimizers``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser, LRSchedulerTypeTuple, instantiate_class
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.optim import Optimizer
from torch.optim.lr_scheduler import OneCycleLR

from lightning_adamw.schedules import WarmupCosineLR

__all__ = [
    "ClassConfig",
    "Factory",
    "Registration",
    "automatic_registrations",
    "class_path_of",
    "registered_config",
    "step_interval_scheduler_config",
]


@dataclass(frozen=True)
class Registration:
    """An optimizer or scheduler option registered with LightningCLI.

    Attributes:
        key: the config key (``"optimizer"``, ``"lr_scheduler"`` or a custom ``nested_key``).
        classes: the registered class, or a tuple of base classes (then the config names its class).
        link_to: ``"AUTOMATIC"`` or the key it is linked to.
    """

    key: str
    classes: type | tuple[type, ...]
    link_to: str

    @property
    def fixed_class(self) -> type | None:
        """The class when it is fixed by the registration (``add_optimizer_args(AdamW)``), else ``None``."""
        return None if isinstance(self.classes, tuple) else self.classes


@dataclass(frozen=True)
class ClassConfig:
    """A class and its init args as given, and the option they were given with.

    Attributes:
        class_path: dotted import path of the class.
        init_args: its arguments (without the first positional one: the groups, or the optimizer).
        option: the command-line option, e.g. ``"--optimizer"``.
    """

    class_path: str
    init_args: dict[str, Any]
    option: str

    def as_init(self) -> dict[str, Any]:
        return {"class_path": self.class_path, "init_args": dict(self.init_args)}

    def shown(self, keys: tuple[str, ...] = ("lr", "weight_decay")) -> str:
        """``torch.optim.SGD(lr=0.05, weight_decay=0.0)``: the class with the arguments given for ``keys``."""
        args = ", ".join(f"{k}={self.init_args[k]}" for k in keys if k in self.init_args)
        return f"{self.class_path}({args})"


def class_path_of(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def automatic_registrations(
    parser: LightningArgumentParser,
) -> tuple[Registration | None, Registration | None]:
    """The optimizer and scheduler registrations the CLI applies itself (``link_to="AUTOMATIC"``).

    Raises:
        MisconfigurationException: more than one automatic optimizer or scheduler (as LightningCLI does: the
            user is then expected to link them and write ``configure_optimizers``).
    """
    found: list[Registration | None] = []
    for register, base in ((parser._optimizers, (Optimizer,)), (parser._lr_schedulers, LRSchedulerTypeTuple)):
        automatic = [
            Registration(key, classes, link_to)
            for key, (classes, link_to) in register.items()
            if link_to == "AUTOMATIC"
            and any(issubclass(c, base) for c in (classes if isinstance(classes, tuple) else (classes,)))
        ]
        if len(automatic) > 1:
            raise MisconfigurationException(
                "lightning-adamw: at most one automatic optimizer and one automatic lr_scheduler can be "
                f"registered, found {[r.key for r in automatic]}; link them to the model (`link_to=...`) and use "
                "them in its configure_optimizers"
            )
        found.append(automatic[0] if automatic else None)
    return found[0], found[1]


def registered_config(registration: Registration, value: Any) -> ClassConfig | None:
    """The class and init args a registration's config value stands for, or ``None`` if none was given.

    ``value`` is the parsed value at ``registration.key``: a ``{class_path, init_args}`` namespace / dict (tuple
    registrations), the init args alone (fixed-class registrations), or ``None``.
    """
    if value is None:
        return None
    value = _as_dict(value)
    option = f"--{registration.key}"
    fixed = registration.fixed_class
    if fixed is not None:
        return ClassConfig(class_path_of(fixed), dict(value or {}), option)
    if not value.get("class_path"):
        return None
    return ClassConfig(str(value["class_path"]), dict(value.get("init_args") or {}), option)


def _as_dict(value: Any) -> Any:
    if hasattr(value, "as_dict"):
        return value.as_dict()
    return value


class Factory:
    """Builds a configured class with one positional first argument (the groups, or the optimizer).

    This is what :class:`~lightning_adamw.DecoupledWeightDecayMixin` finds in
    ``_lightning_adamw_optimizer_factory`` / ``_lightning_adamw_scheduler_factory``.

    Args:
        config: the class, its init args and the option it came from.
    """

    def __init__(self, config: ClassConfig) -> None:
        self.config = config

    def __call__(self, first: Any) -> Any:
        return instantiate_class(first, self.config.as_init())

    def __repr__(self) -> str:
        return f"Factory({self.config.class_path} from {self.config.option})"


def step_interval_scheduler_config(scheduler: Any, trainer: Any) -> dict[str, Any] | None:
    """A Lightning scheduler config that steps ``scheduler`` every optimizer step, or ``None`` if it is not one
    of the per-step schedules (:class:`~lightning_adamw.WarmupCosineLR`, ``OneCycleLR``).

    An unset ``WarmupCosineLR.total_steps`` is filled in from ``trainer.estimated_stepping_batches`` (the same
    rule as :class:`~lightning_adamw.DecoupledWeightDecayMixin`); if the trainer cannot estimate it, a warning
    says the cosine part is skipped.
    """
    if not isinstance(scheduler, (WarmupCosineLR, OneCycleLR)):
        return None
    if isinstance(scheduler, WarmupCosineLR) and scheduler.total_steps is None:
        total = trainer.estimated_stepping_batches if trainer is not None else math.inf
        if total is not None and math.isfinite(total) and total > 0:
            scheduler.set_total_steps(int(total))
        elif scheduler.min_lr_ratio < 1.0:
            rank_zero_warn(
                "lightning-adamw: WarmupCosineLR from --lr_scheduler has no `total_steps` and the trainer cannot "
                "estimate them (max_steps=-1 and an unsized dataloader?): the cosine part is skipped. Set "
                "--lr_scheduler.total_steps or --trainer.max_steps."
            )
    return {"scheduler": scheduler, "interval": "step", "frequency": 1}
