"""The mixin's weight decay over time: ``weight_decay_schedule`` and the EMA-timescale options, in real fits.

Every test trains a tiny module (8 optimizer steps at most) and asserts on the ``weight_decay`` each optimizer
step applied (read in a step post-hook, before anything can change it), on what ``LearningRateMonitor(
log_weight_decay=True)`` wrote to its CSV, on the printed table and on resumed runs. Expected values come from
the formulas (:mod:`lightning_adamw.weight_decay.schedules`); the tolerance is float64 rounding of the few
products and one cosine each value takes (a few ulps: rel 1e-12).
"""

from __future__ import annotations

import csv
import logging
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import yaml
from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_adamw import DecoupledWeightDecayMixin, WeightDecayScheduler
from lightning_adamw.schedules import warmup_cosine_factor
from lightning_adamw.weight_decay import decay_factor

STEPS_PER_EPOCH = 4
REL = 1e-12


class Net(DecoupledWeightDecayMixin, L.LightningModule):
    """Linear-LayerNorm-Linear: one decay group (2 matrices), one no-decay group; 4 batches per epoch."""

    def __init__(
        self,
        lr: float = 0.01,
        weight_decay: float = 0.1,
        lr_schedule: str = "cosine",
        warmup_steps: int = 2,
        weight_decay_schedule: Any = None,
        ema_timescale_epochs: float | None = None,
        ema_timescale_fraction: float | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.body = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.body(x), y)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(4 * STEPS_PER_EPOCH, 4, generator=g)
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


class Applied(L.Callback):
    """The ``weight_decay`` (and ``lr``) of every group as each optimizer step applied them."""

    def __init__(self) -> None:
        self.wd: list[list[float]] = []
        self.lr: list[list[float]] = []

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        def record(optimizer: torch.optim.Optimizer, *_: Any) -> None:
            # A step post-hook of the scheduler moves its counter only; the groups hold what this step used.
            self.wd.append([g["weight_decay"] for g in optimizer.param_groups])
            self.lr.append([g["lr"] for g in optimizer.param_groups])

        trainer.optimizers[0].register_step_post_hook(record)


def fit(
    model: L.LightningModule, root: Path, ckpt: str | None = None, **kwargs: Any
) -> tuple[L.Trainer, Applied]:
    applied = Applied()
    callbacks = [applied, *kwargs.pop("callbacks", [])]
    defaults: dict[str, Any] = dict(
        max_steps=8,
        accelerator="cpu",
        default_root_dir=root,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
    )
    trainer = L.Trainer(**{**defaults, **kwargs, "callbacks": callbacks})
    trainer.fit(model, ckpt_path=ckpt)
    return trainer, applied


def lr_at(step: int, lr: float = 0.01, warmup: int = 2, total: int = 8) -> float:
    return lr * warmup_cosine_factor(step, warmup, total)


# ----------------------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("constant", lambda t: 0.1),
        ("adamc", lambda t: 0.1 * lr_at(t) / 0.01),  # λ·lr_t/lr_max, the peak is the base lr
        (
            {"name": "cosine", "final_ratio": 0.2},
            lambda t: 0.1 * decay_factor("cosine", t, warmup_steps=0, total_steps=8, final_ratio=0.2),
        ),
        (
            {"name": "linear", "warmup_steps": 2},
            lambda t: 0.1 * decay_factor("linear", t, warmup_steps=2, total_steps=8, final_ratio=0.0),
        ),
    ],
    ids=["constant", "adamc", "cosine", "linear"],
)
def test_each_step_applies_the_scheduled_value_and_no_decay_stays_zero(
    schedule: Any, expected: Any, tmp_path: Path
) -> None:
    trainer, applied = fit(Net(weight_decay_schedule=schedule), tmp_path)
    assert [wd[0] for wd in applied.wd] == pytest.approx([expected(t) for t in range(8)], rel=REL)
    assert [wd[1] for wd in applied.wd] == [0.0] * 8
    # lr_max and total_steps came from the trainer; the group keeps λ as base_weight_decay.
    assert trainer.optimizers[0].param_groups[0]["base_weight_decay"] == 0.1


def test_independent_takes_a_per_step_lambda(tmp_path: Path) -> None:
    """λ = 1e-3 per step at the peak lr: torch's weight_decay is λ/lr_max = 0.1 at every step, so the per-step
    decay lr_t·weight_decay = λ·lr_t/lr_max follows the lr schedule."""
    _, applied = fit(Net(weight_decay=1e-3, weight_decay_schedule="independent"), tmp_path)
    assert [wd[0] for wd in applied.wd] == pytest.approx([0.1] * 8, rel=REL)
    per_step = [lr[0] * wd[0] for lr, wd in zip(applied.lr, applied.wd, strict=True)]
    assert per_step == pytest.approx([1e-3 * lr_at(t) / 0.01 for t in range(8)], rel=REL)


def test_independent_refuses_a_default_or_torch_unit_lambda() -> None:
    trainer = L.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_progress_bar=False)
    for kwargs, match in (
        ({}, r"`weight_decay` is not given \(the default 0.1"),  # Net's own default: not given on purpose
        ({"weight_decay": 0.05}, r"the per-step λ is 0.05·lr_max = 0.0005"),
        # None given on purpose leaves λ to torch's AdamW default, 0.01: refused with that value
        ({"weight_decay": None}, r"`weight_decay` is 0.01 for group 'decay'"),
    ):
        model = Net(weight_decay_schedule="independent", **kwargs)
        model.trainer = trainer
        with pytest.raises(ValueError, match=match):
            model.configure_optimizers()


class NetWithoutDecay(Net):
    """A module whose own default ``weight_decay`` is None (the optimizer's default, as ``build_param_groups``
    documents)."""

    def __init__(self, weight_decay: float | None = None, weight_decay_schedule: Any = None) -> None:
        super().__init__(weight_decay=weight_decay, weight_decay_schedule=weight_decay_schedule)  # type: ignore[arg-type]


def test_independent_refuses_a_none_default_with_its_message() -> None:
    """It once crashed formatting None (a TypeError with no hint) instead of refusing in words."""
    model = NetWithoutDecay(weight_decay_schedule="independent")
    model.trainer = L.Trainer(max_steps=8, accelerator="cpu", logger=False, enable_progress_bar=False)
    with pytest.raises(
        ValueError, match=r"not given \(None, the optimizer's own default would shrink the weights by 1%"
    ):
        model.configure_optimizers()


def test_learning_rate_monitor_logs_the_value_each_step_applies(tmp_path: Path) -> None:
    """LearningRateMonitor(log_weight_decay=True) reads the groups at batch start: the mixin refreshes them
    first, so the CSV holds what the step then used (adamc follows the warm-up + cosine lr)."""
    logger = CSVLogger(tmp_path, name="wd")
    monitor = LearningRateMonitor(logging_interval="step", log_weight_decay=True)
    _, applied = fit(
        Net(weight_decay_schedule="adamc"), tmp_path, logger=logger, callbacks=[monitor], log_every_n_steps=1
    )
    rows = list(csv.DictReader(Path(logger.log_dir, "metrics.csv").open()))
    logged = [float(r["lr-AdamW/decay-weight_decay"]) for r in rows if r.get("lr-AdamW/decay-weight_decay")]
    assert logged == [wd[0] for wd in applied.wd]
    assert logged == pytest.approx([0.1 * lr_at(t) / 0.01 for t in range(8)], rel=REL)


def test_table_names_the_schedule_lambda_torch_value_and_timescale(tmp_path: Path, caplog: Any) -> None:
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        fit(Net(weight_decay_schedule="adamc"), tmp_path, max_steps=2)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "weight decay schedule: adamc (λ·lr_t/lr_max, lr_max=0.01) on groups decay" in text
    # the first table's decay column is λ (the optimizer's weight_decay is another number under a schedule)
    assert any(line.split()[:3] == ["group", "λ", "tensors"] for line in text.splitlines())
    assert "weight_decay_schedule='adamc' (hparams.weight_decay_schedule)" in text
    # decay: λ 0.1, torch value at step 0 = 0.1·(1/3), τ = 1/(0.01·0.1) = 1000 steps = 250 epochs = 500 runs.
    row = next(line.split() for line in text.splitlines() if line.startswith("decay ") and "1000" in line)
    assert row == ["decay", "0.1", "0.03333", "0.01", "1000", "250", "500"]


# ----------------------------------------------------------------------------------------------- resume


def test_resume_continues_the_schedule_as_one_uninterrupted_run(tmp_path: Path, caplog: Any) -> None:
    _, whole = fit(Net(weight_decay_schedule="adamc"), tmp_path / "whole")
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(
        Net(weight_decay_schedule="adamc"),
        tmp_path / "a",
        max_steps=4,
        callbacks=[checkpoint],
        enable_checkpointing=True,
    )
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        trainer, resumed = fit(
            Net(weight_decay_schedule="adamc"), tmp_path / "b", ckpt=str(tmp_path / "ckpt/last.ckpt")
        )
    assert [wd[0] for wd in resumed.wd] == pytest.approx([wd[0] for wd in whole.wd[4:]], rel=REL)
    assert WeightDecayScheduler.of(trainer.optimizers[0]).step_count == 8
    # The scheduled value the checkpoint's group held is not a "change" of weight_decay: λ did not change.
    assert not any("weight_decay 0." in r.getMessage() for r in caplog.records)


def test_resume_with_a_new_lambda_and_schedule_says_so_and_applies_it(tmp_path: Path, caplog: Any) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(
        Net(weight_decay_schedule="adamc"),
        tmp_path / "a",
        max_steps=4,
        callbacks=[checkpoint],
        enable_checkpointing=True,
    )
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        _, resumed = fit(
            Net(weight_decay=0.05, weight_decay_schedule="cosine"),
            tmp_path / "b",
            ckpt=str(tmp_path / "ckpt/last.ckpt"),
        )
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "schedule 'adamc' -> 'cosine'" in text and "base weight_decay of 'decay' 0.1 -> 0.05" in text
    assert "decay weight_decay 0.1 -> 0.05" in text  # the optimizer's resume line compares λ
    cosine = [
        0.05 * decay_factor("cosine", t, warmup_steps=0, total_steps=8, final_ratio=0.0) for t in range(4, 8)
    ]
    assert [wd[0] for wd in resumed.wd] == pytest.approx(cosine, rel=REL)


def test_schedule_new_in_the_resumed_run_starts_at_the_step_reached(tmp_path: Path, caplog: Any) -> None:
    checkpoint = ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True)
    fit(Net(), tmp_path / "a", max_steps=4, callbacks=[checkpoint], enable_checkpointing=True)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        _, resumed = fit(
            Net(weight_decay_schedule={"name": "linear"}),
            tmp_path / "b",
            ckpt=str(tmp_path / "ckpt/last.ckpt"),
        )
    assert [wd[0] for wd in resumed.wd] == pytest.approx([0.1 * (1 - t / 8) for t in range(4, 8)], rel=REL)
    assert any("schedule starts at the step reached, 4" in r.getMessage() for r in caplog.records)


# ----------------------------------------------------------------------------------------------- timescale


@pytest.mark.parametrize(
    ("trainer_kwargs", "option", "tau_steps"),
    [
        ({"max_epochs": 2, "max_steps": -1}, {"ema_timescale_epochs": 0.5}, 0.5 * STEPS_PER_EPOCH),
        (
            {"max_steps": 8},
            {"ema_timescale_epochs": 1.5},
            1.5 * STEPS_PER_EPOCH,
        ),  # epochs known without max_epochs
        ({"max_epochs": 2, "max_steps": -1}, {"ema_timescale_fraction": 0.25}, 0.25 * 8),
        ({"max_steps": 6}, {"ema_timescale_fraction": 0.5}, 0.5 * 6),
    ],
    ids=["epochs/max_epochs", "epochs/max_steps", "fraction/max_epochs", "fraction/max_steps"],
)
def test_timescale_sets_lambda_from_the_trainers_steps(
    trainer_kwargs: dict[str, Any], option: dict[str, float], tau_steps: float, tmp_path: Path, caplog: Any
) -> None:
    """λ = 1/(lr·τ) with the base (peak) lr 0.01, τ in optimizer steps from the trainer's plan."""
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        _, applied = fit(Net(lr_schedule="constant", warmup_steps=0, **option), tmp_path, **trainer_kwargs)
    lam = 1.0 / (0.01 * tau_steps)
    assert all(math.isclose(wd[0], lam, rel_tol=REL) for wd in applied.wd) and applied.wd
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert f"from {next(iter(option))}" in text and f"{tau_steps:.4g} steps" in text


def test_timescale_and_an_explicit_weight_decay_is_an_error_naming_both() -> None:
    model = Net(weight_decay=0.05, ema_timescale_fraction=0.2)
    with pytest.raises(ValueError, match="`weight_decay` and `ema_timescale_fraction` are both given"):
        model.configure_optimizers()
    model = Net(ema_timescale_epochs=1.0, ema_timescale_fraction=0.2)
    with pytest.raises(ValueError, match="`ema_timescale_epochs` and `ema_timescale_fraction`"):
        model.configure_optimizers()


def test_logged_hparams_record_the_lambda_that_trains_and_its_timescale(tmp_path: Path) -> None:
    logger = CSVLogger(tmp_path, name="hp")
    fit(Net(weight_decay_schedule="adamc", ema_timescale_fraction=0.25), tmp_path, logger=logger)
    hparams = yaml.safe_load(Path(logger.log_dir, "hparams.yaml").read_text())
    # τ = 0.25 x 8 steps = 2 steps = 0.5 epochs; λ = 1/(0.01·2) = 50 (the module's own weight_decay hparam: 0.1).
    assert hparams["weight_decay/lambda"] == pytest.approx(50.0, rel=REL)
    assert hparams["weight_decay/schedule"] == "adamc"
    assert hparams["weight_decay/ema_timescale_steps"] == pytest.approx(2.0, rel=REL)
    assert hparams["weight_decay/ema_timescale_epochs"] == pytest.approx(0.5, rel=REL)
    assert hparams["weight_decay/ema_timescale_fraction"] == pytest.approx(0.25, rel=REL)
    assert hparams["param_groups/decay/weight_decay"] == pytest.approx(50.0, rel=REL)  # λ, not step 0's value


def test_own_configure_optimizers_gets_the_schedule_too(tmp_path: Path) -> None:
    """A subclass's own configure_optimizers (the README's "keep full control" recipe): the schedule setting
    applies to the optimizer it returns; one created there by hand is kept and checkpointed, and both at once
    is an error."""

    class Own(Net):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.decoupled_param_groups(), lr=0.01)

    _, applied = fit(Own(weight_decay_schedule={"name": "linear"}), tmp_path)
    assert [wd[0] for wd in applied.wd] == pytest.approx([0.1 * (1 - t / 8) for t in range(8)], rel=REL)

    class ByHand(Net):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            optimizer = torch.optim.AdamW(self.decoupled_param_groups(), lr=0.01)
            WeightDecayScheduler(optimizer, "cosine", total_steps=8)
            return optimizer

    optimizer = ByHand(lr_schedule="constant").configure_optimizers()
    assert "lightning_adamw_weight_decay_scheduler" in optimizer.state_dict()
    with pytest.raises(ValueError, match="already has a WeightDecayScheduler"):
        ByHand(weight_decay_schedule="adamc").configure_optimizers()


def test_an_explicit_weight_decay_equal_to_the_default_is_not_silently_replaced(tmp_path: Path) -> None:
    """``Net(weight_decay=0.1, ema_timescale_fraction=0.5)`` with 0.1 the ``__init__`` default: the hparams
    cannot tell it from not given, so the timescale sets λ — and a warning names both options and the value
    passed (an explicit value that differs from the default is an error, tested above)."""
    with pytest.warns(UserWarning, match=r"`weight_decay=0.1` was passed to Net, but it equals the default"):
        trainer, _ = fit(Net(weight_decay=0.1, ema_timescale_fraction=0.5), tmp_path)
    assert trainer.optimizers[0].param_groups[0]["weight_decay"] != 0.1  # λ from the timescale, as said
    # not passed at all: no warning (the usual way to use a timescale)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        model = Net(ema_timescale_fraction=0.5)
        assert model.argument_passed("weight_decay") is False
        assert model.argument_passed("ema_timescale_fraction") is True
