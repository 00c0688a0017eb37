"""Optimizer parameter groups from decisions: ``build_param_groups``, the lr scales, and the checks on group names."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.optim import Optimizer

from lightning_adamw.param_groups.classify import _check_bool, _classify, check_weight_decay
from lightning_adamw.param_groups.names import ParamSite, parameter_sites
from lightning_adamw.param_groups.overrides import check_scale
from lightning_adamw.param_groups.rules import DECAY, DEFAULT_NORM_CLASS_PATTERN, NO_DECAY, ParamDecision

_DECLARED = re.compile(r"declared_(\d+)")

__all__ = [
    "apply_lr_scales",
    "build_param_groups",
    "check_group_prefix",
    "check_lr_scales",
    "check_unique_group_names",
    "group_hparams",
    "group_name",
    "group_sizes",
    "group_weight_decay",
    "groups_from_decisions",
]


def check_group_prefix(group_prefix: Any) -> str | None:
    """``group_prefix`` checked: ``None`` or a non-empty string without a leading or trailing ``/``."""
    if group_prefix is None:
        return None
    if not isinstance(group_prefix, str):
        raise TypeError(f"`group_prefix` must be a string or None, got {type(group_prefix).__name__}")
    if (
        not group_prefix.strip()
        or group_prefix != group_prefix.strip("/")
        or group_prefix != group_prefix.strip()
    ):
        raise ValueError(
            f"`group_prefix` must be a non-empty name without leading/trailing '/' or spaces, got {group_prefix!r}"
        )
    return group_prefix


def group_name(group: str, group_prefix: str | None = None, subgroup: str = "") -> str:
    """``"decay"``, ``"no_decay/layer_3"``, ``"<group_prefix>/decay/backbone"``: ``[prefix/]group[/subgroup]``."""
    name = group if not subgroup else f"{group}/{subgroup}"
    return name if group_prefix is None else f"{group_prefix}/{name}"


def build_param_groups(
    module: nn.Module,
    weight_decay: float | None,
    *,
    exclude_embeddings: bool = False,
    no_decay_patterns: str | Iterable[str] | None = None,
    decay_patterns: str | Iterable[str] | None = None,
    extra_norm_types: Iterable[type[nn.Module]] | type[nn.Module] | None = None,
    norm_class_pattern: str | None = DEFAULT_NORM_CLASS_PATTERN,
    use_model_hooks: bool = True,
    wrapper: nn.Module | None = None,
    include_frozen: bool = False,
    group_prefix: str | None = None,
    group_overrides: Iterable[Mapping[str, Any]] | Mapping[str, Any] | None = None,
    layer_decay: float | None = None,
    layer_id: Callable[[str], int] | None = None,
    num_layers: int | None = None,
    lr: float | None = None,
    defer_lr_scale: bool = False,
) -> list[dict[str, Any]]:
    """Split the trainable parameters of ``module`` into ``"decay"`` and ``"no_decay"`` optimizer groups, each
    split further by layer depth (``layer_decay``), by ``group_overrides`` and by per-tensor ``param._optim``.

    Args:
        module: any ``nn.Module`` (plain, ``torch.compile``-d, DDP- or FSDP-wrapped, or on the ``meta`` device).
        weight_decay: decay of the ``"decay"`` group. ``None`` leaves the key out, so the optimizer's own
            ``weight_decay`` default applies (used when the optimizer was configured elsewhere, e.g. LightningCLI).
            The ``"no_decay"`` group always gets ``0.0``.
        exclude_embeddings: also put embedding tables and learned tokens and arrays (``pos_embed``,
            ``cls_token``, ``class_embedding``, ``latents``, whatever their shape) in ``"no_decay"``.
        no_decay_patterns: extra names to exclude from decay: globs (``"*.gate"``) or ``"re:<regex>"``, matched
            against the names ``module.named_parameters()`` prints (wrapper prefixes left out).
        decay_patterns: names to decay whatever the other rules say (same syntax); must not overlap the above.
        extra_norm_types: more module classes whose own parameters are norm parameters.
        norm_class_pattern: regex searched in class names to recognise norm layers defined outside torch;
            ``None`` turns the class-name rule off.
        use_model_hooks: honour ``no_weight_decay()`` / ``no_weight_decay_keywords()`` methods of the model, and
            its ``layer_id(name)`` / ``group_matcher()`` methods for ``layer_decay``. Flags the model sets on
            tensors (``param._no_weight_decay = True``, ``param._optim``) are always honoured.
        wrapper: the FSDP module that wraps ``module`` from outside, if any: sharded FSDP1 parameters are flat
            1-D shards, and their real shapes are kept by the wrapper's flat parameters. For a LightningModule
            attached to a trainer it is found by itself (``trainer.strategy.model``).
        include_frozen: also group tensors with ``requires_grad=False``. torch optimizers skip tensors whose
            ``grad`` is ``None``, so they cost nothing until code unfreezes them with ``requires_grad_(True)``; then
            they train with the right decay.
        group_prefix: name the groups ``"<group_prefix>/decay"`` and ``"<group_prefix>/no_decay"``. Groups built by
            separate calls (a backbone and a head with their own learning rates) must get distinct prefixes:
            same-named groups are merged in per-group metrics, and Lightning's ``LearningRateMonitor`` refuses
            duplicate group names. :func:`check_unique_group_names` checks a finished list.
        group_overrides: ordered list of dicts ``{"pattern": glob or "re:<regex>", "name": str, "lr_scale": float
            > 0, "weight_decay": float >= 0 | "weight_decay_scale": float >= 0}`` (one dict is accepted too). Each
            tensor takes the first entry whose pattern matches one of its names; the entry splits its class into
            ``decay/<name>`` / ``no_decay/<name>`` (``name`` defaults to ``override_<index>``) with ``lr_scale``
            times the lr; ``weight_decay`` (absolute) or ``weight_decay_scale`` (times ``weight_decay``) applies to
            the decay part only, the no_decay part stays at 0. An override never moves a tensor between decay and
            no_decay (``decay_patterns`` / ``no_decay_patterns`` do).
        layer_decay: layer-wise lr decay in (0, 1]: a tensor at depth ``d`` gets ``lr_scale = layer_decay ** (L + 1
            - d)`` (ELECTRA, Clark et al. 2020; BEiT, Bao et al. 2022): embeddings at depth 0, block ``k`` at ``k``,
            what follows the last block (final norm, head) at ``L + 1`` with the full lr. The depth comes from
            ``layer_id``, else a ``layer_id(name)`` / timm ``group_matcher()`` method of the model, else the block
            index in the name (``layers.N``, ``encoder.layer.N``, ``blocks.N``, ``h.N``, nested ``stages.S.layers.B``);
            see :mod:`lightning_adamw.param_groups.depth`. Groups are split per depth (``decay/layer_3``,
            ``no_decay/embed``, ``decay/head``) and carry ``layer_depth``. ``1.0`` keeps the depth groups with
            ``lr_scale`` 1 (same group names across a sweep). Overrides multiply: ``decay/layer_3/<name>``.
        layer_id: callable ``name -> depth`` (int in ``0..L+1``), used instead of the model's hooks and names;
            returning ``None`` for a tensor leaves that one to them (what the errors about a tensor whose place
            relative to the blocks is unknown suggest).
        num_layers: ``L``; default: the number of blocks found (with ``layer_id``: the largest depth minus 1).
        lr: the optimizer's learning rate: each group gets ``"lr": lr * lr_scale`` (and ``lr_scale_applied``).
            Required when any ``lr_scale`` is not 1, unless ``defer_lr_scale``.
        defer_lr_scale: leave the scales in the groups (``lr_scale``, and ``weight_decay_scale`` where
            ``weight_decay`` is ``None``) for :func:`apply_lr_scales`, which the caller must run on the optimizer
            before creating any LR scheduler (what :class:`~lightning_adamw.DecoupledWeightDecayMixin` does).

    Returns:
        Groups ``{"name", "params": [(name, tensor), ...], "weight_decay", "lr_scale", ...}``: ``"decay"`` and
        ``"no_decay"`` when nothing splits them, else ``"<class>/<part>[/<part>...]"`` (``"decay/layer_3"``,
        ``"no_decay/embed/backbone"``, ``"decay/declared_0"``), prefixed with ``group_prefix``. ``params`` holds
        ``(name, tensor)`` pairs so torch records ``param_names`` in each optimizer group and in its state dict;
        torch optimizers keep the other keys (``lr_scale``, ``layer_depth``) in their groups and state dicts.
        Empty groups are left out. Order: by depth, then tensors of no override before those of each override
        (in the order their first tensor appears), then groups of ``param._optim`` declarations, then decay before
        no_decay; tensors in ``named_parameters()`` order.

    Raises:
        TypeError / ValueError: see :func:`~lightning_adamw.classify_parameters`; a bad ``weight_decay``,
            ``group_prefix`` or ``lr``; a scale other than 1 without ``lr`` (and without ``defer_lr_scale``); a
            ``weight_decay_scale`` with ``weight_decay=None`` (without ``defer_lr_scale``).

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        >>> groups = build_param_groups(model, weight_decay=0.1)
        >>> [(g["name"], g["weight_decay"], [n for n, _ in g["params"]]) for g in groups]
        [('decay', 0.1, ['0.weight']), ('no_decay', 0.0, ['0.bias', '1.weight', '1.bias'])]
        >>> optimizer = torch.optim.AdamW(groups, lr=1e-3)
    """
    wd = check_weight_decay(weight_decay)
    prefix = check_group_prefix(group_prefix)
    base_lr = _check_lr(lr)
    _check_bool(defer_lr_scale, "defer_lr_scale")
    decisions, sites = _classify(
        module,
        exclude_embeddings=exclude_embeddings,
        no_decay_patterns=no_decay_patterns,
        decay_patterns=decay_patterns,
        extra_norm_types=extra_norm_types,
        norm_class_pattern=norm_class_pattern,
        use_model_hooks=use_model_hooks,
        wrapper=wrapper,
        include_frozen=include_frozen,
        group_overrides=group_overrides,
        layer_decay=layer_decay,
        layer_id=layer_id,
        num_layers=num_layers,
    )
    return _groups(module, decisions, sites, wd, prefix, base_lr, defer_lr_scale)


def groups_from_decisions(
    module: nn.Module,
    decisions: Sequence[ParamDecision],
    weight_decay: float | None,
    *,
    group_prefix: str | None = None,
    lr: float | None = None,
    defer_lr_scale: bool = False,
) -> list[dict[str, Any]]:
    """Turn :func:`~lightning_adamw.classify_parameters` output into optimizer groups (see
    :func:`build_param_groups` for the groups, ``lr`` and ``defer_lr_scale``). Tensors are found by the same
    structural names the decisions carry.

    Raises:
        ValueError: a decision names no parameter of ``module`` (decisions made for another module); a scale
            without ``lr`` (see :func:`build_param_groups`).
    """
    wd = check_weight_decay(weight_decay)
    prefix = check_group_prefix(group_prefix)
    base_lr = _check_lr(lr)
    _check_bool(defer_lr_scale, "defer_lr_scale")
    return _groups(module, decisions, parameter_sites(module)[1], wd, prefix, base_lr, defer_lr_scale)


def _check_lr(lr: Any) -> float | None:
    if lr is None:
        return None
    if isinstance(lr, bool) or not isinstance(lr, (int, float)):
        raise TypeError(f"`lr` must be a float or None, got {type(lr).__name__} ({lr!r})")
    lr = float(lr)
    if not math.isfinite(lr) or lr < 0:
        raise ValueError(f"`lr` must be a finite number >= 0, got {lr!r}")
    return lr


def group_weight_decay(d: ParamDecision, weight_decay: float | None) -> float | None:
    """The weight decay of the group of ``d`` given the ``weight_decay`` option (``None``: the optimizer's)."""
    if d.group == NO_DECAY:
        return 0.0
    if d.weight_decay is not None:
        return d.weight_decay
    if weight_decay is None:
        return None
    return weight_decay * d.weight_decay_scale


def _group_order(decisions: Sequence[ParamDecision]) -> list[tuple[str, str]]:
    """``(class, subgroup)`` of every group, in the documented order (depth, override, declaration, class)."""
    override_rank: dict[str, int] = {}
    keys: dict[tuple[str, str], tuple[int, int, int, int]] = {}
    for d in decisions:
        key = (d.group, d.subgroup)
        if key in keys:
            continue
        if d.override is not None:
            override_rank.setdefault(d.override, len(override_rank))
        # Override names cannot have the form declared_<k> (check_group_overrides refuses them).
        declared = _DECLARED.fullmatch(d.subgroup.rsplit("/", 1)[-1])
        declared_index = int(declared[1]) if declared else -1
        keys[key] = (
            d.depth if d.depth is not None else 0,
            override_rank[d.override] if d.override is not None else -1,
            declared_index,
            0 if d.group == DECAY else 1,
        )
    return sorted(keys, key=keys.__getitem__)


def _groups(
    module: nn.Module,
    decisions: Sequence[ParamDecision],
    sites: dict[int, list[ParamSite]],
    wd: float | None,
    prefix: str | None,
    lr: float | None,
    defer: bool,
) -> list[dict[str, Any]]:
    by_name: dict[str, Any] = {}
    for places in sites.values():
        for site in places:
            by_name.setdefault(site.name, site.param)
    members: dict[tuple[str, str], list[ParamDecision]] = {}
    for d in decisions:
        if d.name not in by_name:
            raise ValueError(
                f"decision for `{d.name}` names no parameter of {type(module).__name__}: pass the module the "
                "decisions were made for"
            )
        members.setdefault((d.group, d.subgroup), []).append(d)
    scaled = [k for k, ds in members.items() if ds[0].lr_scale != 1.0]
    if scaled and lr is None and not defer:
        raise ValueError(
            f"group {group_name(scaled[0][0], prefix, scaled[0][1])!r} has lr_scale {members[scaled[0]][0].lr_scale:g}, "
            "but a torch optimizer ignores `lr_scale`: pass `lr=` (the optimizer's learning rate) so that each group "
            "gets lr * lr_scale. DecoupledWeightDecayMixin applies the scales for you (build_param_groups(..., "
            "defer_lr_scale=True) followed by apply_lr_scales(optimizer) before any scheduler does the same)"
        )
    groups: list[dict[str, Any]] = []
    for key in _group_order(decisions):
        kind, subgroup = key
        ds = members[key]
        head = ds[0]
        group: dict[str, Any] = {
            "name": group_name(kind, prefix, subgroup),
            "params": [(d.name, by_name[d.name]) for d in ds],
        }
        group_wd = group_weight_decay(head, wd)
        if group_wd is not None:
            group["weight_decay"] = group_wd
        elif head.weight_decay_scale != 1.0:
            if not defer:
                raise ValueError(
                    f"group {group['name']!r} has a `weight_decay_scale` of {head.weight_decay_scale:g} "
                    f"(group_overrides entry {head.override!r}) but `weight_decay` is None, so there is nothing to "
                    "scale: pass `weight_decay=`, or give the override an absolute `weight_decay`"
                )
            group["weight_decay_scale"] = head.weight_decay_scale
        group["lr_scale"] = head.lr_scale
        if head.depth is not None:
            group["layer_depth"] = head.depth
        if head.declared:
            group.update(head.declared)
            group["declared"] = tuple(k for k, _ in head.declared)
        if lr is not None:
            if "lr" not in group:
                group["lr"] = lr * head.lr_scale
            group["lr_scale_applied"] = True
        groups.append(group)
    return groups


def apply_lr_scales(optimizer: Optimizer | Iterable[dict[str, Any]]) -> int:
    """Multiply each group's ``lr`` by its ``lr_scale`` (and ``weight_decay`` by a deferred
    ``weight_decay_scale``), once: the group is marked ``lr_scale_applied``, so a second call, or groups restored
    from a state dict saved after the scaling, are left alone.

    Call it right after building the optimizer from ``build_param_groups(..., defer_lr_scale=True)`` groups and
    before creating any LR scheduler: torch schedulers record each group's ``initial_lr`` when they are created
    and scale every group from it, so each group then follows the schedule from its own lr (``LambdaLR``,
    ``CosineAnnealingLR``, :class:`~lightning_adamw.WarmupCosineLR`: ``base_lrs == [lr * lr_scale, ...]``).
    ``OneCycleLR`` and ``CyclicLR`` set every group's lr from their own ``max_lr`` / ``base_lr`` argument instead:
    give them one value per group (``max_lr=[g["lr"] for g in optimizer.param_groups]``); :func:`check_lr_scales`
    finds a single value.

    Args:
        optimizer: a torch optimizer, or its ``param_groups`` list (groups without ``lr_scale`` are left alone).

    Returns:
        The number of groups changed.

    Raises:
        RuntimeError: a group to scale already has ``initial_lr`` (a scheduler was created first: it would
            schedule the unscaled lr), naming the group.
        ValueError: a group to scale has no ``lr`` (pass the optimizer's groups, not the ones from
            build_param_groups), or an ``lr_scale`` / ``weight_decay_scale`` that is not a finite number > 0 /
            >= 0.
    """
    groups = getattr(optimizer, "param_groups", optimizer)
    changed = 0
    for index, group in enumerate(groups):
        if group.get("lr_scale_applied") or ("lr_scale" not in group and "weight_decay_scale" not in group):
            continue
        label = group.get("name", index)
        scale = check_scale(group.get("lr_scale", 1.0), f"param_groups[{label!r}]['lr_scale']", positive=True)
        if "lr" not in group:
            raise ValueError(
                f"group {label!r} has no 'lr': apply_lr_scales works on an optimizer's param_groups (build the "
                "optimizer first)"
            )
        if "initial_lr" in group:
            raise RuntimeError(
                f"group {label!r} already has an `initial_lr`: an LR scheduler was created before apply_lr_scales, "
                "so it would schedule the unscaled lr. Call apply_lr_scales(optimizer) before creating schedulers"
            )
        if scale != 1.0 and "lr" not in group.get("declared", ()):
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].mul_(scale)  # a tensor lr (capturable / fused optimizers) stays the same tensor
            else:
                group["lr"] = group["lr"] * scale
        if "weight_decay_scale" in group:
            wd_scale = check_scale(
                group["weight_decay_scale"], f"param_groups[{label!r}]['weight_decay_scale']", positive=False
            )
            group["weight_decay"] = group.get("weight_decay", 0.0) * wd_scale
        group["lr_scale_applied"] = True
        changed += 1
    return changed


def check_lr_scales(optimizer: Optimizer | Iterable[Mapping[str, Any]]) -> None:
    """Check that the groups' ``initial_lr`` (set by the LR schedulers) still follow their ``lr_scale``.

    Every scaled group (``lr_scale_applied``, lr not declared by the model) must have ``initial_lr / lr_scale``
    equal to the same base lr. ``OneCycleLR(optimizer, max_lr=0.01)`` and ``CyclicLR`` with one value overwrite
    every group's lr with that value, so the layer decay would be silently lost. Groups without ``initial_lr`` (no
    scheduler) are not checked.

    Raises:
        ValueError: naming two groups whose scheduled base lrs differ, and saying how to give one value per group.
    """
    groups = getattr(optimizer, "param_groups", optimizer)
    bases: list[tuple[str, float]] = []
    for index, group in enumerate(groups):
        if (
            not group.get("lr_scale_applied")
            or "initial_lr" not in group
            or "lr" in group.get("declared", ())
        ):
            continue
        initial = group["initial_lr"]
        initial = float(initial.item() if isinstance(initial, torch.Tensor) else initial)
        bases.append((str(group.get("name", index)), initial / float(group.get("lr_scale", 1.0))))
    # initial_lr = base * scale then / scale: a few roundings of relative size 2**-53 each; 1e-9 leaves room for
    # schedulers that recompute the lr from factors, and is far below any real difference of scales.
    for name, base in bases[1:]:
        if not math.isclose(base, bases[0][1], rel_tol=1e-9):
            raise ValueError(
                f"the LR scheduler's starting lr of group {name!r} is {base:.6g} x its lr_scale, but that of group "
                f"{bases[0][0]!r} is {bases[0][1]:.6g} x its lr_scale: the scheduler set the same lr on every group "
                "and the lr scales (layer_decay, group_overrides) are lost. OneCycleLR and CyclicLR take their "
                "max_lr / base_lr per group: pass max_lr=[g['lr'] for g in optimizer.param_groups]"
            )


def check_unique_group_names(param_groups: Iterable[Mapping[str, Any]] | Any) -> None:
    """Raise if two parameter groups carry the same ``"name"`` (groups without a name are not checked).

    ``param_groups`` is a list of group dicts or an optimizer (its ``param_groups`` are checked). Same-named
    groups cannot be told apart in per-group metrics and checkpoints, and Lightning's ``LearningRateMonitor``
    stops on them.

    Raises:
        ValueError: naming the duplicated names and suggesting ``group_prefix=``.
    """
    groups = getattr(param_groups, "param_groups", param_groups)
    counts = Counter(g["name"] for g in groups if isinstance(g, Mapping) and g.get("name") is not None)
    duplicated = sorted(str(name) for name, n in counts.items() if n > 1)
    if duplicated:
        raise ValueError(
            f"parameter groups share the names {duplicated}: give each build_param_groups call its own "
            "`group_prefix=` (e.g. group_prefix='backbone' -> 'backbone/decay') or rename the groups"
        )


def group_sizes(
    decisions: Sequence[ParamDecision], group_prefix: str | None = None
) -> dict[str, dict[str, int]]:
    """``{"decay": {"tensors": n, "params": n}, "no_decay": {...}}`` (one entry per group, by its name, e.g.
    ``"decay/layer_3"``) for logging as hyperparameters."""
    sizes: dict[str, dict[str, int]] = {}
    for d in decisions:
        entry = sizes.setdefault(group_name(d.group, group_prefix, d.subgroup), {"tensors": 0, "params": 0})
        entry["tensors"] += 1
        entry["params"] += d.numel
    return sizes


def group_hparams(
    param_groups: Optimizer | Iterable[Mapping[str, Any]], decisions: Sequence[ParamDecision] | None = None
) -> dict[str, Any]:
    """``{"param_groups/<group>/tensors": n, ".../params": n, ".../lr_scale": s, ".../weight_decay": wd,
    ".../depth": d}`` of named groups, for a logger's ``log_hyperparams``.

    ``param_groups`` is an optimizer (its groups show the weight decay it really holds) or a list of groups.
    Element counts come from ``decisions`` (by ``param_names``) when given, so FSDP shards count their full
    tensors; otherwise from the tensors. ``weight_decay`` is left out where a group has none yet, ``depth`` where
    there is no layer decay.
    """
    groups = getattr(param_groups, "param_groups", param_groups)
    numel = {n: d.numel for d in decisions or () for n in (d.name, *d.aliases)}
    hparams: dict[str, Any] = {}
    for group in groups:
        name = group.get("name")
        if name is None:
            continue
        entries = list(group["params"])
        names = group.get("param_names") or [e[0] for e in entries if isinstance(e, tuple)]
        tensors = [e[1] if isinstance(e, tuple) else e for e in entries]
        if names and len(names) == len(tensors) and all(n in numel for n in names):
            count = sum(numel[n] for n in names)
        else:
            count = sum(t.numel() for t in tensors)
        key = f"param_groups/{name}"
        hparams[f"{key}/tensors"] = len(tensors)
        hparams[f"{key}/params"] = count
        hparams[f"{key}/lr_scale"] = float(group.get("lr_scale", 1.0))
        wd = group.get("weight_decay")
        if wd is not None:
            hparams[f"{key}/weight_decay"] = float(wd)
        if group.get("layer_depth") is not None:
            hparams[f"{key}/depth"] = int(group["layer_depth"])
    return hparams
