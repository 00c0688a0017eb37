"""Metric keys that identify groups and tensors: same-named groups and same-named tensors never merge.

The usual way to get them: two ``build_param_groups`` calls, one per sub-module, for different learning rates.
Both name their groups ``decay`` / ``no_decay`` and their tensors relative to the sub-module (``0.weight`` in
the backbone and in the head).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn

from lightning_adamw.monitor import WeightDecayMonitor
from lightning_adamw.param_groups import build_param_groups
from lightning_adamw.update_split import group_labels, layer_labels
from tests.helpers.lit_monitor import MonitoredModule, RecordingLogger, StepRecorder, fit
from tests.helpers.monitor_reference import compare_metrics, reference_bounds, reference_metrics


class BackboneAndHead(MonitoredModule):
    """``net = Sequential(backbone, head)``; the groups of each part from its own ``build_param_groups`` call,
    each part with its own learning rate; ``prefix=True`` names the groups ``backbone_decay`` etc. by hand."""

    def __init__(self, prefix: bool = False) -> None:
        super().__init__()
        self.prefix = prefix
        backbone = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU())
        head = nn.Sequential(nn.Linear(16, 4))
        self.net = nn.Sequential(backbone, head)

    def parts(self) -> list[tuple[str, nn.Module, float]]:
        return [("backbone", self.net[0], 1e-3), ("head", self.net[1], 1e-2)]

    def configure_optimizers(self) -> Any:
        groups = []
        for part, module, lr in self.parts():
            for group in build_param_groups(module, 0.1):
                if self.prefix:
                    group["name"] = f"{part}_{group['name']}"
                groups.append({**group, "lr": lr})
        return torch.optim.AdamW(groups)


def _layer_series(metrics: dict[str, float]) -> set[str]:
    return {
        k[len("adamw_layer/") : -len("/weight_norm")]
        for k in metrics
        if k.startswith("adamw_layer/") and k.endswith("/weight_norm")
    }


def _group_decay(metrics: dict[str, float]) -> dict[str, float]:
    return {
        k.split("/")[1]: v for k, v in metrics.items() if k.startswith("adamw/") and k.endswith("/decay_norm")
    }


def test_two_build_param_groups_calls_keep_every_series(tmp_path: Path) -> None:
    L.seed_everything(0)
    recorder, rec = StepRecorder(), RecordingLogger()
    monitor = WeightDecayMonitor(log_every_n_steps=1, per_layer=True, histogram_every_n_steps=0)
    with pytest.warns(UserWarning) as warned:
        fit(BackboneAndHead(), [monitor, recorder], tmp_path, logger=rec, max_steps=3)
    messages = [str(w.message) for w in warned if "WeightDecayMonitor" in str(w.message)]
    groups_warning = [m for m in messages if "same name" in m]
    assert len(groups_warning) == 1, messages
    # plain words: which names, under which labels, why it matters, and what to do
    for part in ("'decay'", "'decay_1'", "'no_decay_1'", "LearningRateMonitor", 'group_prefix="backbone"'):
        assert part in groups_warning[0], (part, groups_warning[0])
    assert any("0.weight" in m and "adamw_layer/decay/0.weight/decay_norm" in m for m in messages), messages
    logged = rec.monitor_calls()
    for metrics in logged.values():
        # 4 groups, 6 per-layer series for the 6 tensors
        decay = _group_decay(metrics)
        assert set(decay) == {"decay", "no_decay", "decay_1", "no_decay_1"}
        assert decay["decay"] > 0 and decay["decay_1"] > 0
        assert decay["no_decay"] == 0.0 and decay["no_decay_1"] == 0.0
        assert _layer_series(metrics) == {
            "decay/0.weight",  # backbone Linear
            "no_decay/0.bias",
            "1.weight",  # backbone LayerNorm: its names are unique, kept as they are
            "1.bias",
            "decay_1/0.weight",  # head Linear
            "no_decay_1/0.bias",
        }
    # and each series holds its own tensor's numbers (snapshot references use the documented rule)
    for record in recorder.records:
        expected = reference_metrics(record)
        assert compare_metrics(logged[record["step"]], expected, reference_bounds(record)) == {}
    assert "adamw_layer/decay/0.weight/decay_norm" in expected
    # the bounds tell the two same-named tensors apart: the head's value under the backbone's key fails
    bounds = reference_bounds(record)
    head = logged[record["step"]]["adamw_layer/decay_1/0.weight/weight_norm"]
    assert (
        abs(head - expected["adamw_layer/decay/0.weight/weight_norm"])
        > bounds["adamw_layer/decay/0.weight/weight_norm"]
    )
    assert set(monitor.history) == {"adamw/decay", "adamw/no_decay", "adamw/decay_1", "adamw/no_decay_1"}


def test_distinct_group_names_still_qualify_same_named_tensors(tmp_path: Path) -> None:
    """Groups named by hand (what LearningRateMonitor asks for): no group warning, tensors still apart."""
    L.seed_everything(0)
    rec = RecordingLogger()
    monitor = WeightDecayMonitor(log_every_n_steps=1, per_layer=True, histogram_every_n_steps=0)
    with pytest.warns(UserWarning, match="tensor names 0.bias, 0.weight appear in more than one") as warned:
        fit(BackboneAndHead(prefix=True), [monitor], tmp_path, logger=rec, max_steps=2)
    assert not any("same name" in str(w.message) for w in warned)
    metrics = rec.monitor_calls()[1]
    assert _layer_series(metrics) == {
        "backbone_decay/0.weight",
        "backbone_no_decay/0.bias",
        "1.weight",
        "1.bias",
        "head_decay/0.weight",
        "head_no_decay/0.bias",
    }
    decay = _group_decay(metrics)
    assert decay["backbone_decay"] > 0 and decay["head_decay"] > 0
    assert decay["backbone_no_decay"] == decay["head_no_decay"] == 0.0


class TwoOptimizers(BackboneAndHead):
    """Manual optimization, one AdamW per part: the same tensor names in both optimizers."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def configure_optimizers(self) -> Any:
        return [torch.optim.AdamW(build_param_groups(m, 0.1), lr=lr) for _, m, lr in self.parts()]

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        opts = self.optimizers()
        for opt in opts:
            opt.zero_grad()
        self.manual_backward(nn.functional.cross_entropy(self.net(x), y))
        for opt in opts:
            opt.step()


def test_two_optimizers_with_same_named_tensors(tmp_path: Path) -> None:
    L.seed_everything(0)
    rec = RecordingLogger()
    monitor = WeightDecayMonitor(log_every_n_steps=1, per_layer=True, histogram_every_n_steps=0)
    fit(TwoOptimizers(), [monitor], tmp_path, logger=rec, max_steps=4)  # 2 batches, 2 optimizers each
    logged = rec.monitor_calls()
    assert sorted(logged) == [0, 1]
    for metrics in logged.values():
        assert _layer_series(metrics) == {
            "opt0.0.weight",
            "opt0.0.bias",
            "opt0.1.weight",
            "opt0.1.bias",
            "opt1.0.weight",
            "opt1.0.bias",
        }
        decay = _group_decay(metrics)
        assert decay["opt0.decay"] > 0 and decay["opt1.decay"] > 0
        assert decay["opt0.no_decay"] == decay["opt1.no_decay"] == 0.0
        # the head's Linear weight is not the backbone's
        assert (
            metrics["adamw_layer/opt0.0.weight/weight_norm"]
            != metrics["adamw_layer/opt1.0.weight/weight_norm"]
        )


def test_histograms_per_group_label(tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    L.seed_everything(0)
    tb = TensorBoardLogger(tmp_path / "tb")
    monitor = WeightDecayMonitor(log_every_n_steps=1, histogram_every_n_steps=2, plot=False)
    with pytest.warns(UserWarning, match="same name"):
        fit(BackboneAndHead(), [monitor], tmp_path, logger=tb, max_steps=2)
    tb.experiment.flush()
    acc = EventAccumulator(tb.log_dir, size_guidance={"histograms": 0})
    acc.Reload()
    tags = set(acc.Tags()["histograms"])
    assert {"adamw_hist/decay/decay_to_grad_ratio", "adamw_hist/decay_1/decay_to_grad_ratio"} <= tags
    # one decayed matrix in each decay group: one value each, not two in one
    assert acc.Histograms("adamw_hist/decay/decay_to_grad_ratio")[0].histogram_value.num == 1
    assert acc.Histograms("adamw_hist/decay_1/decay_to_grad_ratio")[0].histogram_value.num == 1


def test_label_rules() -> None:
    w = [torch.zeros(2, 2, requires_grad=True) for _ in range(5)]
    groups = [
        {"params": w[:1], "name": "a", "param_names": ["x"]},
        {"params": w[1:2], "name": "a", "param_names": ["x"]},
        {"params": w[2:3], "name": "a_1", "param_names": ["y"]},
        {"params": w[3:5], "name": "b", "param_names": ["z", "z"]},  # a name repeated inside one group
    ]
    assert group_labels(groups) == ["a", "a_2", "a_1", "b"]  # a given name is never taken by a suffix
    assert layer_labels(groups) == [["a/x"], ["a_2/x"], ["y"], ["z", "z_1"]]
    unnamed = [{"params": w[:1], "name": "g"}, {"params": w[1:2], "name": "g"}]
    assert layer_labels(unnamed) == [["g.param0"], ["g_1.param0"]]
