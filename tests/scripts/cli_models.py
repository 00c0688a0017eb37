"""Tiny LightningModules the distributed CLI tests select with ``--model``."""

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

__all__ = ["FailingDigitsClassifier", "TinyTokenClassifier"]


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
