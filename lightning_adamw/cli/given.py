"""What one ``lightning-adamw`` command gives itself: the values on its command line and in its config files.

The parsed config mixes three sources: the parser's defaults (a class's own ``__init__`` defaults, the built-in
job), what this run gives (``--model.lr 0.1``, ``--config my.yaml``), and, on resume, the checkpoint's saved
hyperparameters. Two rules need to tell them apart:

* on resume (``--ckpt_path``) what this run gives wins over the checkpoint's hyperparameters
  (:mod:`lightning_adamw.cli.resume`);
* a model-level ``lr`` / ``weight_decay`` / ``betas`` / ``eps`` given together with an optimizer that does not
  read them is an error (:func:`lightning_adamw.cli.checks.check_model_settings_used`).

:func:`given_config` parses the same arguments again without the parser's defaults (jsonargparse's
``defaults=False``), under the same class-change rule as the real parse (so a class changed after a config
does not inherit what was given for the old one).
"""

from __future__ import annotations

import contextlib
import io
import sys
from collections.abc import Mapping
from typing import Any

from lightning_adamw.cli.parser import class_change_rules

__all__ = ["command_line_model_settings", "given_config", "given_model_args", "model_args"]


def _plain(value: Any) -> Any:
    if hasattr(value, "as_dict"):
        return value.as_dict()
    return value


def given_config(parser: Any, args: Any) -> dict[str, Any] | None:
    """The config of ``args`` without the parser's defaults, as a dict (subcommand at the top, as parsed).

    Args:
        parser: the CLI's parser (``LightningCLI.parser``), already used for the real parse.
        args: what the real parse got (a list of strings, ``None`` for ``sys.argv``, or a dict / Namespace).

    Returns:
        The dict, or ``None`` when the arguments cannot be parsed without defaults (then the callers fall back
        to comparing with the class defaults). Nothing is printed: a failing parse is silent here (the real
        parse already succeeded).
    """
    try:
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            with class_change_rules():
                if isinstance(args, Mapping) or hasattr(args, "as_dict"):
                    config = parser.parse_object(args, defaults=False)
                else:
                    config = parser.parse_args(args, defaults=False)
    except (SystemExit, Exception):  # jsonargparse reports errors by exiting; any failure means "unknown"
        return None
    return _plain(config)


def model_args(config: Mapping[str, Any] | None) -> tuple[str | None, dict[str, Any]]:
    """``(class_path, init args)`` of the ``model`` entry of one subcommand's config (dict or Namespace).

    Subclass mode gives ``{class_path, init_args, dict_kwargs}``; a CLI made for one model class gives the
    arguments directly (``class_path`` is then ``None``)."""
    model = _plain(config.get("model")) if config is not None else None
    if not isinstance(model, Mapping):
        return None, {}
    if "class_path" in model:
        args = dict(_plain(model.get("init_args")) or {})
        args.update(_plain(model.get("dict_kwargs")) or {})
        return str(model["class_path"]), args
    return None, dict(model)


def given_model_args(
    given: Mapping[str, Any] | None, subcommand: str | None
) -> tuple[str | None, dict[str, Any]]:
    """``(class_path, init args)`` that this run gives for the model (see :func:`given_config`)."""
    if given is None:
        return None, {}
    config = given.get(subcommand) if subcommand else given
    return model_args(config if isinstance(config, Mapping) else None)


def command_line_model_settings(args: Any, names: tuple[str, ...]) -> set[str]:
    """Which of the model arguments ``names`` the command line itself sets (``--model.lr``,
    ``--model.init_args.lr``, with or without ``=``), as opposed to a config file. Arguments given as a dict or
    Namespace (``LightningCLI(args={...})``) count as given on the command line.

    Args:
        args: what the CLI parsed (a list of strings, ``None`` for ``sys.argv[1:]``, or a dict / Namespace).
        names: the argument names to look for.
    """
    if isinstance(args, Mapping) or hasattr(args, "as_dict"):
        config = _plain(args)
        subcommand = config.get("subcommand")
        section = config.get(subcommand) if subcommand else None
        if section is None:  # {"fit": {...}} without a "subcommand" key, or the config of one subcommand
            section = next((v for v in config.values() if isinstance(v, Mapping) and "model" in v), config)
        _, model = model_args(section)
        return {n for n in names if n in model}
    tokens = list(sys.argv[1:] if args is None else args)
    found = set()
    for token in tokens:
        if not isinstance(token, str) or not token.startswith("--model."):
            continue
        key = token[len("--model.") :].split("=", 1)[0]
        key = key.removeprefix("init_args.").removeprefix("dict_kwargs.")
        if key in names:
            found.add(key)
    return found
