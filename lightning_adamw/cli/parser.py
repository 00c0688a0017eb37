"""The argument parser of ``lightning-adamw``: what the command line says is what runs.

Two rules that stock jsonargparse / LightningCLI parsing does not keep, both silent otherwise:

* **A changed class starts from its own defaults.** jsonargparse keeps the ``init_args`` of the previous class
  that the new class also accepts when a ``class_path`` changes (``--config configs/quickstart.yaml --model
  my_pkg.MyModel`` would train ``MyModel`` with the demo's ``lr`` / ``weight_decay`` / schedule, and
  ``--data my_pkg.MyData`` with its ``batch_size``). Under :class:`AdamWArgumentParser` a new class gets its
  own defaults plus only what is given for it *after* the change (later ``--model.x`` options, later
  ``--config`` files). A subclass of the old class (a CPU stand-in for a strategy, a test double of a model)
  keeps the values that were *set* for its base class, since it has the same parameters; the base class's
  defaults are not carried, so its own defaults win. This holds for every class-valued option at any depth (``model``, ``data``,
  ``optimizer``, ``lr_scheduler``, ``trainer.logger``, ``trainer.callbacks`` items, a model's injected
  ``optimizer``...), whatever the spelling (``--model X``, ``--model=X``, ``--model.class_path X``, a
  ``class_path`` in a config file or a nested sub-config). One info line per change names the values that
  stock parsing would have carried over, and those that were carried.
* **No abbreviated options.** argparse expands a unique prefix (``--trainer.max_epoch`` becomes
  ``--trainer.max_epochs``); here it is an error that names the option and the options it could mean, for
  the top-level parsers and for the parsers of the classes (``--model.warmup`` is not ``--model.warmup_steps``).

Mechanism: jsonargparse drops the previous ``init_args`` that the new class does not accept in one module-level
function, ``jsonargparse._typehints.discard_init_args_on_class_path_change``. :func:`class_change_rules` wraps
it, for the duration of one parse only (a context variable: other parsers in the process keep the stock
behaviour), so that it drops all of them. :func:`check_mechanism` fails loudly if a jsonargparse release
renames that function, rather than letting the old carry-over come back silently.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch.cli import LightningArgumentParser

__all__ = [
    "AdamWArgumentParser",
    "ClassChange",
    "check_mechanism",
    "class_change_rules",
    "import_path",
    "same_class",
]


@dataclass(frozen=True)
class ClassChange:
    """One class-valued option whose class changed while parsing.

    Attributes:
        old_class: class path before the change.
        new_class: class path after it.
        dropped: ``{name: value}`` of the old ``init_args`` that the new class accepts, that stock jsonargparse
            would have carried over, and that are not carried (values equal to the new class's own defaults are
            left out).
        carried: ``{name: value}`` carried over because the new class is a subclass of the old one and the value
            was set (it differs from the old class's default).
        source: where the new class was given: ``"in <config file>"`` or ``"on the command line"``.
    """

    old_class: str
    new_class: str
    dropped: dict[str, Any]
    carried: dict[str, Any]
    source: str

    def same_change(self, other: ClassChange) -> bool:
        """The same change from the same place. jsonargparse applies a class change once while parsing and
        again when it merges the subcommand's values, then with the values from *before* later options (a
        ``--model.lr`` given before ``--model X`` shows up as the config file's lr): the first report is the
        one that describes what the user wrote."""
        # (the second application names the command line whatever the source was: compare the classes only)
        return (self.old_class, self.new_class) == (other.old_class, other.new_class)

    def message(self) -> str:
        old, new = _short(self.old_class), _short(self.new_class)
        head = f"lightning-adamw: {self.new_class} (given {self.source}) replaced {self.old_class}"
        if self.carried:
            shown = ", ".join(f"{k}={v!r}" for k, v in self.carried.items())
            line = (
                f"{head}, a base class of it; the values set for {old} {shown} were carried over, {new}'s own "
                "defaults apply to the rest"
            )
            if self.dropped:
                line += " (" + ", ".join(f"{k}={v!r}" for k, v in self.dropped.items()) + " were not carried)"
            return line
        shown = ", ".join(f"{k}={v!r}" for k, v in self.dropped.items())
        return (
            f"{head}; {old}'s init_args {shown} were not carried over: {new} starts from its own defaults plus "
            "only the arguments given for it after the change"
        )


_COMMAND_LINE = "on the command line"


@dataclass
class _Recorder:
    report: Callable[[ClassChange], None]
    seen: list[ClassChange]
    #: config files or strings read to the end: before the first, a class's init_args are its own defaults
    configs_read: int = 0
    #: every class change applied so far, reported or not
    applied: list[ClassChange] = field(default_factory=list)


# The parse in progress under the rule; None outside AdamWCLI's parsing (stock behaviour).
_changes: ContextVar[_Recorder | None] = ContextVar("lightning_adamw_class_changes", default=None)
_source: ContextVar[str] = ContextVar("lightning_adamw_config_source", default=_COMMAND_LINE)


def _short(class_path: str) -> str:
    return str(class_path).rsplit(".", 1)[-1]


def import_path(class_path: Any) -> Any:
    """The object a dotted import path names, as jsonargparse imports it, or ``None`` if it cannot be imported
    (jsonargparse reports such a path itself; here it only means "unknown")."""
    from jsonargparse._util import import_object

    try:
        return import_object(class_path)
    except Exception:
        return None


def same_class(a: Any, b: Any) -> bool:
    """Two class paths that import the same object (``torch.optim.AdamW`` is ``torch.optim.adamw.AdamW``)."""
    if a == b:
        return True
    first = import_path(a)
    return first is not None and first is import_path(b)


def _is_subclass(new: Any, old: Any) -> bool:
    new_class, old_class = import_path(new), import_path(old)
    return isinstance(new_class, type) and isinstance(old_class, type) and issubclass(new_class, old_class)


def _typehints_module() -> Any:
    import jsonargparse._typehints as typehints

    return typehints


_ORIGINAL_ATTR = "_lightning_adamw_original"


def check_mechanism() -> None:
    """Raise ``RuntimeError`` if the jsonargparse function that :func:`class_change_rules` wraps is missing.

    Raises:
        RuntimeError: naming the installed jsonargparse version, so the CLI never silently falls back to
            carrying init_args over to a changed class.
    """
    function = getattr(_typehints_module(), "discard_init_args_on_class_path_change", None)
    if not callable(function):
        import jsonargparse

        raise RuntimeError(
            "lightning-adamw: jsonargparse "
            f"{getattr(jsonargparse, '__version__', '?')} has no "
            "`_typehints.discard_init_args_on_class_path_change`; the CLI cannot make a changed class start from "
            "its own defaults. Install a jsonargparse version this lightning-adamw release supports."
        )


def _install() -> None:
    """Wrap jsonargparse's function once per process; the wrapper is stock unless a parse is in progress."""
    check_mechanism()
    module = _typehints_module()
    current = module.discard_init_args_on_class_path_change
    if getattr(current, _ORIGINAL_ATTR, None) is not None:
        return
    original: Callable[..., None] = current

    def discard_all_on_class_change(parser_or_action: Any, prev_val: Any, value: Any) -> None:
        recorder = _changes.get()
        if (
            recorder is None
            or not prev_val
            or not hasattr(prev_val, "clone")  # jsonargparse passes Namespaces; anything else: stock rules
            or "init_args" not in prev_val
            or prev_val.get("class_path") is None  # init args given alone: for the class now named
            or same_class(prev_val["class_path"], value["class_path"])
        ):
            original(parser_or_action, prev_val, value)
            return
        old_path, new_path = str(prev_val["class_path"]), str(value["class_path"])
        sub_add_kwargs = getattr(parser_or_action, "sub_add_kwargs", {})
        # What stock parsing would keep: the same function on a copy.
        kept = prev_val.clone()
        original(parser_or_action, kept, value)
        kept_args = {k: _plain(v) for k, v in kept.init_args.items(branches=True, nested=False)}
        new_defaults = _class_defaults(new_path, sub_add_kwargs)
        carried: dict[str, Any] = {}
        if _is_subclass(new_path, old_path):
            # A subclass has its base's parameters: values that were *set* (not the base's defaults) still
            # describe it. The base's defaults are not carried, so the subclass's own defaults win.
            old_defaults = _class_defaults(old_path, sub_add_kwargs)
            carried = {k: v for k, v in kept_args.items() if k not in old_defaults or old_defaults[k] != v}
        # Before any config was read to its end, the old class's init_args are its own defaults (the built-in
        # job's model), nothing the user wrote; only values someone set are worth a line.
        unset = {} if recorder.configs_read else _class_defaults(old_path, sub_add_kwargs)
        dropped = {
            k: v
            for k, v in kept_args.items()
            if k not in carried
            and (k not in new_defaults or new_defaults[k] != v)
            and (k not in unset or unset[k] != v)
        }
        for key, _ in list(prev_val.init_args.items(branches=True, nested=False)):
            if key not in carried:
                prev_val.init_args.pop(key)
        change = ClassChange(old_path, new_path, dropped, carried, _source.get())
        # jsonargparse may apply one change twice (parsing, then merging the subcommand, with the values from
        # before): the first application is the one that describes what the user wrote; report it, or nothing.
        if not any(change.same_change(seen) for seen in recorder.applied):
            recorder.applied.append(change)
            if dropped or carried:
                recorder.seen.append(change)
                recorder.report(change)

    setattr(discard_all_on_class_change, _ORIGINAL_ATTR, original)
    module.discard_init_args_on_class_path_change = discard_all_on_class_change


def _class_defaults(class_path: str, sub_add_kwargs: dict[str, Any]) -> dict[str, Any]:
    """A class's own init defaults as jsonargparse reads them (``{}`` if they cannot be read)."""
    try:
        parser = _typehints_module().ActionTypeHint.get_class_parser(class_path, sub_add_kwargs)
        defaults = parser.get_defaults(skip_validation=True)
        return {k: _plain(v) for k, v in defaults.items(branches=True, nested=False)}
    except Exception:  # only a default that cannot be read: then no value counts as a default
        return {}


def _plain(value: Any) -> Any:
    """Namespaces as dicts, for comparing and printing."""
    if hasattr(value, "as_dict"):
        return value.as_dict()
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_plain(v) for v in value)
    return value


@contextmanager
def class_change_rules(report: Callable[[ClassChange], None] | None = None) -> Iterator[list[ClassChange]]:
    """Within this context, parsing with any jsonargparse parser drops the init_args of a changed class.

    Args:
        report: called once per change as it happens (e.g. to log :meth:`ClassChange.message`), so the line
            comes before any parse error it explains.

    Yields:
        The list of changes, filled while parsing.
    """
    _install()
    recorder = _Recorder(report or (lambda change: None), [])
    token = _changes.set(recorder)
    try:
        yield recorder.seen
    finally:
        _changes.reset(token)


@contextmanager
def _reading(source: str) -> Iterator[None]:
    token = _source.set(source)
    try:
        yield
    finally:
        _source.reset(token)
        recorder = _changes.get()
        if recorder is not None:
            recorder.configs_read += 1


class AdamWArgumentParser(LightningArgumentParser):
    """``LightningArgumentParser`` that refuses abbreviated options and records where config values come from.

    jsonargparse builds the parsers of classes (``--model.*``, ``--optimizer.*``...) with the class of the
    parser that owns the option, so they refuse abbreviations too.
    """

    def _get_option_tuples(self, option_string: str) -> list[Any]:
        # argparse asks this only for a string that is not an option as given; every option it would expand to
        # is listed, whatever `allow_abbrev` says (with allow_abbrev=False argparse names no candidates).
        given = option_string.split("=", 1)[0]
        if not given.startswith("--"):
            return super()._get_option_tuples(option_string)  # short options (-c FILE) keep argparse's rules
        expansions = sorted(o for o in self._option_string_actions if o.startswith(given) and o != given)
        if expansions:
            shown = " or ".join(repr(c) for c in expansions[:6]) + (" or ..." if len(expansions) > 6 else "")
            self.error(
                f"unrecognized option {given!r}: abbreviated options are not accepted; did you mean {shown}?"
            )
        return super()._get_option_tuples(option_string)

    def parse_path(self, path: str | os.PathLike[str], *args: Any, **kwargs: Any) -> Any:
        with _reading(f"in {path}"):
            return super().parse_path(path, *args, **kwargs)

    def parse_string(self, content: str, *args: Any, **kwargs: Any) -> Any:
        path = kwargs.get("path") or (args[0] if args else "")
        with _reading(f"in {path}" if path else "in a config string"):
            return super().parse_string(content, *args, **kwargs)
