"""Trainable tensors a step leaves alone (no gradient: an unused branch, an MoE expert no token reached) are still
in their group's weight vector: the group's weight norm and every ratio to it count them, with a zero update,
no gradient and no decay. Frozen tensors (``requires_grad=False``) are not trained and are left out. Before,
such a tensor dropped out of its group on the steps it sat out: ``weight_norm`` fell and rose again from step to
step although the weights never moved (a saw-tooth the weights never made)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from torch import nn

from lightning_adamw import WeightDecayMonitor, build_param_groups
from lightning_adamw.update_split import update_split
from tests.helpers.lit_monitor import RecordingLogger, StepRecorder, fit
from tests.helpers.monitor_reference import check_split, snapshot_record


class TwoBranches(nn.Module):
    """``a`` runs at every step, ``b`` only at even steps (``use_b``); ``frozen`` is never trained."""

    def __init__(self, dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(8, 8).to(dtype)
        self.b = nn.Linear(8, 8).to(dtype)
        self.frozen = nn.Linear(8, 8).to(dtype)
        self.frozen.requires_grad_(False)
        self.use_b = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return self.b(y) if self.use_b else y


def _steps(opt: torch.optim.Optimizer, model: TwoBranches, steps: int, **split_kwargs: Any) -> list[Any]:
    out = []
    for step in range(steps):
        model.use_b = step % 2 == 0
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step), dtype=model.a.weight.dtype)

        def closure(x: torch.Tensor = x) -> None:
            opt.zero_grad()
            model(x).square().mean().backward()

        record = snapshot_record(opt, step, closure)
        split = update_split(opt, **split_kwargs)
        check_split(split, record, adam_family=isinstance(opt, torch.optim.Adam))
        out.append((record, split))
    return out


def _group_weight_norm(model: TwoBranches, names: tuple[str, ...]) -> float:
    params = dict(model.named_parameters())
    return float(
        torch.linalg.vector_norm(torch.cat([params[n].detach().double().reshape(-1) for n in names]))
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda groups: torch.optim.AdamW(groups, lr=1e-2),
        lambda groups: torch.optim.Adam(groups, lr=1e-2),  # coupled L2 in the decay group
    ],
    ids=["adamw", "adam_l2"],
)
def test_a_tensor_without_gradient_stays_in_its_group_s_weights(make: Any) -> None:
    model = TwoBranches(torch.float64)
    groups = build_param_groups(model, 0.1)
    opt = make(groups)
    results = _steps(opt, model, 4)
    decay = ("a.weight", "b.weight")  # (frozen.weight has no gradient and is not trained: left out)
    kind = "adamw" if isinstance(opt, torch.optim.AdamW) else "adam_l2"
    norms = []
    for record, split in results:
        metrics = split.metrics(per_layer=True)
        norms.append(metrics[f"{kind}/decay/weight_norm"])
        if record["step"] % 2:  # b sat this step out: no per-tensor metrics for it, its weights still count
            assert not any(k.startswith(f"{kind}_layer/b.weight/") for k in metrics)
            assert f"{kind}_layer/a.weight/weight_norm" in metrics
    # the last step's weights (b's included, from step 2): the group's norm, within float64 summation error
    assert norms[-1] == pytest.approx(_group_weight_norm(model, decay), rel=1e-12, abs=0)
    # no saw-tooth: from one step to the next the norm moves by far less than b's share of it
    b_share = float(model.b.weight.double().norm()) / norms[-1]
    steps_moved = [abs(x - y) / y for x, y in zip(norms[1:], norms[:-1], strict=True)]
    assert max(steps_moved) < 0.05 * b_share


def test_sgd_from_a_snapshot_counts_idle_tensors_too() -> None:
    from lightning_adamw.update_split import take_snapshot

    model = TwoBranches(torch.float64)
    opt = torch.optim.SGD(build_param_groups(model, 0.1), lr=0.05, momentum=0.9)
    for step in range(3):
        model.use_b = step % 2 == 0
        x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step), dtype=torch.float64)

        snap: dict[torch.Tensor, torch.Tensor] = {}

        def closure_with_snapshot(x: torch.Tensor = x, snap: dict[torch.Tensor, torch.Tensor] = snap) -> None:
            opt.zero_grad()
            model(x).square().mean().backward()
            snap.update(take_snapshot(opt))

        record = snapshot_record(opt, step, closure_with_snapshot)
        check_split(update_split(opt, snapshot=snap), record, adam_family=False)


def test_the_monitor_logs_a_continuous_group_weight_norm(tmp_path: Path) -> None:
    """In a real ``Trainer.fit`` with a branch that runs every other step: every logged value is the group's
    weight norm recomputed from snapshots (``check_split`` through the recorder), and the series has no
    saw-tooth."""

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = TwoBranches()

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            self.net.use_b = self.global_step % 2 == 0
            return self.net(batch[0]).square().mean()

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.AdamW(build_param_groups(self.net, 0.1), lr=1e-2)

        def train_dataloader(self) -> Any:
            data = torch.utils.data.TensorDataset(
                torch.randn(64, 8, generator=torch.Generator().manual_seed(0))
            )
            return torch.utils.data.DataLoader(data, batch_size=4)

    recorder, logger = StepRecorder(), RecordingLogger()
    monitor = WeightDecayMonitor(log_every_n_steps=1, plot=False)
    fit(Module(), [monitor, recorder], tmp_path, logger=logger, max_steps=6)
    logged = logger.monitor_calls()
    for record in recorder.records:
        step = record["step"]
        decay = next(g for g in record["groups"] if g["label"] == "decay")
        want = math.sqrt(
            sum(float(w.square().sum()) for w, t in zip(decay["new"], decay["trainable"], strict=True) if t)
        )
        assert logged[step]["adamw/decay/weight_norm"] == pytest.approx(want, rel=1e-5, abs=0)
    series = [logged[s]["adamw/decay/weight_norm"] for s in sorted(logged)]
    # leaving b out on its idle steps would drop the norm by 1 - sqrt(1 - share^2) (about 30 % here); Adam's own
    # steps at lr 1e-2 move it by a few percent
    share = float(monitor_module_b_norm(recorder)) / series[-1]
    drop = 1.0 - math.sqrt(1.0 - share * share)
    assert drop > 0.1
    assert max(abs(x - y) / y for x, y in zip(series[1:], series[:-1], strict=True)) < drop / 3


def monitor_module_b_norm(recorder: StepRecorder) -> float:
    """``||b.weight||`` after the last recorded step."""
    decay = next(g for g in recorder.records[-1]["groups"] if g["label"] == "decay")
    return float(torch.linalg.vector_norm(decay["new"][decay["names"].index("b.weight")]))
