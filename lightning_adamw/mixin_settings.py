"""Where :class:`~lightning_adamw.mixin.DecoupledWeightDecayMixin` reads its settings from: one rule for every
setting (attribute holding a plain value, then ``self.hparams``, then the class defaults), with the source of
each value, so the group table can say where every non-default setting came from (see the mixin's module
docstring for the rule and why tensors, modules and functions never count as settings)."""

from __future__ import annotations

import inspect
import numbers
from typing import Any, ClassVar

import torch
from torch import nn

from lightning_adamw.optimizer_adoption import same_value

__all__ = ["MISSING", "AdamWSettings"]

_LR_SPELLINGS = ("lr", "learning_rate")
#: "no default given" (``None`` is a value a setting may hold)
MISSING: Any = object()
_MISSING = MISSING


def _is_plain_setting(value: Any) -> bool:
    """A value a setting can hold: numbers, bools, strings, classes, dicts, and lists / tuples of those. Never a
    tensor (a parameter or buffer of the model), a module, a function or another object: those are the model's
    own state, whatever their name."""
    if isinstance(value, (torch.Tensor, nn.Module)):
        return False
    if isinstance(value, (bool, numbers.Number, str, type, dict)):
        return True
    if isinstance(value, (list, tuple)):
        return all(v is None or _is_plain_setting(v) for v in value)
    return False


def _as_tuple(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _fmt_setting(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, type):
        return value.__name__
    text = repr(value)
    return text if len(text) <= 80 else f"{text[:77]}..."


def _passed_arguments(cls: type, args: tuple[Any, ...], kwargs: dict[str, Any]) -> frozenset[str] | None:
    """The names of the ``__init__`` arguments a call passes (keywords gathered by ``**kwargs`` by their own
    names), or ``None`` when its signature cannot bind them."""
    try:
        signature = inspect.signature(cls.__init__)
        bound = signature.bind_partial(None, *args, **kwargs)  # (None stands for self)
    except (TypeError, ValueError):
        return None
    names: set[str] = set()
    for name, value in list(bound.arguments.items())[1:]:
        kind = signature.parameters[name].kind
        if kind is inspect.Parameter.VAR_KEYWORD:
            names.update(value)
        elif kind is not inspect.Parameter.VAR_POSITIONAL:
            names.add(name)
    return frozenset(names)


class AdamWSettings:
    """The settings half of :class:`~lightning_adamw.mixin.DecoupledWeightDecayMixin` (its base class)."""

    adamw_defaults: ClassVar[dict[str, Any]] = {}

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        # Which __init__ arguments the caller passed (save_hyperparameters() records the defaults too, so a value
        # equal to its default is otherwise indistinguishable from one not given): read by
        # :meth:`argument_passed`. Recorded here, not by wrapping __init__, which would hide the outer __init__
        # frames from save_hyperparameters().
        following = super().__new__
        instance = following(cls) if following is object.__new__ else following(cls, *args, **kwargs)
        instance.__dict__["_lightning_adamw_passed"] = _passed_arguments(cls, args, kwargs)
        return instance

    def argument_passed(self, name: str) -> bool | None:
        """Whether the code that made this module passed ``name`` to its ``__init__`` (also with its default
        value); ``None`` when unknown (a module restored by unpickling, a call the signature cannot bind, or one
        made by the ``lightning-adamw`` command, which passes every argument and checks the options itself)."""
        passed = self.__dict__.get("_lightning_adamw_passed")
        return None if passed is None else name in passed

    def forget_passed_arguments(self) -> None:
        """Mark the passed arguments unknown (:meth:`argument_passed`): for a caller that passes every argument."""
        self.__dict__["_lightning_adamw_passed"] = None

    def adamw_setting(self, name: str, default: Any = _MISSING) -> Any:
        """A setting: the module's attribute, then ``self.hparams``, then ``default`` / :attr:`adamw_defaults`.

        An attribute counts when it is not ``None`` and is a plain value: a number, bool, string, class, dict, or
        a list / tuple of those. Tensors (parameters, buffers such as a DDPM noise schedule called ``betas``),
        modules, functions and other objects are the model's own state, never a setting (``layer_id``, a
        callable, is read from the instance and ``hparams`` by :meth:`grouping_options`). ``lr`` is also read
        under its alias ``learning_rate`` (the LR finder's second spelling). :meth:`setting_source` says where
        a value came from (the group table shows it for every setting that is not the default).

        Raises:
            ValueError: ``lr`` and ``learning_rate`` are both set and differ (the message names both).
        """
        return self._setting_with_source(name, default)[0]

    def setting_source(self, name: str) -> str:
        """Where :meth:`adamw_setting` found ``name``: ``"attribute self.<name>"``, ``"hparams.<name>"`` or
        ``"default"`` (``lr`` may be found as ``learning_rate``)."""
        return self._setting_with_source(name, _MISSING)[1]

    def setting_given(self, name: str) -> bool:
        """Whether ``name`` was set on purpose: an attribute, or an hparam that differs from the default of the
        module's ``__init__`` argument of that name (``save_hyperparameters()`` records defaults too, so an
        hparam equal to its ``__init__`` default counts as not given). Used where a setting conflicts with
        another one only when both are given (``weight_decay`` and ``ema_timescale_*``)."""
        value, source = self._setting_with_source(name, _MISSING)
        if source == "default":
            return False
        if source.startswith("attribute"):
            return True
        try:
            parameter = inspect.signature(type(self).__init__).parameters.get(name)
        except (TypeError, ValueError):
            return True
        return (
            parameter is None
            or parameter.default is inspect.Parameter.empty
            or not same_value(parameter.default, value)
        )

    def override_setting(self, name: str, value: Any, source: str) -> None:
        """Set ``name`` above the attribute / hparams / default rule, e.g. from a command-line option that is not
        an argument of the module (``lightning-adamw fit --weight_decay_schedule adamc``); ``source`` is how the
        group table names where it came from."""
        self.__dict__.setdefault("_lightning_adamw_overrides", {})[name] = (value, source)

    def _setting_with_source(self, name: str, default: Any) -> tuple[Any, str]:
        override = self.__dict__.get("_lightning_adamw_overrides", {}).get(name)
        if override is not None:
            return override
        if name == "lr":
            return self._lr_setting(default)
        value = self._attribute_setting(name)
        if value is not _MISSING:
            return value, f"attribute self.{name}"
        hparams = getattr(self, "hparams", None)
        if hparams is not None and name in hparams:
            return hparams[name], f"hparams.{name}"
        if default is not _MISSING:
            return default, "default"
        return self.adamw_defaults[name], "default"

    def _attribute_setting(self, name: str) -> Any:
        try:
            value = getattr(self, name)
        except AttributeError:
            return _MISSING
        if value is None or not _is_plain_setting(value):
            return _MISSING
        return value

    def _lr_setting(self, default: Any) -> tuple[Any, str]:
        hparams = getattr(self, "hparams", None)
        attributes = {s: v for s in _LR_SPELLINGS if (v := self._attribute_setting(s)) is not _MISSING}
        stored = {s: hparams[s] for s in _LR_SPELLINGS if hparams is not None and hparams.get(s) is not None}
        # Per spelling the attribute wins; across spellings the two must agree.
        where = {s: f"self.{s}" if s in attributes else f"self.hparams.{s}" for s in {*attributes, *stored}}
        value = {**stored, **attributes}
        if len(value) == 2 and not same_value(value["lr"], value["learning_rate"]):
            raise ValueError(
                f"the module sets the learning rate twice, `{where['lr']}`={value['lr']!r} and "
                f"`{where['learning_rate']}`={value['learning_rate']!r}: DecoupledWeightDecayMixin reads `lr` and "
                "its alias `learning_rate` and cannot tell which one is meant (Lightning's LR finder writes to `lr` "
                "when it exists). Keep one spelling."
            )
        for source, label in ((attributes, "attribute self."), (stored, "hparams.")):
            for spelling in _LR_SPELLINGS:
                if spelling in source:
                    return source[spelling], f"{label}{spelling}"
        if default is not _MISSING:
            return default, "default"
        return self.adamw_defaults["lr"], "default"

    def settings_line(self, names: tuple[str, ...]) -> str | None:
        """``"eps=0.001 (attribute self.eps), lr=0.01 (hparams.lr)"``: the settings among ``names`` that differ
        from the mixin's defaults or were given on purpose (:meth:`setting_given`: e.g. ``lr=0.001`` for a model
        whose own default is 0.003), with where each came from (``None`` when there is none)."""
        shown = []
        for name in names:
            value, source = self._setting_with_source(name, _MISSING)
            default = self.adamw_defaults.get(name, _MISSING)
            if value is None or (
                same_value(_as_tuple(value), _as_tuple(default)) and not self.setting_given(name)
            ):
                continue
            shown.append(f"{name}={_fmt_setting(value)} ({source})")
        return ", ".join(shown) if shown else None
