"""Loading an optimizer checkpoint into regrouped parameter groups, by parameter name. Pure torch.

``torch.optim.Optimizer.load_state_dict`` matches saved state to tensors by *position*: the i-th tensor of the
checkpoint's groups gets the i-th tensor of the current groups. When the grouping changed between runs (a
``no_decay_patterns`` edit, ``exclude_embeddings``), that either fails with a generic size error or, when the
group sizes happen to match, silently hands each tensor another tensor's Adam moments. Groups built by
:func:`lightning_adamw.build_param_groups` carry ``param_names``, and torch saves them in the state dict: so the
state can follow each tensor by name instead.

:func:`remap_state_dict` rewrites a saved state dict into the current layout (the result then loads through
torch's own positional ``load_state_dict``):

* each tensor's state follows its name into whatever group the tensor is in now;
* a tensor that the checkpoint does not know starts fresh; a checkpoint tensor that is gone is dropped;
* a tensor whose state has another shape than the tensor is an error naming it;
* group hyperparameters: for the groups given a ``configured`` entry, the configuration wins (torch would
  overwrite ``lr``, ``weight_decay``, ``betas``... with the checkpoint's); other groups (added later with
  ``add_param_group``) are restored from the checkpoint as torch does. A group under a weight decay schedule
  (:class:`~lightning_adamw.weight_decay.WeightDecayScheduler`) holds its latest step's ``weight_decay``: its
  base decay ``base_weight_decay`` is what is compared and reported;
* without names on both sides the positional load is kept, but different group sizes are an error that names
  the groups.

The returned :class:`StateRemap` says what moved, what starts fresh and which hyperparameters changed.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from lightning_adamw.weight_decay.scheduler import BASE_KEY

__all__ = ["PER_ELEMENT_STATE_KEYS", "LrRule", "StateRemap", "group_label", "remap_state_dict"]

#: State entries that hold one value per element of the parameter (Adam/AdamW/NAdam/RAdam/Adamax moments, SGD
#: momentum, RMSprop/Adadelta/Adagrad/ASGD/Rprop buffers): their shape must equal the parameter's. Other entries
#: (``step``, Adafactor's factored ``row_var``/``col_var``) have shapes of their own and are not compared.
PER_ELEMENT_STATE_KEYS = frozenset(
    {
        "exp_avg",
        "exp_avg_sq",
        "max_exp_avg_sq",
        "exp_inf",
        "momentum_buffer",
        "square_avg",
        "acc_delta",
        "grad_avg",
        "sum",
        "ax",
        "prev",
    }
)

#: How the learning rate of a configured group is set when loading:
#: ``"configured"``: the configured ``lr`` (no scheduler: the new configuration wins);
#: ``"schedule"``: the checkpoint's ``lr`` times ``configured initial_lr / checkpoint initial_lr`` (a scheduler
#: keeps its progress and follows the new base rate; the checkpoint's lr when it has no ``initial_lr``);
#: ``"checkpoint"``: the checkpoint's ``lr`` (schedulers that keep their progress only in ``lr``, such as
#: ``ReduceLROnPlateau``).
LrRule = Literal["configured", "schedule", "checkpoint"]

# Keys of a saved group that are not hyperparameters.
_STRUCTURE_KEYS = ("params", "param_names")
# How keys are called in messages.
_KEY_LABELS = {"initial_lr": "base lr"}
# Hyperparameters worth a word when the configuration changes them on resume.
_REPORTED_KEYS = ("lr", "initial_lr", "weight_decay", "betas", "eps", "momentum", "amsgrad", "maximize")


def group_label(group: dict[str, Any], index: int) -> str:
    """A group's ``"name"``, else ``group<index>`` (the labels the monitor uses)."""
    name = group.get("name")
    return str(name) if name is not None else f"group{index}"


@dataclass
class StateRemap:
    """What :func:`remap_state_dict` did."""

    by_name: bool
    """Whether state was matched by parameter name (else by position)."""
    moved: list[tuple[str, str, str]] = field(default_factory=list)
    """``(tensor name, checkpoint group, current group)`` for tensors whose group changed."""
    fresh: list[str] = field(default_factory=list)
    """Current tensors that the checkpoint does not know: their optimizer state starts empty."""
    dropped: list[str] = field(default_factory=list)
    """Checkpoint tensors that are in no current group: their state is not loaded."""
    changed: list[tuple[str, str, Any, Any]] = field(default_factory=list)
    """``(group, key, checkpoint value, value now)`` for hyperparameters the configuration changed."""
    kept: list[tuple[str, str, Any, Any]] = field(default_factory=list)
    """``(group, key, configured value, checkpoint value kept)``: the checkpoint's value wins (``lr_rule=
    "checkpoint"``)."""
    notes: list[str] = field(default_factory=list)
    """Other adjustments in plain words."""

    def message(self) -> str | None:
        """One line for the log, or ``None`` when the state loaded exactly as saved."""
        parts: list[str] = []
        if self.moved:
            parts.append(
                ", ".join(f"{n} moved {a} -> {b}" for n, a, b in _first(self.moved)) + _more(self.moved)
            )
        if self.by_name and (self.moved or self.fresh or self.dropped):
            parts.append(
                f"{len(self.fresh)} tensor{'s' if len(self.fresh) != 1 else ''} start fresh"
                + (f" ({', '.join(_first(self.fresh))}{_more(self.fresh)})" if self.fresh else "")
            )
        if self.dropped:
            parts.append(
                f"{len(self.dropped)} checkpoint tensor{'s' if len(self.dropped) != 1 else ''} in no current group "
                f"dropped ({', '.join(_first(self.dropped))}{_more(self.dropped)})"
            )
        if self.changed:
            shown = ", ".join(
                f"{g} {_KEY_LABELS.get(k, k)} {_fmt(a)} -> {_fmt(b)}" for g, k, a, b in self.changed
            )
            parts.append(f"the new configuration applies: {shown}")
        if self.kept:
            shown = ", ".join(f"{g} {k} {_fmt(b)} (configured {_fmt(a)})" for g, k, a, b in self.kept)
            parts.append(f"kept from the checkpoint: {shown}")
        parts.extend(self.notes)
        if not parts:
            return None
        how = "by parameter name" if self.by_name else "by position"
        return f"lightning-adamw: resumed optimizer state {how}: " + "; ".join(parts)


def _first(items: Sequence[Any], n: int = 5) -> Sequence[Any]:
    return items[:n]


def _more(items: Sequence[Any], n: int = 5) -> str:
    return f", ... (+{len(items) - n})" if len(items) > n else ""


def _fmt(value: Any) -> str:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, tuple):
        return "(" + ", ".join(_fmt(v) for v in value) + ")"
    return repr(value)


def _as_float(value: Any) -> float | None:
    if isinstance(value, torch.Tensor):
        return float(value.item()) if value.numel() == 1 else None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _same(a: Any, b: Any) -> bool:
    fa, fb = _as_float(a), _as_float(b)
    if fa is not None and fb is not None:
        return fa == fb or (math.isnan(fa) and math.isnan(fb))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    try:
        return bool(a == b)
    except Exception:  # tensors of several elements and other odd values: treat as different
        return False


def _names_of(group: dict[str, Any]) -> list[str] | None:
    names = group.get("param_names")
    return list(names) if names is not None else None


def _match_saved_group(
    index: int,
    group: dict[str, Any],
    names: list[str] | None,
    saved_groups: Sequence[dict[str, Any]],
    same_layout: bool,
) -> dict[str, Any] | None:
    """The checkpoint group that corresponds to a current group: same ``"name"``, else the one sharing the most
    tensor names, else the same position when the layouts have the same number of groups."""
    name = group.get("name")
    if name is not None:
        for saved in saved_groups:
            if saved.get("name") == name:
                return saved
    if names:
        wanted = set(names)
        best = max(saved_groups, key=lambda s: len(wanted & set(s.get("param_names") or ())), default=None)
        if best is not None and wanted & set(best.get("param_names") or ()):
            return best
    if same_layout and index < len(saved_groups):
        return saved_groups[index]
    return None


def _hyperparameters(
    group: dict[str, Any],
    configured: dict[str, Any] | None,
    saved: dict[str, Any] | None,
    lr_rule: LrRule,
    label: str,
    report: StateRemap,
) -> dict[str, Any]:
    """The hyperparameters a current group gets from the load (everything but ``params``/``param_names``)."""
    if configured is None:
        # A group the configuration does not describe (added with add_param_group): torch's rule, the checkpoint
        # wins, so a callback that manages that group's lr (BackboneFinetuning) resumes where it was.
        source = saved if saved is not None else group
        return {k: copy.deepcopy(v) for k, v in source.items() if k not in _STRUCTURE_KEYS}
    values = {k: copy.deepcopy(v) for k, v in configured.items() if k not in _STRUCTURE_KEYS}
    if saved is None:
        return values
    for key in _REPORTED_KEYS:
        if key == "lr" or key not in values or key not in saved:
            continue
        old, new = saved[key], values[key]
        if key == "weight_decay":
            # A scheduled group holds the value of its latest step; its configuration is the base decay λ.
            old, new = saved.get(BASE_KEY, old), values.get(BASE_KEY, new)
        if not _same(old, new):
            report.changed.append((label, key, old, new))
    if "lr" not in values or "lr" not in saved:
        return values
    if lr_rule == "checkpoint":
        if not _same(saved["lr"], values["lr"]):
            report.kept.append((label, "lr", values["lr"], saved["lr"]))
        values["lr"] = _like(values["lr"], _as_float(saved["lr"]))
    elif lr_rule == "schedule" and "initial_lr" in saved and "initial_lr" in values:
        old_base, new_base, old_lr = (
            _as_float(saved["initial_lr"]),
            _as_float(values["initial_lr"]),
            _as_float(saved["lr"]),
        )
        if old_base is not None and new_base is not None and old_lr is not None and old_base > 0:
            lr = old_lr * (new_base / old_base)  # the schedule's progress (lr / base) kept, on the new base
            if not _same(old_lr, lr):
                report.changed.append((label, "lr", old_lr, lr))
            values["lr"] = _like(values["lr"], lr)
    elif not _same(saved["lr"], values["lr"]):
        report.changed.append((label, "lr", saved["lr"], values["lr"]))
    return values


def _like(template: Any, value: float | None) -> Any:
    """``value`` with the type of ``template`` (a tensor lr stays a tensor on its device)."""
    if value is None:
        return template
    if isinstance(template, torch.Tensor):
        return torch.full_like(template, value)
    return value


def _check_shape(name: str, state: dict[str, Any], param: torch.Tensor) -> None:
    for key, value in state.items():
        if key in PER_ELEMENT_STATE_KEYS and isinstance(value, torch.Tensor) and value.shape != param.shape:
            raise ValueError(
                f"the checkpoint's optimizer state of `{name}` ({key}) has shape {tuple(value.shape)}, but the "
                f"tensor now has shape {tuple(param.shape)}: the model changed shape since the checkpoint, so its "
                "optimizer state cannot be resumed (load the weights only, or resume with the same model)"
            )


def _fill_amsgrad(state: dict[str, Any], values: dict[str, Any], name: str, report: StateRemap) -> None:
    # Adam(amsgrad=True) reads `max_exp_avg_sq` from any state that is not empty: a run resumed with amsgrad turned
    # on would fail at its first step with a KeyError. The running maximum starts from the current second moment.
    if values.get("amsgrad") and "exp_avg_sq" in state and "max_exp_avg_sq" not in state:
        state["max_exp_avg_sq"] = state["exp_avg_sq"].clone()
        if not any(n.startswith("amsgrad") for n in report.notes):
            report.notes.append("amsgrad turned on: max_exp_avg_sq starts from exp_avg_sq")


def _group_summary(groups: Sequence[dict[str, Any]]) -> str:
    return (
        "["
        + ", ".join(f"{group_label(g, i)}: {len(g['params'])} tensors" for i, g in enumerate(groups))
        + "]"
    )


def remap_state_dict(
    saved: dict[str, Any],
    groups: Sequence[dict[str, Any]],
    configured: Sequence[dict[str, Any] | None] | None = None,
    lr_rule: LrRule = "configured",
) -> tuple[dict[str, Any], StateRemap]:
    """Rewrite an optimizer ``state_dict`` into the layout of ``groups``, matching tensors by name.

    Args:
        saved: an optimizer ``state_dict()`` (``{"state": {id: {...}}, "param_groups": [...]}``), e.g. from a
            checkpoint. Not modified.
        groups: the current ``optimizer.param_groups`` (each with ``params``; ``param_names`` to match by name).
        configured: per current group, the hyperparameters the configuration asks for (``lr``,
            ``weight_decay``, ``betas``, ``eps``, ``initial_lr``... everything but ``params``), or ``None`` for a
            group whose hyperparameters come from the checkpoint (groups added later). ``None`` for the whole
            argument: every group is restored from the checkpoint, as torch does.
        lr_rule: how the ``lr`` of a configured group is set; see :data:`LrRule`.

    Returns:
        ``(state_dict, report)``: a state dict in the current layout (ids ``0..n-1`` in ``groups`` order, which
        torch's ``load_state_dict`` maps by position) and a :class:`StateRemap`.

    Raises:
        ValueError: a tensor's saved state has another shape than the tensor (naming it); without parameter names
            on both sides, a different number of groups or of tensors in a group (naming the groups and sizes);
            a checkpoint that names one tensor twice.
    """
    saved_groups: list[dict[str, Any]] = list(saved["param_groups"])
    saved_state: dict[Any, Any] = saved["state"]
    if configured is not None and len(configured) != len(groups):
        raise ValueError(f"`configured` has {len(configured)} entries for {len(groups)} groups")
    current_names = [_names_of(g) for g in groups]
    by_name = (
        bool(saved_groups)
        and all(_names_of(g) is not None for g in saved_groups)
        and all(n is not None for n in current_names)
    )
    report = StateRemap(by_name=by_name)
    same_layout = len(saved_groups) == len(groups)

    if not by_name:
        sizes_now = [len(g["params"]) for g in groups]
        sizes_saved = [len(g["params"]) for g in saved_groups]
        if sizes_now != sizes_saved:
            raise ValueError(
                f"cannot resume the optimizer state: the checkpoint's groups {_group_summary(saved_groups)} do not "
                f"match this optimizer's groups {_group_summary(groups)}, and without parameter names on both sides "
                "(`param_names`, which build_param_groups records) the state can only be matched by position. Build "
                "the groups the same way as the run that wrote the checkpoint (same grouping options, same frozen "
                "tensors), or resume from weights only."
            )
        new_groups = []
        new_state = dict(saved_state)
        for i, (group, saved_group) in enumerate(zip(groups, saved_groups, strict=True)):
            values = _hyperparameters(
                group,
                configured[i] if configured else None,
                saved_group,
                lr_rule,
                group_label(group, i),
                report,
            )
            ids = list(saved_group["params"])
            for pid in ids:
                if pid in new_state:
                    new_state[pid] = dict(new_state[pid])
                    _fill_amsgrad(new_state[pid], values, f"{group_label(group, i)}[{pid}]", report)
            entry = {**values, "params": ids}
            if "param_names" in saved_group:
                entry["param_names"] = list(saved_group["param_names"])
            new_groups.append(entry)
        return {**saved, "state": new_state, "param_groups": new_groups}, report

    # By name: where each checkpoint tensor was, and its state.
    where: dict[str, tuple[str, Any]] = {}
    for i, saved_group in enumerate(saved_groups):
        label = group_label(saved_group, i)
        for name, pid in zip(saved_group["param_names"], saved_group["params"], strict=True):
            if name in where:
                raise ValueError(f"the checkpoint's optimizer groups name the tensor `{name}` twice")
            where[name] = (label, pid)

    new_state: dict[int, dict[str, Any]] = {}
    new_groups: list[dict[str, Any]] = []
    seen: set[str] = set()
    next_id = 0
    for i, group in enumerate(groups):
        names = current_names[i]
        assert names is not None
        label = group_label(group, i)
        saved_group = _match_saved_group(i, group, names, saved_groups, same_layout)
        values = _hyperparameters(
            group, configured[i] if configured else None, saved_group, lr_rule, label, report
        )
        ids: list[int] = []
        for name, param in zip(names, group["params"], strict=True):
            ids.append(next_id)
            seen.add(name)
            if name not in where:
                report.fresh.append(name)
            else:
                old_label, pid = where[name]
                if old_label != label:
                    report.moved.append((name, old_label, label))
                if pid in saved_state:
                    state = dict(saved_state[pid])
                    _check_shape(name, state, param)
                    _fill_amsgrad(state, values, name, report)
                    new_state[next_id] = state
            next_id += 1
        new_groups.append({**values, "params": ids, "param_names": list(names)})
    report.dropped = [n for n in where if n not in seen]
    return {**saved, "state": new_state, "param_groups": new_groups}, report
