"""What kind of weight decay an optimizer applies. Pure torch.

Adam with ``weight_decay > 0`` adds ``λw`` to the gradient *before* the moments, so the penalty is divided by
``√v̂ + ε`` per coordinate: L2 regularisation, not weight decay. AdamW (and ``Adam(decoupled_weight_decay=True)``)
shrinks the weights outside the adaptive step. These helpers tell the two apart.
"""

from __future__ import annotations

from torch.optim import Optimizer

__all__ = ["coupled_l2_message", "is_adam_family", "is_coupled_l2", "is_decoupled_adam"]


def is_adam_family(optimizer: Optimizer) -> bool:
    """``torch.optim.Adam`` or ``AdamW`` (or a subclass): optimizers whose state holds ``exp_avg``/``exp_avg_sq``."""
    import torch

    return isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW))


def _group_decoupled(optimizer: Optimizer, group: dict) -> bool:
    import torch

    if isinstance(optimizer, torch.optim.AdamW):
        return True
    return bool(group.get("decoupled_weight_decay", False))


def is_decoupled_adam(optimizer: Optimizer) -> bool:
    """True for AdamW and ``Adam(decoupled_weight_decay=True)``."""
    return is_adam_family(optimizer) and all(_group_decoupled(optimizer, g) for g in optimizer.param_groups)


def is_coupled_l2(optimizer: Optimizer) -> bool:
    """True when an Adam group has ``weight_decay > 0`` applied as L2 through the moments."""
    if not is_adam_family(optimizer):
        return False
    return any(
        float(g.get("weight_decay", 0.0)) > 0 and not _group_decoupled(optimizer, g)
        for g in optimizer.param_groups
    )


def coupled_l2_message(optimizer: Optimizer) -> str:
    groups = [
        f"{g.get('name', i)} (weight_decay={g.get('weight_decay')})"
        for i, g in enumerate(optimizer.param_groups)
        if float(g.get("weight_decay", 0.0)) > 0 and not _group_decoupled(optimizer, g)
    ]
    return (
        f"{type(optimizer).__name__} with weight_decay > 0 in group(s) {', '.join(groups)} is L2 regularization "
        "coupled through Adam's moments, not decoupled weight decay: the penalty is divided by sqrt(v)+eps per "
        "coordinate, so weights with large gradients are barely decayed. Use torch.optim.AdamW (or "
        "Adam(decoupled_weight_decay=True)) for weight decay."
    )
