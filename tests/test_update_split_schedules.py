"""The monitor stays exact under every weight-decay schedule (issue 14): in a real ``Trainer.fit`` with the mixin's
``weight_decay_schedule`` and a warm-up + cosine learning rate, at every step ``decay_norm`` is
``lr_t * weight_decay_t * ||w_old||`` with the values that step applied, and every other metric matches the
float64 reference from parameter snapshots within its derived bound (``tests/helpers/monitor_reference.py``).

That the recorded ``weight_decay_t`` is the one the step applied is checked on its own, from the snapshots and
the optimizer's state: ``(1 - lr_t * weight_decay_t) * w_old - lr_t * u`` reproduces the stored ``w_new``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_adamw import DecoupledWeightDecayMixin, WeightDecayMonitor
from lightning_adamw.update_split.backends.reference import adam_update
from tests.helpers.lit_monitor import RecordingLogger, StepRecorder, fit
from tests.helpers.monitor_reference import compare_metrics, reference_bounds, reference_metrics
from tests.helpers.tolerance import gamma, unit_roundoff

STEPS = 8


class Net(DecoupledWeightDecayMixin, L.LightningModule):
    """Linear-LayerNorm-Linear; groups ``decay`` (2 matrices) and ``no_decay``."""

    def __init__(self, weight_decay: float, weight_decay_schedule: Any) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.lr = 0.01
        self.lr_schedule = "cosine"
        self.warmup_steps = 2
        self.body = nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.Linear(16, 1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self.body(x), y)

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(0)
        x = torch.randn(32, 4, generator=g)
        return DataLoader(TensorDataset(x, x.sum(1, keepdim=True)), batch_size=4)


SCHEDULES: dict[str, tuple[float, Any]] = {
    "constant": (0.1, "constant"),
    "independent": (1e-3, "independent"),  # (lambda per step: torch's weight_decay is lambda / lr_max)
    "adamc": (0.1, "adamc"),
    "cosine": (0.1, {"name": "cosine", "final_ratio": 0.1}),
    "linear": (0.1, {"name": "linear", "warmup_steps": 2}),
}


@pytest.mark.parametrize("schedule", list(SCHEDULES))
def test_update_split_exact_under_every_schedule(schedule: str, tmp_path: Path) -> None:
    weight_decay, setting = SCHEDULES[schedule]
    monitor, recorder, logger = (
        WeightDecayMonitor(log_every_n_steps=1, plot=False),
        StepRecorder(),
        RecordingLogger(),
    )
    trainer = fit(Net(weight_decay, setting), [monitor, recorder], tmp_path, logger=logger, max_steps=STEPS)
    calls = logger.monitor_calls()
    assert len(recorder.records) == STEPS and sorted(calls) == list(range(STEPS))
    for record in recorder.records:
        logged = calls[record["step"]]
        expected = reference_metrics(record, per_layer=False)
        bad = compare_metrics(logged, expected, reference_bounds(record, per_layer=False))
        assert bad == {}, (schedule, record["step"], bad)
    applied = [(r["groups"][0]["lr"], r["groups"][0]["weight_decay"]) for r in recorder.records]
    assert all(r["groups"][1]["weight_decay"] == 0.0 for r in recorder.records)  # no_decay stays 0
    if (
        schedule == "independent"
    ):  # torch's weight_decay is lambda / lr_max, so lr_t * wd = lambda * lr_t / lr_max
        assert [wd for _, wd in applied] == pytest.approx([weight_decay / 0.01] * STEPS, rel=1e-12)
    elif schedule != "constant":  # the schedule really moved the decay the monitor had to follow
        assert len({wd for _, wd in applied}) >= STEPS // 2, applied
    _check_applied(trainer.optimizers[0], recorder.records[-1])


def _check_applied(opt: torch.optim.Optimizer, record: dict[str, Any]) -> None:
    """The recorded lr and weight_decay reproduce the last step: ``w_new = (1 - lr*wd) w_old - lr*u`` (``lr*u``
    from the optimizer's state after it), to float32 rounding of the stored weights and of torch's step."""
    for group, rg in zip(opt.param_groups, record["groups"], strict=True):
        lr, wd = rg["lr"], rg["weight_decay"]
        for p, old, new in zip(group["params"], rg["old"], rg["new"], strict=True):
            st = opt.state[p]
            b = adam_update(
                st["exp_avg"], st["exp_avg_sq"], step=float(st["step"]), lr=lr, betas=group["betas"],
                eps=group["eps"],
            )  # fmt: skip
            predicted = (1.0 - lr * wd) * old - b
            # torch: w*(1 - lr*wd) rounded, the step's ~6 float32 roundings relative to |b|, the sum rounded
            u = unit_roundoff(torch.float32)
            bound = 2 * u * (old.abs() + new.abs()) + gamma(8, u) * b.abs()
            assert bool(((new - predicted).abs() <= bound).all()), (rg["label"], wd)
            # a wrong decay (the unscheduled base value) would not reproduce it where the decay matters
            if wd > 0 and group.get("base_weight_decay", wd) != wd:
                wrong = (1.0 - lr * group["base_weight_decay"]) * old - b
                assert not bool(((new - wrong).abs() <= bound).all()), rg["label"]
