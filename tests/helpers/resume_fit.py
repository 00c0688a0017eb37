"""A tiny three-matrix module and the two-run harness the resume tests share: train one epoch, checkpoint,
resume with a changed configuration (``tests/test_resume_fit.py``, ``tests/test_resume_new_schedule.py``)."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_adamw import DecoupledWeightDecayMixin

STEPS_PER_EPOCH = 4


class Three(DecoupledWeightDecayMixin, L.LightningModule):
    """a, b, c: three 6x6 matrices (decayed unless a pattern says otherwise); out: Linear(6, 1)."""

    def __init__(
        self,
        lr: float = 0.05,
        weight_decay: float = 0.1,
        no_decay_patterns: list[str] | None = None,
        lr_schedule: str = "constant",
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        lr_scheduler: object = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["lr_scheduler"])
        self.lr_scheduler = lr_scheduler
        self.a, self.b, self.c = (nn.Linear(6, 6, bias=False) for _ in range(3))
        self.out = nn.Linear(6, 1)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.out(self.c(self.b(self.a(x)))), y)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(torch.randn(64, 6, generator=g), torch.randn(64, 1, generator=g))
        return DataLoader(data, batch_size=64 // STEPS_PER_EPOCH)


class Probe(L.Callback):
    """The optimizer's groups as training starts (after the checkpoint was restored), and lr at every step."""

    def __init__(self) -> None:
        self.groups: list[dict] = []
        self.lrs: dict[int, float] = {}

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.groups = [
            {k: v for k, v in g.items() if k != "params"} for g in trainer.optimizers[0].param_groups
        ]

    def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
        self.lrs[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]


def fit(
    model: L.LightningModule, root: Path, epochs: int, ckpt: str | None = None, **kwargs: object
) -> L.Trainer:
    trainer = L.Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        default_root_dir=root,
        enable_progress_bar=False,
        enable_model_summary=False,
        logger=kwargs.pop("logger", False),
        callbacks=[ModelCheckpoint(dirpath=root / "ckpt", save_top_k=-1), *kwargs.pop("callbacks", [])],
        **kwargs,
    )
    trainer.fit(model, ckpt_path=ckpt)
    return trainer


def first_run(tmp_path: Path, **hparams: object) -> tuple[Three, L.Trainer, str]:
    torch.manual_seed(0)
    model = Three(**hparams)
    trainer = fit(model, tmp_path / "first", 1)
    (ckpt,) = (tmp_path / "first" / "ckpt").glob("*.ckpt")
    return model, trainer, str(ckpt)


def own_moments(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    return {n: optimizer.state[p]["exp_avg"].clone() for n, p in model.named_parameters()}


def lines(caplog: pytest.LogCaptureFixture, needle: str) -> list[str]:
    return [r.getMessage() for r in caplog.records if needle in r.getMessage()]
