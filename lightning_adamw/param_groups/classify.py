"""``classify_parameters``: one :class:`~lightning_adamw.param_groups.rules.ParamDecision` per tensor.

Checks the options, names the tensors from the module tree (:mod:`.names`), reads what the model declares (its
``no_weight_decay()`` hooks, ``_no_weight_decay`` / ``_optim`` flags on tensors), recovers FSDP1's real shapes,
and applies the rules of :mod:`.rules` to each tensor once. Linear in the number of parameter sites.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn

from lightning_adamw.param_groups.depth import DepthPlan, check_layer_decay, find_depths, layer_decay_scale
from lightning_adamw.param_groups.names import ModuleNode, ParamSite, parameter_sites
from lightning_adamw.param_groups.overrides import GroupOverride, check_group_overrides
from lightning_adamw.param_groups.rules import (
    DECAY,
    DEFAULT_NORM_CLASS_PATTERN,
    NO_DECAY,
    NORM_TYPES,
    ParamDecision,
    decide,
    pattern_matches,
    tensor_views,
)

__all__ = ["Declaration", "assign_groups", "classify_parameters", "fsdp_original_shapes"]


# ----------------------------------------------------------------------------------------------- options


def _as_patterns(value: str | Iterable[str] | None, option: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = (value,)
    try:
        patterns = tuple(value)
    except TypeError:
        raise TypeError(
            f"`{option}` must be a string or a sequence of strings, got {type(value).__name__}"
        ) from None
    for pattern in patterns:
        if not isinstance(pattern, str) or not pattern:
            raise TypeError(f"`{option}` must contain non-empty strings, got {pattern!r}")
        if pattern.startswith("re:"):
            try:
                re.compile(pattern[3:])
            except re.error as err:
                raise ValueError(f"`{option}` has an invalid regular expression {pattern!r}: {err}") from None
    return patterns


def check_weight_decay(weight_decay: Any) -> float | None:
    """``weight_decay`` as a float (``None`` stays ``None``); TypeError / ValueError naming the option."""
    if weight_decay is None:
        return None
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)):
        raise TypeError(
            f"`weight_decay` must be a float, got {type(weight_decay).__name__} ({weight_decay!r})"
        )
    weight_decay = float(weight_decay)
    if not math.isfinite(weight_decay) or weight_decay < 0:
        raise ValueError(f"`weight_decay` must be a finite number >= 0, got {weight_decay!r}")
    return weight_decay


def _check_norm_types(extra_norm_types: Any) -> tuple[type[nn.Module], ...]:
    if extra_norm_types is None:
        return ()
    if isinstance(extra_norm_types, type):
        extra_norm_types = (extra_norm_types,)
    try:
        types = tuple(extra_norm_types)
    except TypeError:
        raise TypeError(
            f"`extra_norm_types` must be a sequence of nn.Module subclasses, got {type(extra_norm_types).__name__}"
        ) from None
    for t in types:
        if not (isinstance(t, type) and issubclass(t, nn.Module)):
            raise TypeError(f"`extra_norm_types` must contain nn.Module subclasses, got {t!r}")
    return types


def _check_bool(value: Any, option: str) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"`{option}` must be a bool, got {type(value).__name__}")


# ----------------------------------------------------------------------------------------------- model declarations


def _hook_names(module: nn.Module, prefix: str, method: str) -> set[str]:
    # Looked up on the class and the instance dict, not with getattr(module, ...): a miss goes through
    # nn.Module.__getattr__ and raises, which costs more than the rest of the grouping on a large model. Wrappers
    # that forward attribute lookups (OptimizedModule, FSDP) are covered: the module they wrap is visited too,
    # with the same name prefix.
    if method not in module.__dict__ and not hasattr(type(module), method):
        return set()
    hook = getattr(module, method, None)
    if not callable(hook):
        return set()
    names = hook()
    if isinstance(names, str):
        names = {names}
    try:
        return {f"{prefix}{n}" if prefix else str(n) for n in names}
    except TypeError:
        raise TypeError(
            f"`{type(module).__name__}.{method}()` must return a collection of names, got {type(names).__name__}"
        ) from None


def _collect_hooks(nodes: list[ModuleNode]) -> tuple[set[str], set[tuple[str, str]]]:
    """Names from every ``no_weight_decay()`` and ``(prefix, substring)`` from every ``no_weight_decay_keywords()``.

    Hooks on sub-modules are honoured too, each for its own tensors: names are prefixed with the sub-module's path,
    and its keywords are matched against names relative to it (``prefix`` is its path and a dot), so a timm
    backbone inside a LightningModule keeps its own lists and they do not reach the head beside it.
    """
    names: set[str] = set()
    keywords: set[tuple[str, str]] = set()
    seen: set[int] = set()
    for node in nodes:
        if id(node.module) in seen:
            continue
        seen.add(id(node.module))
        prefix = f"{node.name}." if node.name else ""
        names |= _hook_names(node.module, prefix, "no_weight_decay")
        keywords |= {(prefix, k) for k in _hook_names(node.module, "", "no_weight_decay_keywords")}
    return names, keywords


# Keys of a parameter group that the grouping itself sets: a tensor's ``_optim`` must not set them.
_GROUP_KEYS = frozenset(
    {
        "params",
        "param_names",
        "name",
        "lr_scale",
        "lr_scale_applied",
        "layer_depth",
        "weight_decay_scale",
        "declared",
        "initial_lr",
    }
)


@dataclass(frozen=True)
class Declaration:
    """What the model set on one tensor: ``param._no_weight_decay`` and ``param._optim``."""

    rule: tuple[str, str] | None = None
    """``(group, reason)`` the declaration puts the tensor in, or ``None`` (the other rules decide)."""
    weight_decay: float | None = None
    """``_optim['weight_decay']`` when it is not 0 (a zero only says no_decay)."""
    hyperparameters: tuple[tuple[str, Any], ...] = ()
    """Every other ``_optim`` entry (``lr``, ``betas``, ...), in the dict's order."""


def _number(value: Any, name: str, key: str, *, positive: bool) -> float:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"parameter `{name}` has `_optim[{key!r}]`={value!r}: it must be a number")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(
            f"parameter `{name}` has `_optim[{key!r}]`={value!r}: it must be a finite number {bound}"
        )
    return value


def _plain(value: Any, name: str, key: str) -> Any:
    """A hashable, comparable copy of an ``_optim`` value (tensors of one element as numbers, lists as tuples)."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise TypeError(
                f"parameter `{name}` has `_optim[{key!r}]` = a tensor of shape {tuple(value.shape)}: per-tensor "
                "hyperparameters must be numbers or tuples of numbers"
            )
        return value.item()
    if isinstance(value, (list, tuple)):
        return tuple(_plain(v, name, key) for v in value)
    try:
        hash(value)
    except TypeError:
        raise TypeError(
            f"parameter `{name}` has `_optim[{key!r}]`={value!r}: per-tensor hyperparameters must be numbers, "
            "strings or tuples"
        ) from None
    return value


def _tensor_declaration(param: torch.Tensor, name: str) -> Declaration:
    """What the model set on the tensor itself.

    Two conventions: ``param._no_weight_decay = True`` (Mamba's ``A_log`` and ``D``) and a per-tensor dict of
    optimizer settings ``param._optim = {"weight_decay": 0.0, "lr": ...}`` (Mamba-2, S4, Hyena-style models: the
    ``lr`` there is absolute). A zero ``weight_decay`` puts the tensor in no_decay, a non-zero one in decay with
    that decay; every other entry is a hyperparameter of the tensor's own group.

    Raises:
        TypeError: ``_no_weight_decay`` that is not a bool, ``_optim`` that is not a dict, a value of the wrong
            type, naming the tensor and the key.
        ValueError: a negative or non-finite ``weight_decay`` / ``lr``, ``eps <= 0``, ``betas`` outside [0, 1), a
            key the grouping sets itself (``params``, ``name``, ``lr_scale``...), or ``_no_weight_decay = True``
            together with a non-zero ``_optim['weight_decay']``.
    """
    flag = getattr(param, "_no_weight_decay", None)
    if flag is not None and not isinstance(flag, bool):
        raise TypeError(
            f"parameter `{name}` has `_no_weight_decay`={flag!r}: the model's flag must be True or False"
        )
    rule = (NO_DECAY, "param._no_weight_decay") if flag else None
    optim = getattr(param, "_optim", None)
    if optim is None:
        return Declaration(rule)
    if not isinstance(optim, Mapping):
        raise TypeError(
            f"parameter `{name}` has `_optim` of type {type(optim).__name__}: the model's per-tensor optimizer "
            "settings must be a dict such as {'weight_decay': 0.0}"
        )
    weight_decay: float | None = None
    hyper: list[tuple[str, Any]] = []
    for key, value in optim.items():
        if not isinstance(key, str) or key in _GROUP_KEYS:
            raise ValueError(
                f"parameter `{name}` has `_optim[{key!r}]`: that key is set by the grouping itself; per-tensor "
                "settings are optimizer hyperparameters such as lr, weight_decay, betas, eps"
            )
        if key == "weight_decay":
            wd = _number(value, name, key, positive=False)
            if wd == 0:
                rule = rule or (NO_DECAY, "param._optim")
            elif flag:
                raise ValueError(
                    f"parameter `{name}` has `_no_weight_decay = True` and `_optim['weight_decay']`={wd!r}: the "
                    "model's flags contradict each other"
                )
            else:
                weight_decay, rule = wd, (DECAY, "param._optim")
            continue
        if key == "lr":
            value = _number(value, name, key, positive=False)
        elif key == "eps":
            value = _number(value, name, key, positive=True)
        elif key == "betas":
            betas = _plain(value, name, key)
            if (
                not isinstance(betas, tuple)
                or len(betas) != 2
                or not all(
                    isinstance(b, (int, float)) and not isinstance(b, bool) and 0 <= b < 1 for b in betas
                )
            ):
                raise ValueError(
                    f"parameter `{name}` has `_optim['betas']`={value!r}: it must be two numbers in [0, 1)"
                )
            value = tuple(float(b) for b in betas)
        else:
            value = _plain(value, name, key)
        hyper.append((key, value))
    return Declaration(rule, weight_decay, tuple(hyper))


# ----------------------------------------------------------------------------------------------- FSDP


def _is_flat_parameter(param: torch.Tensor) -> bool:
    # FSDP1 with use_orig_params=False hands out flattened 1-D FlatParameters: grouping them would put every
    # weight in the no-decay group without a word.
    return type(param).__name__ == "FlatParameter" or getattr(param, "_is_flat_param", False)


def fsdp_original_shapes(*modules: nn.Module) -> dict[int, torch.Size]:
    """``id(parameter) -> unsharded shape`` for the parameters FSDP1 (``use_orig_params=True``) manages.

    FSDP1 replaces every original parameter by a 1-D view of this rank's shard (an empty tensor on ranks that hold
    none of it), so ``param.shape`` / ``param.ndim`` no longer describe the weight: a conv kernel looks like a
    bias. Its ``FlatParameter`` keeps the real shapes. Pass the FSDP *wrapper* too: Lightning wraps the
    LightningModule from outside, so the root's handle is not among the module's own sub-modules.
    """
    shapes: dict[int, torch.Size] = {}
    for root in modules:
        for mod in root.modules():
            flat = getattr(getattr(mod, "_handle", None), "flat_param", None)
            params = getattr(flat, "_params", None)
            if flat is None or params is None:
                continue
            for param, shape in zip(params, flat._shapes, strict=True):
                shapes[id(param)] = torch.Size(shape)
    return shapes


def _attached_wrapper(module: nn.Module) -> nn.Module | None:
    """The module that wraps ``module`` from outside, when a trainer attached to it says so.

    A LightningModule under FSDP is wrapped from the outside, so the root's flat parameter (which knows the real
    shapes of the tensors no inner FSDP unit owns) is not among the module's own sub-modules; its trainer's
    strategy holds it. Duck-typed (``module._trainer.strategy.model``) so that this file needs no Lightning.
    """
    trainer = getattr(module, "_trainer", None)
    model = getattr(getattr(trainer, "strategy", None), "model", None)
    return model if isinstance(model, nn.Module) and model is not module else None


# ----------------------------------------------------------------------------------------------- classification


def classify_parameters(
    module: nn.Module,
    *,
    exclude_embeddings: bool = False,
    no_decay_patterns: str | Iterable[str] | None = None,
    decay_patterns: str | Iterable[str] | None = None,
    extra_norm_types: Iterable[type[nn.Module]] | type[nn.Module] | None = None,
    norm_class_pattern: str | None = DEFAULT_NORM_CLASS_PATTERN,
    use_model_hooks: bool = True,
    wrapper: nn.Module | None = None,
    include_frozen: bool = False,
    group_overrides: Iterable[Mapping[str, Any]] | Mapping[str, Any] | None = None,
    layer_decay: float | None = None,
    layer_id: Callable[[str], int] | None = None,
    num_layers: int | None = None,
) -> list[ParamDecision]:
    """Decide, for every trainable parameter of ``module``, whether it is decayed and why, and which group it joins.

    Returns one :class:`ParamDecision` per distinct tensor, in ``named_parameters()`` order (deterministic, so
    optimizer checkpoints reload). Frozen parameters are left out unless ``include_frozen=True``; tied parameters
    appear once, under their first name. Names are those of the user's own module (see
    :func:`~lightning_adamw.param_groups.parameter_names`). See the package docstring for the rules and
    :func:`~lightning_adamw.build_param_groups` for the options. With ``group_overrides``, ``layer_decay`` or
    per-tensor ``param._optim`` hyperparameters, each decision also carries its ``depth``, ``lr_scale``,
    ``override``, own ``weight_decay`` / ``weight_decay_scale``, ``declared`` hyperparameters and ``subgroup``.

    Raises:
        TypeError / ValueError: a bad option (naming it), a bad ``_no_weight_decay`` / ``_optim`` flag (naming the
            tensor), two tensors with the same name, an FSDP flat parameter, an unused pattern, nothing to
            train, or a depth that cannot be found (see :func:`~lightning_adamw.build_param_groups`).
    """
    return _classify(
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
    )[0]


def _classify(
    module: nn.Module,
    *,
    exclude_embeddings: bool,
    no_decay_patterns: str | Iterable[str] | None,
    decay_patterns: str | Iterable[str] | None,
    extra_norm_types: Iterable[type[nn.Module]] | type[nn.Module] | None,
    norm_class_pattern: str | None,
    use_model_hooks: bool,
    wrapper: nn.Module | None,
    include_frozen: bool,
    group_overrides: Any = None,
    layer_decay: Any = None,
    layer_id: Any = None,
    num_layers: Any = None,
) -> tuple[list[ParamDecision], dict[int, list[ParamSite]]]:
    """:func:`classify_parameters`, and the parameter sites it found (so groups need no second walk)."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"`module` must be a torch.nn.Module, got {type(module).__name__}")
    _check_bool(exclude_embeddings, "exclude_embeddings")
    _check_bool(use_model_hooks, "use_model_hooks")
    _check_bool(include_frozen, "include_frozen")
    no_decay_pats = _as_patterns(no_decay_patterns, "no_decay_patterns")
    decay_pats = _as_patterns(decay_patterns, "decay_patterns")
    norm_types = NORM_TYPES + _check_norm_types(extra_norm_types)
    if norm_class_pattern is not None and not isinstance(norm_class_pattern, str):
        raise TypeError(
            f"`norm_class_pattern` must be a regular expression string or None, got {norm_class_pattern!r}"
        )
    norm_name_re = re.compile(norm_class_pattern) if norm_class_pattern else None
    overrides = check_group_overrides(group_overrides)
    decay_factor, layer_id, num_layers = check_layer_decay(layer_decay, layer_id, num_layers)

    # Every site (owner module, leaf) of every parameter: a tied tensor has several, and it is an embedding if
    # any owner is one (GPT's tied ``wte`` / ``lm_head``).
    nodes, sites = parameter_sites(module)
    hook_names, hook_keywords = _collect_hooks(nodes) if use_model_hooks else (set(), set())
    # Under FSDP1 the tensors are flat shards: decide on the original shapes.
    if wrapper is None:
        wrapper = _attached_wrapper(module)
    true_shapes = fsdp_original_shapes(module, *([wrapper] if wrapper is not None else []))

    decisions: list[ParamDecision] = []
    declarations: list[Declaration] = []
    used_patterns: set[str] = set()
    for places in sites.values():
        first = places[0]
        param = first.param
        if not param.requires_grad and not include_frozen:
            continue
        if _is_flat_parameter(param):
            raise ValueError(
                f"parameter `{first.raw_name}` is an FSDP FlatParameter: parameter names and shapes are lost, so "
                "decay groups cannot be built. Use FSDP with `use_orig_params=True` (Lightning's FSDPStrategy does "
                "this by default) and build the groups in `configure_optimizers`."
            )
        shape = true_shapes.get(id(param))
        if shape is None:
            if getattr(param, "_fsdp_flattened", False) and param.ndim == 1:
                raise ValueError(
                    f"parameter `{first.raw_name}` is a flat FSDP shard whose original shape is unknown: pass the "
                    "FSDP root module as `wrapper=` (in Lightning, `trainer.strategy.model`) so decay groups are "
                    "built from the real shapes"
                )
            shape = param.shape
        declaration = _tensor_declaration(param, first.name)
        group, reason = decide(
            tuple(shape),
            tensor_views(places),
            declared=declaration.rule,
            decay_pats=decay_pats,
            no_decay_pats=no_decay_pats,
            hook_names=hook_names,
            hook_keywords=hook_keywords,
            norm_types=norm_types,
            norm_name_re=norm_name_re,
            exclude_embeddings=exclude_embeddings,
            used_patterns=used_patterns,
        )
        declarations.append(declaration)
        decisions.append(
            ParamDecision(
                name=first.name,
                group=group,
                reason=reason,
                shape=tuple(shape),
                numel=math.prod(shape),
                aliases=tuple(n for n in dict.fromkeys(s.name for s in places) if n != first.name),
                frozen=not param.requires_grad,
            )
        )

    if not decisions:
        raise ValueError(
            f"`module` ({type(module).__name__}) has no trainable parameters (all frozen or none): nothing to "
            "optimize (pass `include_frozen=True` to group frozen tensors for later unfreezing)"
        )
    unused = [p for p in (*decay_pats, *no_decay_pats) if p not in used_patterns]
    if unused:
        option = "decay_patterns" if unused[0] in decay_pats else "no_decay_patterns"
        raise ValueError(
            f"`{option}` pattern {unused[0]!r} matches no trainable parameter of {type(module).__name__}"
            f" (patterns are globs on names such as {decisions[0].name!r}; prefix 're:' for a regular expression)"
        )
    if (
        overrides
        or decay_factor is not None
        or any(d.weight_decay or d.hyperparameters for d in declarations)
    ):
        depth_plan = (
            find_depths(
                module,
                nodes,
                sites,
                layer_id=layer_id,
                num_layers=num_layers,
                use_model_hooks=use_model_hooks,
                norm_types=norm_types,
                norm_name_re=norm_name_re,
            )
            if decay_factor is not None
            else None
        )
        if depth_plan is not None and decay_factor is not None:
            _warn_tied(sites, depth_plan, decay_factor)
        decisions = assign_groups(module, decisions, declarations, overrides, decay_factor, depth_plan)
    return decisions, sites


def _warn_tied(sites: Mapping[int, list[ParamSite]], plan: DepthPlan, layer_decay: float) -> None:
    """Tied weights (GPT-2's ``lm_head.weight`` is ``transformer.wte.weight``) are one tensor with one lr: say
    which name's depth it trains at, since the other name may sit at the other end of the network."""
    for places in sites.values():
        names = list(dict.fromkeys(site.name for site in places))
        if len(names) < 2 or names[0] not in plan.depths:
            continue
        depth = plan.depths[names[0]]
        scale = layer_decay_scale(layer_decay, depth, plan.num_layers)
        others = ", ".join(f"`{n}`" for n in names[1:])
        warnings.warn(
            f"layer_decay: {others} {'is' if len(names) == 2 else 'are'} the same tensor as `{names[0]}` (tied "
            f"weights), and one tensor trains at one lr: that of `{names[0]}`, depth {depth} "
            f"({plan.rules.get(names[0], 'automatic rule')}), lr scale {scale:.4g}, whatever depth {others} would "
            f"have. To choose another, pass `layer_id` (it is asked about `{names[0]}`) or a `group_overrides` "
            f"entry for `{names[0]}`.",
            UserWarning,
            stacklevel=4,
        )


def assign_groups(
    module: nn.Module,
    decisions: list[ParamDecision],
    declarations: list[Declaration],
    overrides: tuple[GroupOverride, ...],
    layer_decay: float | None,
    depth_plan: DepthPlan | None,
) -> list[ParamDecision]:
    """The decisions with their group within the class: depth, override, per-tensor declarations.

    ``subgroup`` joins, with ``/``: the depth part (``embed`` for depth 0, ``layer_<d>``, ``head`` for L + 1), the
    name of the first matching override, and ``declared_<k>`` for the ``k``-th distinct ``param._optim`` (numbered
    in order of first appearance).

    Raises:
        ValueError: an override whose pattern matches no tensor, or only tensors an earlier entry claims.
    """
    matched: set[int] = set()
    claimed: set[int] = set()
    distinct: list[tuple[float | None, tuple[tuple[str, Any], ...]]] = []
    result: list[ParamDecision] = []
    for d, declaration in zip(decisions, declarations, strict=True):
        names = (d.name, *d.aliases)
        override: GroupOverride | None = None
        for o in overrides:
            if any(pattern_matches(o.pattern, n) for n in names):
                matched.add(o.index)
                override = override or o
        parts: list[str] = []
        lr_scale = 1.0
        depth: int | None = None
        depth_rule = ""
        if depth_plan is not None and layer_decay is not None:
            depth = depth_plan.depths[d.name]
            depth_rule = depth_plan.rules[d.name]
            top = depth_plan.num_layers + 1
            parts.append("embed" if depth == 0 else "head" if depth == top else f"layer_{depth}")
            lr_scale = layer_decay_scale(layer_decay, depth, depth_plan.num_layers)
        weight_decay: float | None = None
        weight_decay_scale = 1.0
        if override is not None:
            claimed.add(override.index)
            parts.append(override.name)
            lr_scale *= override.lr_scale
            if d.group == DECAY:
                if override.weight_decay is not None:
                    weight_decay = override.weight_decay
                elif override.weight_decay_scale is not None:
                    weight_decay_scale = override.weight_decay_scale
        # What the model declares on the tensor wins over an override, key by key; a user's decay / no-decay
        # pattern that moved the tensor out of the declared class wins over the declared weight decay.
        own_decay = declaration.weight_decay if d.group == DECAY and d.reason == "param._optim" else None
        if own_decay is not None:
            weight_decay, weight_decay_scale = own_decay, 1.0
        hyper = declaration.hyperparameters
        if own_decay is not None or hyper:
            key = (own_decay, hyper)
            if key not in distinct:
                distinct.append(key)
            parts.append(f"declared_{distinct.index(key)}")
            if any(k == "lr" for k, _ in hyper):
                lr_scale = 1.0  # an lr the model declares is absolute
        result.append(
            replace(
                d,
                depth=depth,
                depth_rule=depth_rule,
                lr_scale=lr_scale,
                override=override.name if override is not None else None,
                weight_decay=weight_decay,
                weight_decay_scale=weight_decay_scale,
                declared=hyper,
                subgroup="/".join(parts),
            )
        )
    for o in overrides:
        if o.index not in matched:
            raise ValueError(
                f"`group_overrides[{o.index}]` pattern {o.pattern!r} matches no trainable parameter of "
                f"{type(module).__name__} (patterns are globs on names such as {decisions[0].name!r}; prefix 're:' "
                "for a regular expression)"
            )
        if o.index not in claimed:
            raise ValueError(
                f"`group_overrides[{o.index}]` pattern {o.pattern!r} matches only tensors that an earlier entry "
                "already claims (the first matching entry wins): reorder the entries or narrow the earlier pattern"
            )
    return result
