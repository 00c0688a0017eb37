"""Small LightningModules shared by the mixin and CLI tests (importable by class path: ``tests.helpers.lit_models.X``)."""

from __future__ import annotations

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_adamw import DecoupledWeightDecayMixin


def regression_data(n: int = 64, dim: int = 6, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = x @ torch.randn(dim, 1, generator=g) + 0.1 * torch.randn(n, 1, generator=g)
    return TensorDataset(x, y)


def make_body(dim: int = 6) -> nn.Sequential:
    return nn.Sequential(nn.Linear(dim, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 1))


class TinyRegressor(DecoupledWeightDecayMixin, L.LightningModule):
    """Linear-LayerNorm-Linear regressor: 2 decayed matrices, 4 no-decay tensors."""

    def __init__(
        self,
        lr: float = 1e-2,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        lr_schedule: str = "constant",
        warmup_steps: int = 0,
        min_lr_ratio: float = 0.0,
        exclude_embeddings: bool = False,
        no_decay_patterns: list[str] | None = None,
        decay_patterns: list[str] | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
        batch_size: int = 16,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.body = make_body()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", nn.functional.mse_loss(self(x), y))

    def train_dataloader(self) -> DataLoader:
        return DataLoader(regression_data(), batch_size=self.hparams.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(regression_data(seed=1), batch_size=32)
