"""The ``lightning-adamw`` CLI: both optimizer spellings keep the decay / no-decay groups; the main job trains."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.cli import LightningCLI

from lightning_adamw import AdamWCLI, WarmupCosineLR

ROOT = Path(__file__).resolve().parents[1]
FAST = [
    "--trainer.max_steps=3",
    "--trainer.limit_val_batches=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.logger=false",
    "--model=tests.helpers.lit_models.TinyRegressor",
    "--data=null",
]


def run_cli(tmp_path: Path, *args: str, cli_class: type[LightningCLI] = AdamWCLI) -> LightningCLI:
    return cli_class(args=["fit", f"--trainer.default_root_dir={tmp_path}", *FAST, *args])


def groups(cli: LightningCLI) -> list[tuple[str | None, float]]:
    return [(g.get("name"), g["weight_decay"]) for g in cli.trainer.optimizers[0].param_groups]


def test_top_level_optimizer_flag_keeps_groups(tmp_path: Path) -> None:
    cli = run_cli(tmp_path, "--optimizer=AdamW", "--optimizer.lr=0.01", "--optimizer.weight_decay=0.2")
    opt = cli.trainer.optimizers[0]
    assert isinstance(opt, torch.optim.AdamW)
    assert groups(cli) == [("decay", 0.2), ("no_decay", 0.0)]
    assert opt.param_groups[1]["param_names"] == [
        "body.0.bias",
        "body.1.weight",
        "body.1.bias",
        "body.3.bias",
    ]
    assert opt.param_groups[0]["lr"] == 0.01


def test_top_level_optimizer_in_yaml_keeps_groups(tmp_path: Path) -> None:
    config = tmp_path / "opt.yaml"
    config.write_text(
        "optimizer:\n  class_path: torch.optim.AdamW\n  init_args:\n    lr: 0.003\n    weight_decay: 0.05\n"
        "lr_scheduler:\n  class_path: lightning_adamw.WarmupCosineLR\n  init_args:\n    warmup_steps: 1\n"
    )
    cli = run_cli(tmp_path, f"--config={config}")
    assert groups(cli) == [("decay", 0.05), ("no_decay", 0.0)]
    (sched_config,) = cli.trainer.lr_scheduler_configs
    assert isinstance(sched_config.scheduler, WarmupCosineLR)
    assert sched_config.interval == "step" and sched_config.scheduler.total_steps == 3


def test_injected_optimizer_keeps_groups(tmp_path: Path) -> None:
    cli = run_cli(tmp_path, "--model.optimizer=AdamW", "--model.optimizer.weight_decay=0.3")
    assert groups(cli) == [("decay", 0.3), ("no_decay", 0.0)]


def test_injected_coupled_adam_warns(tmp_path: Path) -> None:
    with pytest.warns(UserWarning, match="not decoupled weight decay"):
        cli = run_cli(tmp_path, "--model.optimizer=Adam", "--model.optimizer.weight_decay=0.1")
    assert groups(cli) == [("decay", 0.1), ("no_decay", 0.0)]


def test_stock_lightning_cli_loses_the_no_decay_group(tmp_path: Path) -> None:
    """The trap this CLI fixes, shown on the stock class with the same model and flags."""
    cli = run_cli(
        tmp_path,
        "--optimizer=AdamW",
        "--optimizer.weight_decay=0.2",
        cli_class=lambda args: LightningCLI(args=args, subclass_mode_model=True, subclass_mode_data=True),
    )
    assert groups(cli) == [(None, 0.2)]  # norms and biases decayed


def test_grouping_options_from_the_command_line(tmp_path: Path) -> None:
    cli = run_cli(tmp_path, "--model.no_decay_patterns=[body.3.weight]", "--model.weight_decay=0.4")
    opt = cli.trainer.optimizers[0]
    assert opt.param_groups[0]["param_names"] == ["body.0.weight"]
    assert opt.param_groups[0]["weight_decay"] == 0.4


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = f"{ROOT}{os.pathsep}{env.get('PYTHONPATH', '')}"
    return env


def test_console_script_and_module_print_config(tmp_path: Path) -> None:
    exe = Path(sys.executable).with_name("lightning-adamw")
    cmd = [str(exe)] if exe.exists() else [sys.executable, "-m", "lightning_adamw"]
    out = subprocess.run(
        [*cmd, "fit", "--config", str(ROOT / "configs/quickstart.yaml"), "--print_config"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=_env(),
        check=True,
    ).stdout
    assert "class_path: lightning_adamw.demo.DigitsClassifier" in out
    assert "weight_decay: 0.05" in out
    out = subprocess.run(
        [sys.executable, "-m", "lightning_adamw", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        env=_env(),
        check=True,
    ).stdout
    for sub in ("fit", "validate", "test", "predict"):
        assert sub in out


def test_quickstart_main_job_trains_and_reports_accuracy(tmp_path: Path) -> None:
    """The README's main command, ``lightning-adamw fit`` with no config, shortened to 3 epochs: real digits,
    CSV logs, accuracy well above chance."""
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "lightning_adamw",
            "fit",
            "--trainer.max_epochs=3",
            "--trainer.enable_progress_bar=false",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=_env(),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lightning-adamw fit finished: val_acc=" in result.stderr + result.stdout
    metrics = next((tmp_path / "lightning_logs").glob("version_*/metrics.csv"))
    rows = list(csv.DictReader(metrics.open()))
    accs = [float(r["val_acc"]) for r in rows if r.get("val_acc")]
    assert len(accs) == 3
    assert accs[-1] > 0.9
