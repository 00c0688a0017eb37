"""Float64 references of the monitor's metrics from parameter snapshots taken around real optimizer steps.

* :func:`snapshot_record`: one real ``optimizer.step()`` with float64 copies of every parameter before and
  after it (what :class:`tests.helpers.lit_monitor.StepRecorder` records inside a ``Trainer.fit``);
* :func:`reference_metrics`: every metric recomputed from those snapshots in float64, by the definitions (not by
  the package's formulas), and :func:`reference_bounds`: how far the monitor's numbers may be from them (derived
  error bounds, :mod:`tests.helpers.monitor_bounds`), which :func:`compare_metrics` and :func:`check_split`
  check;
* :func:`make_model`: the tiny Linear-LayerNorm-ReLU-Linear model of the functional-core tests.

Torch only (no Lightning), so the functional-core tests do not import Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from tests.helpers.monitor_bounds import metric_bounds, tensor_norms

__all__ = [
    "check_split",
    "checked_step",
    "compare_metrics",
    "make_model",
    "metric_labels",
    "reference_bounds",
    "reference_metrics",
    "snapshot_record",
]


def make_model(dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """Linear(8, 16) - LayerNorm(16) - ReLU - Linear(16, 4): 2 decayed matrices and 4 no-decay tensors."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.ReLU(), nn.Linear(16, 4)).to(dtype)


def snapshot_record(opt: torch.optim.Optimizer, step: int, closure: Callable[[], Any]) -> dict[str, Any]:
    """Run ``closure`` (backward) and ``opt.step()``, recording float64 snapshots as ``StepRecorder`` does."""
    closure()
    groups = []
    for i, g in enumerate(opt.param_groups):
        groups.append(
            {
                "label": g.get("name") or f"group{i}",
                "lr": float(g["lr"]),
                "weight_decay": float(g["weight_decay"]),
                "maximize": bool(g.get("maximize", False)),
                "decoupled": bool(g.get("decoupled_weight_decay", False)),
                "names": list(
                    g.get("param_names") or [f"group{i}.param{j}" for j in range(len(g["params"]))]
                ),
                "named": g.get("param_names") is not None,
                "dtypes": [str(p.dtype) for p in g["params"]],
                "trainable": [bool(p.requires_grad) for p in g["params"]],
                "old": [p.detach().double().clone() for p in g["params"]],
            }
        )
    opt.step()
    for rg, g in zip(groups, opt.param_groups, strict=True):
        rg["new"] = [p.detach().double().clone() for p in g["params"]]
        rg["grad"] = [None if p.grad is None else p.grad.detach().double().clone() for p in g["params"]]
    return {"step": step, "groups": groups}


def checked_step(
    model: nn.Module, opt: torch.optim.Optimizer, step: int, **split_kwargs: Any
) -> tuple[Any, dict[str, Any]]:
    """One real step of ``model`` (squared-output loss on a batch seeded by ``step``) with snapshots around it, and
    ``update_split(opt, **split_kwargs)`` checked against them; returns ``(split, record)``."""
    from lightning_adamw.update_split import update_split

    x = torch.randn(16, 8, generator=torch.Generator().manual_seed(step))

    def closure() -> None:
        opt.zero_grad()
        model(x).square().mean().backward()

    record = snapshot_record(opt, step, closure)
    split = update_split(opt, **split_kwargs)
    check_split(split, record)
    return split, record


def check_split(split: Any, record: dict[str, Any], adam_family: bool = True) -> None:
    """An ``UpdateSplit``'s metrics (per layer too) within their derived error bounds of the snapshot reference."""
    expected = reference_metrics(record, adam_family=adam_family)
    bounds = reference_bounds(record, adam_family=adam_family)
    bad = compare_metrics(split.metrics(per_layer=True), expected, bounds)
    assert bad == {}, f"step {record['step']}: {bad}"


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
    idle: torch.Tensor | None = None,
) -> dict[str, float]:
    """By the definitions, for the updated tensors ``old``, ``new``, ``grad`` (flat, concatenated) and the
    group's trainable tensors the step left alone, ``idle``: those are in the group's weight vector (norms of the
    weights and ratios to them) with a zero update, no gradient and no decay."""
    old, new = old.reshape(-1), new.reshape(-1)
    idle = torch.zeros(0, dtype=old.dtype) if idle is None else idle.reshape(-1)
    old_all, new_all = torch.cat([old, idle]), torch.cat([new, idle])
    grad = None if grad is None else grad.reshape(-1)
    out: dict[str, float] = {"weight_norm": _norm(new_all), "angular_update": _angle(old_all, new_all)}
    delta = new - old
    out["update_norm"] = _norm(delta)
    out["update_to_weight"] = _div(_norm(delta), _norm(old_all))
    if grad is not None:  # the gradient the step used (accumulated, clipped), as the step read it
        out["grad_norm"] = _norm(grad)
        out["grad_to_weight"] = _div(out["grad_norm"], _norm(old_all))
    if kind == "adamw":
        decay = lr * wd * old
        grad_update = new - (1.0 - lr * wd) * old  # what the optimizer moved besides the decay
        out["decay_norm"] = _norm(decay)
        out["grad_update_norm"] = _norm(grad_update)
        out["decay_to_grad_ratio"] = _div(out["decay_norm"], out["grad_update_norm"])
        out["cos_grad_update_weight"] = _div(
            float(torch.dot(grad_update, old)), _norm(grad_update) * _norm(old_all)
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
        trainable = g.get("trainable", [True] * len(g["old"]))
        idle = [
            i for i, gr in enumerate(g["grad"]) if gr is None and trainable[i] and g["old"][i].numel() > 0
        ]
        grads = [g["grad"][i] for i in updated]
        ref = _reference(
            kind,
            _cat(g["old"][i] for i in updated),
            _cat(g["new"][i] for i in updated),
            _cat(grads) if all(x is not None for x in grads) else None,
            g["lr"],
            g["weight_decay"],
            g["maximize"],
            idle=_cat(g["old"][i] for i in idle),
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
