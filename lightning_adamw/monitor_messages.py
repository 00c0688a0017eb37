"""What :class:`~lightning_adamw.monitor.WeightDecayMonitor` tells the user in plain words, and the constant
per-fit metrics it derives from the optimizer's groups. Pure functions of the optimizers (no Trainer), each
returning ``(key, message)`` pairs that the monitor warns about once per key."""

from __future__ import annotations

import torch

from lightning_adamw.update_split import (
    ADAMW_W_OLD_METRICS,
    KIND_PREFIX,
    W_OLD_MAX_RELATIVE_ERROR,
    GroupSplit,
    group_label,
    group_labels,
    layer_labels,
    param_labels,
)
from lightning_adamw.weight_decay.timescale import group_timescales, timescale_warning

__all__ = [
    "COUNTER_PREFIX",
    "duplicate_names_messages",
    "generic_optimizer_message",
    "timescale_facts",
    "w_old_unknown_message",
]

COUNTER_PREFIX = "adamw"
Message = tuple[str, str]


def generic_optimizer_message(optimizer: torch.optim.Optimizer) -> str:
    """Why an optimizer that is not Adam/AdamW gets only the measured update (NAdam, RAdam, Adamax keep Adam-like
    moments but take another step, so the moments cannot be replayed into AdamW's split)."""
    name = type(optimizer).__name__
    keeps_moments = name in {"NAdam", "RAdam", "Adamax", "SparseAdam"} or any(
        "exp_avg" in state for state in optimizer.state.values()
    )
    why = (
        f"{name} keeps Adam-like moments, but its step is not AdamW's w*(1 - lr*wd) - lr*m_hat/(sqrt(v_hat)+eps),"
        " so it cannot be replayed from its state to split decay from gradient"
        if keeps_moments
        else f"{name} has no Adam state (exp_avg/exp_avg_sq) to split into decay and gradient parts"
    )
    return (
        f"WeightDecayMonitor: {why}; logging only optim/<group>/{{update_norm, weight_norm, update_to_weight,"
        " angular_update}, measured from a copy of the weights taken on logging steps."
    )


def timescale_facts(
    optimizers: list[torch.optim.Optimizer], planned_steps: int | None, steps_per_epoch: float | None
) -> tuple[dict[int, dict[str, float]], list[Message]]:
    """Per optimizer index, the constant metrics of its decaying AdamW groups' EMA timescales (Wang & Aitchison,
    2024): ``adamw/<group>/ema_timescale_fraction`` (τ at the group's peak lr over the planned optimizer steps;
    left out when the number of steps is not known in advance) and, for groups a weight decay schedule follows,
    ``adamw/<group>/base_weight_decay`` (λ); and one warning per group whose τ is longer than the run or shorter
    than one epoch (:func:`~lightning_adamw.weight_decay.timescale_warning`)."""
    metrics: dict[int, dict[str, float]] = {}
    messages: list[Message] = []
    for k, optimizer in enumerate(optimizers):
        prefix = f"opt{k}." if len(optimizers) > 1 else ""
        labels = group_labels(optimizer.param_groups)
        found = metrics.setdefault(k, {})
        for ts in group_timescales(optimizer):
            label = f"{prefix}{labels[ts.index]}"
            key = f"{KIND_PREFIX['adamw']}/{label}"
            if planned_steps:
                found[f"{key}/ema_timescale_fraction"] = ts.tau_steps / planned_steps
            if ts.schedule != "constant":
                found[f"{key}/base_weight_decay"] = ts.base_weight_decay
            warning = timescale_warning(
                ts.tau_steps, total_steps=planned_steps, steps_per_epoch=steps_per_epoch
            )
            if warning:
                messages.append((f"timescale-{label}", f"WeightDecayMonitor: group '{label}': {warning}."))
    return metrics, messages


def duplicate_names_messages(
    k: int, optimizer: torch.optim.Optimizer, num_optimizers: int, per_layer: bool
) -> list[Message]:
    """How groups and tensors with the same names are told apart in the metric keys."""
    messages: list[Message] = []
    groups = optimizer.param_groups
    where = f"optimizer {k} ({type(optimizer).__name__})" if num_optimizers > 1 else type(optimizer).__name__
    prefix = f"opt{k}." if num_optimizers > 1 else ""
    raw = [group_label(g, i) for i, g in enumerate(groups)]
    labels = group_labels(groups)
    if raw != labels:
        renamed = ", ".join(
            f"group {i} '{r}' as '{prefix}{u}'"
            for i, (r, u) in enumerate(zip(raw, labels, strict=True))
            if raw.count(r) > 1
        )
        messages.append(
            (
                f"duplicate-groups-{k}",
                f"WeightDecayMonitor: {where} has several parameter groups with the same name"
                f" ({sorted({r for r in raw if raw.count(r) > 1})}); they are logged apart, {renamed}"
                " (e.g. adamw/<label>/decay_norm). Lightning's LearningRateMonitor refuses duplicate group"
                " names: give each group its own 'name', e.g. build the groups of each part with"
                ' `build_param_groups(self.backbone, weight_decay, group_prefix="backbone")`.',
            )
        )
    if not per_layer:
        return messages
    names = [param_labels(g, i, label=labels[i]) for i, g in enumerate(groups)]
    pairs = [
        (n, key)
        for ns, ks in zip(names, layer_labels(groups), strict=True)
        for n, key in zip(ns, ks, strict=True)
        if key != n
    ]
    if pairs:
        qualified = sorted({n for n, _ in pairs})
        shown = ", ".join(qualified[:5]) + (f" and {len(qualified) - 5} more" if len(qualified) > 5 else "")
        messages.append(
            (
                f"duplicate-tensors-{k}",
                f"WeightDecayMonitor: tensor names {shown} appear in more than one parameter group of {where};"
                " their per-layer metrics are logged under the group's label,"
                f" <prefix>_layer/{prefix}<group>/<name>/<metric> (e.g. adamw_layer/{prefix}{pairs[0][1]}"
                "/decay_norm).",
            )
        )
    return messages


def w_old_unknown_message(label: str, group: GroupSplit, step: int) -> Message:
    """The group whose weights before the step cannot be recovered (``lr * weight_decay`` at or near 1)."""
    q = 1.0 - group.lr * group.weight_decay
    return (
        f"w-old-{label}",
        f"WeightDecayMonitor: group '{label}' has lr = {group.lr:g} and weight_decay = {group.weight_decay:g}"
        f" at step {step}, so AdamW multiplied its weights by 1 - lr*weight_decay = {q:.3g}: the weights"
        " before the step cannot be recovered from the optimizer state to better than"
        f" {W_OLD_MAX_RELATIVE_ERROR:.1%} in the parameters' precision."
        f" {', '.join(ADAMW_W_OLD_METRICS[:-1])} and {ADAMW_W_OLD_METRICS[-1]} are left out for this"
        f" group while this lasts (logging steps counted in {COUNTER_PREFIX}/w_old_unknown_steps);"
        " grad_update_norm, weight_norm and uniform_decay_rate are still logged. lr*weight_decay near 1"
        " wipes out the weights at every step: check the learning rate and weight_decay.",
    )
