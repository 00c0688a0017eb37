"""DecoupledWeightDecayMixin in real ``Trainer.fit`` runs on CPU."""

from __future__ import annotations

import logging
import math
import warnings
from functools import partial

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger
from torch import nn

from lightning_adamw import DecoupledWeightDecayMixin, WarmupCosineLR, build_param_groups
from tests.helpers.lit_models import TinyRegressor, make_body, regression_data


def fit(model: L.LightningModule, tmp_path, max_steps: int = 8, **trainer_kwargs) -> L.Trainer:
    trainer = L.Trainer(
        default_root_dir=tmp_path,
        max_steps=max_steps,
        accelerator="cpu",
        devices=1,
        logger=trainer_kwargs.pop("logger", False),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=trainer_kwargs.pop("limit_val_batches", 0),
        **trainer_kwargs,
    )
    trainer.fit(model)
    return trainer


def group_summary(optimizer: torch.optim.Optimizer) -> list[tuple[str, float, list[str]]]:
    return [(g["name"], g["weight_decay"], g["param_names"]) for g in optimizer.param_groups]


def test_default_adamw_gets_groups_and_hparams(tmp_path) -> None:
    model = TinyRegressor(lr=0.02, weight_decay=0.3, betas=(0.8, 0.9), eps=1e-6)
    trainer = fit(model, tmp_path, max_steps=2)
    (opt,) = trainer.optimizers
    assert isinstance(opt, torch.optim.AdamW)
    assert group_summary(opt) == [
        ("decay", 0.3, ["body.0.weight", "body.3.weight"]),
        ("no_decay", 0.0, ["body.0.bias", "body.1.weight", "body.1.bias", "body.3.bias"]),
    ]
    g = opt.param_groups[0]
    assert (g["lr"], g["betas"], g["eps"], g["foreach"]) == (0.02, (0.8, 0.9), 1e-6, True)


def test_fit_matches_a_hand_written_adamw_loop_step_for_step(tmp_path) -> None:
    """The numbers: what Trainer.fit + mixin applies equals AdamW on build_param_groups, by hand."""
    torch.manual_seed(0)
    model = TinyRegressor(lr=0.05, weight_decay=0.5, batch_size=16)
    reference = make_body()
    reference.load_state_dict(model.body.state_dict())
    fit(model, tmp_path, max_steps=8)

    opt = torch.optim.AdamW(build_param_groups(reference, 0.5), lr=0.05, foreach=True)
    loader = torch.utils.data.DataLoader(regression_data(), batch_size=16)
    step = 0
    while step < 8:
        for x, y in loader:
            opt.zero_grad()
            nn.functional.mse_loss(reference(x), y).backward()
            opt.step()
            step += 1
            if step == 8:
                break
    for (name, got), want in zip(
        model.body.state_dict().items(), reference.state_dict().values(), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7, msg=name)
    # And the no-decay tensors really were not decayed: the same run with decay only on them differs.
    assert not torch.allclose(model.body[0].weight, make_body().requires_grad_(False)[0].weight)


def test_injected_optimizer_callable_receives_groups_and_its_own_weight_decay(tmp_path) -> None:
    model = TinyRegressor(weight_decay=0.9, optimizer=partial(torch.optim.SGD, lr=0.1, weight_decay=0.25))
    trainer = fit(model, tmp_path, max_steps=1)
    (opt,) = trainer.optimizers
    assert isinstance(opt, torch.optim.SGD)
    assert [(n, wd) for n, wd, _ in group_summary(opt)] == [("decay", 0.25), ("no_decay", 0.0)]


def test_optimizer_instance_is_refused_with_a_clear_error() -> None:
    model = TinyRegressor()
    model.optimizer = torch.optim.AdamW(model.parameters())
    with pytest.raises(TypeError, match="not an optimizer instance"):
        model.configure_optimizers()


def test_coupled_l2_adam_warns_once_and_decoupled_adam_does_not(tmp_path) -> None:
    model = TinyRegressor(optimizer=partial(torch.optim.Adam, lr=1e-3, weight_decay=0.1))
    with pytest.warns(UserWarning, match="L2 regularization coupled through Adam's moments") as record:
        model.configure_optimizers()
        model.configure_optimizers()
    assert sum("L2 regularization" in str(w.message) for w in record) == 1
    model = TinyRegressor(optimizer=partial(torch.optim.Adam, weight_decay=0.1, decoupled_weight_decay=True))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.configure_optimizers()
    model = TinyRegressor(optimizer=partial(torch.optim.Adam, weight_decay=0.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model.configure_optimizers()


def test_cosine_schedule_steps_every_optimizer_step_to_the_end(tmp_path) -> None:
    model = TinyRegressor(lr=0.1, lr_schedule="cosine", warmup_steps=2, min_lr_ratio=0.1)
    trainer = fit(model, tmp_path, max_steps=10)
    (config,) = trainer.lr_scheduler_configs
    assert isinstance(config.scheduler, WarmupCosineLR)
    assert config.interval == "step"
    assert config.scheduler.total_steps == 10
    # After the 10th step the schedule has reached its floor: min_lr_ratio * lr.
    assert math.isclose(trainer.optimizers[0].param_groups[0]["lr"], 0.01, rel_tol=1e-9)


def test_injected_scheduler_and_plateau_monitor(tmp_path) -> None:
    model = TinyRegressor(lr_scheduler=partial(WarmupCosineLR, warmup_steps=1))
    trainer = fit(model, tmp_path, max_steps=4)
    assert trainer.lr_scheduler_configs[0].scheduler.total_steps == 4
    model = TinyRegressor(lr_scheduler=partial(torch.optim.lr_scheduler.ReduceLROnPlateau, patience=1))
    config = model.configure_optimizers()["lr_scheduler"]
    assert config["monitor"] == "val_loss" and config["interval"] == "epoch"


def test_own_configure_optimizers_with_helper_keeps_full_control(tmp_path) -> None:
    class Custom(TinyRegressor):
        def configure_optimizers(self):
            return torch.optim.AdamW(
                self.decoupled_param_groups(weight_decay=0.7), lr=1e-3, betas=(0.9, 0.95)
            )

    trainer = fit(Custom(), tmp_path, max_steps=1)
    assert [(n, wd) for n, wd, _ in group_summary(trainer.optimizers[0])] == [
        ("decay", 0.7),
        ("no_decay", 0.0),
    ]


def test_grouping_options_come_from_hparams(tmp_path) -> None:
    model = TinyRegressor(no_decay_patterns=["body.3.weight"], decay_patterns=["body.1.weight"])
    trainer = fit(model, tmp_path, max_steps=1)
    summary = group_summary(trainer.optimizers[0])
    assert summary[0][2] == ["body.0.weight", "body.1.weight"]
    assert "body.3.weight" in summary[1][2]


def test_bad_pattern_from_hparams_fails_fit_with_the_option_name(tmp_path) -> None:
    with pytest.raises(
        ValueError, match=r"`no_decay_patterns` pattern 'body\.9\.weight' matches no trainable"
    ):
        fit(TinyRegressor(no_decay_patterns=["body.9.weight"]), tmp_path, max_steps=1)


def test_table_is_printed_once_and_group_sizes_logged_as_hparams(tmp_path, caplog) -> None:
    logger = CSVLogger(tmp_path, name="run")
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        fit(TinyRegressor(), tmp_path, max_steps=2, logger=logger)
    tables = [r.getMessage() for r in caplog.records if "lightning-adamw parameter groups" in r.getMessage()]
    assert len(tables) == 1
    assert "norm:LayerNorm" in tables[0] and "bias" in tables[0]
    hparams = yaml.unsafe_load(
        (tmp_path / "run" / "version_0" / "hparams.yaml").read_text()
    )  # betas is a tuple
    assert hparams["param_groups/decay/tensors"] == 2
    assert hparams["param_groups/decay/params"] == 6 * 16 + 16
    assert hparams["param_groups/no_decay/tensors"] == 4
    assert hparams["param_groups/no_decay/params"] == 16 * 3 + 1


def test_mixin_works_without_hparams_using_attributes_and_class_defaults() -> None:
    class Plain(DecoupledWeightDecayMixin, L.LightningModule):
        adamw_defaults = {**DecoupledWeightDecayMixin.adamw_defaults, "weight_decay": 0.2}

        def __init__(self) -> None:
            super().__init__()
            self.lr = 0.5
            self.net = nn.Linear(2, 2)

    opt = Plain().configure_optimizers()["optimizer"]
    assert [(g["name"], g["weight_decay"], g["lr"]) for g in opt.param_groups] == [
        ("decay", 0.2, 0.5),
        ("no_decay", 0.0, 0.5),
    ]
