"""``RankProbe``: a callback that writes what one rank saw during ``fit`` to ``<out_dir>/rank<N>.json``.

Launched processes cannot hand Python objects back to a test, so every rank dumps its optimizer groups, its
place in the world (global / local / node rank, cluster environment, backend), the learning rate after every
optimizer step and a checksum of its final weights. Add it to any ``lightning-adamw fit`` command::

    --trainer.callbacks+=tests.helpers.cli_probe.RankProbe --trainer.callbacks.out_dir=/tmp/probe
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_only

__all__ = ["RankProbe", "read_probes"]


class RankProbe(L.Callback):
    """Dump this rank's view of the run to ``<out_dir>/rank<global_rank>.json`` (rewritten at each stage).

    Args:
        out_dir: directory for the JSON files (created if missing). Relative paths are from the working directory.
    """

    def __init__(self, out_dir: str = "probe") -> None:
        self.out_dir = Path(out_dir)
        self.record: dict[str, Any] = {"stage": "init", "lrs": [], "steps": []}

    # ------------------------------------------------------------------------------------------- hooks

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record.update(self._world(trainer))
        self.record["optimizer"] = type(trainer.optimizers[0]).__name__
        self.record["groups"] = [_group_summary(g) for g in trainer.optimizers[0].param_groups]
        self.record["schedulers"] = [
            {"class": type(cfg.scheduler).__name__, "interval": cfg.interval, "frequency": cfg.frequency}
            for cfg in trainer.lr_scheduler_configs
        ]
        self.record["precision"] = str(trainer.precision)
        self.record["stage"] = "train_start"
        self._write(trainer)

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # The lr the *next* step will use, per group: the schedule as the optimizer sees it.
        self.record["steps"].append(trainer.global_step)
        self.record["lrs"].append([float(g["lr"]) for g in trainer.optimizers[0].param_groups])

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.record["stage"] = "train_end"
        self.record["global_step"] = trainer.global_step
        self.record["weights_checksum"] = _weights_checksum(pl_module)
        self.record["logger_dirs"] = [
            str(getattr(lg, "log_dir", None) or getattr(lg, "save_dir", None)) for lg in trainer.loggers
        ]
        self.record["callback_metrics"] = {
            k: float(v) for k, v in trainer.callback_metrics.items() if getattr(v, "numel", lambda: 1)() == 1
        }
        # What each WeightDecayMonitor computed on this rank (empty where it does not compute).
        self.record["monitor_last_metrics"] = [
            dict(cb.last_metrics) for cb in trainer.callbacks if type(cb).__name__ == "WeightDecayMonitor"
        ]
        self._write(trainer)

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        self.record["stage"] = "exception"
        self.record["exception"] = f"{type(exception).__name__}: {exception}"
        self._write(trainer)

    # ------------------------------------------------------------------------------------------- helpers

    def _world(self, trainer: L.Trainer) -> dict[str, Any]:
        strategy = trainer.strategy
        env = getattr(strategy, "cluster_environment", None)
        dist = torch.distributed
        return {
            "global_rank": trainer.global_rank,
            "local_rank": trainer.local_rank,
            "node_rank": trainer.node_rank,
            "world_size": trainer.world_size,
            "num_nodes": trainer.num_nodes,
            "num_devices": trainer.num_devices,
            "is_global_zero": trainer.is_global_zero,
            "rank_zero_only_rank": rank_zero_only.rank,
            "strategy": type(strategy).__name__,
            "cluster_environment": type(env).__name__ if env is not None else None,
            "backend": dist.get_backend() if dist.is_available() and dist.is_initialized() else None,
            "dist_rank": dist.get_rank() if dist.is_available() and dist.is_initialized() else None,
            "main_address": getattr(env, "main_address", None),
            "main_port": getattr(env, "main_port", None),
            "pid": os.getpid(),
            "host": socket.gethostname(),
        }

    def _write(self, trainer: L.Trainer) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"rank{trainer.global_rank}.json"
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.record, indent=1, sort_keys=True))
        tmp.replace(path)  # atomic: a reader never sees half a file


def _group_summary(group: dict[str, Any]) -> dict[str, Any]:
    params = group["params"]
    summary: dict[str, Any] = {
        "name": group.get("name"),
        "weight_decay": float(group["weight_decay"]),
        "initial_lr": float(group.get("initial_lr", group["lr"])),
        "param_names": list(group.get("param_names", [])),
        "num_tensors": len(params),
        "numel": sum(int(p.numel()) for p in params),
        "shapes": [list(p.shape) for p in params],
    }
    for key in ("betas", "eps", "fused", "foreach", "amsgrad"):
        if key in group:
            value = group[key]
            summary[key] = list(value) if isinstance(value, tuple) else value
    return summary


def _weights_checksum(module: torch.nn.Module) -> float:
    """Sum of all local parameter values in float64: equal on every rank when DDP keeps replicas in sync."""
    with torch.no_grad():
        return float(sum(p.detach().double().sum().item() for p in module.parameters()))


def read_probes(out_dir: str | os.PathLike[str]) -> dict[int, dict[str, Any]]:
    """``{global_rank: record}`` for every ``rank<N>.json`` under ``out_dir``."""
    records: dict[int, dict[str, Any]] = {}
    for path in sorted(Path(out_dir).glob("rank*.json")):
        records[int(path.stem[len("rank") :])] = json.loads(path.read_text())
    return records
