"""The ``lightning-adamw`` CLI's optimizers and schedulers: what is given is what trains, or the run stops.

Lightning's documented CLI extension points on ``AdamWCLI`` (fixed classes with ``add_optimizer_args`` /
``add_lr_scheduler_args``, linked options, ``link_arguments``, ``ReduceLROnPlateau`` with a monitor), a module's
own ``configure_optimizers`` against a top-level ``--optimizer``, per-step schedules for modules without the
mixin, and the options that are refused (non-finite numbers, two optimizers, a scheduler nothing would use).
Every test is a real short fit or a parse that must fail; numbers are asserted.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from lightning.pytorch.cli import LightningArgumentParser

from lightning_adamw import AdamWCLI, WarmupCosineLR
from lightning_adamw.schedules import warmup_cosine_factor
from tests.helpers.cli_models import InitDictRegressor, RegressionData, UserRegressor

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = str(ROOT / "configs" / "quickstart.yaml")
MODELS = "tests.helpers.cli_models"
FAST = [
    "--trainer.limit_val_batches=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.logger=false",
]


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning-adamw"])


def fit(
    tmp_path: Path, *args: str, steps: int = 2, cli_class: type[AdamWCLI] = AdamWCLI, **kwargs: Any
) -> Any:
    return cli_class(
        args=["fit", f"--trainer.default_root_dir={tmp_path}", f"--trainer.max_steps={steps}", *FAST, *args],
        **kwargs,
    )


def probe(tmp_path: Path) -> list[str]:
    """Options adding the RankProbe callback, which records every group's lr after each optimizer step."""
    return [
        "--trainer.callbacks+=tests.helpers.cli_probe.RankProbe",
        f"--trainer.callbacks.out_dir={tmp_path}",
    ]


def probe_lrs(cli: Any) -> list[float]:
    """The first group's lr after each step; every group must have the same one."""
    (recorder,) = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "RankProbe"]
    lrs = recorder.record["lrs"]
    assert all(len(set(step)) == 1 for step in lrs)
    return [step[0] for step in lrs]


def scheduled_lrs(lr: float, warmup: int, total: int, min_ratio: float) -> list[float]:
    """The lr after each of ``total`` steps of a per-step WarmupCosineLR (the formula, not the class)."""
    return [lr * warmup_cosine_factor(step, warmup, total, min_ratio) for step in range(1, total + 1)]


def groups(cli: Any) -> list[tuple[str | None, float, float]]:
    """``(name, lr before any scheduler step, weight_decay)`` per group of the trained optimizer."""
    return [
        (g.get("name"), g.get("initial_lr", g["lr"]), g["weight_decay"])
        for g in cli.trainer.optimizers[0].param_groups
    ]


def refused(capsys: pytest.CaptureFixture[str], *args: str, **kwargs: Any) -> str:
    """The error of a command that must stop before training (exit code 2)."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        AdamWCLI(args=["fit", *args, "--trainer.max_steps=1", *FAST], **kwargs)
    assert exit_info.value.code == 2
    return capsys.readouterr().err


# ---------------------------------------------------------------------------------------------- fixed classes


class FixedAdamWStepLR(AdamWCLI):
    """Lightning's documented way to fix the classes: only their arguments are options."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_optimizer_args(torch.optim.AdamW)
        parser.add_lr_scheduler_args(torch.optim.lr_scheduler.StepLR)


def test_fixed_optimizer_and_scheduler_classes_keep_the_groups(tmp_path: Path) -> None:
    cli = fit(
        tmp_path,
        "--optimizer.lr=0.02",
        "--optimizer.weight_decay=0.2",
        "--lr_scheduler.step_size=1",
        "--lr_scheduler.gamma=0.5",
        cli_class=FixedAdamWStepLR,
        model_class=UserRegressor,
        datamodule_class=RegressionData,
        subclass_mode_model=False,
        subclass_mode_data=False,
    )
    assert type(cli.trainer.optimizers[0]) is torch.optim.AdamW
    assert groups(cli) == [("decay", 0.02, 0.2), ("no_decay", 0.02, 0.0)]
    (config,) = cli.trainer.lr_scheduler_configs
    assert type(config.scheduler) is torch.optim.lr_scheduler.StepLR
    assert (config.scheduler.step_size, config.scheduler.gamma, config.interval) == (1, 0.5, "epoch")


class FixedWarmupCosine(AdamWCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_lr_scheduler_args(WarmupCosineLR)


def test_fixed_warmup_cosine_is_stepped_per_step_over_the_run(tmp_path: Path) -> None:
    cli = fit(
        tmp_path,
        f"--model={MODELS}.UserRegressor",
        f"--data={MODELS}.RegressionData",
        "--optimizer=AdamW",
        "--optimizer.lr=0.01",
        "--lr_scheduler.warmup_steps=1",
        *probe(tmp_path),
        steps=4,
        cli_class=FixedWarmupCosine,
    )
    (config,) = cli.trainer.lr_scheduler_configs
    assert isinstance(config.scheduler, WarmupCosineLR) and config.interval == "step"
    assert config.scheduler.total_steps == 4
    assert probe_lrs(cli) == pytest.approx(scheduled_lrs(0.01, 1, 4, 0.0), rel=1e-12)


# ---------------------------------------------------------------------------------------------- links


class LinkedBatchSize(AdamWCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.link_arguments("data.batch_size", "model.batch_size")


def test_link_arguments_between_data_and_model(tmp_path: Path) -> None:
    from tests.helpers.lit_models import TinyRegressor

    cli = fit(
        tmp_path,
        "--data.batch_size=8",
        cli_class=LinkedBatchSize,
        model_class=TinyRegressor,
        datamodule_class=RegressionData,
        subclass_mode_model=False,
        subclass_mode_data=False,
    )
    assert cli.model.hparams.batch_size == 8
    assert len(next(iter(cli.trainer.train_dataloader))[0]) == 8


class LinkedOptimizerInit(AdamWCLI):
    """The documented pattern for several or custom optimizers: link the option into the model."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        super().add_arguments_to_parser(parser)
        parser.add_optimizer_args(
            (torch.optim.SGD, torch.optim.AdamW), nested_key="gen_optimizer", link_to="model.optimizer_init"
        )


def test_linked_optimizer_option_goes_to_the_models_own_configure_optimizers(tmp_path: Path) -> None:
    cli = fit(
        tmp_path,
        "--gen_optimizer=SGD",
        "--gen_optimizer.lr=0.05",
        "--gen_optimizer.weight_decay=0.1",
        cli_class=LinkedOptimizerInit,
        model_class=InitDictRegressor,
        datamodule_class=RegressionData,
        subclass_mode_model=False,
        subclass_mode_data=False,
    )
    assert type(cli.trainer.optimizers[0]) is torch.optim.SGD
    assert groups(cli) == [("decay", 0.05, 0.1), ("no_decay", 0.05, 0.0)]
    assert cli.model._lightning_adamw_optimizer_factory is None  # nothing automatic was given


# ---------------------------------------------------------------------------------------------- schedulers


def test_reduce_lr_on_plateau_with_a_monitor(tmp_path: Path) -> None:
    cli = AdamWCLI(
        args=[
            "fit",
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.max_epochs=2",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.enable_checkpointing=false",
            "--trainer.logger=false",
            f"--model={MODELS}.UserRegressor",
            f"--data={MODELS}.RegressionData",
            "--optimizer=AdamW",
            "--optimizer.lr=0.01",
            "--lr_scheduler=ReduceLROnPlateau",
            "--lr_scheduler.monitor=val_loss",
            "--lr_scheduler.patience=5",
        ]
    )
    (config,) = cli.trainer.lr_scheduler_configs
    assert (config.monitor, config.interval) == ("val_loss", "epoch")
    assert groups(cli) == [("decay", 0.01, 0.01), ("no_decay", 0.01, 0.0)]  # AdamW's default decay
    # Stepped with the monitored metric at the end of each epoch: its best is the last epoch's val_loss or less.
    assert config.scheduler.last_epoch == 2
    assert config.scheduler.best <= float(cli.trainer.callback_metrics["val_loss"])


def test_warmup_cosine_for_a_module_without_the_mixin(tmp_path: Path) -> None:
    """Stock LightningCLI steps a top-level scheduler per epoch and never sets its length."""
    with pytest.warns(
        UserWarning, match=r"PlainRegressor does not use DecoupledWeightDecayMixin.*decayed too"
    ):
        cli = fit(
            tmp_path,
            f"--model={MODELS}.PlainRegressor",
            "--data=null",
            "--optimizer=AdamW",
            "--optimizer.lr=0.01",
            "--lr_scheduler=WarmupCosineLR",
            "--lr_scheduler.warmup_steps=1",
            "--lr_scheduler.min_lr_ratio=0.1",
            *probe(tmp_path),
            steps=4,
        )
    (config,) = cli.trainer.lr_scheduler_configs
    assert isinstance(config.scheduler, WarmupCosineLR)
    assert (config.interval, config.scheduler.total_steps) == ("step", 4)
    assert probe_lrs(cli) == pytest.approx(scheduled_lrs(0.01, 1, 4, 0.1), rel=1e-12)
    assert groups(cli) == [(None, 0.01, 0.01)]  # stock: one group, all decayed (the warning says so)


@pytest.mark.parametrize(
    ("args", "schedule"),
    [
        (
            ["--model.lr_schedule=cosine", "--model.warmup_steps=1"],
            "lr scheduler WarmupCosineLR from the model's own settings (lr_scheduler / lr_schedule), stepped every step",
        ),
        (
            ["--lr_scheduler=StepLR", "--lr_scheduler.step_size=1"],
            "lr scheduler StepLR from the top-level --lr_scheduler, stepped every epoch",
        ),
        ([], "no lr scheduler"),
    ],
)
def test_one_line_says_what_trains(
    args: list[str], schedule: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        cli = fit(
            tmp_path,
            f"--model={MODELS}.UserRegressor",
            f"--data={MODELS}.RegressionData",
            "--optimizer=SGD",
            "--optimizer.lr=0.05",
            "--optimizer.weight_decay=0.01",
            *args,
        )
    assert groups(cli) == [("decay", 0.05, 0.01), ("no_decay", 0.05, 0.0)]
    (line,) = [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("lightning-adamw: optimizer")
    ]
    assert line == (
        "lightning-adamw: optimizer torch.optim.sgd.SGD from the top-level --optimizer (the model's own lr / "
        "weight_decay / betas / eps are not used), groups decay (lr=0.05, weight_decay=0.01, 2 tensors), "
        f"no_decay (lr=0.05, weight_decay=0, 4 tensors); {schedule}"
    )


# ---------------------------------------------------------------------------------------------- own configure_optimizers


def test_top_level_optimizer_replaces_a_modules_own_configure_optimizers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with (
        pytest.warns(
            UserWarning,
            match=r"`OwnOptimizerRegressor.configure_optimizers` is overridden by the top-level --optimizer torch.optim.SGD",
        ),
        caplog.at_level(logging.INFO, logger="lightning.pytorch"),
    ):
        cli = fit(
            tmp_path,
            f"--model={MODELS}.OwnOptimizerRegressor",
            f"--data={MODELS}.RegressionData",
            "--optimizer=SGD",
            "--optimizer.lr=0.05",
        )
    assert type(cli.trainer.optimizers[0]) is torch.optim.SGD
    assert groups(cli) == [("decay", 0.05, 0.0), ("no_decay", 0.05, 0.0)]
    (line,) = [
        r.getMessage() for r in caplog.records if r.getMessage().startswith("lightning-adamw: optimizer")
    ]
    assert "torch.optim.sgd.SGD from the top-level --optimizer" in line
    assert "decay (lr=0.05, weight_decay=0, 2 tensors), no_decay (lr=0.05, weight_decay=0, 4 tensors)" in line


def test_own_configure_optimizers_without_top_level_optimizer_is_kept(tmp_path: Path) -> None:
    cli = fit(tmp_path, f"--model={MODELS}.OwnOptimizerRegressor", f"--data={MODELS}.RegressionData")
    opt = cli.trainer.optimizers[0]
    assert type(opt) is torch.optim.AdamW and opt.param_groups[0]["betas"] == (0.9, 0.95)
    assert groups(cli) == [("decay", 3e-4, 0.0), ("no_decay", 3e-4, 0.0)]


# ---------------------------------------------------------------------------------------------- refused


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (
            ["--optimizer=AdamW", "--optimizer.weight_decay=1e400"],
            "--optimizer.weight_decay (optimizer.init_args.weight_decay) must be a finite number, got inf",
        ),
        (["--optimizer=AdamW", "--optimizer.lr=1e400"], "--optimizer.lr (optimizer.init_args.lr)"),
        (
            ["--optimizer=SGD", "--optimizer.momentum=.nan"],
            "--optimizer.momentum (optimizer.init_args.momentum) must be a finite number, got nan",
        ),
        (
            ["--optimizer=AdamW", "--optimizer.betas=[0.9, 1e400]"],
            "--optimizer.betas (optimizer.init_args.betas) must hold finite numbers",
        ),
        (
            ["--optimizer=AdamW", "--lr_scheduler=WarmupCosineLR", "--lr_scheduler.min_lr_ratio=.nan"],
            "--lr_scheduler.min_lr_ratio",
        ),
        (
            ["--model.optimizer=AdamW", "--model.optimizer.lr=1e400"],
            "--model.optimizer.lr (model.init_args.optimizer.init_args.lr)",
        ),
        (["--model.lr=1e400"], "--model.lr (model.init_args.lr) must be a finite number, got inf"),
    ],
)
def test_non_finite_numbers_are_refused(
    args: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert named in refused(capsys, *args)


def test_non_finite_number_from_a_yaml_config_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "inf.yaml"
    config.write_text("optimizer:\n  class_path: torch.optim.AdamW\n  init_args:\n    weight_decay: .inf\n")
    assert "--optimizer.weight_decay" in refused(capsys, "--config", QUICKSTART, "--config", str(config))


def test_non_finite_number_for_a_fixed_optimizer_class_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        FixedAdamWStepLR(
            UserRegressor,
            args=[
                "fit",
                "--optimizer.weight_decay=1e400",
                "--lr_scheduler.step_size=1",
                "--trainer.max_steps=1",
                *FAST,
            ],
            subclass_mode_model=False,
        )
    assert (
        "--optimizer.weight_decay (optimizer.weight_decay) must be a finite number" in capsys.readouterr().err
    )


@pytest.mark.parametrize(
    ("args", "named"),
    [
        (
            ["--optimizer=SGD", "--model.optimizer=AdamW"],
            "the top-level --optimizer (torch.optim.SGD) and --model.optimizer (model.init_args.optimizer: torch.optim.AdamW)",
        ),
        (
            [
                "--optimizer=AdamW",
                "--lr_scheduler=StepLR",
                "--lr_scheduler.step_size=1",
                "--model.lr_scheduler=ConstantLR",
            ],
            "the top-level --lr_scheduler (torch.optim.lr_scheduler.StepLR) and --model.lr_scheduler",
        ),
    ],
)
def test_top_level_and_injected_together_are_refused(
    args: list[str], named: str, capsys: pytest.CaptureFixture[str]
) -> None:
    err = refused(capsys, *args)
    assert named in err and "Drop one" in err


def test_a_scheduler_nothing_would_use_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    err = refused(
        capsys,
        f"--model={MODELS}.OwnOptimizerRegressor",
        "--data=null",
        "--lr_scheduler=StepLR",
        "--lr_scheduler.step_size=1",
    )
    assert "--lr_scheduler torch.optim.lr_scheduler.StepLR would not be used" in err
    assert "OwnOptimizerRegressor writes its own configure_optimizers" in err
    err = refused(
        capsys,
        f"--model={MODELS}.PlainRegressor",
        "--data=null",
        "--lr_scheduler=StepLR",
        "--lr_scheduler.step_size=1",
    )
    assert "is given without a top-level optimizer" in err and "PlainRegressor does not use" in err
