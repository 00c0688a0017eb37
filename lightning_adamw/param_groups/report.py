"""``describe_param_groups``: the human-readable table of groups and of the rule behind every tensor."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any

from torch import nn

from lightning_adamw.param_groups.classify import check_weight_decay, classify_parameters
from lightning_adamw.param_groups.groups import (
    _group_order,
    check_group_prefix,
    group_name,
    group_sizes,
    group_weight_decay,
)
from lightning_adamw.param_groups.rules import DECAY, NO_DECAY, ParamDecision

__all__ = ["describe_param_groups"]


def _fmt_count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(n)


def describe_param_groups(
    module: nn.Module | None = None,
    weight_decay: float | None = None,
    *,
    decisions: Sequence[ParamDecision] | None = None,
    max_rows_per_reason: int = 4,
    group_prefix: str | None = None,
    decay_header: str = "weight_decay",
    **options: Any,
) -> str:
    """A human-readable table of the groups: size of each group and which rule put which tensor there.

    ``decay_header`` names the decay column (``"λ"`` where a weight-decay schedule makes the optimizer's
    ``weight_decay`` another number than the λ shown).

    Pass the same ``module`` and options as to :func:`~lightning_adamw.build_param_groups` (``include_frozen``,
    ``group_prefix``, ``group_overrides``, ``layer_decay``, ...), or ready ``decisions`` from
    :func:`~lightning_adamw.classify_parameters`. Tensors are listed per rule, at most ``max_rows_per_reason``
    names each. When frozen tensors are included (``include_frozen=True``), a ``frozen`` column counts them per
    group and a last line names them. When groups are split further (layer decay, overrides, ``param._optim``),
    the first table has one row per group with its ``lr_scale``, weight decay, ``depth`` and rules, the second
    is per class (decay / no_decay) and rule, and the last lines say how depths were found, which override took
    how many tensors, and what the model declared.
    """
    prefix = check_group_prefix(group_prefix)
    # build_param_groups' options that do not change which tensor goes where (the table shows lr scales).
    options.pop("lr", None)
    options.pop("defer_lr_scale", None)
    if decisions is None:
        if module is None:
            raise TypeError("`describe_param_groups` needs `module` or `decisions`")
        check_weight_decay(weight_decay)
        decisions = classify_parameters(module, **options)
    if any(d.subgroup for d in decisions):
        return _describe_split(decisions, weight_decay, prefix, max_rows_per_reason, decay_header)
    sizes = group_sizes(decisions)
    frozen = [d for d in decisions if d.frozen]
    total = sum(s["params"] for s in sizes.values()) or 1
    width = max(9, *(len(group_name(g, prefix)) for g in (DECAY, NO_DECAY)))
    lines: list[str] = []
    header = f"{'group':<{width}} {decay_header:>12} {'tensors':>8} {'params':>10} {'share':>7}"
    if frozen:
        header += f" {'frozen':>7}"
    lines += [header, "-" * len(header)]
    for kind in (DECAY, NO_DECAY):
        if kind not in sizes:
            continue
        wd = "0.0" if kind == NO_DECAY else ("default" if weight_decay is None else f"{weight_decay:g}")
        s = sizes[kind]
        row = (
            f"{group_name(kind, prefix):<{width}} {wd:>12} {s['tensors']:>8} {_fmt_count(s['params']):>10} "
            f"{100 * s['params'] / total:>6.1f}%"
        )
        if frozen:
            row += f" {sum(d.group == kind for d in frozen):>7}"
        lines.append(row)
    lines.append("")
    lines += _rule_table(decisions, prefix, width, "group", max_rows_per_reason)
    lines += _frozen_line(frozen, max_rows_per_reason)
    return "\n".join(lines)


def _rule_table(
    decisions: Sequence[ParamDecision], prefix: str | None, width: int, title: str, max_rows: int
) -> list[str]:
    lines = [f"{title:<{width}} {'rule':<28} {'tensors':>8} {'params':>10}  examples"]
    by_rule: dict[tuple[str, str], list[ParamDecision]] = {}
    for d in decisions:
        by_rule.setdefault((d.group, d.reason), []).append(d)
    for (kind, reason), items in sorted(by_rule.items()):
        lines.append(
            f"{group_name(kind, prefix):<{width}} {reason:<28} {len(items):>8} "
            f"{_fmt_count(sum(d.numel for d in items)):>10}  {_examples([d.name for d in items], max_rows)}"
        )
    return lines


def _examples(names: list[str], max_rows: int) -> str:
    shown = ", ".join(names[:max_rows])
    return shown + (f", ... (+{len(names) - max_rows})" if len(names) > max_rows else "")


def _frozen_line(frozen: list[ParamDecision], max_rows: int) -> list[str]:
    if not frozen:
        return []
    return [
        "",
        f"frozen now (requires_grad=False, grouped for later unfreezing): {len(frozen)} tensors, "
        f"{_fmt_count(sum(d.numel for d in frozen))} params: {_examples([d.name for d in frozen], max_rows)}",
    ]


def _describe_split(
    decisions: Sequence[ParamDecision],
    weight_decay: float | None,
    prefix: str | None,
    max_rows: int,
    decay_header: str = "weight_decay",
) -> str:
    members: dict[tuple[str, str], list[ParamDecision]] = {}
    for d in decisions:
        members.setdefault((d.group, d.subgroup), []).append(d)
    order = _group_order(decisions)
    names = {key: group_name(key[0], prefix, key[1]) for key in order}
    frozen = [d for d in decisions if d.frozen]
    with_depth = any(d.depth is not None for d in decisions)
    total = sum(d.numel for d in decisions) or 1
    width = max(9, *(len(n) for n in names.values()))
    header = f"{'group':<{width}} {'lr_scale':>9} {decay_header:>12}"
    if with_depth:
        header += f" {'depth':>5}"
    header += f" {'tensors':>8} {'params':>10} {'share':>7}"
    if frozen:
        header += f" {'frozen':>7}"
    header += "  rules"
    lines = [header, "-" * len(header)]
    for key in order:
        items = members[key]
        head = items[0]
        wd = group_weight_decay(head, weight_decay)
        if wd is not None:
            wd_text = f"{wd:g}"
        elif head.weight_decay_scale != 1.0:
            wd_text = f"default*{head.weight_decay_scale:g}"
        else:
            wd_text = "default"
        lr_text = "declared" if any(k == "lr" for k, _ in head.declared) else f"{head.lr_scale:.4g}"
        row = f"{names[key]:<{width}} {lr_text:>9} {wd_text:>12}"
        if with_depth:
            row += f" {head.depth if head.depth is not None else '':>5}"
        numel = sum(d.numel for d in items)
        row += f" {len(items):>8} {_fmt_count(numel):>10} {100 * numel / total:>6.1f}%"
        if frozen:
            row += f" {sum(d.frozen for d in items):>7}"
        reasons = list(dict.fromkeys(d.reason for d in items))
        row += "  " + ", ".join(reasons[:3]) + (f", ... (+{len(reasons) - 3})" if len(reasons) > 3 else "")
        lines.append(row)
    lines.append("")
    class_width = max(9, *(len(group_name(g, prefix)) for g in (DECAY, NO_DECAY)))
    lines += _rule_table(decisions, prefix, class_width, "class", max_rows)
    if with_depth:
        rules = Counter(d.depth_rule for d in decisions)
        listed = "; ".join(f"{rule}: {n} tensors" for rule, n in rules.items())
        lines += [
            "",
            f"depth (lr_scale = layer_decay ** (L + 1 - depth), L + 1 = the head's depth): {listed}",
        ]
    overrides = Counter(d.override for d in decisions if d.override is not None)
    if overrides:
        listed = "; ".join(f"{name}: {n} tensors" for name, n in overrides.items())
        lines += ["", f"group_overrides (first matching entry wins): {listed}"]
    declared: dict[str, list[ParamDecision]] = {}
    for d in decisions:
        if d.declared or (d.weight_decay is not None and d.reason == "param._optim"):
            declared.setdefault(d.subgroup.rsplit("/", 1)[-1], []).append(d)
    if declared:
        parts = []
        for part, items in declared.items():
            head = items[0]
            settings = [f"{k}={v!r}" for k, v in head.declared]
            if head.weight_decay is not None and head.reason == "param._optim":
                settings.insert(0, f"weight_decay={head.weight_decay!r}")
            parts.append(f"{part}: {', '.join(settings)} ({_examples([d.name for d in items], max_rows)})")
        lines += ["", "declared by the model (param._optim, absolute values): " + "; ".join(parts)]
    lines += _frozen_line(frozen, max_rows)
    return "\n".join(lines)
