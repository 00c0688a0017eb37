"""Resume through ``Trainer.fit(ckpt_path=...)``: the new run's configuration wins, moments follow their tensors.

Each test trains a tiny module for one epoch (4 optimizer steps), then resumes from the checkpoint with a changed
configuration and asserts on the optimizer's groups, its state, the schedule and what was printed / logged.
"""

from __future__ import annotations

import logging
import math
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml
from lightning.pytorch.loggers import CSVLogger

from lightning_adamw.schedules import warmup_cosine_factor
from tests.helpers.resume_fit import (
    STEPS_PER_EPOCH,
    Probe,
    Three,
    first_run,
    fit,
    lines,
    own_moments,
)


@pytest.mark.parametrize(
    ("before", "after", "moved"),
    [
        (None, ["c.weight"], [("c.weight", "decay", "no_decay")]),  # group sizes change
        (
            ["re:^[ab]\\.weight$"],
            ["re:^[bc]\\.weight$"],
            [("a.weight", "no_decay", "decay"), ("c.weight", "decay", "no_decay")],
        ),  # same sizes
    ],
)
def test_regrouped_resume_gives_every_tensor_its_own_moments(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, before: list[str] | None, after: list[str], moved: list
) -> None:
    first, trainer, ckpt = first_run(tmp_path, no_decay_patterns=before)
    want = own_moments(first, trainer.optimizers[0])
    torch.manual_seed(1)
    second = Three(no_decay_patterns=after)
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        trainer = fit(second, tmp_path / "second", 1, ckpt)  # max_epochs=1: restored, no further step
    optimizer = trainer.optimizers[0]
    got = own_moments(second, optimizer)
    for name, moment in want.items():
        assert torch.equal(got[name], moment), name
    names = {id(p): n for n, p in second.named_parameters()}
    for group in optimizer.param_groups:
        assert group["param_names"] == [names[id(p)] for p in group["params"]]
    (line,) = lines(caplog, "resumed optimizer state")
    for name, old, new in moved:
        assert f"{name} moved {old} -> {new}" in line
    assert "0 tensors start fresh" in line


def test_resume_with_new_weight_decay_and_lr_applies_them_everywhere(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The table printed at fit start, the logged hparams and optimizer.param_groups agree: the new values."""
    first_run(tmp_path, lr=0.05, weight_decay=0.1)
    probe = Probe()
    logger = CSVLogger(tmp_path, name="second")
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        fit(
            Three(lr=0.02, weight_decay=0.3),
            tmp_path / "second",
            2,
            str(next((tmp_path / "first" / "ckpt").glob("*.ckpt"))),
            callbacks=[probe],
            logger=logger,
        )
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in probe.groups] == [
        ("decay", 0.02, 0.3),
        ("no_decay", 0.02, 0.0),
    ]
    assert set(probe.lrs.values()) == {0.02}  # every resumed step
    (table,) = lines(caplog, "lightning-adamw parameter groups")
    assert table.splitlines()[3].split()[:2] == ["decay", "0.3"]
    hparams = yaml.unsafe_load((Path(logger.log_dir) / "hparams.yaml").read_text())
    assert (hparams["lr"], hparams["weight_decay"]) == (0.02, 0.3)
    (line,) = lines(caplog, "resumed optimizer state")
    assert "decay weight_decay 0.1 -> 0.3" in line and "decay lr 0.05 -> 0.02" in line


def test_longer_resumed_run_follows_the_longer_cosine_schedule(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """1 epoch of cosine, then resumed to 3 epochs: the added steps follow the 12-step schedule from step 4 (not
    the floor of the 4-step one), with the new base lr, and one line says so."""
    first_run(tmp_path, lr=0.05, lr_schedule="cosine", warmup_steps=1, min_lr_ratio=0.1)
    probe = Probe()
    ckpt = str(next((tmp_path / "first" / "ckpt").glob("*.ckpt")))
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        trainer = fit(
            Three(lr=0.02, lr_schedule="cosine", warmup_steps=1, min_lr_ratio=0.1),
            tmp_path / "second",
            3,
            ckpt,
            callbacks=[probe],
        )
    total = 3 * STEPS_PER_EPOCH
    assert trainer.lr_scheduler_configs[0].scheduler.total_steps == total
    assert sorted(probe.lrs) == list(range(STEPS_PER_EPOCH, total))
    for step, lr in probe.lrs.items():
        assert math.isclose(lr, 0.02 * warmup_cosine_factor(step, 1, total, 0.1), rel_tol=1e-12), step
    (line,) = lines(caplog, "WarmupCosineLR: total_steps 4 -> 12")
    assert (
        "(the resumed trainer is longer)" in line and "from step 4" in line and "base lr 0.05 -> 0.02" in line
    )


def test_injected_scheduler_keeps_its_progress_on_the_new_base_lr(tmp_path: Path) -> None:
    """A torch scheduler (StepLR, stepped per epoch) restores its progress; base_lrs and lr follow the new lr."""
    step_lr = partial(torch.optim.lr_scheduler.StepLR, step_size=1, gamma=0.5)
    _, trainer, ckpt = first_run(tmp_path, lr=0.04, lr_scheduler=step_lr)
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.02  # one epoch: one halving
    probe = Probe()
    trainer = fit(Three(lr=0.08, lr_scheduler=step_lr), tmp_path / "second", 2, ckpt, callbacks=[probe])
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.base_lrs == [0.08, 0.08]
    assert [g["lr"] for g in probe.groups] == [0.04, 0.04]  # the new base, halved once: progress kept
    assert [g["lr"] for g in trainer.optimizers[0].param_groups] == [0.02, 0.02]  # and halved again


def test_plateau_scheduler_keeps_the_reduced_lr_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    plateau = partial(torch.optim.lr_scheduler.ReduceLROnPlateau, patience=0, factor=0.5)

    class Flat(Three):
        def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
            self.log("val_loss", 1.0)  # never improves: halve every epoch
            return super().training_step(batch, batch_idx)

    torch.manual_seed(0)
    fit(Flat(lr=0.04, lr_scheduler=plateau), tmp_path / "first", 3)
    ckpt = str(sorted((tmp_path / "first" / "ckpt").glob("*.ckpt"))[-1])
    probe = Probe()
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        caplog.clear()
        fit(Flat(lr=0.08, lr_scheduler=plateau), tmp_path / "second", 4, ckpt, callbacks=[probe])
    saved_lr = torch.load(ckpt, weights_only=False)["optimizer_states"][0]["param_groups"][0]["lr"]
    assert saved_lr < 0.04
    assert [g["lr"] for g in probe.groups] == [saved_lr, saved_lr]
    (line,) = lines(caplog, "resumed optimizer state")
    assert f"kept from the checkpoint: decay lr {saved_lr:.6g} (configured 0.08)" in line


def test_own_configure_optimizers_with_decoupled_param_groups_is_remapped_too(tmp_path: Path) -> None:
    class Own(Three):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.decoupled_param_groups(), lr=self.hparams.lr, betas=(0.9, 0.95))

    torch.manual_seed(0)
    first = Own()
    trainer = fit(first, tmp_path / "first", 1)
    want = own_moments(first, trainer.optimizers[0])
    second = Own(no_decay_patterns=["re:^[ab]\\.weight$"], lr=0.01)
    trainer = fit(second, tmp_path / "second", 1, str(next((tmp_path / "first" / "ckpt").glob("*.ckpt"))))
    got = own_moments(second, trainer.optimizers[0])
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert [(g["name"], g["lr"]) for g in trainer.optimizers[0].param_groups] == [
        ("decay", 0.01),
        ("no_decay", 0.01),
    ]


def test_checkpoint_without_names_and_other_group_sizes_is_a_clear_error(tmp_path: Path) -> None:
    class Plain(Three):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(self.parameters(), lr=0.01)

    class Split(Three):
        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(
                [
                    {"params": [self.a.weight, self.b.weight]},
                    {"params": [self.c.weight, *self.out.parameters()]},
                ]
            )

    fit(Plain(), tmp_path / "first", 1)
    ckpt = str(next((tmp_path / "first" / "ckpt").glob("*.ckpt")))
    with pytest.raises(
        ValueError, match=r"checkpoint's groups \[group0: 5 tensors\].*\[group0: 2 tensors, group1: 3"
    ):
        fit(Split(), tmp_path / "second", 2, ckpt)
