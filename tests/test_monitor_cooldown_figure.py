"""The summary figure shows the learning-rate cooldown (issue 14 §3): the monitor records each group's ``lr`` and
``grad_to_weight``, and the figure has a panel of every group's gradient-to-weight ratio with the cooldown (from
the lr's peak to the last logged step) shaded."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_adamw import DecoupledWeightDecayMixin, WeightDecayMonitor
from lightning_adamw.monitor_plot import cooldown, plot_history
from tests.helpers.lit_monitor import StepRecorder, fit


class Net(DecoupledWeightDecayMixin, L.LightningModule):
    def __init__(self, weight_decay_schedule: str = "constant") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lr, self.lr_schedule, self.warmup_steps = 0.01, "cosine", 3
        self.body = nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.Linear(16, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.body(x), y)

    def train_dataloader(self) -> DataLoader:
        x = torch.randn(40, 4, generator=torch.Generator().manual_seed(0))
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


def test_history_has_lr_and_the_figure_shades_the_cooldown(tmp_path: Path) -> None:
    monitor, recorder = WeightDecayMonitor(log_every_n_steps=1), StepRecorder()
    fit(Net("adamc"), [monitor, recorder], tmp_path, max_steps=10)
    decay = monitor.history["adamw/decay"]
    # the lr each step used, as the recorder saw it before the step
    applied = [r["groups"][0]["lr"] for r in recorder.records]
    assert [v for _, v in decay["lr"]] == applied
    assert len(decay["grad_to_weight"]) == 10
    peak = max(range(10), key=lambda i: applied[i])
    assert cooldown(monitor.history) == (float(peak), 9.0)
    fig: Any = plot_history(monitor.history)
    axes = fig.get_axes()
    ratio = next(ax for ax in axes if ax.get_title() == "gradient-to-weight ratio per group")
    labels = ratio.get_legend_handles_labels()[1]
    assert "lr cooldown" in labels and "adamw/decay" in labels and "adamw/no_decay" in labels
    assert monitor.figure_path is not None and Path(monitor.figure_path).stat().st_size > 0


def test_no_cooldown_while_the_lr_rises_or_stays() -> None:
    rising = {"adamw/decay": {"lr": [[0.0, 1e-3], [1.0, 2e-3]]}}
    constant = {"adamw/decay": {"lr": [[0.0, 1e-3], [1.0, 1e-3]]}}
    assert cooldown(rising) is None and cooldown(constant) is None and cooldown({}) is None
    # (an old history without lr or grad_to_weight draws as before: no ratio panel)
    fig: Any = plot_history({"adamw/decay": {"decay_norm": [[0.0, 1.0]], "grad_update_norm": [[0.0, 2.0]]}})
    assert [ax.get_title() for ax in fig.get_axes() if ax.get_title()] == ["adamw/decay"]


def test_every_log_axis_has_labelled_ticks_even_within_a_decade() -> None:
    """A decay/gradient ratio moving by 23 % (0.00143 -> 0.00176) and norms within one decade: each log axis
    gets labelled ticks, so a small change cannot read as a rise of decades (there were none below a decade)."""
    steps = [0.0, 2.0, 4.0]
    history = {
        "adamw/decay": {
            "decay_norm": [[s, v] for s, v in zip(steps, [1.1e-4, 1.2e-4, 1.3e-4], strict=True)],
            "grad_update_norm": [[s, v] for s, v in zip(steps, [7.7e-2, 7.3e-2, 7.4e-2], strict=True)],
            "decay_to_grad_ratio": [[s, v] for s, v in zip(steps, [1.43e-3, 1.64e-3, 1.76e-3], strict=True)],
            "grad_to_weight": [[s, v] for s, v in zip(steps, [0.31, 0.28, 0.3], strict=True)],
        },
        "adamw/no_decay": {
            "grad_update_norm": [[s, v] for s, v in zip(steps, [2.0e-2, 2.2e-2, 2.1e-2], strict=True)],
            "decay_norm": [[s, 0.0] for s in steps],
        },
    }
    fig: Any = plot_history(history)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig).draw()
    for ax in fig.axes:
        if not ax.lines:
            continue
        low, high = ax.get_ylim()
        labels = [
            t.get_text()
            for t in ax.yaxis.get_ticklabels()
            if t.get_text() and low <= t.get_position()[1] <= high
        ]
        assert labels, f"axis {ax.get_title() or ax.get_ylabel()!r} ({low:.3g}..{high:.3g}) has no tick label"
