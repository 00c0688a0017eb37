"""What :class:`~lightning_adamw.monitor.WeightDecayMonitor` reads from the Trainer: how many optimizer steps a fit
and an epoch take, and whether the parameters are sharded (then every rank sums its shards and the sums are
all-reduced, :class:`~lightning_adamw.update_split.ShardReduce`)."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch

from lightning_adamw.update_split import ShardReduce, dtensor_weight

__all__ = ["distribution_mode", "steps_per_epoch", "total_steps"]


def total_steps(trainer: pl.Trainer, manual: bool) -> int | None:
    """The optimizer steps this fit will have taken at its end, when known in advance (automatic optimization
    with ``max_steps`` or a finite number of batches); ``None`` otherwise (the figure is then drawn at the end)."""
    if manual:
        return None
    try:
        total = trainer.estimated_stepping_batches
    except Exception:  # an iterable dataset without length and no max_steps, ...
        return None
    return int(total) if isinstance(total, (int, float)) and math.isfinite(total) and total > 0 else None


def steps_per_epoch(trainer: pl.Trainer, pl_module: pl.LightningModule) -> float | None:
    """Optimizer steps per epoch (for ``ema_timescale_epochs``); ``None`` when an epoch has no fixed length."""
    batches = trainer.num_training_batches
    if not pl_module.automatic_optimization or not math.isfinite(batches) or batches <= 0:
        return None  # manual optimization steps whenever it likes; iterable datasets have no epoch length
    return float(math.ceil(batches / max(int(trainer.accumulate_grad_batches), 1)))


def distribution_mode(trainer: pl.Trainer) -> tuple[str, ShardReduce | None]:
    """``("single" | "replicated" | "sharded", reducer)``: DDP replicas are identical (rank zero computes alone);
    sharded parameters (FSDP, DTensor) need every rank and a reducer of the sums."""
    if trainer.world_size <= 1:
        return "single", None
    from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy

    strategy = trainer.strategy
    sharded = isinstance(strategy, ModelParallelStrategy)
    weight = dtensor_weight
    if isinstance(strategy, FSDPStrategy):
        mode = str(getattr(strategy, "sharding_strategy", "FULL_SHARD")).upper()
        sharded = "NO_SHARD" not in mode
        if "HYBRID" in mode:
            # hybrid sharding: shards within a node, replicas across nodes -> count each replica once
            replicas = max(trainer.world_size // max(trainer.num_devices, 1), 1)
            weight = lambda p: 1.0 / replicas  # noqa: E731
    if not sharded:
        sharded = any(
            _is_dtensor(p)
            for opt in trainer.optimizers
            for group in opt.param_groups
            for p in group["params"]
        )
    if sharded:
        return "sharded", ShardReduce.torch_distributed(weight=weight)
    return "replicated", None


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - builds without distributed
        return False
    return isinstance(t, DTensor)
