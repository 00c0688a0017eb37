"""A small CNN on scikit-learn's handwritten digits, through LightningCLI, with decoupled weight decay.

The model and data are the package's built-in job (:class:`lightning_adamw.demo.DigitsClassifier`, a
Conv-BN-ReLU network with a LayerNorm + MLP head, and :class:`lightning_adamw.demo.DigitsDataModule`, the 1,797
8x8 digits that ship with scikit-learn: no download). This script adds what a real run needs around them:

* :class:`lightning_adamw.AdamWCLI`: every model, data, trainer and optimizer argument from the command line
  or a YAML file (``--help``, ``--print_config``), and top-level ``--optimizer`` that keeps the decay groups;
* :class:`lightning_adamw.WeightDecayMonitor` as a configurable ``--monitor.*`` section (per layer by
  default): the decay and gradient parts of every AdamW step;
* one command for fit, validation *and* test, accuracy and macro-F1 from torchmetrics, a confusion matrix and
  learning curves saved as PNG in the run's log directory, and a printed summary.

Run it::

    python examples/digits_classifier.py                                  # 10 epochs, ~1 min on 2 cores
    python examples/digits_classifier.py --trainer.max_epochs 3 --model.weight_decay 0.1
    python examples/digits_classifier.py --config configs/wandb.yaml      # + W&B (offline unless told)
    python examples/digits_classifier.py --help

Outputs in ``lightning_logs/digits_classifier/version_N/`` (the CSV logger's directory): ``metrics.csv``,
``config.yaml``, ``weight_decay_monitor.png`` (from the monitor), ``learning_curves.png``,
``confusion_matrix.png`` and ``summary.json``.
"""

from __future__ import annotations

import csv
import json
import math
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch.cli import LightningArgumentParser
from lightning.pytorch.loggers import CSVLogger
from matplotlib.figure import Figure
from torchmetrics.functional.classification import multiclass_confusion_matrix

from lightning_adamw import AdamWCLI, WeightDecayMonitor
from lightning_adamw.demo import DigitsClassifier, DigitsDataModule

NUM_CLASSES = 10

# Lightning suggests more DataLoader workers; for 1,797 tiny images in memory, 0 workers is the fastest.
warnings.filterwarnings("ignore", message=r".*does not have many workers.*")


class DigitsClassifierCLI(AdamWCLI):
    """:class:`~lightning_adamw.AdamWCLI` fixed to the digits model and data, plus a ``--monitor`` section.

    The model and data classes are fixed (``--model.lr``, ``--data.batch_size`` ... set their arguments);
    ``--optimizer`` / ``--lr_scheduler`` and ``--model.optimizer`` still accept any torch class. The monitor is a *forced* callback: it is always attached, and its options live under ``monitor.*`` in
    the YAML and on the command line, e.g. ``--monitor.per_layer false --monitor.log_every_n_steps 5``.
    """

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_lightning_class_args(WeightDecayMonitor, "monitor")
        parser.set_defaults(
            {
                "monitor.per_layer": True,
                "trainer.max_epochs": 10,
                "trainer.log_every_n_steps": 5,
                "trainer.logger": {
                    "class_path": f"{CSVLogger.__module__}.CSVLogger",
                    "init_args": {"save_dir": "lightning_logs", "name": "digits_classifier"},
                },
            }
        )


def _log_dir(trainer: Any) -> Path:
    """Where this run's files go: the first logger's directory (CSV / TensorBoard) or its save dir (W&B)."""
    for logger in trainer.loggers:
        directory = getattr(logger, "log_dir", None) or getattr(logger, "save_dir", None)
        if directory:
            return Path(directory)
    return Path(trainer.default_root_dir)


def _scalars(metrics: dict[str, Any], prefixes: tuple[str, ...]) -> dict[str, float]:
    return {
        k: float(v)
        for k, v in sorted(metrics.items())
        if k.startswith(prefixes) and getattr(v, "numel", lambda: 1)() == 1
    }


@torch.no_grad()
def confusion_matrix(model: torch.nn.Module, loader: Any) -> torch.Tensor:
    """Counts ``[true, predicted]`` over ``loader`` (the test set)."""
    model.eval()
    preds, targets = [], []
    for images, labels in loader:
        preds.append(model(images.to(model.device)).argmax(dim=-1).cpu())
        targets.append(labels)
    return multiclass_confusion_matrix(torch.cat(preds), torch.cat(targets), num_classes=NUM_CLASSES)


def plot_confusion(matrix: torch.Tensor, path: Path) -> Path:
    fig = Figure(figsize=(5.2, 4.6), layout="constrained")
    ax = fig.add_subplot(1, 1, 1)
    image = ax.imshow(matrix.numpy(), cmap="Blues")
    for true in range(NUM_CLASSES):
        for pred in range(NUM_CLASSES):
            count = int(matrix[true, pred])
            if count:
                color = "white" if count > matrix.max() / 2 else "black"
                ax.text(pred, true, str(count), ha="center", va="center", fontsize=8, color=color)
    ax.set_xticks(range(NUM_CLASSES))
    ax.set_yticks(range(NUM_CLASSES))
    ax.set_xlabel("predicted digit")
    ax.set_ylabel("true digit")
    ax.set_title("test set confusion matrix")
    fig.colorbar(image, ax=ax, shrink=0.8)
    fig.savefig(path, dpi=100)
    return path


def plot_learning_curves(metrics_csv: Path, path: Path) -> Path | None:
    """Train / val loss and val accuracy from the CSV logger, with the decay-to-gradient ratio of the monitor."""
    if not metrics_csv.exists():
        return None
    rows = list(csv.DictReader(metrics_csv.open()))

    def series(key: str) -> tuple[list[float], list[float]]:
        points = [(float(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        return [p[0] for p in points], [p[1] for p in points]

    fig = Figure(figsize=(12.0, 3.6), layout="constrained")
    ax_loss, ax_acc, ax_ratio = fig.subplots(1, 3)
    for key, style in (("train_loss", "-"), ("val_loss", "o-")):
        xs, ys = series(key)
        if xs:
            ax_loss.plot(xs, ys, style, label=key, markersize=3)
    ax_loss.set_yscale("log")
    ax_loss.set_title("loss")
    ax_loss.legend()
    for key in ("val_acc", "val_f1"):
        xs, ys = series(key)
        if xs:
            ax_acc.plot(xs, ys, "o-", label=key, markersize=3)
    ax_acc.set_title("validation accuracy / macro-F1")
    ax_acc.legend()
    for key in ("adamw/decay/decay_to_grad_ratio", "adamw/decay/update_to_weight"):
        xs, ys = series(key)
        if xs:
            ax_ratio.plot(xs, ys, label=key.split("/")[-1])
    ax_ratio.set_yscale("log")
    ax_ratio.set_title("WeightDecayMonitor, decay group")
    ax_ratio.legend()
    for ax in (ax_loss, ax_acc, ax_ratio):
        ax.set_xlabel("step")
        ax.grid(True, alpha=0.3)
    fig.savefig(path, dpi=100)
    return path


def main(args: Sequence[str] | None = None) -> dict[str, Any]:
    """Fit, validate and test; save plots and ``summary.json``; print and return the final metrics."""
    cli = DigitsClassifierCLI(
        DigitsClassifier,
        DigitsDataModule,
        subclass_mode_model=False,
        subclass_mode_data=False,
        run=False,
        args=list(args) if args is not None else None,
        parser_kwargs={"prog": "digits_classifier.py"},
    )
    trainer, model, datamodule = cli.trainer, cli.model, cli.datamodule
    trainer.fit(model, datamodule=datamodule)
    val = _scalars(trainer.callback_metrics, ("val_",))
    test = trainer.test(model, datamodule=datamodule, verbose=False)[0]
    monitor = next(cb for cb in trainer.callbacks if isinstance(cb, WeightDecayMonitor))

    log_dir = _log_dir(trainer)
    log_dir.mkdir(parents=True, exist_ok=True)
    matrix = confusion_matrix(model, datamodule.test_dataloader())
    plots = {"confusion_matrix": str(plot_confusion(matrix, log_dir / "confusion_matrix.png"))}
    curves = plot_learning_curves(log_dir / "metrics.csv", log_dir / "learning_curves.png")
    if curves is not None:
        plots["learning_curves"] = str(curves)
    if monitor.figure_path:
        plots["weight_decay_monitor"] = monitor.figure_path

    last = monitor.last_metrics
    watched = (
        "adamw/decay/decay_to_grad_ratio",
        "adamw/decay/angular_update",
        "adamw/decay/equilibrium_angular_update",
        "adamw/decay/weight_norm",
        "adamw/decay/equilibrium_weight_norm",
        "adamw/no_decay/decay_norm",
    )
    summary = {
        "log_dir": str(log_dir),
        "epochs": trainer.current_epoch,
        "steps": trainer.global_step,
        "val": val,
        "test": {k: float(v) for k, v in test.items()},
        "monitor_last": {k: last[k] for k in watched if k in last},
        "monitor_keys": sorted(last),
        "confusion_matrix": matrix.tolist(),
        "plots": plots,
    }
    (log_dir / "summary.json").write_text(json.dumps(summary, indent=2))

    lines = ["", "digits_classifier: final metrics"]
    lines.append("  " + "  ".join(f"{k}={v:.4f}" for k, v in val.items()))
    lines.append("  " + "  ".join(f"{k}={v:.4f}" for k, v in summary["test"].items()))
    mon = summary["monitor_last"]
    if mon:
        angle = mon.get("adamw/decay/angular_update", math.nan)
        eq = mon.get("adamw/decay/equilibrium_angular_update", math.nan)
        lines.append(
            f"  monitor (last step, decay group): decay/gradient = {mon.get('adamw/decay/decay_to_grad_ratio', math.nan):.3g}, "
            f"angular update = {angle:.3g} rad (equilibrium {eq:.3g}), "
            f"no-decay group decay norm = {mon.get('adamw/no_decay/decay_norm', math.nan):g}"
        )
    lines.append(f"  plots and logs: {log_dir}")
    print("\n".join(lines))
    return summary


if __name__ == "__main__":
    main()
