"""Where the mixin reads its settings, and Lightning's tools that write them (LR finder, batch size finder).

One rule: an attribute of the module (not None, not a function) wins, then ``self.hparams``, then
``adamw_defaults``; ``lr`` is also read as ``learning_rate``, and two different values under the two spellings
are an error.
"""

from __future__ import annotations

import logging
import math
from functools import partial

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import BatchSizeFinder, LearningRateFinder
from lightning.pytorch.tuner import Tuner
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_adamw import DecoupledWeightDecayMixin

N_SAMPLES = 256


def dataset() -> TensorDataset:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_SAMPLES, 4, generator=g)
    return TensorDataset(x, x @ torch.randn(4, 1, generator=g))


class Body(DecoupledWeightDecayMixin, L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.Linear(16, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.body(x), y)


class AttrLR(Body):
    """Keeps the learning rate as an attribute (no save_hyperparameters)."""

    def __init__(self, learning_rate: float = 1e-3, lr_schedule: str = "constant") -> None:
        super().__init__()
        self.learning_rate = learning_rate
        self.lr_schedule = lr_schedule


class HparamLR(Body):
    def __init__(self, lr: float = 1e-3, lr_schedule: str = "constant", warmup_steps: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()


def trainer(**kwargs: object) -> L.Trainer:
    defaults: dict = dict(
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        accelerator="cpu",
    )
    return L.Trainer(**{**defaults, **kwargs})


def groups_lr(model: L.LightningModule) -> list[float]:
    return [g["lr"] for g in model.configure_optimizers()["optimizer"].param_groups]


# ----------------------------------------------------------------------------------------------- precedence


def test_attribute_wins_over_hparams_which_win_over_defaults() -> None:
    model = HparamLR(lr=0.01)
    assert groups_lr(model) == [0.01, 0.01]  # hparams
    model.lr = 0.02  # set after __init__ (by the user or a tool): wins over the stale hparam
    assert groups_lr(model) == [0.02, 0.02]
    model.weight_decay = 0.3  # not in hparams: attribute over adamw_defaults
    assert model.configure_optimizers()["optimizer"].param_groups[0]["weight_decay"] == 0.3
    model.lr = None  # None is "not set": back to hparams
    assert groups_lr(model) == [0.01, 0.01]
    assert Body().adamw_setting("eps") == DecoupledWeightDecayMixin.adamw_defaults["eps"]


def test_learning_rate_alias_as_attribute_and_in_hparams() -> None:
    assert groups_lr(AttrLR(learning_rate=0.03)) == [0.03, 0.03]

    class HparamAlias(Body):
        def __init__(self, learning_rate: float = 0.04) -> None:
            super().__init__()
            self.save_hyperparameters()

    assert groups_lr(HparamAlias()) == [0.04, 0.04]


def test_two_spellings_with_different_values_is_an_error_naming_both() -> None:
    model = HparamLR(lr=0.01)
    model.learning_rate = 0.05
    with pytest.raises(ValueError, match=r"`self.hparams.lr`=0.01 and `self.learning_rate`=0.05"):
        model.configure_optimizers()
    model.learning_rate = 0.01  # same value: no ambiguity
    assert groups_lr(model) == [0.01, 0.01]


def test_functions_and_modules_are_not_settings_but_classes_are() -> None:
    class Gain(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.g = nn.Parameter(torch.ones(3, 3))

    model = HparamLR()
    model.gain = Gain()
    model.eps = lambda: 1.0  # a function named like a setting is not a setting
    model.extra_norm_types = Gain  # a class is
    assert model.adamw_setting("eps") == DecoupledWeightDecayMixin.adamw_defaults["eps"]
    groups = {g["name"]: g["param_names"] for g in model.configure_optimizers()["optimizer"].param_groups}
    assert "gain.g" in groups["no_decay"]


# ----------------------------------------------------------------------------------------------- LR finder


@pytest.mark.parametrize("cls", [AttrLR, HparamLR])
def test_lr_find_suggestion_is_what_fit_trains_with(cls: type[Body], tmp_path) -> None:
    """Tuner.lr_find(update_attr=True) writes `learning_rate` (attribute) or `lr` (hparams); fit uses it."""
    torch.manual_seed(0)
    model = cls()
    data = DataLoader(dataset(), batch_size=8)
    finder = Tuner(trainer(max_epochs=1, default_root_dir=tmp_path)).lr_find(
        model, data, num_training=20, min_lr=1e-4, max_lr=1.0, update_attr=True
    )
    suggestion = finder.suggestion()
    assert suggestion is not None and not math.isclose(suggestion, 1e-3)
    seen: list[float] = []

    class First(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
            seen.extend(g["lr"] for g in trainer.optimizers[0].param_groups)

    trainer(max_steps=1, default_root_dir=tmp_path, callbacks=[First()]).fit(model, data)
    assert seen == [suggestion, suggestion]


def test_lr_finder_callback_moves_the_cosine_schedule_to_the_suggestion(tmp_path, caplog) -> None:
    """LearningRateFinder inside fit writes the suggestion after the optimizer and the schedule were built: the
    schedule's base lr follows it (else the scheduler's next step would put the old base lr back)."""
    torch.manual_seed(0)
    model = HparamLR(lr=1e-3, lr_schedule="cosine", warmup_steps=2)
    data = DataLoader(TensorDataset(*[t.repeat(2, 1) for t in dataset().tensors]), batch_size=4)
    lrs: list[float] = []

    class Record(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            # Called for the real run only (the finder runs with its own callbacks): the lr each step applied.
            trainer.optimizers[0].register_step_post_hook(
                lambda opt, *_: lrs.append(opt.param_groups[0]["lr"])
            )

    finder = LearningRateFinder(num_training_steps=30, min_lr=1e-4, max_lr=1.0)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        fit_trainer = trainer(max_steps=6, default_root_dir=tmp_path, callbacks=[finder, Record()])
        fit_trainer.fit(model, data)
    suggestion = model.hparams.lr
    assert not math.isclose(suggestion, 1e-3)
    scheduler = fit_trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.base_lrs == [suggestion, suggestion]
    # The real run's 6 steps: warm-up then cosine over 6 steps, from the suggestion.
    want = [suggestion * scheduler._factor(step) for step in range(6)]
    assert lrs == pytest.approx(want, rel=1e-12)
    assert any("lr changed from 0.001" in r.getMessage() for r in caplog.records)


def test_lr_finder_callback_with_a_chained_warmup_scheduler_keeps_its_warmup(tmp_path) -> None:
    """An injected LinearLR (chainable: each step multiplies the group's lr) after the LR finder: the warm-up runs
    from start_factor x suggestion, as if the suggestion had been configured (the finder writes the bare
    suggestion into the groups)."""
    torch.manual_seed(0)

    class Injected(HparamLR):
        def __init__(self) -> None:
            super().__init__(lr=1e-3)
            self.lr_scheduler = partial(torch.optim.lr_scheduler.LinearLR, start_factor=0.25, total_iters=4)
            self.lr_scheduler_interval = "step"

    model = Injected()
    data = DataLoader(TensorDataset(*[t.repeat(2, 1) for t in dataset().tensors]), batch_size=4)
    lrs: list[float] = []

    class Record(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            trainer.optimizers[0].register_step_post_hook(
                lambda opt, *_: lrs.append(opt.param_groups[0]["lr"])
            )

    finder = LearningRateFinder(num_training_steps=30, min_lr=1e-4, max_lr=1.0)
    trainer(max_steps=6, default_root_dir=tmp_path, callbacks=[finder, Record()]).fit(model, data)
    suggestion = model.hparams.lr
    assert not math.isclose(suggestion, 1e-3)
    want = [suggestion * (0.25 + 0.75 * min(step, 4) / 4) for step in range(6)]
    assert lrs == pytest.approx(want, rel=1e-12)


# ----------------------------------------------------------------------------------------------- batch size finder


class SizedData(L.LightningDataModule):
    def __init__(self, batch_size: int = 4) -> None:
        super().__init__()
        self.save_hyperparameters()

    def train_dataloader(self) -> DataLoader:
        return DataLoader(dataset(), batch_size=self.hparams.batch_size)


def test_batch_size_tuner_with_datamodule_hparams_then_fit_uses_the_new_length(tmp_path) -> None:
    model, data = HparamLR(lr_schedule="cosine"), SizedData(batch_size=4)
    fit_trainer = trainer(max_epochs=2, default_root_dir=tmp_path)
    found = Tuner(fit_trainer).scale_batch_size(
        model, datamodule=data, init_val=4, max_trials=2, steps_per_trial=1
    )
    assert found == data.hparams.batch_size == 8  # 4 and 8 fit; max_trials=2
    fit_trainer.fit(model, datamodule=data)
    assert (
        fit_trainer.lr_scheduler_configs[0].scheduler.total_steps
        == 2 * N_SAMPLES // 8
        == fit_trainer.global_step
    )


def test_batch_size_finder_callback_with_module_attribute_refreshes_the_schedule_length(
    tmp_path, caplog
) -> None:
    """BatchSizeFinder inside fit changes the batch size after configure_optimizers sized the cosine schedule;
    the schedule follows the new number of steps (and says so)."""

    class AttrBatch(HparamLR):
        def __init__(self) -> None:
            super().__init__(lr_schedule="cosine")
            self.batch_size = 4

        def train_dataloader(self) -> DataLoader:
            return DataLoader(dataset(), batch_size=self.batch_size)

    model = AttrBatch()
    fit_trainer = trainer(
        max_epochs=2,
        default_root_dir=tmp_path,
        callbacks=[BatchSizeFinder(init_val=4, max_trials=2, steps_per_trial=1)],
    )
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        fit_trainer.fit(model)
    assert model.batch_size == 8
    scheduler = fit_trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.total_steps == fit_trainer.global_step == 2 * N_SAMPLES // 8
    assert fit_trainer.optimizers[0].param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-15)  # reached its end
    assert any(
        f"total_steps {2 * N_SAMPLES // 4} -> {2 * N_SAMPLES // 8}" in r.getMessage() for r in caplog.records
    )


class Deep(DecoupledWeightDecayMixin, L.LightningModule):
    """embed, two blocks under ``layers``, head: four depths for ``layer_decay``."""

    def __init__(self, lr: float = 0.3, layer_decay: float = 0.5, lr_schedule: str = "cosine") -> None:
        super().__init__()
        self.save_hyperparameters()
        self.embed = nn.Linear(4, 8)
        self.layers = nn.ModuleList(nn.Sequential(nn.LayerNorm(8), nn.Linear(8, 8)) for _ in range(2))
        self.head = nn.Linear(8, 1)
        self.warmup_steps = 2

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return nn.functional.mse_loss(self.head(h), y)


def test_lr_finder_callback_gives_the_first_step_its_scales_and_warmup(tmp_path) -> None:
    """LearningRateFinder writes the bare suggestion into every group just before training: the groups get
    their layer-decay scales and the warm-up factor back before the first batch starts, so every callback (and
    LearningRateMonitor) sees, and the first step applies, suggestion x scale x factor(0)."""
    torch.manual_seed(0)
    seen: list[list[float]] = []
    applied: list[list[float]] = []

    class Record(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            trainer.optimizers[0].register_step_post_hook(
                lambda opt, *_: applied.append([g["lr"] for g in opt.param_groups])
            )

        def on_train_batch_start(self, trainer: L.Trainer, *args: object) -> None:
            seen.append([g["lr"] for g in trainer.optimizers[0].param_groups])

    model = Deep()
    data = DataLoader(dataset(), batch_size=8)
    finder = LearningRateFinder(num_training_steps=20, early_stop_threshold=None)
    trainer(max_steps=4, default_root_dir=tmp_path, callbacks=[finder, Record()]).fit(model, data)
    suggestion = model.hparams.lr
    assert not math.isclose(suggestion, 0.3)
    scales = [0.125, 0.125, 0.25, 0.25, 0.5, 0.5, 1.0, 1.0]  # 0.5 ** (L + 1 - depth): embed, blocks 1-2, head
    first = [suggestion * s / 3 for s in scales]  # warm-up factor (0 + 1) / (2 + 1)
    assert seen[0] == pytest.approx(first, rel=1e-12)
    assert applied[0] == pytest.approx(first, rel=1e-12)
