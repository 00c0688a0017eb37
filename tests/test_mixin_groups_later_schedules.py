"""Schedulers and groups added after they were built (``BackboneFinetuning``, ``optimizer.add_param_group``).

Torch's per-group schedulers zip their per-group lists with ``optimizer.param_groups`` strictly, so a group added
later made ``WarmupCosineLR`` (the mixin's ``lr_schedule="cosine"``) fail at the unfreeze epoch with "zip()
argument 2 is shorter than argument 1". Now the schedules the mixin adopts leave an added group's lr to whoever
added it: ``BackboneFinetuning``'s ramp (lr/10 at the unfreeze epoch, x2 per epoch, capped at the first
group's lr) is exactly what the added group trains with, while the configured groups follow the cosine.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import BackboneFinetuning
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_adamw import DecoupledWeightDecayMixin
from lightning_adamw.schedules import warmup_cosine_factor

STEPS_PER_EPOCH = 4
EPOCHS = 4
TOTAL = STEPS_PER_EPOCH * EPOCHS


class FineTuned(DecoupledWeightDecayMixin, L.LightningModule):
    """``backbone`` (frozen by BackboneFinetuning until its epoch) and ``head``."""

    def __init__(self, lr_schedule: str = "cosine", warmup_steps: int = 2, lr_scheduler: Any = None) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["lr_scheduler"])
        self.lr = 0.01
        self.lr_scheduler = lr_scheduler
        self.lr_scheduler_interval = "step"
        self.backbone = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.Linear(8, 8))
        self.head = nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.head(self.backbone(x)), y)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        data = TensorDataset(
            torch.randn(16 * STEPS_PER_EPOCH, 6, generator=g), torch.randn(64, 1, generator=g)
        )
        return DataLoader(data, batch_size=16)


class StepLrs(L.Callback):
    """Every group's lr as each optimizer step applied it."""

    def __init__(self) -> None:
        self.lrs: list[list[float]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        trainer.optimizers[0].register_step_post_hook(
            lambda opt, *_: self.lrs.append([g["lr"] for g in opt.param_groups])
        )


def fit(model: L.LightningModule, tmp_path: Any) -> StepLrs:
    record = StepLrs()
    trainer = L.Trainer(
        max_epochs=EPOCHS,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=1), record],
    )
    with pytest.warns(UserWarning, match="grouping rules do not decay"):  # the added group decays the norms
        trainer.fit(model)
    return record


def backbone_ramp(head_lr_at_epoch_start: list[float]) -> list[float]:
    """BackboneFinetuning's lr of the added group in epochs 1, 2, ...: lr/10 at the unfreeze epoch, then x2
    per epoch, never above the first group's current lr (its defaults)."""
    ramp = [head_lr_at_epoch_start[0] * 0.1]
    for head in head_lr_at_epoch_start[1:]:
        ramp.append(min(ramp[-1] * 2.0, head))
    return ramp


def test_backbone_finetuning_with_the_built_in_cosine_keeps_its_ramp(tmp_path: Any) -> None:
    record = fit(FineTuned(), tmp_path)
    assert len(record.lrs) == TOTAL
    head = [0.01 * warmup_cosine_factor(t, 2, TOTAL) for t in range(TOTAL)]
    assert [lrs[0] for lrs in record.lrs] == pytest.approx(head, rel=1e-12)
    assert [lrs[1] for lrs in record.lrs] == pytest.approx(head, rel=1e-12)
    assert all(len(lrs) == 2 for lrs in record.lrs[:STEPS_PER_EPOCH])  # frozen in epoch 0
    ramp = backbone_ramp([head[e * STEPS_PER_EPOCH] for e in range(1, EPOCHS)])
    added = [lrs[2] for lrs in record.lrs[STEPS_PER_EPOCH:]]
    assert added == pytest.approx([r for r in ramp for _ in range(STEPS_PER_EPOCH)], rel=1e-12)


def test_an_adopted_lambda_scheduler_leaves_the_added_group_to_the_callback(tmp_path: Any) -> None:
    """torch's LambdaLR (one lambda per group, zipped strictly) also copes: the configured groups follow it."""
    schedule = partial(torch.optim.lr_scheduler.LambdaLR, lr_lambda=lambda step: 1.0 / (1 + step))
    record = fit(FineTuned(lr_schedule="constant", warmup_steps=0, lr_scheduler=schedule), tmp_path)
    head = [0.01 / (1 + t) for t in range(TOTAL)]
    assert [lrs[0] for lrs in record.lrs] == pytest.approx(head, rel=1e-12)
    ramp = backbone_ramp([head[e * STEPS_PER_EPOCH] for e in range(1, EPOCHS)])
    assert [lrs[2] for lrs in record.lrs[STEPS_PER_EPOCH:]] == pytest.approx(
        [r for r in ramp for _ in range(STEPS_PER_EPOCH)], rel=1e-12
    )


def test_one_cycle_refuses_an_added_group_naming_itself() -> None:
    model = FineTuned(lr_schedule="constant", warmup_steps=0)
    model.lr_scheduler = partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.01, total_steps=10)
    model.backbone.requires_grad_(False)
    configured = model.configure_optimizers()  # keeps the scheduler alive, as the trainer does
    optimizer = configured["optimizer"]
    with pytest.raises(
        ValueError, match="OneCycleLR cannot schedule a parameter group added after it was built"
    ):
        optimizer.add_param_group({"params": list(model.backbone.parameters())})
    assert len(optimizer.param_groups) == 2  # left as it was
