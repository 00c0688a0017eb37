"""The built-in job: a small CNN on scikit-learn's bundled handwritten digits (no download).

``lightning-adamw fit`` (or ``lightning-adamw fit --config configs/quickstart.yaml``, the same job written out)
trains :class:`DigitsClassifier` on :class:`DigitsDataModule` on a CPU in seconds. Both are ordinary Lightning
classes and double as a template: the model uses :class:`~lightning_adamw.DecoupledWeightDecayMixin` and
accepts LightningCLI-injected optimizer and scheduler callables. Given no data module, the model trains on
``DigitsDataModule()`` by itself, so ``lightning-adamw fit`` alone is the whole job; a data module given to
the trainer (``--data``, the configs) is used instead.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, TensorDataset, random_split
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from lightning_adamw.mixin import DecoupledWeightDecayMixin

__all__ = ["DigitsClassifier", "DigitsDataModule", "DigitsTask", "load_digits_tensors"]

NUM_CLASSES = 10


def load_digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """The 1,797 8x8 digit images shipped with scikit-learn as ``(N, 1, 8, 8)`` floats in [0, 1] and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    labels = torch.tensor(digits.target, dtype=torch.long)
    return images, labels


class DigitsDataModule(L.LightningDataModule):
    """scikit-learn's digits split into train / val / test with a fixed seed.

    Args:
        batch_size: samples per batch.
        val_fraction: share of the data held out for validation.
        test_fraction: share held out for test.
        seed: seed of the split (the same split on every rank and every run).
        num_workers: DataLoader workers (0 is fastest for data this small).
    """

    def __init__(
        self,
        batch_size: int = 64,
        val_fraction: float = 0.15,
        test_fraction: float = 0.15,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if not 0 < val_fraction < 1 or not 0 < test_fraction < 1 or val_fraction + test_fraction >= 1:
            raise ValueError(
                f"`val_fraction` ({val_fraction}) and `test_fraction` ({test_fraction}) must be in (0, 1) with sum < 1"
            )
        if batch_size <= 0:
            raise ValueError(f"`batch_size` must be positive, got {batch_size}")
        self.save_hyperparameters()
        self.train_set: Any = None
        self.val_set: Any = None
        self.test_set: Any = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is not None:
            return
        images, labels = load_digits_tensors()
        dataset = TensorDataset(images, labels)
        n = len(dataset)
        n_val = round(n * self.hparams.val_fraction)
        n_test = round(n * self.hparams.test_fraction)
        generator = torch.Generator().manual_seed(self.hparams.seed)
        self.train_set, self.val_set, self.test_set = random_split(
            dataset, [n - n_val - n_test, n_val, n_test], generator=generator
        )

    def _loader(self, dataset: Any, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=self.hparams.batch_size,
            shuffle=shuffle,
            num_workers=self.hparams.num_workers,
            persistent_workers=self.hparams.num_workers > 0,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, shuffle=False)


class DigitsTask(L.LightningModule):
    """Classification steps and metrics (loss, accuracy, macro F1 via torchmetrics) and the built-in digits data,
    shared by the built-in job's models (:class:`DigitsClassifier`, :class:`~lightning_adamw.finetune.ViTFineTuner`).

    A subclass defines ``forward(images) -> logits`` and calls :meth:`_init_digits_task` in its ``__init__``.
    """

    def _init_digits_task(self, num_classes: int) -> None:
        self.val_acc = MulticlassAccuracy(num_classes=num_classes)
        self.test_acc = MulticlassAccuracy(num_classes=num_classes)
        self.val_f1 = MulticlassF1Score(num_classes=num_classes, average="macro")
        self.test_f1 = MulticlassF1Score(num_classes=num_classes, average="macro")
        self._own_data: DigitsDataModule | None = None

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.val_acc(logits, labels)
        self.val_f1(logits, labels)
        # (sync_dist: under DDP the logged loss is the mean over ranks, as the torchmetrics metrics are)
        self.log("val_loss", F.cross_entropy(logits, labels), prog_bar=True, sync_dist=True)
        self.log("val_acc", self.val_acc, prog_bar=True)
        self.log("val_f1", self.val_f1)

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.test_acc(logits, labels)
        self.test_f1(logits, labels)
        self.log("test_loss", F.cross_entropy(logits, labels), sync_dist=True)
        self.log("test_acc", self.test_acc)
        self.log("test_f1", self.test_f1)

    def predict_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self(batch[0]).argmax(dim=-1)

    # Used only when no data module is given (Lightning prefers a data module's loaders).
    def _digits(self) -> DigitsDataModule:
        if self._own_data is None:
            self._own_data = DigitsDataModule()
            self._own_data.setup()
        return self._own_data

    def train_dataloader(self) -> DataLoader:
        return self._digits().train_dataloader()

    def val_dataloader(self) -> DataLoader:
        return self._digits().val_dataloader()

    def test_dataloader(self) -> DataLoader:
        return self._digits().test_dataloader()

    def predict_dataloader(self) -> DataLoader:
        return self._digits().predict_dataloader()


class DigitsClassifier(DecoupledWeightDecayMixin, DigitsTask):
    """Conv-BN-ReLU x2, LayerNorm, MLP head: every kind of parameter the grouping rules care about.

    Args:
        lr: peak learning rate of the default AdamW.
        weight_decay: decoupled weight decay of the ``decay`` group.
        betas: Adam betas.
        eps: Adam epsilon.
        channels: width of the first conv layer (the second has twice as many).
        hidden: width of the hidden layer of the head.
        dropout: dropout before the last layer.
        lr_schedule: ``"cosine"`` (linear warm-up then cosine, per step) or ``"constant"``.
        warmup_steps: warm-up length in optimizer steps.
        min_lr_ratio: final learning rate as a fraction of ``lr``.
        exclude_embeddings: grouping option (this model has no embeddings; kept for a uniform CLI).
        no_decay_patterns: extra name patterns to exclude from decay.
        decay_patterns: name patterns to always decay.
        optimizer: an optimizer callable injected by LightningCLI (``--model.optimizer AdamW``); it receives
            the decay / no-decay groups. ``None`` uses AdamW with the arguments above.
        lr_scheduler: a scheduler callable injected by LightningCLI; ``None`` uses ``lr_schedule``.
        weight_decay_schedule: weight decay over time (``None``: constant): ``"constant"``, ``"independent"``,
            ``"adamc"``, ``"cosine"``, ``"linear"``, or a dict with options (``{name: cosine, final_ratio: 0.1}``);
            see :class:`~lightning_adamw.weight_decay.WeightDecayScheduler`.
        ema_timescale_epochs: set the decay by its EMA timescale τ in epochs instead of ``weight_decay``
            (λ = 1/(lr·τ), Wang & Aitchison 2024).
        ema_timescale_fraction: the same, as a fraction of the planned optimizer steps.

    Data: with no data module (``trainer.fit(model)``, ``lightning-adamw fit`` without ``--data``) the
    ``*_dataloader`` methods serve a ``DigitsDataModule()`` with its defaults (batch size 64, the fixed split).
    A data module given to the trainer takes precedence, as always in Lightning.
    """

    def __init__(
        self,
        lr: float = 3e-3,
        weight_decay: float = 0.05,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        channels: int = 32,
        hidden: int = 128,
        dropout: float = 0.1,
        lr_schedule: str = "cosine",
        warmup_steps: int = 20,
        min_lr_ratio: float = 0.05,
        exclude_embeddings: bool = False,
        no_decay_patterns: list[str] | None = None,
        decay_patterns: list[str] | None = None,
        weight_decay_schedule: dict[str, Any] | str | None = None,
        ema_timescale_epochs: float | None = None,
        ema_timescale_fraction: float | None = None,
        optimizer: OptimizerCallable | None = None,
        lr_scheduler: LRSchedulerCallable | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer", "lr_scheduler"])
        self.optimizer = optimizer
        self.lr_scheduler = lr_scheduler
        c = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(),
            nn.Conv2d(c, 2 * c, 3, padding=1, bias=False),
            nn.BatchNorm2d(2 * c),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.LayerNorm(2 * c * 16),
            nn.Linear(2 * c * 16, hidden),
            nn.GELU(),
            nn.Dropout(dropout),
            nn.Linear(hidden, NUM_CLASSES),
        )
        self._init_digits_task(NUM_CLASSES)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))
