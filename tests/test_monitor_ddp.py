"""WeightDecayMonitor in real 2-process CPU (gloo) runs: DDP (replicated) and FSDP2 (sharded parameters).

Each test launches ``tests/scripts/distributed_monitor.py`` in its own process session (Lightning starts the
second rank from it), bounded by a timeout, and always kills that session in ``finally``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L

from lightning_adamw.monitor import WeightDecayMonitor
from tests.scripts.monitor_common import (
    MonitoredModule,
    RecordingLogger,
    compare_metrics,
    fit,
    run_distributed_script,
)


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
    # exact against snapshots taken around the real (all-reduced) steps on rank 0
    for step, expected in r0["reference"].items():
        assert compare_metrics(r0["monitor_calls"][step], expected, 1e-5) == {}, step

    # the same training in one process: each DDP step averages two batches of 8 = one batch of 16
    L.seed_everything(0)
    rec = RecordingLogger()
    fit(
        MonitoredModule(batch_size=16),
        [WeightDecayMonitor(log_every_n_steps=1, per_layer=True, histogram_every_n_steps=0)],
        tmp_path / "single",
        logger=rec,
        max_steps=4,
    )
    single = rec.monitor_calls()
    for step, metrics in r0["monitor_calls"].items():
        assert set(metrics) == set(single[int(step)])
        assert compare_metrics(metrics, single[int(step)], 1e-4, cos_atol=1e-4) == {}, step


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
    # and they are the numbers of the full (gathered) parameters
    for step, expected in r0["reference"].items():
        assert compare_metrics(r0["monitor_calls"][step], expected, 1e-5) == {}, step
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
        assert abs(calls[k]["adamw/decay/decay_norm"] - want) <= 1e-5 * want, (k, calls[k], want)
    assert calls["2"]["adamw/no_decay/decay_norm"] == 0.0
    assert calls["2"]["adamw/decay/decay_norm"] > 0.0
