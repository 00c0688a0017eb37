"""Optimizer groups after configure_optimizers: add_param_group (BackboneFinetuning), unfreezing by hand,
tensors outside every group, and hyperparameter checks on whatever built the optimizer."""

from __future__ import annotations

import math
import warnings
from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import BackboneFinetuning
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_adamw import DecoupledWeightDecayMixin, WeightDecayMonitor
from lightning_adamw import optimizer_adoption as adoption_module
from lightning_adamw.update_split import layer_labels


def data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    return DataLoader(
        TensorDataset(torch.randn(64, 6, generator=g), torch.randn(64, 1, generator=g)), batch_size=16
    )


class Net(DecoupledWeightDecayMixin, L.LightningModule):
    """backbone: Linear + LayerNorm; head: Linear. Frozen backbone when ``freeze=True`` (in __init__)."""

    def __init__(
        self,
        lr: float = 1e-2,
        weight_decay: float = 0.05,
        include_frozen: bool = False,
        freeze: bool = False,
        unfreeze_at: int | None = None,
        optimizer: object = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["optimizer"])
        self.optimizer = optimizer
        self.backbone = nn.Sequential(nn.Linear(6, 8), nn.LayerNorm(8), nn.ReLU())
        self.head = nn.Linear(8, 1)
        if freeze:
            self.backbone.requires_grad_(False)

    def on_train_epoch_start(self) -> None:
        if self.hparams.unfreeze_at is not None and self.current_epoch == self.hparams.unfreeze_at:
            self.backbone.requires_grad_(True)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.head(self.backbone(x)), y)


class Snapshot(L.Callback):
    def __init__(self) -> None:
        self.after_epoch: dict[int, dict[str, torch.Tensor]] = {}

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.after_epoch[trainer.current_epoch] = {
            n: p.detach().clone() for n, p in pl_module.backbone.named_parameters()
        }


def fit(model: L.LightningModule, tmp_path, epochs: int = 2, callbacks: list | None = None) -> L.Trainer:
    trainer = L.Trainer(
        max_epochs=epochs,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        default_root_dir=tmp_path,
        callbacks=callbacks or [],
    )
    trainer.fit(model, data())
    return trainer


def changed(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> list[str]:
    return [n for n in before if not torch.equal(before[n], after[n])]


BACKBONE = ["backbone.0.weight", "backbone.0.bias", "backbone.1.weight", "backbone.1.bias"]


def test_backbone_finetuning_trains_the_unfrozen_backbone_with_names(tmp_path) -> None:
    """Lightning's BackboneFinetuning: frozen in epoch 0, added with add_param_group (no names) in epoch 1 and
    trained; the added group carries the module's names, the monitor reports it per tensor under them, and the
    norm / bias tensors decayed by that single group are named in a warning."""
    torch.manual_seed(0)
    model = Net()
    start = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    snap = Snapshot()
    monitor = WeightDecayMonitor(log_every_n_steps=1, per_layer=True)
    with pytest.warns(UserWarning, match="grouping rules do not decay") as record:
        trainer = fit(
            model, tmp_path, callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=1), snap, monitor]
        )
    (mixed,) = [str(w.message) for w in record if "grouping rules do not decay" in str(w.message)]
    assert "backbone.0.bias (bias)" in mixed and "backbone.1.weight (norm:LayerNorm)" in mixed
    assert "backbone.0.weight" not in mixed
    assert changed(start, snap.after_epoch[0]) == []
    assert changed(snap.after_epoch[0], snap.after_epoch[1]) == [
        n.removeprefix("backbone.") for n in BACKBONE
    ]
    optimizer = trainer.optimizers[0]
    assert [(g.get("name"), g["param_names"]) for g in optimizer.param_groups] == [
        ("decay", ["head.weight"]),
        ("no_decay", ["head.bias"]),
        (None, BACKBONE),
    ]
    added = optimizer.param_groups[-1]
    assert added["weight_decay"] == 0.05  # the configured decay, not torch's hidden default 0.01
    assert layer_labels(optimizer.param_groups)[-1] == BACKBONE
    assert all(f"adamw_layer/{n}/update_norm" in monitor.last_metrics for n in BACKBONE)


def test_added_group_defaults_come_from_the_configured_optimizer() -> None:
    """Default AdamW: the module's weight_decay; an injected optimizer: its own; foreign tensors get a name."""
    model = Net(weight_decay=0.3, freeze=True)
    optimizer = model.configure_optimizers()["optimizer"]
    foreign = nn.Parameter(torch.zeros(2, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        optimizer.add_param_group({"params": [model.backbone[0].weight, foreign]})
    assert optimizer.param_groups[-1]["weight_decay"] == 0.3
    assert optimizer.param_groups[-1]["param_names"] == ["backbone.0.weight", "added2.param1"]

    model = Net(weight_decay=0.9, freeze=True, optimizer=partial(torch.optim.SGD, lr=0.1, weight_decay=0.25))
    optimizer = model.configure_optimizers()["optimizer"]
    optimizer.add_param_group({"params": list(model.backbone[0].parameters())})
    assert optimizer.param_groups[-1]["weight_decay"] == 0.25


def test_unfreezing_by_hand_warns_once_naming_the_tensors(tmp_path) -> None:
    torch.manual_seed(0)
    model = Net(freeze=True, unfreeze_at=1)
    snap = Snapshot()
    with pytest.warns(UserWarning, match="get gradients but are in no optimizer group") as record:
        fit(model, tmp_path, epochs=3, callbacks=[snap])
    (message,) = [str(w.message) for w in record if "in no optimizer group" in str(w.message)]
    assert all(n in message for n in BACKBONE) and "include_frozen=True" in message
    assert changed(snap.after_epoch[0], snap.after_epoch[2]) == []  # the reason for the warning


def test_include_frozen_trains_the_backbone_after_unfreezing(tmp_path) -> None:
    torch.manual_seed(0)
    model = Net(freeze=True, unfreeze_at=1, include_frozen=True)
    start = {n: p.detach().clone() for n, p in model.backbone.named_parameters()}
    snap = Snapshot()
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*in no optimizer group")
        trainer = fit(model, tmp_path, epochs=2, callbacks=[snap])
    assert changed(start, snap.after_epoch[0]) == []
    assert len(changed(snap.after_epoch[0], snap.after_epoch[1])) == len(BACKBONE)
    groups = {g["name"]: g["param_names"] for g in trainer.optimizers[0].param_groups}
    assert groups == {
        "decay": ["backbone.0.weight", "head.weight"],
        "no_decay": ["backbone.0.bias", "backbone.1.weight", "backbone.1.bias", "head.bias"],
    }


def test_untracked_tensors_are_recomputed_only_when_the_groups_change(tmp_path, monkeypatch) -> None:
    """The per-step check costs a signature comparison; the tensor scan runs when groups change."""
    calls = []
    real = adoption_module.untracked_tensors
    monkeypatch.setattr(adoption_module, "untracked_tensors", lambda *a: calls.append(1) or real(*a))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(Net(), tmp_path, epochs=2, callbacks=[BackboneFinetuning(unfreeze_backbone_at_epoch=1)])
    assert len(calls) == 2  # first step, and after add_param_group; 8 steps in all


@pytest.mark.parametrize(
    ("settings", "match"),
    [
        ({"optimizer": partial(torch.optim.AdamW, lr=math.inf)}, r"group `decay` has `lr`=inf"),
        (
            {"optimizer": partial(torch.optim.AdamW, weight_decay=math.inf)},
            r"group `decay` has `weight_decay`=inf",
        ),
        ({"optimizer": partial(torch.optim.AdamW, eps=math.inf)}, r"group `decay` has `eps`=inf"),
        ({"lr": math.inf}, r"group `decay` has `lr`=inf"),
    ],
)
def test_non_finite_hyperparameters_are_refused_whatever_built_the_optimizer(
    settings: dict, match: str
) -> None:
    with pytest.raises(ValueError, match=match):
        Net(**settings).configure_optimizers()


def test_non_finite_lr_from_own_configure_optimizers_or_add_param_group_is_refused() -> None:
    class Own(Net):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.decoupled_param_groups(), lr=float("1e400"))

    with pytest.raises(ValueError, match=r"AdamW parameter group `decay` has `lr`=inf"):
        Own().configure_optimizers()
    model = Net(freeze=True)
    optimizer = model.configure_optimizers()["optimizer"]
    with pytest.raises(ValueError, match=r"group `group2` has `lr`=inf"):
        optimizer.add_param_group({"params": list(model.backbone[0].parameters()), "lr": math.inf})
    assert len(optimizer.param_groups) == 2  # refused, not added
