"""WeightDecayMonitor inside real ``Trainer.fit`` runs, compared with snapshots taken around real steps."""

from __future__ import annotations

import csv
import doctest
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger

import lightning_adamw.monitor as monitor_module
from lightning_adamw.monitor import WeightDecayMonitor
from tests.helpers.lit_monitor import MonitoredModule, RecordingLogger, StepRecorder, finite_everywhere, fit
from tests.helpers.monitor_reference import compare_metrics, reference_bounds, reference_metrics
from tests.helpers.tolerance import SAFETY, gamma, unit_roundoff
from tests.helpers.wandb_reader import iter_records, read_run, wandb_offline  # noqa: F401  (pytest fixture)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
U32, U64 = unit_roundoff(torch.float32), unit_roundoff(torch.float64)


def check_against_snapshots(
    recorder: StepRecorder, logger: RecordingLogger, adam_family: bool = True
) -> dict[int, dict[str, float]]:
    """Every recorded step was logged, each metric within its derived error bound of the snapshot reference."""
    logged = logger.monitor_calls()
    assert recorder.records, "no optimizer step recorded"
    per_layer = any("_layer/" in key for metrics in logged.values() for key in metrics)
    for record in recorder.records:
        step = record["step"]
        assert step in logged, f"step {step} not logged; logged steps {sorted(logged)}"
        expected = reference_metrics(record, adam_family=adam_family, per_layer=per_layer)
        bounds = reference_bounds(record, adam_family=adam_family, per_layer=per_layer)
        bad = compare_metrics(logged[step], expected, bounds)
        assert bad == {}, f"step {step}: {bad}"
    return logged


@pytest.mark.parametrize(
    ("dtype", "optimizer_kwargs"),
    [(torch.float32, {"foreach": True}), (torch.float64, {"foreach": False, "amsgrad": True})],
    ids=["fp32-foreach", "fp64-for_loop-amsgrad"],
)
def test_exact_with_clipping_and_accumulation(
    tmp_path: Path, dtype: torch.dtype, optimizer_kwargs: dict[str, Any]
) -> None:
    """Numbers are those of the step actually applied: accumulated over 2 batches, then clipped to norm 0.05."""
    L.seed_everything(0)
    module = MonitoredModule(dtype=dtype, optimizer_kwargs=optimizer_kwargs)
    recorder, logger = StepRecorder(), RecordingLogger()
    monitor = WeightDecayMonitor(log_every_n_steps=1, per_layer=True, histogram_every_n_steps=0)
    trainer = fit(
        module,
        [monitor, recorder],
        tmp_path,
        logger=logger,
        max_steps=6,
        gradient_clip_val=0.05,
        accumulate_grad_batches=2,
    )
    assert trainer.global_step == 6 and len(recorder.records) == 6
    logged = check_against_snapshots(recorder, logger)
    for record in recorder.records:
        grads = torch.cat(
            [g.reshape(-1) for group in record["groups"] for g in group["grad"] if g is not None]
        )
        # the gradient the optimizer saw was clipped to norm 0.05: torch scales by 0.05 / (norm + 1e-6), with
        # the norm summed over n elements in the parameters' dtype and the scaling rounded (3 roundings more)
        u = unit_roundoff(dtype)
        rel = 1e-6 / 0.05 + gamma(grads.numel() + 3, u)
        assert float(torch.linalg.vector_norm(grads)) == pytest.approx(0.05, rel=SAFETY * rel, abs=0)
        assert logged[record["step"]]["adamw/no_decay/decay_norm"] == 0.0
        assert logged[record["step"]]["adamw/decay/decay_norm"] > 0.0
    assert sorted(logged) == list(range(6))


@pytest.mark.parametrize("scheduler", ["lambda", "onecycle"])
def test_lr_is_read_when_the_step_happens(tmp_path: Path, scheduler: str) -> None:
    """A step-interval scheduler changes lr right after each step; the monitor must use the lr of the step.

    float64, so that the storage rounding of fp32 weights (comparable to OneCycle's tiny first steps) does not
    blur a strict comparison.
    """
    L.seed_everything(0)
    module = MonitoredModule(scheduler=scheduler, dtype=torch.float64)
    recorder, logger = StepRecorder(), RecordingLogger()
    fit(
        module,
        [WeightDecayMonitor(log_every_n_steps=1, histogram_every_n_steps=0), recorder],
        tmp_path,
        logger=logger,
        max_steps=6,
    )
    logged = check_against_snapshots(recorder, logger)
    lrs = [r["groups"][0]["lr"] for r in recorder.records]
    for record, next_lr in zip(recorder.records[:-1], lrs[1:], strict=True):
        used_lr = record["groups"][0]["lr"]
        # reading lr one step late would give this decay_norm, which the derived bound rejects
        key = "adamw/decay/decay_norm"
        late = next_lr / used_lr * logged[record["step"]][key]
        assert abs(late - reference_metrics(record)[key]) > reference_bounds(record)[key], record["step"]


def test_adam_and_adamw_without_decay_are_identical(tmp_path: Path) -> None:
    """With weight_decay=0 the monitor sees bit-identical Adam and AdamW trajectories."""
    runs = []
    for name in ("adam", "adamw"):
        L.seed_everything(0)
        module = MonitoredModule(optimizer=name, weight_decay=0.0)
        logger = RecordingLogger()
        fit(
            module,
            [WeightDecayMonitor(log_every_n_steps=1, per_layer=True)],
            tmp_path / name,
            logger=logger,
            max_steps=6,
        )
        runs.append((module, logger.monitor_calls()))
    (adam, adam_logged), (adamw, adamw_logged) = runs
    for p, q in zip(adam.parameters(), adamw.parameters(), strict=True):
        assert torch.equal(p, q)
    assert adam_logged == adamw_logged
    assert all(m["adamw/decay/decay_norm"] == 0.0 for m in adam_logged.values())
    assert len(adam_logged) == 6


def test_csv_logger_round_trip(tmp_path: Path) -> None:
    L.seed_everything(0)
    csv_logger, rec = CSVLogger(tmp_path / "csv"), RecordingLogger()
    monitor = WeightDecayMonitor(log_every_n_steps=2, per_layer=True)
    fit(MonitoredModule(), [monitor], tmp_path, logger=[csv_logger, rec], max_steps=8)
    with open(Path(csv_logger.log_dir) / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    logged = rec.monitor_calls()
    assert sorted(logged) == [1, 3, 5, 7]
    keys = [k for k in logged[1] if k.startswith(("adamw/", "adamw_layer/"))]
    assert "adamw_layer/net.0.weight/decay_norm" in keys
    for key in keys:
        from_csv = [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        assert from_csv == [(step, logged[step][key]) for step in sorted(logged) if key in logged[step]], key
    # summary figure beside the logs
    assert monitor.figure_path == str(Path(csv_logger.log_dir) / "weight_decay_monitor.png")
    assert Path(monitor.figure_path).read_bytes()[:8] == PNG_MAGIC


def test_tensorboard_round_trip(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    L.seed_everything(0)
    tb_logger, rec = TensorBoardLogger(tmp_path / "tb"), RecordingLogger()
    monitor = WeightDecayMonitor(log_every_n_steps=2, histogram_every_n_steps=4)
    fit(MonitoredModule(), [monitor], tmp_path, logger=[tb_logger, rec], max_steps=8)
    tb_logger.experiment.flush()
    acc = EventAccumulator(tb_logger.log_dir, size_guidance={"scalars": 0, "histograms": 0, "images": 0})
    acc.Reload()
    logged = rec.monitor_calls()
    for key in ("adamw/decay/decay_norm", "adamw/decay/grad_update_norm", "adamw/no_decay/weight_norm"):
        events = [(e.step, e.value) for e in acc.Scalars(key)]
        expected = [(step, logged[step][key]) for step in sorted(logged)]
        assert [s for s, _ in events] == [s for s, _ in expected] == [1, 3, 5, 7]
        for (_, got), (_, want) in zip(events, expected, strict=True):
            assert got == pytest.approx(want, rel=U32, abs=0)  # TensorBoard stores float32: one rounding
    hist = acc.Histograms("adamw_hist/decay/decay_to_grad_ratio")
    assert [h.step for h in hist] == [3, 7]
    assert hist[0].histogram_value.num == 2  # two decayed matrices in the group
    assert "adamw/summary" in acc.Tags()["images"]
    assert Path(monitor.figure_path or "").parent == Path(tb_logger.log_dir)


@pytest.mark.usefixtures("wandb_offline")
def test_wandb_offline_round_trip(tmp_path: Path) -> None:
    L.seed_everything(0)
    save_dir = tmp_path / "wandb_run"
    save_dir.mkdir()
    wb_logger = WandbLogger(project="lightning-adamw-test", save_dir=str(save_dir), offline=True)
    rec = RecordingLogger()
    monitor = WeightDecayMonitor(log_every_n_steps=2, per_layer=True, histogram_every_n_steps=4)
    fit(MonitoredModule(), [monitor], tmp_path, logger=[wb_logger, rec], max_steps=8)
    wb_logger.experiment.finish()
    run = read_run(save_dir, timeout=30)
    logged = rec.monitor_calls()
    keys = [k for k in logged[1] if k.startswith(("adamw/", "adamw_layer/"))]
    assert len(keys) > 40
    for key in keys:
        series = run.series(key, step_key="trainer/global_step")
        assert series == [(step, logged[step][key]) for step in sorted(logged) if key in logged[step]], key
    hist_rows = run.rows_with("adamw_hist/decay/decay_to_grad_ratio")
    assert [r["trainer/global_step"] for r in hist_rows] == [3, 7]
    assert hist_rows[0]["adamw_hist/decay/decay_to_grad_ratio"]["_type"] == "histogram"
    image_rows = run.rows_with("adamw/summary")
    assert len(image_rows) == 1 and image_rows[0]["trainer/global_step"] == 8
    # charts of the monitor's metrics use the trainer step as x axis
    globs = {
        r.metric.glob_name: r.metric.step_metric
        for r in iter_records(run.path)
        if r.WhichOneof("record_type") == "metric" and r.metric.glob_name
    }
    for prefix in ("adamw/*", "adamw_layer/*", "adamw_hist/*", "adam_l2/*", "optim/*"):
        assert globs.get(prefix) == "trainer/global_step", (prefix, globs)


def test_resume_continues_the_same_curves(tmp_path: Path) -> None:
    def run(max_steps: int, ckpt_path: str | None = None, save: str | None = None) -> WeightDecayMonitor:
        L.seed_everything(0)
        monitor = WeightDecayMonitor(log_every_n_steps=1, plot=False)
        trainer = fit(
            MonitoredModule(data_size=32, nan_at_step=5),  # 4 steps per epoch; NaN at step 5
            [monitor],
            tmp_path,
            logger=RecordingLogger(),
            max_steps=max_steps,
            ckpt_path=ckpt_path,
        )
        if save:
            trainer.save_checkpoint(save)
        return monitor

    with pytest.warns(UserWarning, match="NaN/inf"):
        straight = run(8)
    ckpt = str(tmp_path / "half.ckpt")
    run(4, save=ckpt)
    with pytest.warns(UserWarning, match="NaN/inf"):
        resumed = run(8, ckpt_path=ckpt)
    assert straight.history.keys() == resumed.history.keys() == {"adamw/decay", "adamw/no_decay"}
    for key, series in straight.history.items():
        assert resumed.history[key].keys() == series.keys()
        for name, points in series.items():
            assert resumed.history[key][name] == points, (key, name)
            assert [int(s) for s, _ in points] == [0, 1, 2, 3, 4]  # steps 5-7 are NaN and left out
    assert straight.nonfinite_steps == resumed.nonfinite_steps == 3


def test_non_finite_gradients_are_counted_not_crashed(tmp_path: Path) -> None:
    L.seed_everything(0)
    rec = RecordingLogger()
    monitor = WeightDecayMonitor(log_every_n_steps=1, per_layer=True)
    with pytest.warns(UserWarning, match="NaN/inf") as warned:
        fit(MonitoredModule(nan_at_step=3), [monitor], tmp_path, logger=rec, max_steps=6)
    assert sum("NaN/inf" in str(w.message) for w in warned) == 1
    logged = rec.monitor_calls()
    assert sorted(logged) == list(range(6))
    assert finite_everywhere(rec.calls, lambda k: k.startswith("adamw"))
    assert [logged[s]["adamw/nonfinite_steps"] for s in range(6)] == [0, 0, 0, 1, 2, 3]
    assert [logged[s]["adamw/nonfinite_tensors"] for s in range(6)] == [0, 0, 0, 6, 6, 6]
    assert "adamw/decay/decay_norm" in logged[2] and "adamw/decay/decay_norm" not in logged[3]
    assert monitor.nonfinite_steps == 3


def test_optimizer_without_adam_state_warns_once(tmp_path: Path) -> None:
    L.seed_everything(0)
    recorder, rec = StepRecorder(), RecordingLogger()
    with pytest.warns(UserWarning, match="SGD has no Adam state") as warned:
        fit(
            MonitoredModule(optimizer="sgd", lr=0.05),
            [WeightDecayMonitor(log_every_n_steps=1, per_layer=True), recorder],
            tmp_path,
            logger=rec,
            max_steps=4,
        )
    assert sum("no Adam state" in str(w.message) for w in warned) == 1
    logged = check_against_snapshots(recorder, rec, adam_family=False)
    assert "optim/decay/update_norm" in logged[0] and "optim_layer/net.0.weight/angular_update" in logged[0]
    assert not any(k.startswith("adamw/decay") for k in logged[0])


def test_no_logger_warns_and_still_computes(tmp_path: Path) -> None:
    L.seed_everything(0)
    monitor = WeightDecayMonitor(log_every_n_steps=2)
    with pytest.warns(UserWarning, match="has no logger"):
        fit(MonitoredModule(), [monitor], tmp_path, logger=False, max_steps=4)
    assert monitor.last_metrics["adamw/decay/decay_norm"] > 0
    assert monitor.figure_path == str(tmp_path / "weight_decay_monitor.png")
    assert Path(monitor.figure_path).read_bytes()[:8] == PNG_MAGIC


def test_coupled_l2_adam_in_trainer(tmp_path: Path) -> None:
    L.seed_everything(0)
    recorder, rec = StepRecorder(), RecordingLogger()
    monitor = WeightDecayMonitor(log_every_n_steps=1, per_layer=True)
    fit(
        MonitoredModule(optimizer="adam", weight_decay=0.1),
        [monitor, recorder],
        tmp_path,
        logger=rec,
        max_steps=4,
    )
    logged = check_against_snapshots(recorder, rec)
    for metrics in logged.values():
        lo, mid, hi = (metrics[f"adam_l2/decay/eff_decay_rate_{q}"] for q in ("min", "median", "max"))
        assert lo <= mid <= hi and hi > lo
        # (lr * weight_decay: one float64 rounding on either side)
        assert metrics["adam_l2/decay/uniform_decay_rate"] == pytest.approx(
            1e-2 * 0.1, rel=2 * gamma(1, U64), abs=0
        )
        assert "adamw/no_decay/grad_update_norm" in metrics  # the wd=0 group of Adam is AdamW
    assert "adam_l2/decay" in monitor.history


def test_interval_follows_trainer_and_skips_other_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = []
    real = monitor_module.update_split

    def counting(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(monitor_module, "update_split", counting)
    L.seed_everything(0)
    rec = RecordingLogger()
    monitor = WeightDecayMonitor(histogram_every_n_steps=0)
    fit(MonitoredModule(), [monitor], tmp_path, logger=rec, max_steps=7, log_every_n_steps=3)
    assert sorted(rec.monitor_calls()) == [2, 5]
    assert len(calls) == 2  # nothing is computed on the other steps


class TwoOptimizerModule(MonitoredModule):
    """Manual optimization with two optimizers, one with unnamed groups."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def configure_optimizers(self) -> Any:
        from lightning_adamw.param_groups import build_param_groups

        first = torch.optim.AdamW(build_param_groups(self.net[0], 0.1), lr=1e-2)
        second = torch.optim.AdamW(self.net[1:].parameters(), lr=1e-2, weight_decay=0.05)
        return [first, second]

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        for opt in self.optimizers():
            opt.zero_grad()
            self.manual_backward(torch.nn.functional.cross_entropy(self.net(x), y))
            opt.step()


def test_several_optimizers_keep_their_groups_apart(tmp_path: Path) -> None:
    L.seed_everything(0)
    rec = RecordingLogger()
    fit(
        TwoOptimizerModule(),
        [WeightDecayMonitor(log_every_n_steps=2, per_layer=True)],
        tmp_path,
        logger=rec,
        max_steps=8,  # global_step counts both optimizers: 4 batches
    )
    logged = rec.monitor_calls()
    # both optimizers log on the same (batch) steps, 1 and 3, although each one's step counts differ
    assert sorted(logged) == [1, 3]
    assert all(
        "adamw/opt0.decay/decay_norm" in m and "adamw/opt1.group0/decay_norm" in m for m in logged.values()
    )
    keys = set().union(*logged.values())
    assert {
        "adamw/opt0.decay/decay_norm",
        "adamw/opt0.no_decay/decay_norm",
        "adamw/opt1.group0/decay_norm",
    } <= keys
    assert "adamw_layer/opt1.group0.param0/decay_norm" in keys  # group without param_names
    assert "adamw_layer/opt0.weight/decay_norm" in keys


def test_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="log_every_n_steps"):
        WeightDecayMonitor(log_every_n_steps=0)
    with pytest.raises(ValueError, match="histogram_every_n_steps"):
        WeightDecayMonitor(histogram_every_n_steps=-1)
    with pytest.raises(ValueError, match="chunk_numel"):
        WeightDecayMonitor(chunk_numel=0)


def test_state_dict_round_trip() -> None:
    monitor = WeightDecayMonitor()
    monitor.history = {"adamw/decay": {"decay_norm": [[0.0, 1.5]]}}
    monitor.nonfinite_steps = 2
    other = WeightDecayMonitor()
    other.load_state_dict(monitor.state_dict())
    assert other.history == monitor.history and other.nonfinite_steps == 2
    assert WeightDecayMonitor(per_layer=True).state_key != monitor.state_key


def test_docstring_example() -> None:
    failures, tried = doctest.testmod(monitor_module)
    assert tried > 0 and failures == 0
