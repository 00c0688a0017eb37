"""Decay / no-decay parameter groups for decoupled weight decay (AdamW).

Pure torch, no Lightning import: everything here takes an ``nn.Module`` and returns plain data, so
it can be tested directly and used from any training loop.

The rules, in the order they are tried for each trainable parameter (the first that matches wins):

1. ``decay_patterns``      -> decay     (user override, forced decay)
2. ``no_decay_patterns``   -> no_decay  (user override)
3. ``no_weight_decay()``   -> no_decay  (names the model lists itself, the convention timm models follow;
   ``no_weight_decay_keywords()`` substrings too)
4. normalization module    -> no_decay  (torch's norm types, ``extra_norm_types``, or a class name that
   matches ``norm_class_pattern``; only parameters the norm module owns directly)
5. bias                    -> no_decay  (leaf name ``bias`` or ``*_bias``, e.g. ``in_proj_bias``)
6. embedding               -> decay, or no_decay with ``exclude_embeddings=True`` (``nn.Embedding`` /
   ``nn.EmbeddingBag`` weights, and tensors whose leaf name says they are embeddings, e.g. ``pos_embed``)
7. ``ndim <= 1``           -> no_decay  (layer-scale gammas, gains, temperatures, ...)
8. everything else         -> decay

A pattern that matches no parameter is an error (a typo must not pass silently), and a parameter that a
forced-decay and a no-decay pattern both match is an error naming it.
"""

from __future__ import annotations

import fnmatch
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = [
    "DECAY",
    "DEFAULT_NORM_CLASS_PATTERN",
    "NORM_TYPES",
    "NO_DECAY",
    "WRAPPER_PREFIXES",
    "ParamDecision",
    "build_param_groups",
    "classify_parameters",
    "clean_param_name",
    "describe_param_groups",
    "group_sizes",
    "groups_from_decisions",
]

DECAY = "decay"
NO_DECAY = "no_decay"

#: torch's own normalization layers. ``_NormBase`` covers BatchNorm*, SyncBatchNorm and InstanceNorm*.
NORM_TYPES: tuple[type[nn.Module], ...] = (
    nn.modules.batchnorm._NormBase,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
    nn.CrossMapLRN2d,
)

#: Class-name rule for norm layers defined outside torch: ``LlamaRMSNorm``, ``T5LayerNorm``,
#: ``LayerNorm2d``, ``BatchNormAct2d``, ``GroupNormAct``, ``FusedRMSNorm``, ``ScaleNorm``, ``FrozenBatchNorm2d``...
#: It matches a name that ends in ``Norm`` (optionally ``1d``/``2d``/``3d``), contains ``NormAct``, or contains
#: one of the well-known norm names. ``Normalize``/``Normal`` do not match.
DEFAULT_NORM_CLASS_PATTERN = r"Norm(?:[123][dD])?$|NormAct|(?:Layer|Batch|Group|Instance|RMS|Scale)Norm"

#: Prefixes inserted into parameter names by wrappers: ``torch.compile`` (``_orig_mod.``), DDP / DataParallel
#: (``module.``, only at the front), FSDP (``_fsdp_wrapped_module.``) and activation checkpointing.
WRAPPER_PREFIXES: tuple[str, ...] = ("_orig_mod.", "_fsdp_wrapped_module.", "_checkpoint_wrapped_module.")

# Leaf names of raw parameters that hold embeddings (ViT ``pos_embed``, ``cls_token``, ``wpe`` ...).
_EMBEDDING_LEAF = re.compile(
    r"(?:^|_)(?:embed|embeds|embedding|embeddings|emb)(?:$|_)|^(?:cls|dist|reg|mask)_token$"
)
_EMBEDDING_TYPES: tuple[type[nn.Module], ...] = (nn.Embedding, nn.EmbeddingBag)


@dataclass(frozen=True)
class ParamDecision:
    """Where one trainable parameter goes and why."""

    name: str
    """Clean parameter name (wrapper prefixes removed; the first name of a tied parameter)."""
    group: str
    """``"decay"`` or ``"no_decay"``."""
    reason: str
    """The rule that decided it, e.g. ``"norm:LayerNorm"``, ``"bias"``, ``"1-D"``, ``"pattern:*.gate"``."""
    shape: tuple[int, ...]
    numel: int
    aliases: tuple[str, ...] = ()
    """Other names of the same tensor (tied weights), cleaned."""


# ----------------------------------------------------------------------------------------------- names


def clean_param_name(name: str) -> str:
    """Remove the prefixes that ``torch.compile``, DDP and FSDP add, so names match the original model."""
    for prefix in WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    if name.startswith("module."):
        name = name[len("module.") :]
    return name


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


def _pattern_matches(pattern: str, name: str) -> bool:
    """Glob by default (``*`` crosses dots); ``re:`` prefix for a regular expression searched in the name."""
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern)


def _check_weight_decay(weight_decay: Any) -> float | None:
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


# ----------------------------------------------------------------------------------------------- hooks


def _hook_names(module: nn.Module, prefix: str, method: str) -> set[str]:
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


def _collect_hooks(module: nn.Module) -> tuple[set[str], set[str]]:
    """Names from every ``no_weight_decay()`` and substrings from every ``no_weight_decay_keywords()``.

    Hooks on sub-modules are honoured too: their names are prefixed with the sub-module's path, so a timm
    backbone inside a LightningModule keeps its own list.
    """
    names: set[str] = set()
    keywords: set[str] = set()
    for mod_name, mod in module.named_modules():
        prefix = clean_param_name(f"{mod_name}.") if mod_name else ""
        names |= _hook_names(mod, prefix, "no_weight_decay")
        keywords |= _hook_names(mod, "", "no_weight_decay_keywords")
    return names, keywords


# ----------------------------------------------------------------------------------------------- classification


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
) -> list[ParamDecision]:
    """Decide, for every trainable parameter of ``module``, whether it is decayed and why.

    Returns one :class:`ParamDecision` per distinct trainable tensor, in ``module.named_parameters()`` order
    (deterministic, so optimizer checkpoints reload). Frozen parameters are left out; tied parameters appear once.
    See the module docstring for the rules and :func:`build_param_groups` for the options.
    """
    if not isinstance(module, nn.Module):
        raise TypeError(f"`module` must be a torch.nn.Module, got {type(module).__name__}")
    if not isinstance(exclude_embeddings, bool):
        raise TypeError(f"`exclude_embeddings` must be a bool, got {type(exclude_embeddings).__name__}")
    if not isinstance(use_model_hooks, bool):
        raise TypeError(f"`use_model_hooks` must be a bool, got {type(use_model_hooks).__name__}")
    no_decay_pats = _as_patterns(no_decay_patterns, "no_decay_patterns")
    decay_pats = _as_patterns(decay_patterns, "decay_patterns")
    norm_types = NORM_TYPES + _check_norm_types(extra_norm_types)
    if norm_class_pattern is not None and not isinstance(norm_class_pattern, str):
        raise TypeError(
            f"`norm_class_pattern` must be a regular expression string or None, got {norm_class_pattern!r}"
        )
    norm_name_re = re.compile(norm_class_pattern) if norm_class_pattern else None

    # Every (owner module, leaf name) of every parameter: a tied tensor has several owners, and it is an
    # embedding if any owner is one (GPT's tied ``wte`` / ``lm_head``).
    owners: dict[int, list[tuple[str, nn.Module, str]]] = {}
    for mod_name, mod in module.named_modules(remove_duplicate=False):
        for leaf, param in mod._parameters.items():
            if param is None:
                continue
            full = f"{mod_name}.{leaf}" if mod_name else leaf
            owners.setdefault(id(param), []).append((clean_param_name(full), mod, leaf))

    hook_names, hook_keywords = _collect_hooks(module) if use_model_hooks else (set(), set())
    # Under FSDP1 the tensors are flat shards: decide on the original shapes.
    if wrapper is None:
        wrapper = _attached_wrapper(module)
    true_shapes = fsdp_original_shapes(module, *([wrapper] if wrapper is not None else []))

    decisions: list[ParamDecision] = []
    used_patterns: set[str] = set()
    for raw_name, param in module.named_parameters():
        if not param.requires_grad:
            continue
        if _is_flat_parameter(param):
            raise ValueError(
                f"parameter `{raw_name}` is an FSDP FlatParameter: parameter names and shapes are lost, so decay "
                "groups cannot be built. Use FSDP with `use_orig_params=True` (Lightning's FSDPStrategy does this "
                "by default) and build the groups in `configure_optimizers`."
            )
        name = clean_param_name(raw_name)
        entries = owners.get(id(param), [(name, module, name.rsplit(".", 1)[-1])])
        names = [n for n, _, _ in entries]

        shape = true_shapes.get(id(param))
        if shape is None:
            if getattr(param, "_fsdp_flattened", False) and param.ndim == 1:
                raise ValueError(
                    f"parameter `{raw_name}` is a flat FSDP shard whose original shape is unknown: pass the FSDP "
                    "root module as `wrapper=` (in Lightning, `trainer.strategy.model`) so decay groups are built "
                    "from the real shapes"
                )
            shape = param.shape
        group, reason = _decide(
            len(shape),
            names,
            entries,
            decay_pats,
            no_decay_pats,
            hook_names,
            hook_keywords,
            norm_types,
            norm_name_re,
            exclude_embeddings,
            used_patterns,
        )
        decisions.append(
            ParamDecision(
                name=name,
                group=group,
                reason=reason,
                shape=tuple(shape),
                numel=math.prod(shape),
                aliases=tuple(n for n in dict.fromkeys(names) if n != name),
            )
        )

    if not decisions:
        raise ValueError(
            f"`module` ({type(module).__name__}) has no trainable parameters (all frozen or none): nothing to optimize"
        )
    unused = [p for p in (*decay_pats, *no_decay_pats) if p not in used_patterns]
    if unused:
        option = "decay_patterns" if unused[0] in decay_pats else "no_decay_patterns"
        raise ValueError(
            f"`{option}` pattern {unused[0]!r} matches no trainable parameter of {type(module).__name__}"
            f" (patterns are globs on names such as {decisions[0].name!r}; prefix 're:' for a regular expression)"
        )
    return decisions


def _decide(
    ndim: int,
    names: Sequence[str],
    entries: Sequence[tuple[str, nn.Module, str]],
    decay_pats: tuple[str, ...],
    no_decay_pats: tuple[str, ...],
    hook_names: set[str],
    hook_keywords: set[str],
    norm_types: tuple[type[nn.Module], ...],
    norm_name_re: re.Pattern[str] | None,
    exclude_embeddings: bool,
    used_patterns: set[str],
) -> tuple[str, str]:
    forced = [p for p in decay_pats if any(_pattern_matches(p, n) for n in names)]
    excluded = [p for p in no_decay_pats if any(_pattern_matches(p, n) for n in names)]
    used_patterns.update(forced, excluded)
    if forced and excluded:
        raise ValueError(
            f"parameter `{names[0]}` is matched by `decay_patterns` {forced[0]!r} and by `no_decay_patterns` "
            f"{excluded[0]!r}: make the patterns disjoint"
        )
    if forced:
        return DECAY, f"pattern:{forced[0]}"
    if excluded:
        return NO_DECAY, f"pattern:{excluded[0]}"

    for n in names:
        hit = n in hook_names or any(fnmatch.fnmatchcase(n, h) for h in hook_names if "*" in h or "?" in h)
        if hit:
            return NO_DECAY, "no_weight_decay()"
        if any(k in n for k in hook_keywords):
            return NO_DECAY, "no_weight_decay_keywords()"

    for _, owner, _ in entries:
        cls = type(owner)
        if isinstance(owner, norm_types):
            return NO_DECAY, f"norm:{cls.__name__}"
        if norm_name_re is not None and norm_name_re.search(cls.__name__):
            return NO_DECAY, f"norm:{cls.__name__}"

    leaves = [leaf for _, _, leaf in entries]
    if any(leaf == "bias" or leaf.endswith("_bias") for leaf in leaves):
        return NO_DECAY, "bias"

    is_embedding = any(isinstance(owner, _EMBEDDING_TYPES) for _, owner, _ in entries) or (
        ndim >= 2 and any(_EMBEDDING_LEAF.search(leaf) for leaf in leaves)
    )
    if is_embedding:
        return (NO_DECAY, "embedding") if exclude_embeddings else (DECAY, "embedding")

    if ndim <= 1:
        return NO_DECAY, "1-D"
    return DECAY, "weight"


# ----------------------------------------------------------------------------------------------- groups


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
) -> list[dict[str, Any]]:
    """Split the trainable parameters of ``module`` into ``"decay"`` and ``"no_decay"`` optimizer groups.

    Args:
        module: any ``nn.Module`` (plain, ``torch.compile``-d, DDP- or FSDP-wrapped, or on the ``meta`` device).
        weight_decay: decay of the ``"decay"`` group. ``None`` leaves the key out, so the optimizer's own
            ``weight_decay`` default applies (used when the optimizer was configured elsewhere, e.g. LightningCLI).
            The ``"no_decay"`` group always gets ``0.0``.
        exclude_embeddings: also put embedding tables (and ``pos_embed``-like tensors) in ``"no_decay"``.
        no_decay_patterns: extra names to exclude from decay: globs (``"*.gate"``) or ``"re:<regex>"``.
        decay_patterns: names to decay whatever the other rules say (same syntax); must not overlap the above.
        extra_norm_types: more module classes whose own parameters are norm parameters.
        norm_class_pattern: regex searched in class names to recognise norm layers defined outside torch;
            ``None`` turns the class-name rule off.
        use_model_hooks: honour ``no_weight_decay()`` / ``no_weight_decay_keywords()`` methods of the model.
        wrapper: the FSDP module that wraps ``module`` from outside, if any: sharded FSDP1 parameters are flat
            1-D shards, and their real shapes are kept by the wrapper's flat parameters. For a LightningModule
            attached to a trainer it is found by itself (``trainer.strategy.model``).

    Returns:
        Up to two groups, ``[{"name": "decay", "params": [(name, tensor), ...], "weight_decay": wd},
        {"name": "no_decay", "params": [...], "weight_decay": 0.0}]``. ``params`` holds ``(name, tensor)``
        pairs so torch records ``param_names`` in each optimizer group and in its state dict. Empty groups
        are left out.

    Example:
        >>> import torch
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))
        >>> groups = build_param_groups(model, weight_decay=0.1)
        >>> [(g["name"], g["weight_decay"], [n for n, _ in g["params"]]) for g in groups]
        [('decay', 0.1, ['0.weight']), ('no_decay', 0.0, ['0.bias', '1.weight', '1.bias'])]
        >>> optimizer = torch.optim.AdamW(groups, lr=1e-3)
    """
    wd = _check_weight_decay(weight_decay)
    decisions = classify_parameters(
        module,
        exclude_embeddings=exclude_embeddings,
        no_decay_patterns=no_decay_patterns,
        decay_patterns=decay_patterns,
        extra_norm_types=extra_norm_types,
        norm_class_pattern=norm_class_pattern,
        use_model_hooks=use_model_hooks,
        wrapper=wrapper,
    )
    return groups_from_decisions(module, decisions, wd)


def groups_from_decisions(
    module: nn.Module, decisions: Sequence[ParamDecision], weight_decay: float | None
) -> list[dict[str, Any]]:
    """Turn :func:`classify_parameters` output into optimizer groups (see :func:`build_param_groups`)."""
    wd = _check_weight_decay(weight_decay)
    by_name = _params_by_clean_name(module)
    groups: list[dict[str, Any]] = []
    for group_name in (DECAY, NO_DECAY):
        params = [(d.name, by_name[d.name]) for d in decisions if d.group == group_name]
        if not params:
            continue
        group: dict[str, Any] = {"name": group_name, "params": params}
        if group_name == NO_DECAY:
            group["weight_decay"] = 0.0
        elif wd is not None:
            group["weight_decay"] = wd
        groups.append(group)
    return groups


def _params_by_clean_name(module: nn.Module) -> dict[str, torch.nn.Parameter]:
    return {clean_param_name(n): p for n, p in module.named_parameters()}


def group_sizes(decisions: Sequence[ParamDecision]) -> dict[str, dict[str, int]]:
    """``{"decay": {"tensors": n, "params": n}, "no_decay": {...}}`` for logging as hyperparameters."""
    sizes: dict[str, dict[str, int]] = {}
    for d in decisions:
        entry = sizes.setdefault(d.group, {"tensors": 0, "params": 0})
        entry["tensors"] += 1
        entry["params"] += d.numel
    return sizes


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
    **options: Any,
) -> str:
    """A human-readable table of the groups: size of each group and which rule put which tensor there.

    Pass the same ``module`` and options as to :func:`build_param_groups`, or ready ``decisions`` from
    :func:`classify_parameters`. Tensors are listed per rule, at most ``max_rows_per_reason`` names each.
    """
    if decisions is None:
        if module is None:
            raise TypeError("`describe_param_groups` needs `module` or `decisions`")
        _check_weight_decay(weight_decay)
        decisions = classify_parameters(module, **options)
    sizes = group_sizes(decisions)
    total = sum(s["params"] for s in sizes.values()) or 1
    lines: list[str] = []
    header = f"{'group':<9} {'weight_decay':>12} {'tensors':>8} {'params':>10} {'share':>7}"
    lines += [header, "-" * len(header)]
    for group_name in (DECAY, NO_DECAY):
        if group_name not in sizes:
            continue
        wd = "0.0" if group_name == NO_DECAY else ("default" if weight_decay is None else f"{weight_decay:g}")
        s = sizes[group_name]
        lines.append(
            f"{group_name:<9} {wd:>12} {s['tensors']:>8} {_fmt_count(s['params']):>10} {100 * s['params'] / total:>6.1f}%"
        )
    lines.append("")
    lines.append(f"{'group':<9} {'rule':<28} {'tensors':>8} {'params':>10}  examples")
    by_rule: dict[tuple[str, str], list[ParamDecision]] = {}
    for d in decisions:
        by_rule.setdefault((d.group, d.reason), []).append(d)
    for (group_name, reason), items in sorted(by_rule.items()):
        examples = ", ".join(d.name for d in items[:max_rows_per_reason])
        if len(items) > max_rows_per_reason:
            examples += f", ... (+{len(items) - max_rows_per_reason})"
        n = sum(d.numel for d in items)
        lines.append(f"{group_name:<9} {reason:<28} {len(items):>8} {_fmt_count(n):>10}  {examples}")
    return "\n".join(lines)
