"""lightning-adamw: decoupled weight decay (AdamW) done right for PyTorch Lightning, and made visible.

Public API:

- :func:`build_param_groups` / :func:`classify_parameters` / :func:`describe_param_groups`: the pure
  functions that split any ``nn.Module`` into ``"decay"`` and ``"no_decay"`` groups and explain why.
- :class:`DecoupledWeightDecayMixin`: a LightningModule mixin whose ``configure_optimizers`` uses them.
- :class:`WarmupCosineLR`: linear warm-up + cosine decay, per optimizer step.
- :class:`AdamWCLI` and the ``lightning-adamw`` command.
"""

from lightning_adamw.cli import AdamWCLI
from lightning_adamw.mixin import DecoupledWeightDecayMixin
from lightning_adamw.optim_checks import is_coupled_l2, is_decoupled_adam
from lightning_adamw.param_groups import (
    DEFAULT_NORM_CLASS_PATTERN,
    NORM_TYPES,
    ParamDecision,
    build_param_groups,
    classify_parameters,
    describe_param_groups,
)
from lightning_adamw.schedules import WarmupCosineLR

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_NORM_CLASS_PATTERN",
    "NORM_TYPES",
    "AdamWCLI",
    "DecoupledWeightDecayMixin",
    "ParamDecision",
    "WarmupCosineLR",
    "__version__",
    "build_param_groups",
    "classify_parameters",
    "describe_param_groups",
    "is_coupled_l2",
    "is_decoupled_adam",
]
