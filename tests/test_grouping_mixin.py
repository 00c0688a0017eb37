"""Per-group hyperparameters through ``DecoupledWeightDecayMixin``: the scales on every optimizer path, resume,
logged hyperparameters, the monitors, and a module's own ``configure_optimizers``.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from torch import nn
from torch.utils.data import DataLoader

from lightning_adamw import DecoupledWeightDecayMixin, WeightDecayMonitor
from lightning_adamw.schedules import WarmupCosineLR
from tests.helpers.lit_models import regression_data

LR, DECAY = 1e-2, 0.5


class Stack(DecoupledWeightDecayMixin, L.LightningModule):
    """embed (depth 0) -> layers.0, layers.1 (depths 1, 2) -> head (depth 3)."""

    def __init__(self, lr: float = LR, layer_decay: float | None = DECAY, **options: Any) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Linear(6, 8)
        self.layers = nn.ModuleList(nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8)) for _ in range(2))
        self.head = nn.Linear(8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.embed(x)
        for layer in self.layers:
            x = x + layer(x)
        return self.head(x)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)


def expected_lr(name: str, lr: float = LR) -> float:
    depth = 0 if name.endswith("embed") else 3 if name.endswith("head") else int(name[-1])
    return lr * DECAY ** (3 - depth)


def trainer(tmp_path: Path, **kwargs: Any) -> L.Trainer:
    options: dict[str, Any] = {
        "max_steps": 4,
        "logger": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "enable_checkpointing": False,
        "default_root_dir": tmp_path,
    }
    return L.Trainer(**{**options, **kwargs})


def data() -> DataLoader:
    return DataLoader(regression_data(), batch_size=16)


def test_default_adamw_and_builtin_schedule_start_each_group_from_its_scaled_lr() -> None:
    result = Stack(lr_schedule="cosine", warmup_steps=2, total_steps=10).configure_optimizers()
    optimizer, scheduler = result["optimizer"], result["lr_scheduler"]["scheduler"]
    assert isinstance(scheduler, WarmupCosineLR)
    for group, base in zip(optimizer.param_groups, scheduler.base_lrs, strict=True):
        depth_part = group["name"].split("/")[1]
        assert base == group["initial_lr"] == expected_lr(depth_part), group["name"]
        # warm-up step 0: factor 1 / (warmup_steps + 1); base * (1/3) and base / 3 differ by one rounding
        assert math.isclose(group["lr"], base / 3, rel_tol=1e-15)
        assert group["lr_scale_applied"] is True


def test_injected_optimizer_gets_the_scales_on_its_own_lr() -> None:
    module = Stack(group_overrides=[{"pattern": "head.*", "name": "out", "lr_scale": 3.0}])
    module.optimizer = lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9)
    optimizer = module.configure_optimizers()["optimizer"]
    lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
    assert lrs["decay/layer_1"] == 0.1 * DECAY**2
    assert lrs["decay/head/out"] == 0.1 * 3.0  # override times depth L + 1 (scale 1)


def test_own_configure_optimizers_needs_lr_and_one_max_lr_is_caught() -> None:
    class Own(Stack):
        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.decoupled_param_groups(), lr=LR)

    with pytest.raises(
        ValueError,
        match=r"which a torch optimizer cannot apply by itself: call `self.decoupled_param_groups\(lr=<the lr you give the optimizer>\)`",
    ):
        Own().configure_optimizers()

    class OwnWithLr(Stack):
        def configure_optimizers(self) -> Any:
            optimizer = torch.optim.AdamW(self.decoupled_param_groups(lr=LR), lr=LR)
            return {
                "optimizer": optimizer,
                "lr_scheduler": torch.optim.lr_scheduler.OneCycleLR(optimizer, LR, 10),
            }

    with pytest.raises(ValueError, match=r"scales \(layer_decay, group_overrides\) are lost"):
        OwnWithLr().configure_optimizers()


def test_layer_id_callable_is_read_from_the_instance() -> None:
    module = Stack()
    module.layer_id = lambda name: 0 if name.startswith("embed") else 1  # only two depths: L = 0
    groups = {g["name"]: g["lr"] for g in module.configure_optimizers()["optimizer"].param_groups}
    assert groups == {
        "decay/embed": LR * DECAY,
        "no_decay/embed": LR * DECAY,
        "decay/head": LR,
        "no_decay/head": LR,
    }


def test_fit_logs_hparams_and_monitors_every_group_and_resume_keeps_the_scales(tmp_path: Path) -> None:
    logger = L.pytorch.loggers.CSVLogger(tmp_path, name="run", version=0)
    monitor = WeightDecayMonitor(log_every_n_steps=1)
    first = trainer(
        tmp_path,
        logger=logger,
        callbacks=[monitor],
        enable_checkpointing=True,
        max_steps=2,
        log_every_n_steps=1,
    )
    first.fit(Stack(weight_decay=0.1), data())
    hparams = yaml.unsafe_load((tmp_path / "run" / "version_0" / "hparams.yaml").read_text())
    assert hparams["param_groups/decay/layer_1/lr_scale"] == DECAY**2
    assert hparams["param_groups/decay/layer_1/depth"] == 1
    assert hparams["param_groups/no_decay/head/weight_decay"] == 0.0
    assert hparams["param_groups/decay/layer_2/tensors"] == 1
    assert hparams["param_groups/decay/layer_2/params"] == 8 * 8
    # The monitor reports each group by its name; the decay term is lr * wd * |w| with that group's lr.
    metrics = monitor.last_metrics
    assert metrics["adamw/no_decay/layer_1/decay_norm"] == 0.0
    rate = metrics["adamw/decay/layer_1/uniform_decay_rate"]
    assert math.isclose(rate, LR * DECAY**2 * 0.1, rel_tol=1e-6)  # fp32 metric of an fp64 product
    ckpt = next((tmp_path / "run" / "version_0" / "checkpoints").glob("*.ckpt"))

    resumed = Stack(weight_decay=0.1)
    second = trainer(tmp_path / "resumed", max_steps=3)
    second.fit(resumed, data(), ckpt_path=ckpt)
    for group in second.optimizers[0].param_groups:
        assert group["lr"] == expected_lr(group["name"].split("/")[1]), group[
            "name"
        ]  # scaled once, not twice


def test_a_num_layers_hparam_of_the_architecture_is_ignored_without_layer_decay() -> None:
    class Net(DecoupledWeightDecayMixin, L.LightningModule):
        def __init__(self, num_layers: int = 3) -> None:  # the network's depth, not a layer-decay setting
            super().__init__()
            self.save_hyperparameters()
            self.num_layers = num_layers
            self.layers = nn.ModuleList(nn.Linear(4, 4) for _ in range(num_layers))

    names = [g["name"] for g in Net().configure_optimizers()["optimizer"].param_groups]
    assert names == ["decay", "no_decay"]
