"""What :class:`~lightning_adamw.monitor.WeightDecayMonitor` sends to loggers besides ``log_metrics``: W&B
``define_metric`` (charts against the trainer step), per-group histograms (W&B and TensorBoard), the summary
figure as an image, and the log directory the figure goes to."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl

from lightning_adamw.monitor_plot import RenderedFigure

__all__ = [
    "IMAGE_KEY",
    "define_wandb_metrics",
    "figure_dir",
    "is_tensorboard",
    "is_wandb",
    "log_figure",
    "log_histograms",
    "prepare_figure",
]

#: The key of the summary figure in W&B and TensorBoard.
IMAGE_KEY = "adamw/summary"


def is_wandb(logger: Any) -> bool:
    from lightning.pytorch.loggers import WandbLogger

    return isinstance(logger, WandbLogger)


def is_tensorboard(logger: Any) -> bool:
    from lightning.pytorch.loggers import TensorBoardLogger

    return isinstance(logger, TensorBoardLogger)


def figure_dir(trainer: pl.Trainer) -> str:
    """Where a relative ``plot_filename`` goes: the first logger's log directory, else ``default_root_dir``
    (the choice of ``trainer.log_dir``, without its broadcast: this runs on rank zero only)."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    if trainer.loggers:
        logger = trainer.loggers[0]
        directory = logger.log_dir if isinstance(logger, (CSVLogger, TensorBoardLogger)) else logger.save_dir
        if directory:
            return str(directory)
    return str(trainer.default_root_dir)


def define_wandb_metrics(loggers: Iterable[Any], prefixes: Iterable[str]) -> None:
    """Charts of ``<prefix>/*``, ``<prefix>_layer/*`` and ``<prefix>_hist/*`` use ``trainer/global_step`` as x axis
    in W&B (not W&B's internal call counter)."""
    for logger in loggers:
        if not is_wandb(logger):
            continue
        define = getattr(logger.experiment, "define_metric", None)
        if define is None:
            continue
        prefix = f"{logger._prefix}{logger.LOGGER_JOIN_CHAR}" if getattr(logger, "_prefix", "") else ""
        define("trainer/global_step")
        for kind_prefix in sorted(set(prefixes)):
            for suffix in ("", "_layer", "_hist"):
                define(f"{prefix}{kind_prefix}{suffix}/*", step_metric="trainer/global_step")


def log_histograms(loggers: Iterable[Any], values: Mapping[str, Sequence[float]], step: int) -> None:
    """``{key: values}`` as W&B histograms and TensorBoard histograms at ``step``."""
    for logger in loggers:
        if is_wandb(logger):
            import wandb

            logger.experiment.log(
                {**{key: wandb.Histogram(data) for key, data in values.items()}, "trainer/global_step": step}
            )
        elif is_tensorboard(logger):
            import numpy as np

            for key, data in values.items():
                logger.experiment.add_histogram(key, np.asarray(data, dtype=np.float64), global_step=step)


def prepare_figure(loggers: Iterable[Any]) -> Callable[[RenderedFigure], None]:
    """What the figure's background thread also prepares for ``loggers`` (reading the file for W&B's image)."""
    wandb_wanted = any(is_wandb(logger) for logger in loggers)

    def prepare(figure: RenderedFigure) -> None:
        if wandb_wanted:
            import wandb

            figure.extras["wandb"] = wandb.Image(figure.path)

    return prepare


def log_figure(
    loggers: Iterable[Any], figure: RenderedFigure, step: int, warn: Callable[[str, str], None]
) -> None:
    """The figure as an image in W&B (``log_metrics`` with the image built in the background, what
    ``WandbLogger.log_image`` does) and TensorBoard (its pixels); a logger that refuses it gets a warning."""
    for logger in loggers:
        try:
            if is_wandb(logger):
                logger.log_metrics({IMAGE_KEY: [figure.extras["wandb"]]}, step=step)
            elif is_tensorboard(logger):
                logger.experiment.add_image(IMAGE_KEY, figure.rgba, global_step=step, dataformats="HWC")
        except Exception as err:  # a logger refusing an image must not fail the end of training
            warn(f"image-{type(logger).__name__}", f"WeightDecayMonitor: could not log figure: {err!r}")
