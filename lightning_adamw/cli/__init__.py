"""The ``lightning-adamw`` command (:class:`AdamWCLI`), a LightningCLI that keeps the parameter groups.

Stages of one command line, one module each: :mod:`~lightning_adamw.cli.parser` (class changes start from the
new class's own defaults; no abbreviated options), :mod:`~lightning_adamw.cli.checks` (non-finite values,
conflicting optimizers), :mod:`~lightning_adamw.cli.optimizers` (top-level and registered optimizers and
schedulers handed to the module as factories), :mod:`~lightning_adamw.cli.app` (the CLI class and ``main``).
"""

from __future__ import annotations

from lightning_adamw.cli.app import BUILT_IN_JOB, AdamWCLI, main

__all__ = ["BUILT_IN_JOB", "AdamWCLI", "main"]
