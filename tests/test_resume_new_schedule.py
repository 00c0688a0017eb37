"""Resume with a learning-rate schedule the checkpoint has no state for (new in the resumed run).

Lightning restores a scheduler only from a state the checkpoint holds; a schedule new in the resumed run used to
start at its own step 0 in the middle of training (``lr_schedule="constant"`` for 4 steps, then ``"cosine"``
over 8: the cosine's first half at steps 4..7, never decaying). It now starts at the step reached, with one line.
Every test trains one epoch of 4 steps, then resumes to 2 epochs; lrs are compared with the closed forms
(rel 1e-12: a few float64 operations each).
"""

from __future__ import annotations

import logging
import math
from functools import partial
from pathlib import Path

import pytest
import torch

from lightning_adamw.schedules import warmup_cosine_factor
from tests.helpers.resume_fit import STEPS_PER_EPOCH, Probe, Three, first_run, fit, lines


def test_cosine_added_on_resume_starts_at_the_step_reached(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    _, _, ckpt = first_run(tmp_path, lr=0.01)  # constant lr: no scheduler state in the checkpoint
    probe = Probe()
    with caplog.at_level(logging.INFO, logger="lightning.pytorch"):
        trainer = fit(Three(lr=0.01, lr_schedule="cosine"), tmp_path / "second", 2, ckpt, callbacks=[probe])
    total = 2 * STEPS_PER_EPOCH
    assert sorted(probe.lrs) == list(range(STEPS_PER_EPOCH, total))
    for step, lr in probe.lrs.items():
        assert math.isclose(lr, 0.01 * warmup_cosine_factor(step, 0, total), rel_tol=1e-12), step
    assert trainer.lr_scheduler_configs[0].scheduler.last_epoch == total
    (line,) = lines(caplog, "is new in this resumed run")
    assert "WarmupCosineLR" in line and "starts at the step reached, 4" in line and "lr 0.01 -> 0.005" in line


def test_an_injected_scheduler_added_on_resume_is_stepped_to_the_step_reached(tmp_path: Path) -> None:
    """A chainable torch scheduler (LinearLR, per step) new in the resumed run: stepped 4 times first, so steps
    4..7 get the lrs an uninterrupted run with it would have (0.01 x (0.2 + 0.8·min(t, 6)/6))."""
    _, _, ckpt = first_run(tmp_path, lr=0.01)
    linear = partial(torch.optim.lr_scheduler.LinearLR, start_factor=0.2, total_iters=6)

    class Stepped(Three):
        lr_scheduler_interval = "step"

    probe = Probe()
    fit(Stepped(lr=0.01, lr_scheduler=linear), tmp_path / "second", 2, ckpt, callbacks=[probe])
    want = {t: 0.01 * (0.2 + 0.8 * min(t, 6) / 6) for t in range(STEPS_PER_EPOCH, 2 * STEPS_PER_EPOCH)}
    assert probe.lrs == pytest.approx(want, rel=1e-12)
