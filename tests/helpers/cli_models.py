"""Tiny LightningModules and DataModules the CLI tests select with ``--model`` / ``--data``."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset

from lightning_adamw import DecoupledWeightDecayMixin
from lightning_adamw.demo import DigitsClassifier

__all__ = [
    "AppliedProbe",
    "FailingDigitsClassifier",
    "InitDictRegressor",
    "OwnOptimizerRegressor",
    "PlainRegressor",
    "RegressionData",
    "ScheduledRegressor",
    "SlowDigitsClassifier",
    "TinyTokenClassifier",
    "UserRegressor",
]


class FailingDigitsClassifier(DigitsClassifier):
    """The digits classifier, except that ``training_step`` raises on one rank at one step.

    The other ranks carry on into the next gradient all-reduce, where they would wait forever for the dead
    rank unless the launcher tears the run down: exactly the situation the failure test checks.

    Args:
        fail_on_rank: global rank that raises.
        fail_at_step: ``trainer.global_step`` at which it raises.
        **kwargs: passed to :class:`~lightning_adamw.demo.DigitsClassifier`.
    """

    MESSAGE = "lightning-adamw test: deliberate failure in training_step"

    def __init__(self, fail_on_rank: int = 1, fail_at_step: int = 2, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.fail_on_rank = fail_on_rank
        self.fail_at_step = fail_at_step

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.global_rank == self.fail_on_rank and self.trainer.global_step == self.fail_at_step:
            raise RuntimeError(f"{self.MESSAGE} on rank {self.global_rank} at step {self.fail_at_step}")
        return super().training_step(batch, batch_idx)


class TinyTokenClassifier(DecoupledWeightDecayMixin, L.LightningModule):
    """Embedding -> LayerNorm -> Linear on random tokens, with its own data: every grouping option has a target.

    ``embed.weight`` is decayed by default and moves to ``no_decay`` with ``exclude_embeddings=True``;
    ``norm.*`` and ``head.bias`` are no-decay; ``head.weight`` is decayed.
    """

    def __init__(
        self,
        vocab: int = 32,
        dim: int = 8,
        lr: float = 1e-2,
        weight_decay: float = 0.1,
        exclude_embeddings: bool = False,
        no_decay_patterns: list[str] | None = None,
        decay_patterns: list[str] | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        self.embed = nn.Embedding(vocab, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, 2)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(self.embed(tokens).mean(dim=1)))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        tokens, labels = batch
        loss = F.cross_entropy(self(tokens), labels)
        self.log("train_loss", loss)
        return loss

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        tokens = torch.randint(0, self.hparams.vocab, (64, 5), generator=g)
        return DataLoader(TensorDataset(tokens, tokens[:, 0] % 2), batch_size=16)


# ------------------------------------------------------------------------------ for the CLI rule tests


class RegressionData(L.LightningDataModule):
    """A user's data module with its own default batch size (16), on 64 random regression rows."""

    def __init__(self, batch_size: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()

    def _loader(self, seed: int) -> DataLoader:
        from tests.helpers.lit_models import regression_data

        return DataLoader(regression_data(seed=seed), batch_size=self.hparams.batch_size)

    def train_dataloader(self) -> DataLoader:
        return self._loader(0)

    def val_dataloader(self) -> DataLoader:
        return self._loader(1)


class UserRegressor(DecoupledWeightDecayMixin, L.LightningModule):
    """A user's model whose defaults all differ from the built-in DigitsClassifier's (lr 3e-3, decay 0.05...)."""

    def __init__(
        self,
        lr: float = 1e-3,
        weight_decay: float = 0.0,
        lr_schedule: str = "constant",
        warmup_steps: int = 0,
        hidden: int = 16,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(nn.Linear(6, hidden), nn.LayerNorm(hidden), nn.Linear(hidden, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.body(x), y)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("val_loss", F.mse_loss(self.body(x), y))


class OwnOptimizerRegressor(UserRegressor):
    """The README's "keep full control" recipe: its own configure_optimizers over the mixin's groups."""

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.decoupled_param_groups(), lr=3e-4, betas=(0.9, 0.95))


class InitDictRegressor(UserRegressor):
    """Lightning's documented pattern for linked optimizer options: the model gets the optimizer's
    ``{class_path, init_args}`` (``parser.add_optimizer_args(..., link_to="model.optimizer_init")``) and builds
    it in its own configure_optimizers, here over the mixin's groups."""

    def __init__(self, optimizer_init: dict | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.optimizer_init = optimizer_init

    def configure_optimizers(self) -> torch.optim.Optimizer:
        from lightning.pytorch.cli import instantiate_class

        return instantiate_class(self.decoupled_param_groups(weight_decay=None), self.optimizer_init)


class PlainRegressor(L.LightningModule):
    """A module without the mixin (stock LightningCLI rules apply to it), with its own data."""

    def __init__(self, batch_size: int = 16) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.Linear(16, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.body(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def train_dataloader(self) -> DataLoader:
        from tests.helpers.lit_models import regression_data

        return DataLoader(regression_data(), batch_size=self.hparams.batch_size)


class SlowDigitsClassifier(DigitsClassifier):
    """A subclass of the built-in model with defaults of its own (lr 1e-4, 5 warm-up steps)."""

    def __init__(self, lr: float = 1e-4, warmup_steps: int = 5, **kwargs: Any) -> None:
        super().__init__(lr=lr, warmup_steps=warmup_steps, **kwargs)


class ScheduledRegressor(UserRegressor):
    """A user's model with a grouping option and the weight-decay-over-time settings as ``__init__`` arguments."""

    def __init__(
        self,
        lr: float = 0.05,
        weight_decay: float = 0.2,
        no_decay_patterns: list[str] | None = None,
        weight_decay_schedule: dict[str, Any] | str | None = None,
        ema_timescale_fraction: float | None = None,
        lr_schedule: str = "constant",
        warmup_steps: int = 0,
    ) -> None:
        super().__init__(lr=lr, weight_decay=weight_decay, lr_schedule=lr_schedule, warmup_steps=warmup_steps)
        self.save_hyperparameters()


class AppliedProbe(L.Callback):
    """Every group's ``lr`` and ``weight_decay`` as each optimizer step applied them (read in a step post-hook)."""

    def __init__(self) -> None:
        self.lr: list[list[float]] = []
        self.wd: list[list[float]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        def record(optimizer: torch.optim.Optimizer, *_: Any) -> None:
            self.lr.append([float(g["lr"]) for g in optimizer.param_groups])
            self.wd.append([float(g["weight_decay"]) for g in optimizer.param_groups])

        trainer.optimizers[0].register_step_post_hook(record)
