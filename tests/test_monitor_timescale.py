"""The monitor's timescale facts and messages: `ema_timescale_fraction`, `base_weight_decay`, the two timescale
warnings, `last_metrics` with two optimizers, and the message for Adam-like optimizers it cannot replay."""

from __future__ import annotations

import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader

from lightning_adamw import WeightDecayMonitor, build_param_groups
from tests.helpers.lit_models import TinyRegressor, make_body, regression_data

# regression_data() has 64 rows: 4 optimizer steps per epoch at batch 16
STEPS_PER_EPOCH = 4


def fit(model: L.LightningModule, tmp_path: Path, max_steps: int) -> tuple[WeightDecayMonitor, list[str]]:
    monitor = WeightDecayMonitor(log_every_n_steps=1, plot=False)
    trainer = L.Trainer(
        max_steps=max_steps,
        callbacks=[monitor],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        limit_val_batches=0,
        default_root_dir=tmp_path,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model)
    return monitor, [str(w.message) for w in caught if "WeightDecayMonitor" in str(w.message)]


def test_fraction_of_the_run_and_warning_when_longer_than_the_run(tmp_path: Path) -> None:
    # tau = 1/(lr*lambda) = 1/(1e-2 * 0.1) = 1000 steps, 12 planned: 1000/12 of the run, and one warning
    monitor, messages = fit(TinyRegressor(lr=1e-2, weight_decay=0.1), tmp_path, max_steps=12)
    assert monitor.last_metrics["adamw/decay/ema_timescale_fraction"] == pytest.approx(1000 / 12, rel=1e-12)
    assert "adamw/no_decay/ema_timescale_fraction" not in monitor.last_metrics  # λ = 0: no timescale
    assert "adamw/decay/base_weight_decay" not in monitor.last_metrics  # no weight decay schedule
    (line,) = [m for m in messages if "timescale" in m]
    assert "group 'decay'" in line and "longer than the whole run (12 steps)" in line and "1000" in line


def test_warning_when_shorter_than_one_epoch(tmp_path: Path) -> None:
    # tau = 1/(0.5 * 0.5) = 4 steps ... with 4 steps per epoch it is one epoch: no warning; at 1.0 x 0.5 it is 2
    _, quiet = fit(TinyRegressor(lr=0.5, weight_decay=0.5), tmp_path / "a", max_steps=2 * STEPS_PER_EPOCH)
    assert not [m for m in quiet if "timescale" in m]
    monitor, messages = fit(TinyRegressor(lr=1.0, weight_decay=0.5), tmp_path / "b", max_steps=8)
    assert monitor.last_metrics["adamw/decay/ema_timescale_fraction"] == pytest.approx(2 / 8, rel=1e-12)
    (line,) = [m for m in messages if "timescale" in m]
    assert f"shorter than one epoch ({STEPS_PER_EPOCH} steps)" in line and "longer" not in line


@pytest.mark.parametrize(
    ("schedule", "lam", "tau"),
    [("adamc", 0.2, 1 / (1e-2 * 0.2)), ("independent", 1e-3, 1 / 1e-3)],  # independent: λ per step
)
def test_scheduled_groups_log_their_base_weight_decay(
    tmp_path: Path, schedule: str, lam: float, tau: float
) -> None:
    model = TinyRegressor(lr=1e-2, weight_decay=lam, lr_schedule="cosine", warmup_steps=2)
    model.weight_decay_schedule = schedule  # an attribute setting, as Tuner-style tools write them
    monitor, _ = fit(model, tmp_path, max_steps=10)
    metrics = monitor.last_metrics
    assert metrics["adamw/decay/base_weight_decay"] == lam
    # tau at the peak lr: 1/(lr_max * λ), or 1/λ where λ is the per-step decay at the peak ("independent")
    assert metrics["adamw/decay/ema_timescale_fraction"] == pytest.approx(tau / 10, rel=1e-12)
    assert "adamw/no_decay/base_weight_decay" not in metrics


class TwoOptimizers(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.a, self.b = make_body(), make_body()

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        for opt, net in zip(self.optimizers(), (self.a, self.b), strict=True):
            opt.zero_grad()
            self.manual_backward(nn.functional.mse_loss(net(x), y))
            opt.step()

    def configure_optimizers(self) -> list[torch.optim.Optimizer]:
        return [torch.optim.AdamW(build_param_groups(net, 0.1), lr=1e-2) for net in (self.a, self.b)]

    def train_dataloader(self) -> DataLoader:
        return DataLoader(regression_data(), batch_size=16)


def test_last_metrics_keeps_every_optimizer_of_the_step(tmp_path: Path) -> None:
    monitor, _ = fit(TwoOptimizers(), tmp_path, max_steps=6)
    for k in (0, 1):
        assert monitor.last_metrics[f"adamw/opt{k}.decay/decay_norm"] > 0
        assert monitor.last_metrics[f"adamw/opt{k}.no_decay/decay_norm"] == 0.0


class NAdamRegressor(TinyRegressor):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.NAdam(build_param_groups(self, 0.1), lr=1e-2)


def test_adam_like_optimizers_are_named_for_what_they_are(tmp_path: Path) -> None:
    monitor, messages = fit(NAdamRegressor(), tmp_path, max_steps=2)
    (line,) = [m for m in messages if "NAdam" in m]
    assert "keeps Adam-like moments" in line and "no Adam state" not in line
    assert monitor.last_metrics["optim/decay/update_norm"] > 0
