"""Run WeightDecayMonitor in a real 2-process CPU (gloo) training and dump what every rank saw.

Launched by ``tests/test_monitor_ddp.py`` (and ``tests/test_monitor_fsdp.py`` on a GPU machine)::

    python tests/scripts/distributed_monitor.py --out DIR --strategy ddp|fsdp2|fsdp1 [--devices 2]

Lightning re-executes this file for the other ranks. Each rank writes ``DIR/rank<r>.json`` with the monitor's
calls to the loggers made on that rank, its last metrics and history, and (rank 0) float64 reference metrics
recomputed from snapshots of the full parameters taken around every optimizer step, with the derived error
bound of each (``tests/helpers/monitor_bounds.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

import lightning as L  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from torch.utils.data import DataLoader, DistributedSampler  # noqa: E402

from lightning_adamw.monitor import WeightDecayMonitor  # noqa: E402
from tests.helpers.lit_monitor import MonitoredModule, RecordingLogger, StepRecorder, make_data  # noqa: E402
from tests.helpers.monitor_reference import reference_bounds, reference_metrics  # noqa: E402


class InterleavedData(MonitoredModule):
    """Rank r gets samples r, r+2, ... in order (Lightning's own sampler would shuffle training data), so one
    DDP step over two batches of 8 is one single-process step over the 16 consecutive samples."""

    def train_dataloader(self) -> DataLoader:
        data = make_data(self.data_size)
        sampler = DistributedSampler(
            data, num_replicas=self.trainer.world_size, rank=self.trainer.global_rank, shuffle=False
        )
        return DataLoader(data, batch_size=self.batch_size, sampler=sampler)


class ShardedModule(InterleavedData):
    """FSDP2 (``fully_shard``) on every Linear layer and the root, for ModelParallelStrategy."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.net:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self.net, mesh=mesh)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--strategy", choices=["ddp", "fsdp2", "fsdp1"], required=True)
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--optimizer-kwargs", default="{}", help="JSON, e.g. '{\"fused\": true}'")
    args = parser.parse_args()
    optimizer_kwargs = json.loads(args.optimizer_kwargs)
    out = Path(args.out)

    L.seed_everything(0)
    strategy: Any = args.strategy
    if args.strategy == "fsdp2":
        from lightning.pytorch.strategies import ModelParallelStrategy

        strategy = ModelParallelStrategy(data_parallel_size=args.devices, tensor_parallel_size=1)
        module: MonitoredModule = ShardedModule(batch_size=8, optimizer_kwargs=optimizer_kwargs)
    elif args.strategy == "fsdp1":
        from lightning.pytorch.strategies import FSDPStrategy

        if args.accelerator == "cpu":  # Lightning's FSDPStrategy refuses CPU; the test-only subclass does not
            from tests.helpers.cli_strategies import CPUFSDPStrategy as FSDPStrategy

        strategy = FSDPStrategy(use_orig_params=True)
        module = InterleavedData(batch_size=8, optimizer_kwargs=optimizer_kwargs)
    else:
        module = InterleavedData(batch_size=8, optimizer_kwargs=optimizer_kwargs)

    recorder = StepRecorder(full_tensor=args.strategy != "ddp")
    recording = RecordingLogger()
    monitor = WeightDecayMonitor(log_every_n_steps=1, per_layer=True, histogram_every_n_steps=0)
    trainer = L.Trainer(
        default_root_dir=str(out),
        accelerator=args.accelerator,
        devices=args.devices,
        strategy=strategy,
        max_steps=args.steps,
        logger=[CSVLogger(str(out / "csv")), recording],
        callbacks=[monitor, recorder],
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        use_distributed_sampler=False,
    )
    trainer.fit(module)

    rank = trainer.global_rank
    result = {
        "rank": rank,
        "world_size": trainer.world_size,
        "finished": trainer.global_step == args.steps,
        "mode": monitor._mode,
        "monitor_calls": {str(k): v for k, v in recording.monitor_calls().items()},
        "last_metrics": monitor.last_metrics,
        "history": monitor.history,
        "figure_path": monitor.figure_path,
        "pid": os.getpid(),
    }
    if rank == 0:
        result["reference"] = {str(r["step"]): reference_metrics(r) for r in recorder.records}
        result["bounds"] = {str(r["step"]): reference_bounds(r) for r in recorder.records}
    (out / f"rank{rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    main()
