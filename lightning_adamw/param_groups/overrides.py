"""``group_overrides``: per-pattern learning-rate and weight-decay settings, checked once, matched per tensor.

An override never moves a tensor between decay and no_decay (``decay_patterns`` / ``no_decay_patterns`` do that):
it splits each class further, so the tensors it matches get a group of their own, ``decay/<name>`` and
``no_decay/<name>``, with their own ``lr_scale`` and, in the decay part, their own weight decay.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from lightning_adamw.param_groups.rules import pattern_matches

__all__ = ["GroupOverride", "check_group_overrides", "check_scale", "first_override"]

_KEYS = ("pattern", "name", "lr_scale", "weight_decay", "weight_decay_scale")
# Names the grouping gives to groups of tensors with their own ``param._optim``: an override must not take them.
_RESERVED = re.compile(r"declared_\d+")


@dataclass(frozen=True)
class GroupOverride:
    """One checked entry of ``group_overrides``."""

    pattern: str
    """Glob (``*`` crosses dots) or ``re:<regex>``, matched against the same names as ``no_decay_patterns``."""
    name: str
    """Readable part of the group names: ``decay/<name>``, ``no_decay/<name>``."""
    index: int
    """Position in ``group_overrides`` (the first matching entry wins)."""
    lr_scale: float = 1.0
    """Factor on the optimizer's lr (> 0); multiplies the layer-decay factor when both apply."""
    weight_decay: float | None = None
    """Absolute weight decay of the decay part (the no_decay part stays at 0)."""
    weight_decay_scale: float | None = None
    """Factor on the ``weight_decay`` option, for the decay part."""


def check_scale(value: Any, option: str, *, positive: bool) -> float:
    """``value`` as a finite float, > 0 (``positive``) or >= 0; TypeError / ValueError naming ``option``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"`{option}` must be a number, got {type(value).__name__} ({value!r})")
    value = float(value)
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"`{option}` must be a finite number {bound}, got {value!r}")
    return value


def check_group_overrides(value: Any) -> tuple[GroupOverride, ...]:
    """``group_overrides`` checked: a list of dicts (or one dict) with the keys ``pattern`` (required), ``name``,
    ``lr_scale``, and ``weight_decay`` or ``weight_decay_scale``; :class:`GroupOverride` instances pass as they are.

    Raises:
        TypeError: not a dict or a list of dicts; a value of the wrong type (naming the entry and the key).
        ValueError: an unknown key, no ``pattern``, an invalid regular expression, ``lr_scale <= 0``, a negative
            or non-finite weight decay, both ``weight_decay`` and ``weight_decay_scale``, a name with ``/`` or a
            reserved name (``declared_<k>``), two entries with the same name.
    """
    if value is None:
        return ()
    if isinstance(value, (Mapping, GroupOverride)):
        value = [value]
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise TypeError(
            "`group_overrides` must be a list of dicts such as [{'pattern': 'backbone.*', 'lr_scale': 0.1}], "
            f"got {type(value).__name__}"
        )
    overrides: list[GroupOverride] = []
    for index, entry in enumerate(value):
        overrides.append(_check_entry(index, entry))
    seen: dict[str, int] = {}
    for o in overrides:
        if o.name in seen:
            raise ValueError(
                f"`group_overrides[{seen[o.name]}]` and `group_overrides[{o.index}]` have the same name "
                f"{o.name!r}: group names must be unique (give each entry its own `name`)"
            )
        seen[o.name] = o.index
    return tuple(overrides)


def _check_entry(index: int, entry: Any) -> GroupOverride:
    where = f"group_overrides[{index}]"
    if isinstance(entry, GroupOverride):
        entry = {
            "pattern": entry.pattern,
            "name": entry.name,
            "lr_scale": entry.lr_scale,
            "weight_decay": entry.weight_decay,
            "weight_decay_scale": entry.weight_decay_scale,
        }
        entry = {k: v for k, v in entry.items() if v is not None}
    if not isinstance(entry, Mapping):
        raise TypeError(
            f"`{where}` must be a dict with a 'pattern' key, got {type(entry).__name__} ({entry!r})"
        )
    unknown = [k for k in entry if k not in _KEYS]
    if unknown:
        raise ValueError(
            f"`{where}` ({dict(entry)!r}) has the unknown key {unknown[0]!r}; the keys are {', '.join(_KEYS)}"
        )
    pattern = entry.get("pattern")
    if not isinstance(pattern, str) or not pattern:
        raise ValueError(f"`{where}` needs a 'pattern' (a glob or 're:<regex>'), got {pattern!r}")
    if pattern.startswith("re:"):
        try:
            re.compile(pattern[3:])
        except re.error as err:
            raise ValueError(
                f"`{where}.pattern` is an invalid regular expression {pattern!r}: {err}"
            ) from None
    name = entry.get("name", f"override_{index}")
    if not isinstance(name, str) or not name.strip() or name != name.strip() or "/" in name:
        raise ValueError(
            f"`{where}.name` must be a non-empty name without '/' or surrounding spaces, got {name!r}"
        )
    if _RESERVED.fullmatch(name):
        raise ValueError(
            f"`{where}.name` {name!r} is reserved for groups of tensors with their own `param._optim`"
        )
    lr_scale = check_scale(entry.get("lr_scale", 1.0), f"{where}.lr_scale", positive=True)
    weight_decay = entry.get("weight_decay")
    weight_decay_scale = entry.get("weight_decay_scale")
    if weight_decay is not None and weight_decay_scale is not None:
        raise ValueError(
            f"`{where}` sets both 'weight_decay' ({weight_decay!r}) and 'weight_decay_scale' "
            f"({weight_decay_scale!r}): give one"
        )
    return GroupOverride(
        pattern=pattern,
        name=name,
        index=index,
        lr_scale=lr_scale,
        weight_decay=None
        if weight_decay is None
        else check_scale(weight_decay, f"{where}.weight_decay", positive=False),
        weight_decay_scale=None
        if weight_decay_scale is None
        else check_scale(weight_decay_scale, f"{where}.weight_decay_scale", positive=False),
    )


def first_override(overrides: tuple[GroupOverride, ...], names: Iterable[str]) -> GroupOverride | None:
    """The first entry whose pattern matches one of ``names`` (a tied tensor has several), or ``None``."""
    names = tuple(names)
    for o in overrides:
        if any(pattern_matches(o.pattern, n) for n in names):
            return o
    return None
