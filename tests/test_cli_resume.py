"""``lightning-adamw``: what the command line says wins, on resume too, or the command stops.

* ``--ckpt_path``: stock LightningCLI parses the checkpoint's saved hyperparameters over the new command line;
  here the model arguments this run gives win, the rest come from the checkpoint, one line says which.
* a model ``lr`` / ``weight_decay`` given on the command line while a top-level (or injected) optimizer trains
  is an error naming both; set in a config file, a warning naming the values.
* a class change is reported once, with the values the user wrote.

In-process ``AdamWCLI`` runs (real fits of a tiny regressor, checkpoints on disk); numbers are asserted.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from lightning_adamw.cli import AdamWCLI
from tests.helpers.cli_models import AppliedProbe

ROOT = Path(__file__).resolve().parents[1]
MODEL = "tests.helpers.cli_models.ScheduledRegressor"  # lr 0.05, weight_decay 0.2 by default
DATA = "tests.helpers.cli_models.RegressionData"  # 64 rows, batch 16: 4 steps per epoch
FAST = [
    "--trainer.limit_val_batches=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.logger=false",
    "--trainer.accelerator=cpu",
]


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning-adamw"])


class _ParseOnly(AdamWCLI):
    """Parses a subcommand (``fit ...``) and its checks, builds and runs nothing."""

    def instantiate_classes(self) -> None:
        pass

    def after_instantiate_classes(self) -> None:
        pass

    def _run_subcommand(self, subcommand: str) -> None:
        pass


def fit(root: Path, *args: str) -> AdamWCLI:
    return AdamWCLI(
        args=[
            "fit",
            "--model",
            MODEL,
            "--data",
            DATA,
            f"--trainer.default_root_dir={root}",
            "--trainer.callbacks+=tests.helpers.cli_models.AppliedProbe",
            *FAST,
            *args,
        ]
    )


def probe(cli: AdamWCLI) -> AppliedProbe:
    return next(c for c in cli.trainer.callbacks if isinstance(c, AppliedProbe))


def lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if "lightning-adamw" in r.getMessage()]


def first_run(root: Path) -> str:
    fit(root / "first", "--trainer.max_steps=3")
    (ckpt,) = (root / "first").rglob("*.ckpt")
    return str(ckpt)


def test_resume_on_the_command_line_keeps_the_new_model_arguments(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The fresh user's run: lr, weight_decay and a grouping option changed on resume all apply."""
    ckpt = first_run(tmp_path)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        cli = fit(
            tmp_path / "second",
            "--trainer.max_steps=5",
            "--model.lr=0.001",
            "--model.weight_decay=0.01",
            "--model.no_decay_patterns=[body.2.weight]",
            f"--ckpt_path={ckpt}",
        )
    applied = probe(cli)
    assert applied.lr == [[0.001, 0.001]] * 2 and applied.wd == [[0.01, 0.0]] * 2  # steps 3 and 4
    names = {g["name"]: g["param_names"] for g in cli.trainer.optimizers[0].param_groups}
    assert "body.2.weight" in names["no_decay"]
    assert dict(cli.model.hparams)["lr"] == 0.001
    text = "\n".join(lines(caplog))
    assert (
        "the model arguments given in this run win over the checkpoint's: lr=0.001 (checkpoint: 0.05)" in text
    )
    assert "body.2.weight moved decay -> no_decay" in text


def test_resume_takes_what_this_run_does_not_give_from_the_checkpoint_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fit(tmp_path / "first", "--trainer.max_steps=3", "--model.lr=0.02")
    (ckpt,) = (tmp_path / "first").rglob("*.ckpt")
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        cli = fit(
            tmp_path / "second", "--trainer.max_steps=4", "--model.weight_decay=0.3", f"--ckpt_path={ckpt}"
        )
    assert probe(cli).lr == [[0.02, 0.02]] and probe(cli).wd == [[0.3, 0.0]]
    text = "\n".join(lines(caplog))
    assert (
        "taken from the checkpoint's hyperparameters (not given in this run): lr=0.02 (default: 0.05)" in text
    )
    assert "weight_decay=0.3 (checkpoint: 0.2)" in text


def test_model_lr_on_the_command_line_with_a_config_optimizer_is_an_error(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        _ParseOnly(
            args=[
                "fit",
                "--config",
                str(ROOT / "configs/gpu.yaml"),
                "--config",
                str(ROOT / "configs/cpu.yaml"),
                "--model.lr=0.1",
                "--model.weight_decay=0.3",
            ]
        )
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert (
        "--model.lr 0.1 and --model.weight_decay 0.3 given, but the optimizer that trains is --optimizer"
        in err
    )
    assert "(--optimizer.lr 0.1 --optimizer.weight_decay 0.3)" in err


def test_model_lr_with_an_injected_optimizer_is_an_error(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        AdamWCLI(
            args=[
                "--model=tests.helpers.lit_models.TinyRegressor",
                "--model.optimizer=SGD",
                "--model.lr=0.1",
            ],
            run=False,
        )
    assert (
        "--model.lr 0.1 given, but the optimizer that trains is --model.optimizer" in capsys.readouterr().err
    )


def test_model_settings_from_a_config_with_a_top_level_optimizer_warn_naming_them(tmp_path: Path) -> None:
    with pytest.warns(
        UserWarning, match=r"the model's lr=0.003, weight_decay=0.05 \(set in a config file\) are not"
    ):
        AdamWCLI(args=["--config", str(ROOT / "configs/quickstart.yaml"), "--optimizer=AdamW"], run=False)


def test_a_class_change_is_reported_once_with_the_values_given(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        _ParseOnly(
            args=[
                "fit",
                "--config",
                str(ROOT / "configs/quickstart.yaml"),
                "--model.lr=0.01",
                "--model",
                MODEL,
            ]
        )
    replaced = [m for m in lines(caplog) if "replaced lightning_adamw.demo.DigitsClassifier" in m]
    assert len(replaced) == 1 and "lr=0.01," in replaced[0]
