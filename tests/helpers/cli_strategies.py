"""A test-only FSDP strategy that runs on CPU processes (gloo), so sharded FSDP can be tested without GPUs.

Lightning refuses ``FSDPStrategy`` with ``accelerator="cpu"`` (its accelerator connector checks
``type(strategy) is FSDPStrategy``) and wraps the model with ``device_id=root_device.index``, which is ``None``
on CPU and makes torch's FSDP look for an accelerator. torch's FSDP itself runs on CPU with gloo when given
``device_id=torch.device("cpu")``. This subclass changes only that, so the sharded code path (sharded parameter
views, ``_fsdp_wrapped_module.`` names) is exercised for real. Not for training: Lightning does not support it.
"""

from __future__ import annotations

import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch import nn

__all__ = ["CPUFSDPStrategy"]


class CPUFSDPStrategy(FSDPStrategy):
    """:class:`~lightning.pytorch.strategies.FSDPStrategy` usable with ``accelerator="cpu"`` (tests only)."""

    strategy_name = "cpu_fsdp_test"

    def _setup_model(self, model: nn.Module) -> nn.Module:
        from torch.distributed.fsdp import FullyShardedDataParallel

        if any(isinstance(m, FullyShardedDataParallel) for m in model.modules()):
            return model
        return FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )
