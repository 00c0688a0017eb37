"""Layer-wise lr decay through ``lightning-adamw fit --config configs/finetune_layer_decay.yaml``.

A transformers ViT (built from a config, no download) fine-tuned with ``layer_decay: 0.65``: the learning rates
Lightning's ``LearningRateMonitor`` logs for every group must be ``lr * 0.65 ** (L + 1 - depth)`` times the
warm-up / cosine factor, at step 0 and after the warm-up; norms and biases sit in no-decay groups at every depth;
the groups are the same from Python and from YAML; the scales follow whatever lr the optimizer gets (the
module's default AdamW, a top-level or an injected optimizer).
"""

from __future__ import annotations

import csv
import math
import re
import sys
from pathlib import Path

import pytest

from lightning_adamw.schedules import warmup_cosine_factor

pytest.importorskip("transformers", reason="transformers is a dev extra: pip install -e '.[dev]'")

from lightning_adamw.cli import AdamWCLI
from lightning_adamw.finetune import ViTFineTuner

CONFIG = str(Path(__file__).resolve().parents[1] / "configs" / "finetune_layer_decay.yaml")
STEPS, WARMUP, LR, DECAY = 6, 3, 1e-3, 0.65
DEPTH = 4  # ViTFineTuner's default number of blocks: L = 4, the head at depth 5


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning-adamw"])


def fit(tmp_path: Path, *extra: str) -> AdamWCLI:
    args = [
        "fit",
        "--config",
        CONFIG,
        f"--trainer.max_steps={STEPS}",
        "--trainer.log_every_n_steps=1",
        "--trainer.limit_val_batches=0",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={tmp_path}",
        f"--model.warmup_steps={WARMUP}",
        *extra,
    ]
    return AdamWCLI(args=args)


def logged_lrs(cli: AdamWCLI) -> list[dict[str, float]]:
    """Per step, the lr of every group as LearningRateMonitor wrote it to the CSV log."""
    path = Path(cli.trainer.logger.log_dir) / "metrics.csv"
    rows = list(csv.DictReader(path.open()))
    out = []
    for row in rows:
        lrs = {k[len("lr-AdamW/") :]: float(v) for k, v in row.items() if k.startswith("lr-AdamW/") and v}
        if lrs:
            out.append(lrs)
    return out


def test_fit_from_the_config_logs_lr_times_decay_per_depth_at_step_0_and_after_warmup(tmp_path: Path) -> None:
    cli = fit(tmp_path)
    groups = cli.trainer.optimizers[0].param_groups
    depth = {g["name"]: g["layer_depth"] for g in groups}
    assert set(depth.values()) == set(range(DEPTH + 2))
    # Norms and biases are in no-decay groups at every depth.
    for group in groups:
        kind = group["name"].split("/")[0]
        for name in group["param_names"]:
            undecayed = re.search(r"bias|layernorm", name) is not None
            assert (kind == "no_decay") == undecayed, name
            assert group["weight_decay"] == (0.0 if undecayed else 0.05)
    steps = logged_lrs(cli)
    assert len(steps) == STEPS and set(steps[0]) == set(depth)
    for step in (0, WARMUP):  # the first step, and the first step after the warm-up (factor 1)
        factor = warmup_cosine_factor(step, WARMUP, STEPS, 0.01)
        for name, lr in steps[step].items():
            expected = LR * DECAY ** (DEPTH + 1 - depth[name]) * factor
            # The CSV holds repr floats; lr * scale * factor is three roundings of 2**-53 apart from exact.
            assert math.isclose(lr, expected, rel_tol=1e-12), (step, name, lr, expected)
    assert warmup_cosine_factor(WARMUP, WARMUP, STEPS, 0.01) == 1.0


def test_same_groups_from_python_and_from_yaml(tmp_path: Path) -> None:
    cli = fit(tmp_path, "--trainer.max_steps=1")
    from_yaml = [
        (g["name"], g["param_names"], g["initial_lr"], g["weight_decay"], g["lr_scale"], g["layer_depth"])
        for g in cli.trainer.optimizers[0].param_groups
    ]
    module = ViTFineTuner(lr=LR, weight_decay=0.05, layer_decay=DECAY, warmup_steps=WARMUP, min_lr_ratio=0.01)
    optimizer = module.configure_optimizers()["optimizer"]
    from_python = [
        (g["name"], g["param_names"], g["initial_lr"], g["weight_decay"], g["lr_scale"], g["layer_depth"])
        for g in optimizer.param_groups
    ]
    assert from_python == from_yaml


@pytest.mark.parametrize(
    "optimizer",
    [
        ["--optimizer=AdamW", "--optimizer.lr=0.002"],
        ["--model.optimizer=AdamW", "--model.optimizer.lr=0.002"],
    ],
    ids=["top-level", "injected"],
)
def test_overrides_from_yaml_and_scales_on_a_cli_optimizer(tmp_path: Path, optimizer: list[str]) -> None:
    overrides = '[{pattern: "model.classifier.*", name: cls, lr_scale: 2.0}]'
    cli = fit(
        tmp_path,
        "--trainer.max_steps=1",
        "--model.layer_decay=0.5",
        f"--model.group_overrides={overrides}",
        *optimizer,
    )
    initial = {g["name"]: g["initial_lr"] for g in cli.trainer.optimizers[0].param_groups}
    assert initial["decay/head/cls"] == 0.002 * 2.0
    assert initial["no_decay/head"] == 0.002  # the final layernorm: head depth, no override
    assert initial["decay/layer_2"] == 0.002 * 0.5 ** (DEPTH + 1 - 2)
    assert initial["no_decay/embed"] == 0.002 * 0.5 ** (DEPTH + 1)


def test_one_cycle_with_one_max_lr_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"scales \(layer_decay, group_overrides\) are lost"):
        fit(
            tmp_path,
            "--trainer.max_steps=1",
            "--lr_scheduler=OneCycleLR",
            "--lr_scheduler.max_lr=0.01",
            "--lr_scheduler.total_steps=1",
        )
