"""lightning-adamw: decoupled weight decay (AdamW) done right for PyTorch Lightning, and made visible.

Public API:

- :func:`build_param_groups` / :func:`classify_parameters` / :func:`describe_param_groups`: pure functions that
  split any ``nn.Module`` into ``"decay"`` and ``"no_decay"`` optimizer groups (optionally further by layer depth
  and overrides) and explain why; :func:`apply_lr_scales` and :func:`check_unique_group_names` for optimizers built
  from them.
- :mod:`lightning_adamw.update_split` (``update_split.update_split``, :func:`adamw_update_split`): pure functions that split an optimizer step, right after
  ``optimizer.step()``, into its decoupled-decay part and its gradient part.
- :class:`DecoupledWeightDecayMixin`: a LightningModule mixin whose ``configure_optimizers`` builds the groups.
- :class:`WeightDecayMonitor`: a callback that logs the split of every (logged) update.
- :class:`WarmupCosineLR`: linear warm-up + cosine decay, per optimizer step.
- :class:`WeightDecayScheduler`: weight decay over time (``constant``, ``independent``, ``adamc``, ``cosine``,
  ``linear``), set for every optimizer step through the optimizer's step hooks (pure torch).
- :class:`AdamWCLI` and the ``lightning-adamw`` command.

The Lightning-facing names are imported lazily, so ``import lightning_adamw`` and the functional core
(``param_groups``, ``update_split``) do not import Lightning.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

# The plain-torch core is imported eagerly (no Lightning); `lightning_adamw.update_split` is the submodule, and
# its main function is `lightning_adamw.update_split.update_split` (a package-level function of the same name would
# be shadowed by the submodule, depending on import order).
from lightning_adamw.optim_checks import is_coupled_l2, is_decoupled_adam
from lightning_adamw.param_groups import (
    DEFAULT_NORM_CLASS_PATTERN,
    NORM_TYPES,
    ParamDecision,
    apply_lr_scales,
    build_param_groups,
    check_unique_group_names,
    classify_parameters,
    describe_param_groups,
)
from lightning_adamw.schedules import WarmupCosineLR
from lightning_adamw.update_split import UpdateSplit, adamw_update_split
from lightning_adamw.weight_decay import WeightDecayScheduler

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "AdamWCLI": "lightning_adamw.cli",
    "DEFAULT_NORM_CLASS_PATTERN": "lightning_adamw.param_groups",
    "DecoupledWeightDecayMixin": "lightning_adamw.mixin",
    "NORM_TYPES": "lightning_adamw.param_groups",
    "ParamDecision": "lightning_adamw.param_groups",
    "UpdateSplit": "lightning_adamw.update_split",
    "WarmupCosineLR": "lightning_adamw.schedules",
    "WeightDecayMonitor": "lightning_adamw.monitor",
    "WeightDecayScheduler": "lightning_adamw.weight_decay",
    "adamw_update_split": "lightning_adamw.update_split",
    "apply_lr_scales": "lightning_adamw.param_groups",
    "build_param_groups": "lightning_adamw.param_groups",
    "check_unique_group_names": "lightning_adamw.param_groups",
    "classify_parameters": "lightning_adamw.param_groups",
    "describe_param_groups": "lightning_adamw.param_groups",
    "is_coupled_l2": "lightning_adamw.optim_checks",
    "is_decoupled_adam": "lightning_adamw.optim_checks",
}

__all__ = [
    "DEFAULT_NORM_CLASS_PATTERN",
    "NORM_TYPES",
    "AdamWCLI",
    "DecoupledWeightDecayMixin",
    "ParamDecision",
    "UpdateSplit",
    "WarmupCosineLR",
    "WeightDecayMonitor",
    "WeightDecayScheduler",
    "__version__",
    "adamw_update_split",
    "apply_lr_scales",
    "build_param_groups",
    "check_unique_group_names",
    "classify_parameters",
    "describe_param_groups",
    "is_coupled_l2",
    "is_decoupled_adam",
]
assert sorted(__all__) == sorted([*_EXPORTS, "__version__"])  # one list to keep in sync, checked at import

if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from lightning_adamw.cli import AdamWCLI
    from lightning_adamw.mixin import DecoupledWeightDecayMixin
    from lightning_adamw.monitor import WeightDecayMonitor


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'lightning_adamw' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # cache: the next access is a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
