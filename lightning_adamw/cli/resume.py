"""``--ckpt_path``: the checkpoint's saved hyperparameters fill in only what this run does not give.

Stock LightningCLI (``LightningCLI._parse_ckpt_path``) reads the checkpoint's ``hyper_parameters`` and parses
them *over* the config of the new run: every model argument the checkpoint saved replaces the one given on the
command line or in a config file, so ``--model.lr 0.001 --ckpt_path last.ckpt`` trains at the checkpoint's lr,
silently. Here the new run's configuration wins (as it does for ``Trainer.fit(ckpt_path=...)`` in Python): a
model argument that this run gives (:func:`lightning_adamw.cli.given.given_config`) keeps its value, the others
come from the checkpoint, and one info line says which values came from where.

A model class given in this run that is not the checkpoint's takes none of the checkpoint's hyperparameters
(they describe another class), and the line says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["CheckpointHparams", "split_checkpoint_hparams"]

_MISSING: Any = object()


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return repr(value)


def _short(class_path: str | None) -> str:
    return str(class_path).rsplit(".", 1)[-1]


@dataclass
class CheckpointHparams:
    """What the checkpoint's hyperparameters do to the model's arguments of a resumed run.

    Attributes:
        class_path: the checkpoint's model class (``None`` when it saved none: a CLI made for one class).
        applied: ``{name: value}`` taken from the checkpoint (this run does not give them).
        overridden: ``{name: (checkpoint value, value given in this run)}`` where this run wins and differs.
        taken: ``{name: (checkpoint value, value this run would have had)}``: the applied values that change
            something (the others equal this run's defaults); the second entry is ``_MISSING`` when this run
            had no value (the checkpoint's class replaces the configured one).
        other_class: the class this run gives, when it is not the checkpoint's (then nothing is applied).
    """

    class_path: str | None
    applied: dict[str, Any] = field(default_factory=dict)
    overridden: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    taken: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    other_class: str | None = None

    def config(self) -> dict[str, Any]:
        """The ``model`` value to parse over the run's config (LightningCLI's own layout)."""
        if self.class_path is None:
            return dict(self.applied)
        return {"class_path": self.class_path, "dict_kwargs": dict(self.applied)}

    def message(self, ckpt_path: str) -> str | None:
        """One info line, or ``None`` when the checkpoint changes nothing and nothing given was overridden."""
        head = f"lightning-adamw: --ckpt_path {ckpt_path}: "
        if self.other_class is not None:
            return (
                f"{head}the model class given in this run, {self.other_class}, is not the checkpoint's "
                f"({self.class_path}): the checkpoint's hyperparameters are not applied; {_short(self.other_class)} "
                "gets what this run gives and its own defaults"
            )
        parts = []
        if self.overridden:
            shown = ", ".join(
                f"{k}={_fmt(new)} (checkpoint: {_fmt(old)})" for k, (old, new) in self.overridden.items()
            )
            parts.append(f"the model arguments given in this run win over the checkpoint's: {shown}")
        if self.taken:
            shown = ", ".join(
                f"{k}={_fmt(old)}" + ("" if new is _MISSING else f" (default: {_fmt(new)})")
                for k, (old, new) in self.taken.items()
            )
            parts.append(f"taken from the checkpoint's hyperparameters (not given in this run): {shown}")
        return head + "; ".join(parts) if parts else None


def split_checkpoint_hparams(
    hparams: Mapping[str, Any],
    current_class: str | None,
    current_args: Mapping[str, Any],
    given_class: str | None,
    given_args: Mapping[str, Any],
    same_class: Any = None,
) -> CheckpointHparams:
    """Decide, per saved hyperparameter, whether the checkpoint's value or this run's applies.

    Args:
        hparams: the checkpoint's ``hyper_parameters`` (``_instantiator`` removed); ``_class_path`` is the class
            LightningCLI instantiated.
        current_class: the model class of this run's parsed config (``None`` for a CLI made for one class).
        current_args: this run's parsed model arguments (defaults included).
        given_class: the model class this run gives explicitly (``None``: not given).
        given_args: the model arguments this run gives explicitly (command line and config files).
        same_class: ``(a, b) -> bool`` for two class paths (``torch.optim.AdamW`` is ``torch.optim.adamw.AdamW``);
            default: equal strings.

    Returns:
        A :class:`CheckpointHparams`.
    """
    same = same_class or (lambda a, b: a == b)
    saved = dict(hparams)
    class_path = saved.pop("_class_path", None)
    result = CheckpointHparams(class_path=str(class_path) if class_path is not None else None)
    if class_path is not None and given_class is not None and not same(given_class, class_path):
        result.other_class = given_class
        return result
    switching = class_path is not None and current_class is not None and not same(current_class, class_path)
    for name, value in saved.items():
        if name in given_args:
            if given_args[name] != value:
                result.overridden[name] = (value, given_args[name])
            continue
        result.applied[name] = value
        # The value this run would have had: its own default, unless the checkpoint's class replaces the one
        # configured (then there is no "default" to compare with, and everything saved counts).
        current = current_args.get(name, _MISSING) if not switching else _MISSING
        if current is _MISSING or current != value:
            result.taken[name] = (value, current)
    return result
