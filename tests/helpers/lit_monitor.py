"""Lightning pieces of the monitor tests and of the multi-process script they launch.

* :class:`MonitoredModule`: a tiny classifier whose optimizer, scheduler and bad-day behaviour are chosen by
  arguments; its groups come from :func:`lightning_adamw.build_param_groups` (``decay`` / ``no_decay``).
* :class:`RecordingLogger`: keeps every ``log_metrics`` call in memory, on every rank (so a test can prove that
  only rank zero logged).
* :class:`StepRecorder`: snapshots the weights right before and right after every real ``optimizer.step()``
  (optimizer step pre/post hooks), the ground truth the monitor is compared against
  (:mod:`tests.helpers.monitor_reference`).
* :func:`fit`: a quiet CPU ``Trainer.fit``; :func:`run_distributed_script`: ``tests/scripts/distributed_monitor.py``
  in its own process session.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import Logger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_adamw.param_groups import build_param_groups

__all__ = [
    "DISTRIBUTED_SCRIPT",
    "REPO",
    "MonitoredModule",
    "RecordingLogger",
    "StepRecorder",
    "finite_everywhere",
    "fit",
    "make_data",
    "run_distributed_script",
]


def make_data(n: int = 64, dim: int = 8, classes: int = 4, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g)
    y = torch.randint(0, classes, (n,), generator=g)
    return TensorDataset(x, y)


class MonitoredModule(L.LightningModule):
    """Linear-LayerNorm-ReLU-Linear classifier; 2 decayed matrices and 4 no-decay tensors."""

    def __init__(
        self,
        optimizer: str = "adamw",
        lr: float = 1e-2,
        weight_decay: float = 0.1,
        dtype: torch.dtype = torch.float32,
        optimizer_kwargs: dict[str, Any] | None = None,
        scheduler: str | None = None,
        nan_at_step: int | None = None,
        batch_size: int = 8,
        data_size: int = 64,
        unnamed_groups: bool = False,
    ) -> None:
        super().__init__()
        self.optimizer_name = optimizer
        self.lr = lr
        self.weight_decay = weight_decay
        self.optimizer_kwargs = optimizer_kwargs or {}
        self.scheduler = scheduler
        self.nan_at_step = nan_at_step
        self.batch_size = batch_size
        self.data_size = data_size
        self.unnamed_groups = unnamed_groups
        self.net = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 4)).to(dtype)
        self.dtype_ = dtype

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self.net(x.to(self.dtype_)), y)
        if self.nan_at_step is not None and self.trainer.global_step == self.nan_at_step:
            loss = loss * float("nan")
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> Any:
        if self.unnamed_groups:
            groups: Any = self.parameters()
        else:
            groups = build_param_groups(self, self.weight_decay)
        kwargs = dict(self.optimizer_kwargs)
        if self.optimizer_name == "adamw":
            opt: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=self.lr, **kwargs)
        elif self.optimizer_name == "adam":
            opt = torch.optim.Adam(groups, lr=self.lr, **kwargs)
        elif self.optimizer_name == "sgd":
            opt = torch.optim.SGD(groups, lr=self.lr, momentum=0.9, **kwargs)
        else:
            raise ValueError(self.optimizer_name)
        if self.scheduler is None:
            return opt
        if self.scheduler == "lambda":
            # a different lr on every step: reading it one step late would be visibly wrong
            sched: Any = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (1.0 + 0.5 * s))
        elif self.scheduler == "onecycle":
            sched = torch.optim.lr_scheduler.OneCycleLR(
                opt, max_lr=self.lr, total_steps=self.trainer.max_steps
            )
        else:
            raise ValueError(self.scheduler)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def train_dataloader(self) -> DataLoader:
        return DataLoader(make_data(self.data_size), batch_size=self.batch_size, shuffle=False)


class RecordingLogger(Logger):
    """Keeps ``(step, metrics)`` of every ``log_metrics`` call. Not rank-zero-only on purpose."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "recording"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        self.calls.append((step, dict(metrics)))

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(int(step), m[key]) for step, m in self.calls if key in m and step is not None]

    def monitor_calls(self) -> dict[int, dict[str, float]]:
        """The monitor's calls (those with ``adamw/`` counters), by step."""
        out: dict[int, dict[str, float]] = {}
        for step, m in self.calls:
            if step is not None and "adamw/nonfinite_steps" in m:
                out.setdefault(int(step), {}).update(m)
        return out


def _label(group: dict[str, Any], index: int) -> str:
    return str(group.get("name") or f"group{index}")


def _names(group: dict[str, Any], index: int) -> list[str]:
    names = group.get("param_names")
    if names is not None and len(names) == len(group["params"]):
        return list(names)
    return [f"{_label(group, index)}.param{j}" for j in range(len(group["params"]))]


class StepRecorder(Callback):
    """Snapshots (float64) of every parameter right before and after every real ``optimizer.step()``.

    ``full_tensor=True`` gathers DTensor parameters (a collective: all ranks must record).
    """

    def __init__(self, full_tensor: bool = False, every: int = 1) -> None:
        self.full_tensor = full_tensor
        self.every = every
        self.records: list[dict[str, Any]] = []
        self._pending: dict[str, Any] | None = None
        self._handles: list[Any] = []

    def _value(self, t: torch.Tensor) -> torch.Tensor:
        if self.full_tensor and hasattr(t, "full_tensor"):
            t = t.full_tensor()
        return t.detach().to(torch.float64).clone()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        optimizer = trainer.optimizers[0]

        def pre(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            step = trainer.global_step
            if (step + 1) % self.every:
                return
            self._pending = {
                "step": step,
                "groups": [
                    {
                        "label": _label(g, i),
                        "lr": float(g["lr"]),
                        "weight_decay": float(g.get("weight_decay", 0.0)),
                        "maximize": bool(g.get("maximize", False)),
                        "decoupled": bool(g.get("decoupled_weight_decay", False)),
                        "names": _names(g, i),
                        "named": g.get("param_names") is not None
                        and len(g["param_names"]) == len(g["params"]),
                        "dtypes": [str(p.dtype) for p in g["params"]],
                        "trainable": [bool(p.requires_grad) for p in g["params"]],
                        "old": [self._value(p) for p in g["params"]],
                    }
                    for i, g in enumerate(opt.param_groups)
                ],
            }

        def post(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            record = self._pending
            if record is None:
                return
            self._pending = None
            for rg, g in zip(record["groups"], opt.param_groups, strict=True):
                rg["new"] = [self._value(p) for p in g["params"]]
                rg["grad"] = [None if p.grad is None else self._value(p.grad) for p in g["params"]]
            self.records.append(record)

        self._handles = [optimizer.register_step_pre_hook(pre), optimizer.register_step_post_hook(post)]

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for h in self._handles:
            h.remove()


def fit(
    module: L.LightningModule,
    callbacks: list[Callback],
    root: Any,
    *,
    logger: Any = False,
    max_steps: int = 8,
    ckpt_path: str | None = None,
    **trainer_kwargs: Any,
) -> L.Trainer:
    """A quiet CPU ``Trainer.fit``."""
    trainer = L.Trainer(
        default_root_dir=str(root),
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=logger,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        **trainer_kwargs,
    )
    trainer.fit(module, ckpt_path=ckpt_path)
    return trainer


def finite_everywhere(
    calls: Iterable[tuple[Any, dict[str, float]]], predicate: Callable[[str], bool]
) -> bool:
    return all(math.isfinite(v) for _, m in calls for k, v in m.items() if predicate(k))


REPO = Path(__file__).resolve().parents[2]
DISTRIBUTED_SCRIPT = REPO / "tests" / "scripts" / "distributed_monitor.py"
DISTRIBUTED_TIMEOUT_S = 240  # Python processes importing torch + Lightning on a busy 2-core machine


def run_distributed_script(
    out: Path, *args: str, ranks: int = 2, timeout: float = DISTRIBUTED_TIMEOUT_S
) -> list[Any]:
    """Run ``distributed_monitor.py`` in its own process session and return each rank's JSON result.

    The session is always killed in ``finally`` (rank 0 and the ranks Lightning started from it), whether the run
    passed, failed or timed out.
    """
    import pytest

    out.mkdir(parents=True, exist_ok=True)
    # One thread per rank (Lightning would pick cores / ranks): the matrix products then add in the order a
    # one-thread process uses, so a test can reproduce a rank's arithmetic bit for bit in one process.
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    env.pop("MASTER_PORT", None)  # let Lightning pick a free port
    proc = subprocess.Popen(
        [sys.executable, str(DISTRIBUTED_SCRIPT), "--out", str(out), *args],
        cwd=out,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    output = ""
    try:
        output, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"distributed run {args} did not finish within {timeout} s")
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()
    assert proc.returncode == 0, output[-4000:]
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(ranks)]
