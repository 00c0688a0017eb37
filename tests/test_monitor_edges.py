"""Edges of WeightDecayMonitor: a figure path with folders, the figure drawn off the training thread, lr *
weight_decay at or near 1 (the weights before the step cannot be recovered), and one monitor reused for several
fits."""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

import lightning_adamw.monitor_plot as monitor_plot
from lightning_adamw.monitor import WeightDecayMonitor
from lightning_adamw.param_groups import build_param_groups
from lightning_adamw.update_split import (
    ADAMW_W_OLD_METRICS,
    W_OLD_MAX_RELATIVE_ERROR,
    update_split,
    w_old_reconstructible,
)
from tests.helpers.lit_monitor import MonitoredModule, RecordingLogger, StepRecorder, fit
from tests.helpers.monitor_reference import (
    check_split,
    compare_metrics,
    make_model,
    reference_bounds,
    reference_metrics,
    snapshot_record,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: what can be known without w_old (the rest of the per-tensor metrics need it, or only the hyperparameters)
KNOWABLE = ("grad_update_norm", "weight_norm")
#: what needs w_old
NEEDS_W_OLD = ADAMW_W_OLD_METRICS


# ---------------------------------------------------------------------------------------------------------------
# plot_filename with folders
# ---------------------------------------------------------------------------------------------------------------
def test_plot_filename_with_folders(tmp_path: Path) -> None:
    L.seed_everything(0)
    csv = CSVLogger(tmp_path / "logs")
    relative = WeightDecayMonitor(log_every_n_steps=1, plot_filename="plots/deeper/wd.png")
    fit(MonitoredModule(), [relative], tmp_path, logger=csv, max_steps=2)
    assert relative.figure_path == str(Path(csv.log_dir) / "plots" / "deeper" / "wd.png")  # under the log dir
    assert Path(relative.figure_path).read_bytes()[:8] == PNG_MAGIC

    target = tmp_path / "elsewhere" / "figs" / "wd.png"
    absolute = WeightDecayMonitor(log_every_n_steps=1, plot_filename=str(target))
    fit(MonitoredModule(), [absolute], tmp_path, logger=CSVLogger(tmp_path / "logs2"), max_steps=2)
    assert absolute.figure_path == str(target)  # as given
    assert target.read_bytes()[:8] == PNG_MAGIC

    with pytest.raises(ValueError, match="plot_filename"):
        WeightDecayMonitor(plot_filename="")


class _Events(L.Callback):
    """Records, in order, the end of each training batch and of training (callbacks run after the monitor's)."""

    def __init__(self, events: list[str]) -> None:
        self.events = events

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        self.events.append(f"batch_end {trainer.global_step}")

    def on_train_end(self, *args: Any) -> None:
        self.events.append("train_end")


def test_figure_is_drawn_off_the_training_thread_once_its_data_is_final(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """8 steps logged every 3 steps: the last point is step 5, so the figure is drawn in a background thread right
    after the 6th step, while steps 7 and 8 train; it still reaches the file and the loggers at the end."""
    events: list[str] = []
    threads: list[str] = []
    real_render, real_submit = monitor_plot.render_png, monitor_plot.FigureWriter.submit

    def render(*args: Any, **kwargs: Any) -> Any:
        threads.append("main" if threading.current_thread() is threading.main_thread() else "worker")
        return real_render(*args, **kwargs)

    def submit(self: monitor_plot.FigureWriter, *args: Any, **kwargs: Any) -> None:
        events.append("figure submitted")
        real_submit(self, *args, **kwargs)

    monkeypatch.setattr(monitor_plot, "render_png", render)
    monkeypatch.setattr(monitor_plot.FigureWriter, "submit", submit)
    L.seed_everything(0)
    monitor = WeightDecayMonitor(log_every_n_steps=3, histogram_every_n_steps=0)
    fit(
        MonitoredModule(),
        [monitor, _Events(events)],
        tmp_path,
        logger=CSVLogger(tmp_path / "logs"),
        max_steps=8,
    )
    assert threads == ["worker"]  # drawn once, off the training thread
    # handed to the background right after the 6th step (the monitor's hook runs before _Events'), before the last two
    assert events == ["batch_end 1", "batch_end 2", "batch_end 3", "batch_end 4", "batch_end 5", "figure submitted",
                      "batch_end 6", "batch_end 7", "batch_end 8", "train_end"]  # fmt: skip
    assert [p[0] for p in monitor.history["adamw/decay"]["decay_norm"]] == [2.0, 5.0]
    assert Path(monitor.figure_path or "").read_bytes()[:8] == PNG_MAGIC


def test_a_monitor_after_a_fit_can_be_pickled(tmp_path: Path) -> None:
    """(``ddp_spawn`` and other process-spawning strategies pickle the callbacks.)"""
    import pickle

    monitor = WeightDecayMonitor(log_every_n_steps=2)
    fit(MonitoredModule(), [monitor], tmp_path, logger=RecordingLogger(), max_steps=4)
    copy = pickle.loads(pickle.dumps(monitor))
    assert copy.history == monitor.history and copy.figure_path == monitor.figure_path


def test_a_figure_that_cannot_be_drawn_warns_and_training_ends_normally(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: Any, **kwargs: Any) -> Any:
        raise OSError("disk full")

    monkeypatch.setattr(monitor_plot, "render_png", broken)
    monitor = WeightDecayMonitor(log_every_n_steps=2)
    with pytest.warns(UserWarning, match="could not write the summary figure: OSError.*disk full"):
        trainer = fit(MonitoredModule(), [monitor], tmp_path, logger=RecordingLogger(), max_steps=4)
    assert trainer.global_step == 4 and monitor.figure_path is None and monitor.last_metrics


# ---------------------------------------------------------------------------------------------------------------
# lr * weight_decay at or near 1
# ---------------------------------------------------------------------------------------------------------------
def test_lr_times_weight_decay_equal_to_one_in_a_fit(tmp_path: Path) -> None:
    """AdamW multiplies the weights by 1 - lr*wd = 0: w_old is gone. The monitor must not log 0 for the decay
    (the weights lost by it are as large as they were), but say so, and log what is still known."""
    L.seed_everything(0)
    recorder, rec = StepRecorder(), RecordingLogger()
    monitor = WeightDecayMonitor(log_every_n_steps=1, per_layer=True, histogram_every_n_steps=0)
    with pytest.warns(UserWarning, match="group 'decay' has lr = 0.5 and weight_decay = 2") as warned:
        fit(MonitoredModule(lr=0.5, weight_decay=2.0), [monitor, recorder], tmp_path, logger=rec, max_steps=3)
    assert sum("cannot be recovered" in str(w.message) for w in warned) == 1  # once
    logged = rec.monitor_calls()
    assert [logged[s]["adamw/w_old_unknown_steps"] for s in range(3)] == [1.0, 2.0, 3.0]
    assert monitor.w_old_unknown_steps == 3
    for record in recorder.records:
        metrics = logged[record["step"]]
        # nothing that needs w_old, for the group and for each of its tensors: no silent 0
        assert not [
            k for k in metrics if k.startswith("adamw/decay/") and k.rsplit("/", 1)[-1] in NEEDS_W_OLD
        ]
        assert not [
            k
            for k in metrics
            if k.startswith("adamw_layer/net.0.weight/") and k.rsplit("/", 1)[-1] in NEEDS_W_OLD
        ]
        assert metrics["adamw/decay/uniform_decay_rate"] == 1.0
        # what is known is logged, and right (here grad_update_norm = ||w_new||: the update is all that is left)
        expected = {
            k: v
            for k, v in reference_metrics(record).items()
            if not (k.startswith("adamw/decay/") or "/net.0.weight/" in k or "/net.3.weight/" in k)
            or k.rsplit("/", 1)[-1] in KNOWABLE
        }
        assert "adamw/decay/grad_update_norm" in expected
        assert compare_metrics(metrics, expected, reference_bounds(record)) == {}
        # the no-decay group is untouched by it
        assert metrics["adamw/no_decay/decay_norm"] == 0.0 and "adamw/no_decay/angular_update" in metrics
    assert "decay_norm" not in monitor.history.get("adamw/decay", {})


def _one_step(dtype: torch.dtype, lr: float, weight_decay: float) -> tuple[dict[str, float], dict]:
    model = make_model(dtype)
    opt = torch.optim.AdamW(build_param_groups(model, weight_decay), lr=lr)
    gen = torch.Generator().manual_seed(0)
    record = {}
    for step in range(2):
        x = torch.randn(16, 8, generator=gen).to(dtype)

        def closure(x: torch.Tensor = x) -> None:
            opt.zero_grad()
            model(x).square().mean().backward()

        record = snapshot_record(opt, step, closure)
    split = update_split(opt)
    unknown = [g.name for g in split.w_old_unknown]
    return split, record, unknown


@pytest.mark.parametrize(
    ("dtype", "lr", "weight_decay"),
    [
        (torch.float32, 1.0, 1.0 - 1e-3),  # |1 - lr*wd| = 1e-3: w_old to about 1e-4, logged
        (torch.float32, 1.0, 1.5),  # lr*wd > 1: weights flip sign each step, w_old still known
        (torch.float64, 1.0, 1.0 - 1e-9),  # float64 keeps w_old even there
    ],
    ids=["fp32-near", "fp32-above", "fp64-very-near"],
)
def test_near_one_w_old_is_reconstructed(dtype: torch.dtype, lr: float, weight_decay: float) -> None:
    split, record, unknown = _one_step(dtype, lr, weight_decay)
    assert unknown == []
    # every metric within its derived bound of the snapshot reference (the bounds grow as 1 / |1 - lr*wd|)
    check_split(split, record)
    if lr * weight_decay > 1:  # w_new + lr*u points against w_old: the angle is pi minus the one to it
        key = "adamw/decay/angular_update"
        got, want = split.metrics()[key], reference_metrics(record)[key]
        assert abs((math.pi - got) - want) > reference_bounds(record)[key]


@pytest.mark.parametrize(
    ("dtype", "lr", "weight_decay"),
    [
        (torch.float32, 0.5, 2.0),  # exactly 1
        (torch.float32, 1.0, 1.0 - 1e-7),  # 1 - lr*wd below float32's rounding of the weights
        (torch.bfloat16, 1.0, 0.8),  # |1 - lr*wd| = 0.2: bfloat16's 2^-7 / 0.2 is more than 1/64
    ],
    ids=["fp32-one", "fp32-within-rounding", "bf16-near"],
)
def test_at_one_w_old_is_not_reported(dtype: torch.dtype, lr: float, weight_decay: float) -> None:
    split, record, unknown = _one_step(dtype, lr, weight_decay)
    assert unknown == ["decay"]
    metrics = split.metrics(per_layer=True)
    assert not [k for k in metrics if k.startswith("adamw/decay/") and k.rsplit("/", 1)[-1] in NEEDS_W_OLD]
    known = {
        k: v
        for k, v in reference_metrics(record).items()
        if k.startswith("adamw/decay/") and k.rsplit("/", 1)[-1] in KNOWABLE
    }
    assert len(known) == 2
    assert compare_metrics(metrics, known, reference_bounds(record)) == {}


def test_reconstructible_threshold_follows_the_error_bound() -> None:
    """Relative error of w_old about eps / |1 - lr*wd|; logged while that is at most 1/64."""
    assert W_OLD_MAX_RELATIVE_ERROR == 2.0**-6
    eps32 = torch.finfo(torch.float32).eps
    limit = eps32 / W_OLD_MAX_RELATIVE_ERROR  # |1 - lr*wd| = 64 eps = 7.6e-6
    assert w_old_reconstructible(1.0, 1.0 - 1.01 * limit, eps32)
    assert not w_old_reconstructible(1.0, 1.0 - 0.99 * limit, eps32)
    assert not w_old_reconstructible(0.5, 2.0, 0.0)  # exactly 1, whatever the precision
    assert w_old_reconstructible(1.0, 1.0 + 1.01 * limit, eps32)  # just above 1: same bound
    assert w_old_reconstructible(1e-3, 0.1, torch.finfo(torch.bfloat16).eps)


# ---------------------------------------------------------------------------------------------------------------
# one monitor, several fits
# ---------------------------------------------------------------------------------------------------------------
def _steps(monitor: WeightDecayMonitor) -> list[float]:
    return [s for s, _ in monitor.history["adamw/decay"]["decay_norm"]]


def test_one_monitor_two_fits_keeps_both_histories(tmp_path: Path) -> None:
    L.seed_everything(0)
    monitor = WeightDecayMonitor(log_every_n_steps=1)
    first_rec, second_rec = RecordingLogger(), RecordingLogger()
    fit(MonitoredModule(), [monitor], tmp_path / "a", logger=first_rec, max_steps=4)
    first = [list(p) for p in monitor.history["adamw/decay"]["decay_norm"]]
    assert _steps(monitor) == [0, 1, 2, 3] and monitor.fit_starts == []
    fit(MonitoredModule(lr=3e-2), [monitor], tmp_path / "b", logger=second_rec, max_steps=3)
    # the first fit's curve is kept; the second is appended after it (its steps restart at 0 in the logs)
    assert monitor.history["adamw/decay"]["decay_norm"][:4] == first
    assert _steps(monitor) == [0, 1, 2, 3, 4, 5, 6]
    assert monitor.step_offset == 4 and monitor.fit_starts == [4]
    assert sorted(second_rec.monitor_calls()) == [0, 1, 2]
    second = [v for _, v in monitor.history["adamw/decay"]["decay_norm"][4:]]
    assert second == [second_rec.monitor_calls()[s]["adamw/decay/decay_norm"] for s in range(3)]
    assert Path(monitor.figure_path or "").read_bytes()[:8] == PNG_MAGIC


def test_resume_of_a_later_fit_continues_its_curve(tmp_path: Path) -> None:
    """A checkpoint of the second fit restores the offset: a resumed run extends the same, shifted curve."""
    L.seed_everything(0)
    monitor = WeightDecayMonitor(log_every_n_steps=1, plot=False)
    fit(MonitoredModule(), [monitor], tmp_path / "a", logger=RecordingLogger(), max_steps=4)
    trainer = fit(MonitoredModule(), [monitor], tmp_path / "b", logger=RecordingLogger(), max_steps=2)
    ckpt = str(tmp_path / "second.ckpt")
    trainer.save_checkpoint(ckpt)
    assert _steps(monitor) == [0, 1, 2, 3, 4, 5]
    L.seed_everything(0)
    resumed = WeightDecayMonitor(log_every_n_steps=1, plot=False)
    fit(MonitoredModule(), [resumed], tmp_path / "b", logger=RecordingLogger(), max_steps=4, ckpt_path=ckpt)
    assert _steps(resumed) == [0, 1, 2, 3, 4, 5, 6, 7]
    assert resumed.history["adamw/decay"]["decay_norm"][:6] == monitor.history["adamw/decay"]["decay_norm"]
    assert resumed.fit_starts == [4] and resumed.step_offset == 4
    assert all(math.isfinite(v) for _, v in resumed.history["adamw/decay"]["decay_norm"])


def test_state_dict_keeps_the_offset() -> None:
    monitor = WeightDecayMonitor()
    monitor.history = {"adamw/decay": {"decay_norm": [[0.0, 1.5], [5.0, 1.0]]}}
    monitor.step_offset, monitor.fit_starts, monitor.w_old_unknown_steps = 5, [5], 2
    other = WeightDecayMonitor()
    other.load_state_dict(monitor.state_dict())
    assert (other.step_offset, other.fit_starts, other.w_old_unknown_steps) == (5, [5], 2)
    # a checkpoint written before the offset existed (version 1): one fit, offset 0
    old = WeightDecayMonitor()
    old.load_state_dict({"version": 1, "history": monitor.history, "nonfinite_steps": 0, "skipped_steps": 0})
    assert old.step_offset == 0 and old.fit_starts == []
