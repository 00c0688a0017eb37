"""``lightning-adamw`` with weight decay over time: ``--model.weight_decay_schedule``, YAML, the top-level
``--weight_decay_schedule``, the EMA-timescale options, and the options refused before anything is built.

In-process ``AdamWCLI`` fits of a tiny regressor (64 rows, batch 16: 4 optimizer steps per epoch); the
``weight_decay`` each step applied is asserted against the formulas (rel 1e-12: float64 rounding of a few
products and one cosine).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import pytest

from lightning_adamw.cli import AdamWCLI
from lightning_adamw.schedules import warmup_cosine_factor
from lightning_adamw.weight_decay import decay_factor
from tests.helpers.cli_models import AppliedProbe

MODEL = "tests.helpers.cli_models.ScheduledRegressor"  # lr 0.05, weight_decay 0.2
DATA = "tests.helpers.cli_models.RegressionData"
REL = 1e-12
FAST = [
    f"--data={DATA}",
    "--trainer.max_steps=4",
    "--trainer.limit_val_batches=0",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--trainer.enable_checkpointing=false",
    "--trainer.logger=false",
    "--trainer.accelerator=cpu",
    "--trainer.callbacks+=tests.helpers.cli_models.AppliedProbe",
]


@pytest.fixture(autouse=True)
def _no_pytest_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lightning-adamw"])


def fit(tmp_path: Path, *args: str) -> list[list[float]]:
    cli = AdamWCLI(args=["fit", f"--trainer.default_root_dir={tmp_path}", *FAST, *args])
    return next(c for c in cli.trainer.callbacks if isinstance(c, AppliedProbe)).wd


def test_model_option_adamc_follows_the_lr_schedule(tmp_path: Path) -> None:
    wd = fit(
        tmp_path,
        f"--model={MODEL}",
        "--model.weight_decay_schedule=adamc",
        "--model.lr_schedule=cosine",
        "--model.warmup_steps=1",
    )
    assert [w[0] for w in wd] == pytest.approx(
        [0.2 * warmup_cosine_factor(t, 1, 4) for t in range(4)], rel=REL
    )
    assert [w[1] for w in wd] == [0.0] * 4


def test_dict_form_in_yaml(tmp_path: Path) -> None:
    config = tmp_path / "wd.yaml"
    config.write_text(
        f"model:\n  class_path: {MODEL}\n  init_args:\n    weight_decay_schedule:\n"
        "      name: cosine\n      final_ratio: 0.5\n"
    )
    wd = fit(tmp_path, f"--config={config}")
    want = [0.2 * decay_factor("cosine", t, warmup_steps=0, total_steps=4, final_ratio=0.5) for t in range(4)]
    assert [w[0] for w in wd] == pytest.approx(want, rel=REL)


def test_top_level_option_for_a_model_without_the_argument(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """UserRegressor has no weight_decay_schedule argument: the top-level option reaches it, and the line on what
    trains with a top-level optimizer names the schedule."""
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        wd = fit(
            tmp_path,
            "--model=tests.helpers.cli_models.UserRegressor",
            "--weight_decay_schedule={name: linear, final_ratio: 0.0}",
            "--optimizer=AdamW",
            "--optimizer.lr=0.01",
            "--optimizer.weight_decay=0.1",
        )
    assert [w[0] for w in wd] == pytest.approx([0.1 * (1 - t / 4) for t in range(4)], rel=REL)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "weight decay schedule: linear (linear to 0 at step 4) on groups decay" in text
    assert "weight_decay_schedule={'name': 'linear', 'final_ratio': 0.0} (--weight_decay_schedule)" in text


def test_timescale_from_the_command_line(tmp_path: Path) -> None:
    """λ = 1/(lr·τ), τ = 0.5 of the 4 planned steps, lr 0.05: λ = 10."""
    wd = fit(tmp_path, f"--model={MODEL}", "--model.ema_timescale_fraction=0.5", "--model.weight_decay=null")
    assert [w[0] for w in wd] == pytest.approx([1.0 / (0.05 * 2.0)] * 4, rel=REL)


def test_timescale_with_a_top_level_optimizer_uses_its_lr(tmp_path: Path) -> None:
    """AdamW's own default weight_decay (0.01, filled in by the parser) is not "given": λ = 1/(0.01·2) = 50 on
    the decay group, which took the optimizer's default; no_decay stays 0."""
    wd = fit(
        tmp_path,
        f"--model={MODEL}",
        "--model.ema_timescale_fraction=0.5",
        "--optimizer=AdamW",
        "--optimizer.lr=0.01",
    )
    assert wd == [[pytest.approx(50.0, rel=REL), 0.0]] * 4


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--model.weight_decay_schedule=adamw"],
            "--model.weight_decay_schedule: unknown weight decay schedule 'adamw': `weight_decay_schedule` must "
            "be one of 'constant', 'independent', 'adamc', 'cosine', 'linear'",
        ),
        (
            ["--model.weight_decay_schedule={name: adamc, final_ratio: 0.1}"],
            "weight decay schedule 'adamc' does not use `final_ratio`",
        ),
        (
            ["--model.weight_decay_schedule=adamc", "--weight_decay_schedule=cosine"],
            "--model.weight_decay_schedule 'adamc' and --weight_decay_schedule 'cosine' are both given",
        ),
        (
            ["--model.ema_timescale_fraction=0.5", "--model.weight_decay=0.1"],
            "--model.weight_decay and --model.ema_timescale_fraction: `weight_decay` and `ema_timescale_fraction`"
            " are both given",
        ),
        (
            ["--model.ema_timescale_fraction=0.5", "--optimizer=AdamW", "--optimizer.weight_decay=0.1"],
            "--model.ema_timescale_fraction and --optimizer.weight_decay",
        ),
    ],
    ids=["unknown", "misplaced-option", "twice", "timescale+weight_decay", "timescale+optimizer"],
)
def test_refused_before_anything_is_built(
    args: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        AdamWCLI(args=[f"--model={MODEL}", *args], run=False)
    assert exit_info.value.code == 2
    assert message in " ".join(capsys.readouterr().err.split())
