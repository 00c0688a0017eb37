"""WeightDecayMonitor in real 2-process CPU (gloo) runs: DDP (replicated) and FSDP2 (sharded parameters).

Each test launches ``tests/scripts/distributed_monitor.py`` in its own process session (Lightning starts the
second rank from it), bounded by a timeout, and always kills that session in ``finally``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader, Subset

from lightning_adamw.monitor import WeightDecayMonitor
from tests.helpers.lit_monitor import MonitoredModule, RecordingLogger, fit, make_data, run_distributed_script
from tests.helpers.monitor_bounds import TensorNorms, metric_bounds
from tests.helpers.monitor_reference import compare_metrics
from tests.helpers.tolerance import SAFETY, gamma, unit_roundoff

DECAY_NUMEL = 8 * 16 + 16 * 4  # MonitoredModule's two decayed matrices


class TwoMicroBatches(MonitoredModule):
    """One process, the two DDP ranks' batches of each step as two accumulated micro-batches of 8: samples
    0, 2, ..., 14 (rank 0's first batch), then 1, 3, ..., 15 (rank 1's), and so on."""

    def train_dataloader(self) -> DataLoader:
        order = [
            i
            for start in range(0, self.data_size, 16)
            for r in (0, 1)
            for i in range(start + r, start + 16, 2)
        ]
        return DataLoader(Subset(make_data(self.data_size), order), batch_size=8, shuffle=False)


def run_distributed(out: Path, *args: str) -> tuple[dict[str, Any], dict[str, Any]]:
    r0, r1 = run_distributed_script(out, *args, ranks=2)
    return r0, r1


def test_ddp_two_processes(tmp_path: Path) -> None:
    r0, r1 = run_distributed(tmp_path / "ddp", "--strategy", "ddp", "--steps", "4")
    assert r0["finished"] and r1["finished"]
    assert r0["world_size"] == r1["world_size"] == 2
    assert r0["mode"] == r1["mode"] == "replicated"
    # rank 0 computed and logged every step; rank 1 did no work at all
    assert sorted(int(s) for s in r0["monitor_calls"]) == [0, 1, 2, 3]
    assert r1["monitor_calls"] == {} and r1["last_metrics"] == {} and r1["history"] == {}
    assert [p.name for p in (tmp_path / "ddp" / "csv").rglob("metrics.csv")] == ["metrics.csv"]
    assert r0["figure_path"] and Path(r0["figure_path"]).exists() and r1["figure_path"] is None
    # exact against snapshots taken around the real (all-reduced) steps on rank 0 (derived bounds)
    for step, expected in r0["reference"].items():
        assert compare_metrics(r0["monitor_calls"][step], expected, r0["bounds"][step]) == {}, step
    # (and tight enough that the numbers of the next step do not pass for this one's)
    assert compare_metrics(r0["monitor_calls"]["1"], r0["reference"]["0"], r0["bounds"]["0"]) != {}

    # The same training in one process: the two ranks' batches as two accumulated micro-batches. DDP averages
    # g0/2 + g1/2 (gloo adds the two halves); accumulation scales each loss by 1/2 and adds the gradients: the
    # same float32 roundings in the same order (halving is exact; one thread, as each rank ran, so the matrix
    # products add in the same order too), so every number is bit for bit the same: the error bound is 0.
    L.seed_everything(0)
    rec = RecordingLogger()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        fit(
            TwoMicroBatches(batch_size=8),
            [WeightDecayMonitor(log_every_n_steps=1, per_layer=True, histogram_every_n_steps=0)],
            tmp_path / "single",
            logger=rec,
            max_steps=4,
            accumulate_grad_batches=2,
        )
    finally:
        torch.set_num_threads(threads)
    single = rec.monitor_calls()
    assert sorted(single) == [0, 1, 2, 3]
    for step, metrics in r0["monitor_calls"].items():
        assert metrics == single[int(step)], step


def test_fsdp2_sharded_parameters_two_processes(tmp_path: Path) -> None:
    """Every rank computes local sums of its shards; they are all-reduced before the square roots."""
    r0, r1 = run_distributed(tmp_path / "fsdp2", "--strategy", "fsdp2", "--steps", "3")
    assert r0["finished"] and r1["finished"]
    assert r0["mode"] == r1["mode"] == "sharded"
    # both ranks took part and got the same global numbers; only rank 0 logged them
    assert r0["last_metrics"] and r0["last_metrics"] == r1["last_metrics"]
    assert r0["history"] == r1["history"]
    assert sorted(int(s) for s in r0["monitor_calls"]) == [0, 1, 2]
    assert r1["monitor_calls"] == {}
    # and they are the numbers of the full (gathered) parameters (derived bounds)
    for step, expected in r0["reference"].items():
        assert compare_metrics(r0["monitor_calls"][step], expected, r0["bounds"][step]) == {}, step
    assert r0["monitor_calls"]["2"]["adamw/no_decay/decay_norm"] == 0.0


def test_fsdp1_sharded_build_param_groups_in_configure_optimizers_two_processes(tmp_path: Path) -> None:
    """FSDP1 FULL_SHARD over 2 CPU ranks with ``build_param_groups(self)`` called in ``configure_optimizers``.

    The LightningModule is wrapped from outside, so the real shapes of the root's tensors (here ``net.0.bias``,
    which no inner FSDP unit owns) come from the wrapper found through the trainer; the groups must be right
    and the sharded monitor numbers those of the gathered tensors. (A GPU run caught this path refusing a true
    1-D bias before the wrapper was looked up.)
    """
    r0, r1 = run_distributed(tmp_path / "fsdp1", "--strategy", "fsdp1", "--steps", "3")
    assert r0["finished"] and r1["finished"]
    assert r0["mode"] == r1["mode"] == "sharded"
    assert r0["last_metrics"] == r1["last_metrics"]
    calls = r0["monitor_calls"]
    assert sorted(int(s) for s in calls) == [0, 1, 2] and r1["monitor_calls"] == {}
    # The recorder snapshots only rank 0's FSDP1 shard, so check the global numbers through an identity instead:
    # w_old of step k is w_new of step k-1, so decay_norm(k) = lr*wd*||w_old|| = weight_norm(k-1) / timescale(k).
    for k in ("1", "2"):
        prev = str(int(k) - 1)
        want = calls[prev]["adamw/decay/weight_norm"] / calls[k]["adamw/decay/ema_timescale_steps"]
        assert abs(calls[k]["adamw/decay/decay_norm"] - want) <= _identity_bound(
            calls[prev], calls[k], want
        ), k
    assert calls["2"]["adamw/no_decay/decay_norm"] == 0.0
    assert calls["2"]["adamw/decay/decay_norm"] > 0.0


def _identity_bound(before: dict[str, float], now: dict[str, float], want: float) -> float:
    """How far ``decay_norm(k)`` and ``weight_norm(k-1) * lr * wd`` may be apart: both are the monitor's float32
    numbers of the same true ``lr*wd*||w||`` (the weights before step k are those after step k-1), each within
    its derived bound (tests/helpers/monitor_bounds.py, from the group norms the monitor logged; the group's
    two tensors taken as one of their total size, a deeper sum), plus the 2 roundings of ``want``."""
    lr_wd = 1.0 / now["adamw/decay/ema_timescale_steps"]
    norms = TensorNorms(
        numel=DECAY_NUMEL,
        shape=(16, DECAY_NUMEL // 16),
        dtype=torch.float32,
        old=before["adamw/decay/weight_norm"],
        new=now["adamw/decay/weight_norm"],
        step=now["adamw/decay/grad_update_norm"],
    )
    bounds = metric_bounds("adamw", [norms], lr=lr_wd, weight_decay=1.0, expected={"decay_norm": want})
    previous = TensorNorms(
        numel=DECAY_NUMEL,
        shape=(16, DECAY_NUMEL // 16),
        dtype=torch.float32,
        old=norms.old,
        new=norms.old,
        step=0.0,
    )
    weight = metric_bounds("adamw", [previous], lr=0.0, weight_decay=0.0, expected={})["weight_norm"]
    return bounds["decay_norm"] + lr_wd * weight + SAFETY * gamma(2, unit_roundoff(torch.float64)) * want
