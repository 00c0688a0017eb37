"""Every file in ``configs/`` parses and prints, composes with the others, and means what it says.

In-process (``lightning_adamw.cli.main`` / ``AdamWCLI``), so these are fast; the multi-process runs of the same
configs are in ``test_distributed_cli.py``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from lightning.pytorch.strategies import FSDPStrategy

from lightning_adamw.cli import AdamWCLI, main
from lightning_adamw.cli.app import _uses_wandb
from lightning_adamw.schedules import WarmupCosineLR, warmup_cosine_factor

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
MAIN_CONFIGS = ["quickstart.yaml", "gpu.yaml", "ddp.yaml", "multinode.yaml", "fsdp.yaml"]
FRAGMENTS = ["cpu.yaml", "wandb.yaml"]
# Configs of other jobs, each run by its own test (finetune_layer_decay.yaml: tests/test_grouping_finetune_cli.py).
OTHER_JOBS = ["finetune_layer_decay.yaml"]
GPU_CONFIGS = ["gpu.yaml", "ddp.yaml", "multinode.yaml", "fsdp.yaml"]
MONITOR = "lightning_adamw.monitor.WeightDecayMonitor"


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    # LightningCLI(args=...) warns when sys.argv holds arguments too (here: pytest's own).
    monkeypatch.setattr(sys, "argv", ["lightning-adamw"])


def cfg(name: str) -> str:
    return str(CONFIGS / name)


def print_config(capsys: pytest.CaptureFixture[str], *args: str) -> dict[str, Any]:
    """``lightning-adamw fit <args> --print_config`` parsed back from YAML."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", *args, "--print_config"])
    assert exit_info.value.code in (None, 0)
    return yaml.safe_load(capsys.readouterr().out)


class _ParseOnly(AdamWCLI):
    """Parses like ``lightning-adamw`` but builds nothing (the GPU configs cannot be instantiated on CPU)."""

    def instantiate_classes(self) -> None:
        pass


def parse(*args: str) -> Any:
    return _ParseOnly(args=list(args), run=False).config


def callback_paths(config: dict[str, Any]) -> list[str]:
    return [c["class_path"] for c in config["trainer"]["callbacks"] or []]


# ---------------------------------------------------------------------------------------------------- parsing


def test_every_config_file_is_covered() -> None:
    assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(MAIN_CONFIGS + FRAGMENTS + OTHER_JOBS)
    assert (CONFIGS / "slurm.sbatch").exists()


@pytest.mark.parametrize("name", MAIN_CONFIGS)
def test_config_parses_prints_and_round_trips(
    name: str, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    printed = print_config(capsys, "--config", cfg(name))
    assert printed["model"]["class_path"] == "lightning_adamw.demo.DigitsClassifier"
    assert printed["data"]["class_path"] == "lightning_adamw.demo.DigitsDataModule"
    assert printed["seed_everything"] == 0
    if name != "quickstart.yaml":
        optimizer = printed["optimizer"]
        assert optimizer["class_path"] == "torch.optim.AdamW"
        assert {k: optimizer["init_args"][k] for k in ("lr", "weight_decay", "betas", "eps")} == {
            "lr": 0.003,
            "weight_decay": 0.05,
            "betas": [0.9, 0.999],
            "eps": 1e-8,
        }
        scheduler = printed["lr_scheduler"]
        assert scheduler["class_path"] == "lightning_adamw.WarmupCosineLR"
        assert scheduler["init_args"] == {
            "warmup_steps": 20,
            "total_steps": None,
            "min_lr_ratio": 0.05,
            "last_epoch": -1,
        }
        model_args = printed["model"]["init_args"]
        assert {k: model_args[k] for k in ("exclude_embeddings", "no_decay_patterns", "decay_patterns")} == {
            "exclude_embeddings": False,
            "no_decay_patterns": None,
            "decay_patterns": None,
        }
        assert MONITOR in callback_paths(printed)
    # What --print_config writes is itself a config that gives the same result.
    saved = tmp_path / "printed.yaml"
    saved.write_text(yaml.safe_dump(printed))
    assert print_config(capsys, "--config", str(saved)) == printed


def test_gpu_config(capsys: pytest.CaptureFixture[str]) -> None:
    printed = print_config(capsys, "--config", cfg("gpu.yaml"))
    trainer = printed["trainer"]
    assert (trainer["accelerator"], trainer["devices"], trainer["precision"]) == ("gpu", 1, "bf16-mixed")
    assert trainer["strategy"] == "auto"
    assert printed["optimizer"]["init_args"]["fused"] is True
    assert callback_paths(printed) == [MONITOR, "lightning.pytorch.callbacks.LearningRateMonitor"]


@pytest.mark.parametrize("name", ["ddp.yaml", "multinode.yaml"])
def test_ddp_configs(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    trainer = print_config(capsys, "--config", cfg(name))["trainer"]
    assert (trainer["accelerator"], trainer["devices"], trainer["strategy"]) == ("gpu", -1, "ddp")
    assert trainer["num_nodes"] == (2 if name == "multinode.yaml" else 1)
    assert trainer["precision"] == "bf16-mixed"


def test_fsdp_config_keeps_original_params_and_wrap_policy(capsys: pytest.CaptureFixture[str]) -> None:
    strategy = print_config(capsys, "--config", cfg("fsdp.yaml"))["trainer"]["strategy"]
    assert strategy["class_path"] == "lightning.pytorch.strategies.FSDPStrategy"
    assert strategy["init_args"]["sharding_strategy"] == "FULL_SHARD"
    assert strategy["dict_kwargs"] == {"use_orig_params": True}
    # --print_config leaves the wrap policy out (it does not serialise a set of classes); it is parsed though.
    parsed = parse("--config", cfg("fsdp.yaml")).trainer.strategy
    assert parsed.init_args.auto_wrap_policy == {torch.nn.Linear}
    strategy = FSDPStrategy(**parsed.init_args.as_dict(), **parsed.dict_kwargs)
    assert strategy.kwargs["use_orig_params"] is True
    assert strategy.kwargs["auto_wrap_policy"] is not None


# ---------------------------------------------------------------------------------------------------- composing


@pytest.mark.parametrize("name", MAIN_CONFIGS)
def test_wandb_fragment_composes_with(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    alone = print_config(capsys, "--config", cfg(name))
    both = print_config(capsys, "--config", cfg(name), "--config", cfg("wandb.yaml"))
    logger = both["trainer"]["logger"]
    assert logger["class_path"] == "lightning.pytorch.loggers.WandbLogger"
    args = logger["init_args"]
    assert (args["project"], args["tags"], args["save_dir"]) == (
        "lightning-adamw",
        ["adamw", "decoupled-weight-decay"],
        ".",
    )
    assert args["offline"] is False and args["mode"] is None  # offline comes from WANDB_MODE, see below
    # Nothing but the logger changed.
    alone["trainer"].pop("logger")
    both["trainer"].pop("logger")
    assert both == alone


@pytest.mark.parametrize("name", GPU_CONFIGS)
def test_cpu_fragment_composes_with(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    alone = print_config(capsys, "--config", cfg(name))
    both = print_config(capsys, "--config", cfg(name), "--config", cfg("cpu.yaml"), "--trainer.devices=2")
    trainer = both["trainer"]
    assert (trainer["accelerator"], trainer["precision"], str(trainer["devices"])) == ("cpu", "32-true", "2")
    for key in ("accelerator", "precision", "devices"):
        alone["trainer"].pop(key)
        both["trainer"].pop(key)
    assert both == alone


def test_three_configs_and_command_line_compose(capsys: pytest.CaptureFixture[str]) -> None:
    printed = print_config(
        capsys,
        *("--config", cfg("ddp.yaml"), "--config", cfg("cpu.yaml"), "--config", cfg("wandb.yaml")),
        "--trainer.devices=2",
        "--optimizer.init_args.weight_decay=0.2",
        "--lr_scheduler.init_args.warmup_steps=5",
        "--model.init_args.no_decay_patterns=[head.5.weight]",
        "--trainer.logger.init_args.name=my-run",
    )
    assert printed["trainer"]["strategy"] == "ddp" and printed["trainer"]["accelerator"] == "cpu"
    assert printed["optimizer"]["init_args"]["weight_decay"] == 0.2
    assert printed["optimizer"]["init_args"]["lr"] == 0.003  # the rest of init_args is kept
    assert printed["lr_scheduler"]["init_args"]["warmup_steps"] == 5
    assert printed["model"]["init_args"]["no_decay_patterns"] == ["head.5.weight"]
    assert printed["trainer"]["logger"]["init_args"]["name"] == "my-run"


# ---------------------------------------------------------------------------------------------------- training


def fit(tmp_path: Path, *args: str, steps: int = 6) -> AdamWCLI:
    """A short in-process fit on CPU of the given configs (GPU configs via cpu.yaml)."""
    return AdamWCLI(
        args=[
            "fit",
            *args,
            f"--trainer.default_root_dir={tmp_path}",
            "--trainer.accelerator=cpu",
            "--trainer.devices=1",
            "--trainer.precision=32-true",
            f"--trainer.max_steps={steps}",
            "--trainer.limit_val_batches=0",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            "--trainer.enable_checkpointing=false",
            f"--trainer.logger.init_args.save_dir={tmp_path}",  # the configs' CSVLogger, not in the cwd
            "--trainer.callbacks+=tests.helpers.cli_probe.RankProbe",
            f"--trainer.callbacks.out_dir={tmp_path / 'probe'}",
        ]
    )


def groups_of(cli: AdamWCLI) -> list[tuple[str, float, list[str]]]:
    return [(g["name"], g["weight_decay"], g["param_names"]) for g in cli.trainer.optimizers[0].param_groups]


def probe_lrs(cli: AdamWCLI) -> list[list[float]]:
    (probe,) = [cb for cb in cli.trainer.callbacks if type(cb).__name__ == "RankProbe"]
    return probe.record["lrs"]


TOKEN_MODEL = "--model=tests.helpers.cli_models.TinyTokenClassifier"


def test_decay_options_from_yaml(tmp_path: Path) -> None:
    options = tmp_path / "options.yaml"
    options.write_text(
        "model:\n"
        "  class_path: tests.helpers.cli_models.TinyTokenClassifier\n"
        "  init_args:\n"
        "    exclude_embeddings: true\n"
        "    decay_patterns: [norm.weight]\n"
        "data: null\n"
    )
    cli = fit(tmp_path, "--config", cfg("gpu.yaml"), "--config", str(options), steps=2)
    assert groups_of(cli) == [
        ("decay", 0.05, ["norm.weight", "head.weight"]),
        ("no_decay", 0.0, ["embed.weight", "norm.bias", "head.bias"]),
    ]


def test_decay_options_from_the_command_line(tmp_path: Path) -> None:
    base = ("--config", cfg("gpu.yaml"), TOKEN_MODEL, "--data=null")
    cli = fit(tmp_path / "a", *base, steps=2)
    assert groups_of(cli) == [
        ("decay", 0.05, ["embed.weight", "head.weight"]),  # embeddings are decayed unless excluded
        ("no_decay", 0.0, ["norm.weight", "norm.bias", "head.bias"]),
    ]
    cli = fit(
        tmp_path / "b",
        *base,
        "--model.exclude_embeddings=true",
        "--model.no_decay_patterns=[head.*]",
        "--model.decay_patterns=[re:^norm\\.weight$]",
        "--optimizer.init_args.weight_decay=0.3",
        steps=2,
    )
    assert groups_of(cli) == [
        ("decay", 0.3, ["norm.weight"]),
        ("no_decay", 0.0, ["embed.weight", "norm.bias", "head.weight", "head.bias"]),
    ]


def test_bad_decay_pattern_from_the_command_line_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"no_decay_patterns.*'hed\.\*' matches no trainable parameter"):
        fit(
            tmp_path,
            "--config",
            cfg("gpu.yaml"),
            TOKEN_MODEL,
            "--data=null",
            "--model.no_decay_patterns=[hed.*]",
        )


def expected_lrs(lr: float, warmup: int, total: int, min_ratio: float) -> list[float]:
    return [lr * warmup_cosine_factor(step, warmup, total, min_ratio) for step in range(1, total + 1)]


def test_warmup_cosine_as_top_level_lr_scheduler(tmp_path: Path) -> None:
    cli = fit(tmp_path, "--config", cfg("gpu.yaml"), "--lr_scheduler.init_args.warmup_steps=2", steps=6)
    (config,) = cli.trainer.lr_scheduler_configs
    assert isinstance(config.scheduler, WarmupCosineLR) and config.interval == "step"
    assert config.scheduler.total_steps == 6  # filled in from the trainer
    lrs = probe_lrs(cli)
    assert [lr for lr, _ in lrs] == pytest.approx(expected_lrs(0.003, 2, 6, 0.05), rel=1e-12)
    assert all(decay == no_decay for decay, no_decay in lrs)
    assert lrs[-1][0] == pytest.approx(0.003 * 0.05)


def test_warmup_cosine_through_the_models_injected_lr_scheduler(tmp_path: Path) -> None:
    injected = tmp_path / "injected.yaml"
    injected.write_text(
        "optimizer: null\n"
        "lr_scheduler: null\n"
        "model:\n"
        "  init_args:\n"
        "    optimizer:\n"
        "      class_path: torch.optim.AdamW\n"
        "      init_args: {lr: 0.01, weight_decay: 0.2, betas: [0.8, 0.99]}\n"
        "    lr_scheduler:\n"
        "      class_path: lightning_adamw.WarmupCosineLR\n"
        "      init_args: {warmup_steps: 3, min_lr_ratio: 0.1}\n"
    )
    cli = fit(tmp_path, "--config", cfg("gpu.yaml"), "--config", str(injected), steps=6)
    assert cli.model._lightning_adamw_optimizer_factory is None  # no top-level optimizer left
    opt = cli.trainer.optimizers[0]
    assert [(g["name"], g["weight_decay"], g["betas"]) for g in opt.param_groups] == [
        ("decay", 0.2, (0.8, 0.99)),
        ("no_decay", 0.0, (0.8, 0.99)),
    ]
    (config,) = cli.trainer.lr_scheduler_configs
    assert isinstance(config.scheduler, WarmupCosineLR) and config.scheduler.total_steps == 6
    assert [lr for lr, _ in probe_lrs(cli)] == pytest.approx(expected_lrs(0.01, 3, 6, 0.1), rel=1e-12)


def test_lr_scheduler_by_short_name_on_the_command_line(tmp_path: Path) -> None:
    cli = fit(
        tmp_path,
        "--config",
        cfg("quickstart.yaml"),
        "--optimizer=AdamW",
        "--optimizer.lr=0.002",
        "--lr_scheduler=WarmupCosineLR",
        "--lr_scheduler.warmup_steps=1",
        steps=4,
    )
    assert [lr for lr, _ in probe_lrs(cli)] == pytest.approx(expected_lrs(0.002, 1, 4, 0.0), rel=1e-12)


# ---------------------------------------------------------------------------------------------------- W&B


def test_uses_wandb() -> None:
    assert _uses_wandb({"class_path": "lightning.pytorch.loggers.WandbLogger"})
    assert _uses_wandb([{"class_path": "lightning.pytorch.loggers.CSVLogger"}, "WandbLogger"])
    assert not _uses_wandb({"class_path": "lightning.pytorch.loggers.CSVLogger"})
    assert not _uses_wandb(None) and not _uses_wandb(False) and not _uses_wandb(True)


@pytest.mark.parametrize(("preset", "expected"), [(None, "offline"), ("online", "online"), ("", "offline")])
def test_wandb_is_offline_unless_wandb_mode_says_otherwise(
    preset: str | None, expected: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    if preset is None:
        monkeypatch.delenv("WANDB_MODE", raising=False)
    else:
        monkeypatch.setenv("WANDB_MODE", preset)
    # Parsing and building the logger does not start a W&B run (that happens when it first logs).
    cli = AdamWCLI(
        args=[
            "--config",
            cfg("quickstart.yaml"),
            "--config",
            cfg("wandb.yaml"),
            f"--trainer.default_root_dir={tmp_path}",
        ],
        run=False,
    )
    assert os.environ["WANDB_MODE"] == expected
    assert type(cli.trainer.logger).__name__ == "WandbLogger"
    monkeypatch.setenv("WANDB_MODE", "offline")  # restored by monkeypatch afterwards


def test_no_wandb_no_wandb_mode(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("WANDB_MODE", raising=False)
    AdamWCLI(args=["--config", cfg("quickstart.yaml"), f"--trainer.default_root_dir={tmp_path}"], run=False)
    assert "WANDB_MODE" not in os.environ


# ---------------------------------------------------------------------------------------------------- docs, SLURM


def test_slurm_script_is_valid_bash_and_matches_lightning() -> None:
    script = (CONFIGS / "slurm.sbatch").read_text()
    subprocess.run(["bash", "-n", str(CONFIGS / "slurm.sbatch")], check=True, timeout=30)
    directives = dict(re.findall(r"^#SBATCH --([\w-]+)(?:=(\S+))?", script, flags=re.M))
    # One task per GPU (Lightning's SLURMEnvironment checks ntasks-per-node == devices).
    assert directives["ntasks-per-node"] == directives["gpus-per-node"]
    assert directives["job-name"] not in ("bash", "interactive")
    assert directives["signal"].startswith("SIGUSR1@")
    assert "srun --kill-on-bad-exit=1" in script
    assert (
        '--trainer.num_nodes "$SLURM_NNODES"' in script
        and '--trainer.devices "$SLURM_NTASKS_PER_NODE"' in script
    )


def test_docs_name_real_configs_and_complete_torchrun_lines() -> None:
    doc = (ROOT / "docs" / "distributed.md").read_text()
    for path in set(re.findall(r"configs/[\w.]+", doc)):
        assert (ROOT / path).exists(), path
    for name in MAIN_CONFIGS + FRAGMENTS + ["slurm.sbatch"]:
        assert f"configs/{name}" in doc, name
    torchrun_lines = [line for line in doc.splitlines() if line.lstrip().startswith("torchrun --")]
    assert len(torchrun_lines) >= 4  # two nodes on a cluster, two on loopback
    for line in torchrun_lines:
        for flag in ("--nnodes=", "--nproc_per_node=", "--node_rank=", "--master_addr=", "--master_port="):
            assert flag in line, line
