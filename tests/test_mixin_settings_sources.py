"""Which module attributes are settings, and where each setting came from.

The mixin reads its settings from attributes of the module first. A model's own state under a generic name
(a DDPM noise schedule registered as the buffer ``betas``, a ``nn.Parameter`` called ``eps``) is never a setting:
only plain values are (numbers, bools, strings, classes, dicts, lists / tuples of those). A plain value under a
setting's name still is one (``self.eps = 1e-3``), so the table printed at fit start names every setting that
is not the default and where it came from, and an explicit ``total_steps`` shorter than the run warns.
"""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_adamw import DecoupledWeightDecayMixin


class Net(DecoupledWeightDecayMixin, L.LightningModule):
    def __init__(self, lr: float = 1e-2, lr_schedule: str = "constant", warmup_steps: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.body(x), y)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(16, 4, generator=g)
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


def fit(model: L.LightningModule, tmp_path: Any, steps: int = 4) -> tuple[L.Trainer, list[float]]:
    lrs: list[float] = []

    class Record(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            trainer.optimizers[0].register_step_post_hook(lambda o, *_: lrs.append(o.param_groups[0]["lr"]))

    trainer = L.Trainer(
        max_steps=steps,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[Record()],
    )
    trainer.fit(model)
    return trainer, lrs


def test_tensors_buffers_and_modules_are_the_models_state_not_settings(tmp_path: Any) -> None:
    model = Net()
    model.register_buffer("betas", torch.linspace(1e-4, 0.02, 100))  # a DDPM noise schedule
    model.eps = nn.Parameter(torch.ones(1))
    model.weight_decay = torch.tensor(0.5)
    model.total_steps = nn.Linear(1, 1)
    assert model.setting_source("betas") == "default" and model.adamw_setting("betas") == (0.9, 0.999)
    trainer, _ = fit(model, tmp_path, steps=1)
    group = trainer.optimizers[0].param_groups[0]
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.9, 0.999), 1e-8, 1e-2)


def test_plain_values_are_settings_and_the_table_says_where_each_came_from(
    tmp_path: Any, caplog: Any
) -> None:
    model = Net()
    model.eps = 1e-3  # a loss epsilon of the model: a plain float named like a setting is one
    model.betas = [0.8, 0.99]
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        trainer, _ = fit(model, tmp_path, steps=1)
    assert trainer.optimizers[0].param_groups[0]["eps"] == 1e-3
    (line,) = [r.getMessage() for r in caplog.records if "parameter groups" in r.getMessage()]
    settings = line.splitlines()[-1]
    assert settings == (
        "settings: lr=0.01 (hparams.lr), betas=[0.8, 0.99] (attribute self.betas), eps=0.001 (attribute self.eps)"
    )


def test_explicit_total_steps_shorter_than_the_run_warns_naming_it(tmp_path: Any) -> None:
    model = Net(lr_schedule="cosine", warmup_steps=1)
    model.total_steps = 2
    with pytest.warns(
        UserWarning,
        match=r"`total_steps`=2 \(attribute self.total_steps\) is shorter than the "
        r"trainer's planned 4 optimizer steps",
    ):
        _, lrs = fit(model, tmp_path)
    assert lrs == pytest.approx([0.005, 0.01, 0.0, 0.0], abs=1e-18)  # what the warning describes


def test_total_steps_equal_to_the_run_does_not_warn(tmp_path: Any, recwarn: Any) -> None:
    model = Net(lr_schedule="cosine")
    model.total_steps = 4
    fit(model, tmp_path)
    assert not [w for w in recwarn if "total_steps" in str(w.message)]
