"""Weight decay over time: ``constant``, ``independent`` and ``adamc`` schedules on a tiny GPT, measured.

Two parts, on the character-level GPT and the standard-library text of ``examples/tiny_gpt.py`` (imported, not
copied; no download), all on a CPU:

1. **Three schedules through Lightning.** The same GPT, seed and warm-up + cosine learning rate (the mixin's
   ``lr_schedule``, down to ``min_lr_ratio``), trained through
   :class:`~lightning_adamw.DecoupledWeightDecayMixin` with ``weight_decay_schedule`` = ``"constant"``,
   ``"independent"`` and ``"adamc"``, λ set by its EMA timescale (``ema_timescale_fraction``: the same τ =
   1/(per-step decay) at the peak lr for all three). :class:`~lightning_adamw.WeightDecayMonitor` logs the decay
   group's weight norm and decay / gradient ratio (and ``grad_norm`` where the monitor has it); a small callback
   records, for every optimizer step, the lr and ``weight_decay`` each group applied and the gradient norm
   ‖g‖ of the decayed groups. Per-step decay ``lr_t·weight_decay_t``:

   * ``constant``: λ·lr_t (torch's AdamW);
   * ``independent``: λ·lr_t/lr_max (Loshchilov & Hutter's η_t·λ). With λ given as a timescale this is the
     *same* run as ``constant`` at one learning rate: the schedule only changes what λ means when lr changes;
   * ``adamc``: λ·lr_t²/lr_max (Defazio et al. 2025, "Why gradients rapidly increase near the end of
     training"): equal to ``constant`` at the peak, smaller as the lr cools. Following the paper, the output
     layer keeps plain AdamW decay: here the output layer is the token embedding (tied to the head), which gets
     a group of its own (``decay/head``, via ``group_overrides``) that the schedule leaves out.

   The paper's claim measured here: during the cooldown the gradient norm rises under ``constant`` and does not
   (or less) under ``adamc``. The summary reports ‖g‖ late in training relative to the middle of training.

2. **A λ x lr grid** for ``constant`` and ``independent`` (plain torch: ``build_param_groups``,
   ``WarmupCosineLR`` and :class:`~lightning_adamw.WeightDecayScheduler` on ``torch.optim.AdamW``; a smaller GPT,
   several seeds). Validation bits per character per cell; per learning rate the best λ and the *edge* λ (the
   largest λ within ``--edge-tolerance`` of that lr's best), and slopes of log10 λ against log10 lr with the
   analysis of ``examples/adam_vs_adamw.py`` (0: λ does not depend on lr; -1: only lr·λ matters), from the
   seed-mean table (± the fit's standard error) and per seed (mean ± std over seeds).

Everything lands in ``<log-dir>/weight_decay_schedules/version_N/``: ``results.json`` (all numbers),
``grid.csv`` (one row per cell and seed), ``schedules.png``, ``grid_heatmaps.png`` and the Lightning runs' CSV
logs under ``fits/``.

Run it::

    python examples/weight_decay_schedules.py            # default size: about 10 minutes on 2 CPU cores
    python examples/weight_decay_schedules.py --quick    # seconds; what the tests run
    python examples/weight_decay_schedules.py --help
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger
from matplotlib.figure import Figure
from torch.optim import Optimizer
from tqdm.auto import tqdm

# The other examples are scripts, not a package: make them importable however this file is run.
sys.path.insert(0, str(Path(__file__).resolve().parent))

from adam_vs_adamw import analyse, jsonable
from tiny_gpt import StdlibTextDataModule, TinyGPT

from lightning_adamw import WarmupCosineLR, WeightDecayMonitor, WeightDecayScheduler, build_param_groups

warnings.filterwarnings("ignore", message=r".*does not have many workers.*")

#: The schedules of part 1, in plot order.
SCHEDULES = ("constant", "independent", "adamc")
#: The schedules the grid compares, with the meaning of their λ axis.
GRID_AXES = {
    "constant": "λ (torch weight_decay; per-step decay lr_t·λ)",
    "independent": "λ (per-step decay at the peak lr; per step λ·lr_t/lr_max)",
}
#: The decayed groups of part 1: the matrices (normalized layers, AdamC applies) and the output layer.
MATRICES, HEAD = "decay", "decay/head"
COLORS = {"constant": "tab:blue", "independent": "tab:orange", "adamc": "tab:green"}


# ================================================================================================ part 1


def schedule_setting(name: str) -> str | dict[str, Any]:
    """The mixin's ``weight_decay_schedule`` for ``name``: AdamC leaves the output layer on plain AdamW."""
    return {"name": "adamc", "groups": [MATRICES]} if name == "adamc" else name


class StepRecorder(L.Callback):
    """Per optimizer step: each decayed group's lr and the ``weight_decay`` it applied, and its gradient norm.

    Reads the groups in an optimizer step *post*-hook: the update has just been applied with exactly these
    values (the :class:`~lightning_adamw.WeightDecayScheduler` timing contract) and ``p.grad`` is still the
    gradient the step used (no clipping in these runs).
    """

    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []
        self._handle: Any = None
        self._step = 0

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._handle = trainer.optimizers[0].register_step_post_hook(self._post_step)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._handle is not None:
            self._handle.remove()

    @torch.no_grad()
    def _post_step(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        row: dict[str, float] = {"step": float(self._step)}
        for group in optimizer.param_groups:
            if not group.get("base_weight_decay", group["weight_decay"]):
                continue
            name = group["name"]
            grads = [p.grad for p in group["params"] if p.grad is not None]
            norms = torch._foreach_norm(grads) if grads else []
            row[f"{name}/lr"] = float(group["lr"])
            row[f"{name}/weight_decay"] = float(group["weight_decay"])
            row[f"{name}/grad_norm"] = float(torch.linalg.vector_norm(torch.stack(norms))) if norms else 0.0
        self.rows.append(row)
        self._step += 1


@torch.no_grad()
def validation_bpc(model: TinyGPT, loader: Any) -> float:
    """Bits per character over every validation window (each character scored once)."""
    model.eval()
    total, count = 0.0, 0
    for x, y in loader:
        total += float(model._loss((x, y))) * y.numel()
        count += y.numel()
    return total / count / math.log(2)


def read_csv_series(path: Path, prefix: str) -> dict[str, list[list[float]]]:
    """``{metric: [[step, value], ...]}`` of every ``<prefix>/<metric>`` column of a CSVLogger file."""
    series: dict[str, list[list[float]]] = {}
    if not path.exists():
        return series
    with path.open() as handle:
        for row in csv.DictReader(handle):
            for key, value in row.items():
                if key and key.startswith(prefix + "/") and value not in (None, ""):
                    series.setdefault(key[len(prefix) + 1 :], []).append([float(row["step"]), float(value)])
    return series


def window_mean(steps: np.ndarray, values: np.ndarray, lo: float, hi: float) -> float:
    """Mean of ``values`` over the steps in ``[lo, hi)`` (NaN when there are none)."""
    mask = (steps >= lo) & (steps < hi)
    return float(values[mask].mean()) if mask.any() else math.nan


def run_schedule(
    args: argparse.Namespace, run_dir: Path, name: str, data: StdlibTextDataModule
) -> dict[str, Any]:
    """One ``Trainer.fit`` of the GPT under schedule ``name``; the per-step records and the monitor's series."""
    L.seed_everything(args.seed, verbose=False)
    model = TinyGPT(
        vocab_size=data.vocab_size,
        block_size=data.block_size,
        d_model=args.d_model,
        n_layers=args.n_layers,
        n_heads=args.n_heads,
        lr=args.lr,
        warmup_steps=args.warmup_steps,
        min_lr_ratio=args.min_lr_ratio,
        print_param_groups=name == SCHEDULES[0],
    )
    # Settings the mixin reads from attributes: λ from its timescale, the schedule, and the output layer (the
    # tied token embedding) in a group of its own so AdamC can leave it on plain AdamW decay.
    model.ema_timescale_fraction = args.tau_fraction
    model.weight_decay_schedule = schedule_setting(name)
    model.group_overrides = [{"pattern": "tok_emb.weight", "name": "head"}]
    monitor = WeightDecayMonitor(log_every_n_steps=args.log_every, plot=False)
    recorder = StepRecorder()
    trainer = L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=args.steps,
        logger=CSVLogger(save_dir=str(run_dir), name="fits", version=name),
        callbacks=[monitor, recorder],
        log_every_n_steps=args.log_every,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=not args.no_progress,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    groups = {g["name"]: g for g in trainer.optimizers[0].param_groups}
    monitor_series = read_csv_series(Path(trainer.logger.log_dir) / "metrics.csv", f"adamw/{MATRICES}")
    return {
        "schedule": name,
        "setting": schedule_setting(name),
        "seconds": seconds,
        "val_bpc": validation_bpc(model, data.val_dataloader()),
        "parameters": sum(p.numel() for p in model.parameters()),
        "base_weight_decay": {
            g: float(groups[g].get("base_weight_decay", groups[g]["weight_decay"])) for g in (MATRICES, HEAD)
        },
        "follows_schedule": {g: "weight_decay_schedule" in groups[g] for g in (MATRICES, HEAD)},
        "lr_max": args.lr,
        "steps": recorder.rows,
        "monitor": monitor_series,
        "log_dir": trainer.logger.log_dir,
    }


def summarize_schedule(run: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """The numbers the write-up quotes: ‖g‖, ‖w‖ and the decay / gradient ratio in the middle and at the end.

    ``mid`` is the window [40 %, 60 %) of training, ``end`` the last 10 %; ``grad_norm_rise`` = end / mid of the
    decayed matrices' gradient norm (Defazio et al. 2025 report it rising steeply during the cooldown).
    """
    rows = run["steps"]
    steps = np.asarray([r["step"] for r in rows])
    total = float(args.steps)
    mid, end = (0.4 * total, 0.6 * total), (0.9 * total, total + 1)
    grad = np.asarray([r[f"{MATRICES}/grad_norm"] for r in rows])
    out: dict[str, Any] = {
        "val_bpc": run["val_bpc"],
        "grad_norm_mid": window_mean(steps, grad, *mid),
        "grad_norm_end": window_mean(steps, grad, *end),
        "grad_norm_min_after_warmup": float(grad[steps >= args.warmup_steps].min()),
    }
    out["grad_norm_rise"] = out["grad_norm_end"] / out["grad_norm_mid"]
    for metric in ("weight_norm", "decay_to_grad_ratio", "grad_norm", "grad_to_weight"):
        points = run["monitor"].get(metric)
        if not points:
            continue
        s, v = np.asarray(points).T
        out[f"monitor_{metric}_mid"] = window_mean(s, v, *mid)
        out[f"monitor_{metric}_end"] = window_mean(s, v, *end)
        out[f"monitor_{metric}_last"] = float(v[-1])
    # What decay the matrices got over the whole run: Σ_t lr_t·wd_t (≈ the number of timescales elapsed).
    out["integrated_decay"] = float(sum(r[f"{MATRICES}/lr"] * r[f"{MATRICES}/weight_decay"] for r in rows))
    return out


def monitor_grad_check(run: dict[str, Any]) -> dict[str, Any] | None:
    """The monitor's ``grad_norm`` against this script's own ‖g‖ on the monitor's logging steps (when it has it)."""
    points = run["monitor"].get("grad_norm")
    if not points:
        return None
    own = {int(r["step"]): r[f"{MATRICES}/grad_norm"] for r in run["steps"]}
    pairs = [(v, own[int(s)]) for s, v in points if int(s) in own]
    if not pairs:
        return None
    return {"points": len(pairs), "max_rel_diff": max(abs(a - b) / b for a, b in pairs if b > 0)}


# ================================================================================================ part 2


def grid_lambdas(args: argparse.Namespace) -> dict[str, list[float]]:
    return {
        "constant": _logspace(*args.constant_range, args.num_lambda_constant),
        "independent": _logspace(*args.independent_range, args.num_lambda_independent),
    }


def _logspace(lo: float, hi: float, n: int) -> list[float]:
    # 3 significant digits: clean axis labels and JSON keys
    return [float(f"{v:.3g}") for v in np.logspace(math.log10(lo), math.log10(hi), n)]


def batch_order(n: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless shuffled window indices for ``seed``: the same batches in every cell of one seed."""
    generator = torch.Generator().manual_seed(10_000 + seed)
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch_size + 1, batch_size):
            yield order[start : start + batch_size]


def windows(data: torch.Tensor, block: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """All ``(x, y)`` windows of ``data`` as two ``(n, block)`` tensors (``y`` shifted by one character)."""
    starts = torch.arange(0, len(data) - block - 1, stride)
    index = starts[:, None] + torch.arange(block + 1)
    chunks = data[index]
    return chunks[:, :-1], chunks[:, 1:]


def train_cell(
    args: argparse.Namespace,
    data: StdlibTextDataModule,
    train: tuple[torch.Tensor, torch.Tensor],
    val: tuple[torch.Tensor, torch.Tensor],
    schedule: str,
    lr: float,
    lam: float,
    seed: int,
) -> float:
    """One grid cell: a small GPT trained with ``schedule`` at (lr, λ); its validation bits per character.

    The torch loop a Lightning run does, without Lightning: groups from ``build_param_groups``, warm-up +
    cosine lr, and the :class:`~lightning_adamw.WeightDecayScheduler` setting ``weight_decay`` every step.
    """
    torch.manual_seed(seed)
    model = TinyGPT(
        vocab_size=data.vocab_size,
        block_size=args.grid_block_size,
        d_model=args.grid_d_model,
        n_layers=args.grid_n_layers,
        n_heads=args.n_heads,
    )
    optimizer = torch.optim.AdamW(build_param_groups(model, lam), lr=lr, betas=(0.9, 0.95), foreach=True)
    lr_schedule = WarmupCosineLR(
        optimizer,
        warmup_steps=args.grid_warmup_steps,
        total_steps=args.grid_steps,
        min_lr_ratio=args.min_lr_ratio,
    )
    WeightDecayScheduler(optimizer, schedule)
    x_train, y_train = train
    batches = batch_order(len(x_train), args.grid_batch_size, seed)
    for _ in range(args.grid_steps):
        index = next(batches)
        loss = model._loss((x_train[index], y_train[index]))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        lr_schedule.step()
    x_val, y_val = val
    value = validation_bpc(model, zip(x_val.split(256), y_val.split(256), strict=True))
    return value if math.isfinite(value) else math.nan


def run_grid(args: argparse.Namespace, data: StdlibTextDataModule) -> dict[str, Any]:
    """Every (schedule, λ, lr, seed) cell; validation bpc shaped ``(seeds, λ, lr)`` per schedule, and the fits."""
    block = args.grid_block_size
    train = windows(data.train_data, block, block // 2)
    val = windows(data.val_data, block, block)
    lambdas = grid_lambdas(args)
    lrs = _logspace(*args.lr_range, args.num_lr)
    seeds = list(range(args.seeds))
    cells = [
        (s, li, ri, si)
        for s in GRID_AXES
        for si in seeds
        for li in range(len(lambdas[s]))
        for ri in range(len(lrs))
    ]
    values = {s: np.full((len(seeds), len(lambdas[s]), len(lrs)), math.nan) for s in GRID_AXES}
    start = time.perf_counter()
    for schedule, li, ri, si in tqdm(
        cells, desc="grid", unit="run", disable=args.no_progress, file=sys.stdout
    ):
        values[schedule][si, li, ri] = train_cell(
            args, data, train, val, schedule, lrs[ri], lambdas[schedule][li], seeds[si]
        )
    seconds = time.perf_counter() - start
    # A run that diverged (NaN) counts as the unigram baseline: the worst a model that learned nothing gets.
    worst = data.unigram_bits_per_char()
    filled = {s: np.where(np.isfinite(v), v, worst) for s, v in values.items()}
    analysis: dict[str, Any] = {}
    for schedule, table in filled.items():
        info = analyse(
            table.mean(axis=0),
            lambdas[schedule],
            lrs,
            name=schedule,
            edge_tolerance=args.edge_tolerance,
            usable_factor=args.usable_factor,
        )
        per_seed = [
            analyse(
                table[si],
                lambdas[schedule],
                lrs,
                edge_tolerance=args.edge_tolerance,
                usable_factor=args.usable_factor,
            )
            for si in range(len(seeds))
        ]
        for key in ("slope", "edge_slope"):
            slopes = np.asarray([p[key] for p in per_seed], dtype=float)
            finite = slopes[np.isfinite(slopes)]
            info[f"{key}_per_seed"] = slopes
            info[f"{key}_seed_mean"] = float(finite.mean()) if finite.size else math.nan
            info[f"{key}_seed_std"] = float(finite.std(ddof=1)) if finite.size > 1 else math.nan
        info["cell_std_median"] = float(np.median(table.std(axis=0, ddof=1))) if len(seeds) > 1 else math.nan
        analysis[schedule] = info
    return {
        "lrs": lrs,
        "lambdas": lambdas,
        "seeds": len(seeds),
        "steps": args.grid_steps,
        "cells": len(cells),
        "seconds": seconds,
        "val_bpc_per_seed": values,
        "mean_val_bpc": {s: v.mean(axis=0) for s, v in filled.items()},
        "std_val_bpc": {
            s: v.std(axis=0, ddof=1) if len(seeds) > 1 else np.zeros(v.shape[1:]) for s, v in filled.items()
        },
        "diverged": {s: int((~np.isfinite(v)).sum()) for s, v in values.items()},
        "analysis": analysis,
    }


def write_grid_csv(grid: dict[str, Any], path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["schedule", "lr", "lambda", "per_step_decay_at_peak", "seed", "val_bpc"])
        for schedule, table in grid["val_bpc_per_seed"].items():
            for si in range(table.shape[0]):
                for li, lam in enumerate(grid["lambdas"][schedule]):
                    for ri, lr in enumerate(grid["lrs"]):
                        per_step = lam * lr if schedule == "constant" else lam
                        writer.writerow(
                            [schedule, lr, lam, f"{per_step:.6g}", si, f"{table[si, li, ri]:.5f}"]
                        )


# ================================================================================================ plots


def smooth(values: np.ndarray, width: int) -> np.ndarray:
    """Centered running mean over ``width`` points (edges use the points available)."""
    if width <= 1 or len(values) < width:
        return values
    kernel = np.ones(width)
    return np.convolve(values, kernel, mode="same") / np.convolve(np.ones_like(values), kernel, mode="same")


def plot_schedules(runs: dict[str, dict[str, Any]], args: argparse.Namespace, path: Path) -> Path:
    """Per schedule over training: lr and per-step decay, ‖g‖, ‖w‖ and the decay / gradient ratio."""
    fig = Figure(figsize=(9.0, 11.0), layout="constrained")
    axes = fig.subplots(4, 1, sharex=True)
    width = max(args.steps // 50, 1)
    for name, run in runs.items():
        rows = run["steps"]
        steps = np.asarray([r["step"] for r in rows])
        lr = np.asarray([r[f"{MATRICES}/lr"] for r in rows])
        wd = np.asarray([r[f"{MATRICES}/weight_decay"] for r in rows])
        grad = np.asarray([r[f"{MATRICES}/grad_norm"] for r in rows])
        style = {"color": COLORS[name], "linestyle": "--" if name == "independent" else "-", "label": name}
        axes[0].plot(steps, lr * wd, **style)
        axes[1].plot(steps, smooth(grad, width), **style)
        for ax, metric in ((axes[2], "weight_norm"), (axes[3], "decay_to_grad_ratio")):
            points = run["monitor"].get(metric)
            if points:
                s, v = np.asarray(points).T
                ax.plot(s, v, **style)
    first = next(iter(runs.values()))["steps"]
    lr_line = np.asarray([r[f"{MATRICES}/lr"] for r in first])
    twin = axes[0].twinx()
    twin.plot(np.arange(len(lr_line)), lr_line, color="gray", linewidth=1, label="lr_t (all)")
    twin.set_ylabel("learning rate", color="gray")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("per-step decay lr_t·wd_t")
    axes[0].set_title(
        f"Tiny GPT, {args.steps} steps, warm-up {args.warmup_steps} + cosine to {args.min_lr_ratio:g}·lr; "
        f"τ = {args.tau_fraction:g} of the run at the peak lr"
    )
    axes[1].set_ylabel(f"‖g‖ of '{MATRICES}' (running mean)")
    axes[2].set_ylabel(f"‖w‖ of '{MATRICES}' (monitor)")
    axes[3].set_ylabel("decay / gradient update (monitor)")
    axes[3].set_yscale("log")
    axes[3].set_xlabel("optimizer step")
    # The cooldown as the Defazio et al. figures show it: from the first step whose lr is below half the peak.
    cooldown = float(
        next((i for i, v in enumerate(lr_line) if i > args.warmup_steps and v < 0.5 * args.lr), 0)
    )
    top = max(
        float(np.max(np.asarray([r[f"{MATRICES}/lr"] * r[f"{MATRICES}/weight_decay"] for r in first]))), 1e-30
    )
    axes[0].set_ylim(
        top * 1e-4, top * 2.0
    )  # the last steps' decay falls towards 0: keep four decades in view
    for ax in axes:
        ax.axvspan(cooldown, args.steps, color="0.92", zorder=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8, loc="best")
    axes[1].text(cooldown, axes[1].get_ylim()[1], " cooldown (lr < half its peak)", va="top", fontsize=8)
    fig.savefig(path, dpi=100)
    return path


def plot_grid(grid: dict[str, Any], path: Path) -> Path:
    """Mean validation bpc heatmaps (x: lr, y: λ) with best λ per lr (circles) and the fitted slope."""
    names = list(GRID_AXES)
    fig = Figure(figsize=(5.8 * len(names), 5.4), layout="constrained")
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    every = np.concatenate([np.ravel(grid["mean_val_bpc"][s]) for s in names])
    lo = float(every.min())
    hi = lo * 1.25  # the valley keeps its contrast; the hurting corners saturate
    image = None
    lr_index = np.log10(grid["lrs"])
    lr_step = (lr_index[-1] - lr_index[0]) / max(len(lr_index) - 1, 1) or 1.0
    for ax, name in zip(axes, names, strict=True):
        table = np.asarray(grid["mean_val_bpc"][name])
        lam_index = np.log10(grid["lambdas"][name])
        step = (lam_index[-1] - lam_index[0]) / max(len(lam_index) - 1, 1) or 1.0
        image = ax.imshow(table, origin="lower", cmap="viridis_r", vmin=lo, vmax=hi, aspect="auto")
        for li in range(table.shape[0]):
            for ri in range(table.shape[1]):
                ax.text(
                    ri,
                    li,
                    f"{table[li, ri]:.3f}",
                    ha="center",
                    va="center",
                    fontsize=6,
                    color="white" if table[li, ri] > (lo + hi) / 2 else "black",
                )
        info = grid["analysis"][name]
        xs = np.arange(len(grid["lrs"]))
        best_y = (np.log10(info["best_lambda"]) - lam_index[0]) / step
        ax.scatter(xs, best_y, s=90, facecolors="none", edgecolors="red", linewidths=1.5)
        if math.isfinite(info["slope"]):
            fit = (info["intercept"] + info["slope"] * lr_index - lam_index[0]) / step
            ax.plot((lr_index - lr_index[0]) / lr_step, fit, "r--", linewidth=1.3)
        ax.set_xlim(-0.5, len(xs) - 0.5)
        ax.set_ylim(-0.5, len(lam_index) - 0.5)
        ax.set_xticks(range(len(xs)), [f"{v:.0e}" for v in grid["lrs"]], rotation=45, fontsize=8)
        ax.set_yticks(range(len(lam_index)), [f"{v:.0e}" for v in grid["lambdas"][name]], fontsize=8)
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel(GRID_AXES[name], fontsize=8)
        ax.set_title(
            f"weight_decay_schedule={name!r}: best {info['best_value']:.3f} bpc\n"
            f"slope of best λ vs lr: {info['slope']:+.2f} ± {info['slope_stderr']:.2f} (mean table), "
            f"{info['slope_seed_mean']:+.2f} ± {info['slope_seed_std']:.2f} (seeds)",
            fontsize=8,
        )
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="validation bits per character, mean over seeds", shrink=0.9)
    fig.savefig(path, dpi=100)
    return path


# ================================================================================================ main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="weight_decay_schedules",
        description=(
            "Weight decay schedules (constant, independent, adamc) on a tiny GPT: gradient norm, weight norm and "
            "decay / gradient ratio over training, and a λ x lr grid of whether the best λ depends on lr. "
            "Results and plots go to <log-dir>/weight_decay_schedules/version_N/."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test")
    parser.add_argument("--log-dir", default="lightning_logs", help="root directory of the run")
    parser.add_argument("--seed", type=int, default=0, help="seed of the three schedule runs")
    parser.add_argument("--modules", nargs="+", default=None, help="standard-library modules of the corpus")
    runs = parser.add_argument_group("part 1: the three schedules through Lightning")
    runs.add_argument("--steps", type=int, default=1200, help="optimizer steps per run")
    runs.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    runs.add_argument("--warmup-steps", type=int, default=60)
    runs.add_argument("--min-lr-ratio", type=float, default=0.0, help="final lr / peak lr (also in the grid)")
    runs.add_argument(
        "--tau-fraction",
        type=float,
        default=0.1,
        help="ema_timescale_fraction: the decay's EMA timescale at the peak lr, as a fraction of the run",
    )
    runs.add_argument("--d-model", type=int, default=64)
    runs.add_argument("--n-layers", type=int, default=2)
    runs.add_argument("--n-heads", type=int, default=4)
    runs.add_argument("--block-size", type=int, default=64)
    runs.add_argument("--batch-size", type=int, default=32)
    runs.add_argument("--log-every", type=int, default=10, help="monitor and logger interval (steps)")
    grid = parser.add_argument_group("part 2: the λ x lr grid (plain torch)")
    grid.add_argument("--lr-range", nargs=2, type=float, default=(1e-3, 3e-2), metavar=("MIN", "MAX"))
    grid.add_argument("--num-lr", type=int, default=5)
    grid.add_argument("--constant-range", nargs=2, type=float, default=(1e-2, 1e2), metavar=("MIN", "MAX"))
    grid.add_argument("--num-lambda-constant", type=int, default=9)
    grid.add_argument(
        "--independent-range", nargs=2, type=float, default=(1e-4, 1e-1), metavar=("MIN", "MAX")
    )
    grid.add_argument("--num-lambda-independent", type=int, default=7)
    grid.add_argument("--seeds", type=int, default=3, help="seeds per cell (init and batch order)")
    grid.add_argument("--grid-steps", type=int, default=300)
    grid.add_argument("--grid-warmup-steps", type=int, default=30)
    grid.add_argument("--grid-d-model", type=int, default=32)
    grid.add_argument("--grid-n-layers", type=int, default=1)
    grid.add_argument("--grid-block-size", type=int, default=32)
    grid.add_argument("--grid-batch-size", type=int, default=16)
    grid.add_argument(
        "--edge-tolerance",
        type=float,
        default=0.02,
        help="the edge λ of an lr is the largest λ whose bpc is within (1 + this) x that lr's best",
    )
    grid.add_argument(
        "--usable-factor",
        type=float,
        default=1.05,
        help="learning rates whose best bpc is above this x the overall best did not train in the budget: "
        "left out of the slope fits",
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch CPU threads (tiny models: 1 is fastest)"
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


QUICK = {
    "steps": 60,
    "warmup_steps": 6,
    "d_model": 32,
    "n_layers": 1,
    "block_size": 32,
    "batch_size": 16,
    "log_every": 5,
    "num_lr": 2,
    "num_lambda_constant": 2,
    "num_lambda_independent": 2,
    "seeds": 2,
    "grid_steps": 20,
    "grid_warmup_steps": 2,
    "modules": ["textwrap", "heapq"],
    "usable_factor": 10.0,  # 20 steps train nothing well: fit every column, the test checks the mechanics
}


def apply_quick(args: argparse.Namespace) -> None:
    """Shrink everything for ``--quick`` (values given on the command line still win)."""
    defaults = build_parser().parse_args([])
    for key, value in QUICK.items():
        if getattr(args, key) == getattr(defaults, key):
            setattr(args, key, value)


def check_args(args: argparse.Namespace) -> None:
    if args.num_lr < 2 or args.num_lambda_constant < 2 or args.num_lambda_independent < 2:
        raise SystemExit("--num-lr, --num-lambda-constant and --num-lambda-independent must be >= 2")
    if args.steps < 10 * args.log_every:
        raise SystemExit(f"--steps ({args.steps}) must be at least 10 x --log-every ({args.log_every})")
    if args.warmup_steps > args.steps or args.grid_warmup_steps > args.grid_steps:
        raise SystemExit("--warmup-steps / --grid-warmup-steps must not exceed --steps / --grid-steps")
    if args.independent_range[1] >= 1:
        raise SystemExit("--independent-range: a per-step decay of 1 or more zeroes the weights every step")


def summary_lines(results: dict[str, Any]) -> list[str]:
    lines = ["", "=" * 100, "weight decay schedules on a tiny GPT: summary", "=" * 100]
    part1 = results["schedules"]
    lines.append(
        f"part 1: {results['args']['steps']} steps, peak lr {results['args']['lr']:g}, τ = "
        f"{results['args']['tau_fraction']:g} of the run at the peak lr; '{MATRICES}' group "
        "(‖g‖: mid = 40-60 % of training, end = last 10 %)"
    )
    lines.append(
        f"{'schedule':<12} {'λ':>10} {'Σ lr·wd':>8} {'val bpc':>8} {'‖g‖ mid':>9} {'‖g‖ end':>9} {'end/mid':>8} "
        f"{'‖w‖ mid':>8} {'‖w‖ end':>8} {'d/g end':>8}"
    )
    for name, s in part1.items():
        lam = results["runs"][name]["base_weight_decay"][MATRICES]
        lines.append(
            f"{name:<12} {lam:>10.4g} {s['integrated_decay']:>8.2f} {s['val_bpc']:>8.3f} {s['grad_norm_mid']:>9.3f} "
            f"{s['grad_norm_end']:>9.3f} {s['grad_norm_rise']:>8.2f} {s.get('monitor_weight_norm_mid', math.nan):>8.2f} "
            f"{s.get('monitor_weight_norm_end', math.nan):>8.2f} {s.get('monitor_decay_to_grad_ratio_end', math.nan):>8.3f}"
        )
    grid = results["grid"]
    lines.append(
        f"part 2: {grid['cells']} runs ({len(grid['lrs'])} lr x λ x {grid['seeds']} seed(s), {grid['steps']} steps "
        f"each) in {grid['seconds']:.0f}s; diverged: {grid['diverged']}"
    )
    lines.append(
        f"{'schedule':<12} {'best bpc':>9} {'at lr':>7} {'at λ':>8}  {'slope best λ (table)':>21}  "
        f"{'(seeds)':>14}  {'slope edge λ (table)':>21}  {'(seeds)':>14}"
    )

    def fmt(value: float | None, spread: float | None) -> str:
        if value is None:
            return "n/a"
        return f"{value:+.2f}" + (f" ± {spread:.2f}" if spread is not None else "")

    for name, info in grid["analysis"].items():
        lines.append(
            f"{name:<12} {info['best_value']:>9.3f} {info['best_lr']:>7.0e} {info['best_lambda_overall']:>8.0e}  "
            f"{fmt(info['slope'], info['slope_stderr']):>21}  {fmt(info['slope_seed_mean'], info['slope_seed_std']):>14}  "
            f"{fmt(info['edge_slope'], info['edge_slope_stderr']):>21}  "
            f"{fmt(info['edge_slope_seed_mean'], info['edge_slope_seed_std']):>14}"
        )
    lines.append(
        "  slope 0: λ does not depend on lr; -1: only lr·λ matters. Table: fit on the seed-mean bpc (± its standard "
        "error); seeds: one fit per seed (mean ± std)."
    )
    for name, info in grid["analysis"].items():
        cells = [
            f"{lr:.0e}: {b:.0e}/{e:.0e}" + ("" if used else "(x)")
            for lr, b, e, used in zip(
                grid["lrs"], info["best_lambda"], info["edge_lambda"], info["columns_used"], strict=True
            )
        ]
        lines.append(f"  {name:<12} best/edge λ per lr ((x): left out of the fits)  " + "  ".join(cells))
    lines.append(f"plots and numbers: {results['run_dir']}")
    return lines


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run both parts; return (and save as ``results.json``) every number the summary prints."""
    args = build_parser().parse_args(argv)
    if args.quick:
        apply_quick(args)
    check_args(args)
    torch.set_num_threads(args.threads)
    run_dir = Path(CSVLogger(save_dir=args.log_dir, name="weight_decay_schedules").log_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    print(f"weight_decay_schedules: writing to {run_dir}")

    print("\n[1/2] constant, independent and adamc through Trainer.fit")
    data = StdlibTextDataModule(modules=args.modules, block_size=args.block_size, batch_size=args.batch_size)
    runs = {name: run_schedule(args, run_dir, name, data) for name in SCHEDULES}
    summaries = {name: summarize_schedule(run, args) for name, run in runs.items()}
    schedules_plot = plot_schedules(runs, args, run_dir / "schedules.png")

    print("\n[2/2] λ x lr grid: constant vs independent")
    grid_data = StdlibTextDataModule(modules=args.modules, block_size=args.grid_block_size)
    grid = run_grid(args, grid_data)
    write_grid_csv(grid, run_dir / "grid.csv")
    grid_plot = plot_grid(grid, run_dir / "grid_heatmaps.png")

    results: dict[str, Any] = {
        "run_dir": str(run_dir),
        "args": vars(args),
        "runs": {name: {k: v for k, v in run.items()} for name, run in runs.items()},
        "schedules": summaries,
        "monitor_grad_norm_check": {name: monitor_grad_check(run) for name, run in runs.items()},
        "grid": grid,
        "plots": {"schedules": str(schedules_plot), "grid": str(grid_plot)},
        "versions": {"torch": torch.__version__, "lightning": L.__version__},
        "seconds": time.perf_counter() - start,
    }
    results = jsonable(results)
    (run_dir / "results.json").write_text(json.dumps(results, indent=1))
    print("\n".join(summary_lines(results)))
    print(f"total time {results['seconds']:.0f}s")
    return results


if __name__ == "__main__":
    main()
