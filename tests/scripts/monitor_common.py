"""Shared pieces of the WeightDecayMonitor tests and of the multi-process scripts they launch.

* :class:`MonitoredModule`: a tiny classifier whose optimizer, scheduler and bad-day behaviour are chosen by
  arguments; its groups come from :func:`lightning_adamw.build_param_groups` (``decay`` / ``no_decay``).
* :class:`RecordingLogger`: keeps every ``log_metrics`` call in memory, on every rank (so a test can prove that
  only rank zero logged).
* :class:`StepRecorder`: snapshots the weights right before and right after every real ``optimizer.step()``
  (optimizer step pre/post hooks), the ground truth the monitor is compared against.
* :func:`reference_metrics`: the monitor's metrics recomputed in float64 from those snapshots, and
  :func:`reference_bounds`: how far the monitor's numbers may be from them (derived error bounds,
  :mod:`tests.helpers.monitor_bounds`), which :func:`compare_metrics` checks.
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
from tests.helpers.monitor_bounds import metric_bounds, tensor_norms

METRICS_BY_KIND: dict[str, tuple[str, ...]] = {
    "adamw": (
        "decay_norm",
        "grad_update_norm",
        "decay_to_grad_ratio",
        "update_norm",
        "weight_norm",
        "update_to_weight",
        "cos_grad_update_weight",
        "angular_update",
    ),
    "adam_l2": ("l2_grad_share", "update_norm", "weight_norm", "update_to_weight", "angular_update"),
    "optim": ("update_norm", "weight_norm", "update_to_weight", "angular_update"),
}


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


def _norm(t: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(t))


def _cat(ts: Iterable[torch.Tensor]) -> torch.Tensor:
    ts = list(ts)
    return torch.cat([t.reshape(-1) for t in ts]) if ts else torch.zeros(0, dtype=torch.float64)


def _div(a: float, b: float) -> float:
    return a / b if b != 0 else math.nan


def _angle(old: torch.Tensor, new: torch.Tensor) -> float:
    if _norm(old) == 0.0:
        return math.nan
    unit = old / torch.linalg.vector_norm(old)
    par = torch.dot(new, unit)
    perp = torch.linalg.vector_norm(new - par * unit)
    return math.atan2(float(perp), float(par))


def _reference(
    kind: str,
    old: torch.Tensor,
    new: torch.Tensor,
    grad: torch.Tensor | None,
    lr: float,
    wd: float,
    maximize: bool,
) -> dict[str, float]:
    old, new = old.reshape(-1), new.reshape(-1)
    grad = None if grad is None else grad.reshape(-1)
    out: dict[str, float] = {"weight_norm": _norm(new), "angular_update": _angle(old, new)}
    delta = new - old
    out["update_norm"] = _norm(delta)
    out["update_to_weight"] = _div(_norm(delta), _norm(old))
    if kind == "adamw":
        decay = lr * wd * old
        grad_update = new - (1.0 - lr * wd) * old  # what the optimizer moved besides the decay
        out["decay_norm"] = _norm(decay)
        out["grad_update_norm"] = _norm(grad_update)
        out["decay_to_grad_ratio"] = _div(out["decay_norm"], out["grad_update_norm"])
        out["cos_grad_update_weight"] = _div(
            float(torch.dot(grad_update, old)), _norm(grad_update) * _norm(old)
        )
    elif kind == "adam_l2":
        assert grad is not None
        g = -grad if maximize else grad
        out["l2_grad_share"] = _div(_norm(wd * old), _norm(g + wd * old))
    return out


def record_kind(group: dict[str, Any], adam_family: bool) -> str:
    if not adam_family:
        return "optim"
    if group["decoupled"] or group["weight_decay"] == 0.0:
        return "adamw"
    return "adam_l2"


def _unique(labels: list[str]) -> list[str]:
    taken, seen, out = set(labels), set(), []
    for label in labels:
        if label in seen:
            k = 1
            while f"{label}_{k}" in taken:
                k += 1
            label = f"{label}_{k}"
            taken.add(label)
        seen.add(label)
        out.append(label)
    return out


def metric_labels(record: dict[str, Any]) -> list[tuple[str, list[str]]]:
    """``(group label, per-tensor labels)`` of each recorded group, by the rule the monitor documents: group
    names made unique with ``_1``, ``_2``, ...; a tensor keeps its name unless another group has a tensor of
    that name, then it is ``<group label>/<name>`` (unnamed tensors are ``<group label>.param<j>``)."""
    groups = record["groups"]
    labels = _unique([g["label"] for g in groups])
    names = [
        list(g["names"]) if g.get("named", True) else [f"{label}.param{j}" for j in range(len(g["names"]))]
        for g, label in zip(groups, labels, strict=True)
    ]
    owners: dict[str, set[int]] = {}
    for gi, group_names in enumerate(names):
        for n in group_names:
            owners.setdefault(n, set()).add(gi)
    flat = _unique(
        [f"{labels[gi]}/{n}" if len(owners[n]) > 1 else n for gi, ns in enumerate(names) for n in ns]
    )
    out, start = [], 0
    for label, group_names in zip(labels, names, strict=True):
        out.append((label, flat[start : start + len(group_names)]))
        start += len(group_names)
    return out


def reference_metrics(
    record: dict[str, Any], adam_family: bool = True, per_layer: bool = True
) -> dict[str, float]:
    """The monitor's group (and per-layer) metrics of one recorded step, recomputed from the snapshots."""
    out: dict[str, float] = {}
    for g, (label, keys) in zip(record["groups"], metric_labels(record), strict=True):
        kind = record_kind(g, adam_family)
        updated = [
            i
            for i, (o, n, gr) in enumerate(zip(g["old"], g["new"], g["grad"], strict=True))
            if gr is not None and o.numel() > 0
        ]
        if not updated:
            continue
        grads = [g["grad"][i] for i in updated]
        ref = _reference(
            kind,
            _cat(g["old"][i] for i in updated),
            _cat(g["new"][i] for i in updated),
            _cat(grads) if all(x is not None for x in grads) else None,
            g["lr"],
            g["weight_decay"],
            g["maximize"],
        )
        for key, value in ref.items():
            out[f"{kind}/{label}/{key}"] = value
        if per_layer:
            for i in updated:
                ref = _reference(
                    kind, g["old"][i], g["new"][i], g["grad"][i], g["lr"], g["weight_decay"], g["maximize"]
                )
                for key, value in ref.items():
                    out[f"{kind}_layer/{keys[i]}/{key}"] = value
    return out


def _dtype(name: str) -> torch.dtype:
    return getattr(torch, name.split(".")[-1])


def reference_bounds(
    record: dict[str, Any], adam_family: bool = True, per_layer: bool = True, eta_rel: float = 0.0
) -> dict[str, float]:
    """For every key of :func:`reference_metrics`, the largest difference the monitor's value may have from it
    (absolute; derived from the arithmetic, see :mod:`tests.helpers.monitor_bounds`). Parameters are taken as
    float32 where the record does not say (``"dtypes"``). ``eta_rel``: a further relative error of the
    monitor's ``lr*u`` (e.g. float32 bias corrections replayed against float64 ones)."""
    expected = reference_metrics(record, adam_family=adam_family, per_layer=per_layer)
    out: dict[str, float] = {}
    for g, (label, keys) in zip(record["groups"], metric_labels(record), strict=True):
        kind = record_kind(g, adam_family)
        q = 1.0 - g["lr"] * g["weight_decay"] if kind == "adamw" else 1.0
        dtypes = [_dtype(d) for d in g.get("dtypes", ["float32"] * len(g["old"]))]
        norms = {
            i: tensor_norms(g["old"][i], g["new"][i], g["grad"][i], q, dtypes[i])
            for i, (o, gr) in enumerate(zip(g["old"], g["grad"], strict=True))
            if gr is not None and o.numel() > 0
        }
        if not norms:
            continue

        prefixes = [(f"{kind}/{label}/", list(norms.values()))]
        if per_layer:
            prefixes += [(f"{kind}_layer/{keys[i]}/", [t]) for i, t in norms.items()]
        for prefix, tensors in prefixes:
            metrics = {k[len(prefix) :]: v for k, v in expected.items() if k.startswith(prefix)}
            found = metric_bounds(
                kind, tensors, lr=g["lr"], weight_decay=g["weight_decay"], expected=metrics, eta_rel=eta_rel
            )
            out.update({prefix + name: bound for name, bound in found.items()})
    return out


def compare_metrics(
    actual: dict[str, float], expected: dict[str, float], bounds: dict[str, float]
) -> dict[str, tuple[float, float, float]]:
    """``{key: (got, expected, bound)}`` for every expected key the monitor missed or got farther than its
    derived bound (:func:`reference_bounds`) from the float64 reference; ``{}`` when all pass. An undefined
    reference (NaN, e.g. a ratio to a zero-initialised weight) must be left out by the monitor."""
    bad: dict[str, tuple[float, float, float]] = {}
    for key, want in expected.items():
        got = actual.get(key, math.nan)
        bound = bounds.get(key, math.nan)
        if not math.isfinite(want):  # undefined: must be left out
            if key in actual:
                bad[key] = (got, want, bound)
            continue
        if not abs(got - want) <= bound:  # (also fails for a missing key or a missing bound)
            bad[key] = (got, want, bound)
    return bad


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
