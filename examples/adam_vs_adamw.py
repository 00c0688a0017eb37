"""Adam + L2 versus AdamW on scikit-learn's handwritten digits: the AdamW argument as an experiment.

Three parts, all on data that ships with scikit-learn (no download), all on a CPU:

1. **Identity at λ = 0.** Two real ``Trainer.fit`` runs, ``torch.optim.Adam`` and ``torch.optim.AdamW`` with
   ``weight_decay=0`` on the decay / no-decay groups of :class:`~lightning_adamw.DecoupledWeightDecayMixin`,
   end with bit-identical weights (``torch.equal`` on every tensor). Two more runs with the same λ > 0 show
   that the check can fail: there the weights differ.
2. **The learning-rate x weight-decay grid** (Loshchilov & Hutter, ICLR 2019, Fig. 2 style). A small
   LayerNorm MLP is trained for every (lr, λ, seed) cell with Adam + L2 and with AdamW, and the test error
   is drawn as heatmaps side by side. To make hundreds of runs cheap, the grid trains all cells at once in a
   plain-torch loop: every cell keeps its own parameters (built with :func:`lightning_adamw.build_param_groups`)
   and its own real ``torch.optim.Adam`` / ``AdamW`` groups; only the forward pass is batched (``torch.func``).
   A third panel, on by default, is AdamW in the paper's own parameterization: the paper decays by
   ``η_t·λ`` (schedule multiplier times λ), torch's AdamW by ``lr·λ``, so that panel gives torch
   ``weight_decay = λ / lr``. For each optimizer the summary reports the slope of log10(best λ) against
   log10(lr) (0: the best λ does not depend on lr; -1: only the product lr·λ matters) and the best test error.
3. **Effective decay, seen by the monitor.** The best Adam + L2 and AdamW settings are trained again through
   Lightning with :class:`~lightning_adamw.WeightDecayMonitor`. For Adam + L2 it reports the
   per-coordinate decay rate ``lr·λ/(√v̂+ε)`` that L2 inside Adam really applies (min / median / max); AdamW
   applies the same ``lr·λ`` to every coordinate. The plot shows both over training, and the distribution of
   the per-coordinate rates at the end of training.

Everything lands in one run directory (``<log-dir>/adam_vs_adamw/version_N/``): ``results.json`` (all numbers),
``grid.csv`` (one row per cell and seed), ``grid_heatmaps.png``, ``effective_decay.png``, and the Lightning
runs' CSV logs and monitor figures under ``fits/``.

Run it::

    python examples/adam_vs_adamw.py            # default size: a few minutes on 2 CPU cores
    python examples/adam_vs_adamw.py --quick    # seconds; what the tests run
    python examples/adam_vs_adamw.py --help
"""

from __future__ import annotations

import argparse
import copy
import csv
import functools
import json
import math
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import CSVLogger
from matplotlib.figure import Figure
from torch import nn
from torch.func import functional_call, vmap
from torch.nn import functional as F
from tqdm.auto import tqdm

from lightning_adamw import DecoupledWeightDecayMixin, WarmupCosineLR, WeightDecayMonitor, build_param_groups
from lightning_adamw.demo import DigitsDataModule
from lightning_adamw.update_split.backends.reference import adam_denominator

NUM_CLASSES = 10
NUM_FEATURES = 64  # 8 x 8 pixels

#: The optimizers the grid compares: label, torch class, and the torch ``weight_decay`` for (lr, λ).
OPTIMIZERS: dict[str, dict[str, Any]] = {
    "adam_l2": {
        "label": "Adam + L2",
        "short": "Adam+L2",
        "cls": torch.optim.Adam,
        "axis": "L2 factor λ (torch.optim.Adam weight_decay)",
    },
    "adamw": {
        "label": "AdamW (torch: decay lr·λ per step)",
        "short": "AdamW",
        "cls": torch.optim.AdamW,
        "axis": "weight decay λ (torch.optim.AdamW weight_decay)",
    },
    "adamw_paper": {
        "label": "AdamW (paper: decay η_t·λ per step)",
        "short": "AdamW-paper",
        "cls": torch.optim.AdamW,
        "axis": "weight decay λ (decay per step η_t·λ; torch weight_decay = λ/lr)",
    },
}


def torch_weight_decay(optimizer: str, lr: float, lam: float) -> float:
    """The ``weight_decay`` to give torch so that ``optimizer`` applies λ the way its grid axis means it.

    torch's AdamW multiplies the decay by the current learning rate (``w -= lr_t·wd·w``). The paper's AdamW
    multiplies it by the schedule multiplier only (``w -= η_t·λ·w``, with ``lr_t = lr·η_t``), hence ``λ / lr``.
    """
    return lam / lr if optimizer == "adamw_paper" else lam


# ================================================================================================ model


def make_mlp(hidden: int = 64, depth: int = 2) -> nn.Sequential:
    """``depth`` x (Linear, LayerNorm, ReLU) and a linear head, on flattened 8x8 digits.

    LayerNorm makes the hidden weights scale-invariant, as BatchNorm does in the paper's ResNets, so weight
    decay acts on them through the effective learning rate; the biases and norm gains go to the no-decay group.
    """
    layers: list[nn.Module] = []
    width = NUM_FEATURES
    for _ in range(depth):
        layers += [nn.Linear(width, hidden), nn.LayerNorm(hidden), nn.ReLU()]
        width = hidden
    layers.append(nn.Linear(width, NUM_CLASSES))
    return nn.Sequential(*layers)


class DigitsMLP(DecoupledWeightDecayMixin, L.LightningModule):
    """The grid's MLP as a LightningModule, for the runs that go through ``Trainer.fit``.

    Args:
        optimizer_name: ``"adam_l2"`` (``torch.optim.Adam``, λ as coupled L2), ``"adamw"`` or ``"adamw_paper"``
            (see :data:`OPTIMIZERS`); ``"adam_l2"`` with λ = 0 is plain Adam.
        lr: peak learning rate (cosine decay to 0 over the run, per optimizer step, as in the grid).
        weight_decay: λ in the chosen optimizer's convention.
        hidden: hidden width.
        depth: number of hidden layers.
        print_param_groups: print the mixin's group table when fit starts.
    """

    def __init__(
        self,
        optimizer_name: str = "adamw",
        lr: float = 3e-3,
        weight_decay: float = 0.0,
        hidden: int = 64,
        depth: int = 2,
        print_param_groups: bool = True,
    ) -> None:
        super().__init__()
        if optimizer_name not in OPTIMIZERS:
            raise ValueError(f"`optimizer_name` must be one of {sorted(OPTIMIZERS)}, got {optimizer_name!r}")
        self.save_hyperparameters()
        # Settings the mixin reads: the cosine schedule of the grid (no warm-up, down to 0).
        self.lr_schedule = "cosine"
        self.warmup_steps = 0
        self.min_lr_ratio = 0.0
        # The mixin hands the decay / no-decay groups to this callable; its weight_decay applies to "decay".
        # Adam and AdamW get identical arguments (foreach included), so at λ = 0 they run the same kernels.
        self.optimizer = functools.partial(
            OPTIMIZERS[optimizer_name]["cls"],
            lr=lr,
            weight_decay=torch_weight_decay(optimizer_name, lr, weight_decay),
            foreach=True,
        )
        self.net = make_mlp(hidden, depth)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images.flatten(1))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        images, labels = batch
        loss = F.cross_entropy(self(images), labels)
        self.log("train_loss", loss, prog_bar=True)
        return loss

    def test_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        images, labels = batch
        logits = self(images)
        self.log("test_loss", F.cross_entropy(logits, labels))
        self.log("test_error", 100.0 * (logits.argmax(-1) != labels).float().mean())


# ================================================================================================ data


@dataclass
class DigitsSplit:
    """Train and test tensors of one :class:`~lightning_adamw.demo.DigitsDataModule` split (flattened)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def datamodule(args: argparse.Namespace) -> DigitsDataModule:
    """The package's digits data module with this experiment's split (a big test set, for a precise error)."""
    return DigitsDataModule(
        batch_size=args.batch_size,
        val_fraction=args.val_fraction,
        test_fraction=args.test_fraction,
        seed=args.split_seed,
    )


def load_split(dm: DigitsDataModule) -> DigitsSplit:
    """The same samples the Lightning runs see, as whole tensors for the grid's plain-torch loop."""
    dm.setup("fit")

    def tensors(subset: Any) -> tuple[torch.Tensor, torch.Tensor]:
        images, labels = subset.dataset.tensors
        index = torch.as_tensor(subset.indices)
        return images[index].flatten(1), labels[index]

    x_train, y_train = tensors(dm.train_set)
    x_test, y_test = tensors(dm.test_set)
    return DigitsSplit(x_train, y_train, x_test, y_test)


# ================================================================================================ grid


@dataclass
class GridSpec:
    """What the grid trains: axes per optimizer, seeds, and the training recipe shared by every cell."""

    optimizers: list[str]
    lrs: list[float]
    lambdas: dict[str, list[float]]
    seeds: list[int]
    steps: int
    batch_size: int
    hidden: int
    depth: int


@dataclass
class GridResult:
    """Test error (%) and test loss per optimizer, shaped ``(seeds, lambdas, lrs)``; diverged cells marked."""

    spec: GridSpec
    errors: dict[str, np.ndarray]
    losses: dict[str, np.ndarray]
    diverged: dict[str, np.ndarray]
    seconds: float
    analysis: dict[str, dict[str, Any]] = field(default_factory=dict)

    def mean_errors(self, optimizer: str) -> np.ndarray:
        """Seed-averaged test error, shape ``(lambdas, lrs)``."""
        return self.errors[optimizer].mean(axis=0)


def _logspace(lo: float, hi: float, n: int) -> list[float]:
    # Rounded to 3 significant digits so the axis labels and JSON keys read cleanly.
    return [float(f"{v:.3g}") for v in np.logspace(math.log10(lo), math.log10(hi), n)]


def batch_order(n: int, batch_size: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless mini-batch indices for seed ``seed``: a fresh permutation per epoch, the incomplete tail dropped."""
    generator = torch.Generator().manual_seed(10_000 + seed)
    batch = min(batch_size, n)
    while True:
        order = torch.randperm(n, generator=generator)
        for start in range(0, n - batch + 1, batch):
            yield order[start : start + batch]


class Population:
    """Every (optimizer, λ, lr, seed) cell's own MLP, trained side by side with real torch optimizers.

    Cells are ordinary ``nn.Module`` copies whose decay / no-decay groups come from ``build_param_groups``.
    Groups with identical hyperparameters are merged before building the optimizer (Adam's update is
    per-coordinate, so this changes no number; it only saves torch's per-group Python overhead): one decay group
    per (optimizer, λ, lr) holding all seeds, one no-decay group per (optimizer, lr).
    """

    def __init__(self, spec: GridSpec) -> None:
        self.spec = spec
        inits = []
        for seed in spec.seeds:
            with torch.random.fork_rng():
                torch.manual_seed(seed)
                inits.append(make_mlp(spec.hidden, spec.depth))
        self.template = make_mlp(spec.hidden, spec.depth).to("meta")
        self.cells: list[tuple[str, int, int, int]] = []  # (optimizer, lambda index, lr index, seed index)
        self.members: list[nn.Module] = []
        self.optimizers: list[torch.optim.Optimizer] = []
        self.schedulers: list[WarmupCosineLR] = []
        for opt_name in spec.optimizers:
            decay_groups: list[dict[str, Any]] = []
            no_decay: dict[int, list[tuple[str, nn.Parameter]]] = {}
            for li, lam in enumerate(spec.lambdas[opt_name]):
                for ri, lr in enumerate(spec.lrs):
                    wd = torch_weight_decay(opt_name, lr, lam)
                    merged: list[tuple[str, nn.Parameter]] = []
                    for si in range(len(spec.seeds)):
                        member = copy.deepcopy(inits[si])
                        tag = f"{opt_name}.l{li}.r{ri}.s{si}."
                        for group in build_param_groups(member, wd):
                            named = [(tag + n, p) for n, p in group["params"]]
                            if group["name"] == "decay":
                                merged += named
                            else:
                                no_decay.setdefault(ri, []).extend(named)
                        self.members.append(member)
                        self.cells.append((opt_name, li, ri, si))
                    decay_groups.append({"name": "decay", "params": merged, "weight_decay": wd, "lr": lr})
            groups = decay_groups + [
                {"name": "no_decay", "params": params, "weight_decay": 0.0, "lr": spec.lrs[ri]}
                for ri, params in sorted(no_decay.items())
            ]
            optimizer = OPTIMIZERS[opt_name]["cls"](groups, lr=spec.lrs[0], foreach=True)
            self.optimizers.append(optimizer)
            self.schedulers.append(
                WarmupCosineLR(optimizer, warmup_steps=0, total_steps=spec.steps, min_lr_ratio=0.0)
            )
        self.names = [n for n, _ in self.template.named_parameters()]
        self.params = [list(m.parameters()) for m in self.members]
        self.seed_index = torch.tensor([c[3] for c in self.cells])
        self._forward = vmap(lambda params, x: functional_call(self.template, params, (x,)))

    def __len__(self) -> int:
        return len(self.members)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """``(cells, batch, classes)`` from ``x`` of shape ``(cells, batch, features)``."""
        # Stacking copies the small weights once per step; autograd routes each slice's gradient back to its
        # cell's own parameters, which is what the optimizers update.
        stacked = {n: torch.stack([p[i] for p in self.params]) for i, n in enumerate(self.names)}
        return self._forward(stacked, x)

    def train(self, data: DigitsSplit, progress: bool = True) -> None:
        spec = self.spec
        # One shuffling stream per seed: seed s means the same init *and* the same batches in every cell, so
        # the cells of one seed differ by their hyperparameters only (common random numbers).
        streams = [batch_order(len(data.x_train), spec.batch_size, seed) for seed in spec.seeds]
        bar = tqdm(
            range(spec.steps),
            desc=f"grid: {len(self)} runs side by side",
            unit="step",
            disable=not progress,
            file=sys.stdout,
        )
        for _ in bar:
            index = torch.stack([next(stream) for stream in streams])[self.seed_index]
            batch = index.shape[1]
            logits = self.logits(data.x_train[index])
            per_cell = F.cross_entropy(
                logits.reshape(-1, NUM_CLASSES), data.y_train[index].reshape(-1), reduction="none"
            ).view(len(self), batch)
            loss = per_cell.mean(dim=1)
            for optimizer in self.optimizers:
                optimizer.zero_grad(set_to_none=True)
            # The sum of the cells' losses: each cell's gradient is that of its own loss (no shared parameters).
            loss.sum().backward()
            for optimizer, scheduler in zip(self.optimizers, self.schedulers, strict=True):
                optimizer.step()
                scheduler.step()
            finite = loss.detach()[torch.isfinite(loss.detach())]
            if finite.numel():
                bar.set_postfix(median_loss=f"{finite.median().item():.3f}", refresh=False)

    @torch.no_grad()
    def evaluate(self, data: DigitsSplit) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per cell: test error (%), test loss, and whether the run diverged (non-finite weights or logits)."""
        x = data.x_test.unsqueeze(0).expand(len(self), -1, -1)
        logits = self.logits(x)
        finite = torch.isfinite(logits).flatten(1).all(dim=1)
        for i, params in enumerate(self.params):
            finite[i] &= all(bool(torch.isfinite(p).all()) for p in params)
        wrong = (logits.argmax(dim=-1) != data.y_test).float().mean(dim=1) * 100.0
        loss = F.cross_entropy(
            logits.reshape(-1, NUM_CLASSES), data.y_test.repeat(len(self)), reduction="none"
        ).view(len(self), -1)
        loss = loss.mean(dim=1)
        # A diverged run classifies nothing: count every test sample as an error (a finite, honest value).
        wrong = torch.where(finite, wrong, torch.full_like(wrong, 100.0))
        loss = torch.where(finite, loss, torch.full_like(loss, math.nan))
        return wrong.numpy(), loss.numpy(), (~finite).numpy()


def run_grid(
    spec: GridSpec, data: DigitsSplit, progress: bool = True, edge_tolerance: float = 0.2
) -> GridResult:
    """Train every cell of ``spec`` and return the test errors, shaped per optimizer ``(seeds, λ, lr)``."""
    start = time.perf_counter()
    population = Population(spec)
    population.train(data, progress=progress)
    wrong, loss, diverged = population.evaluate(data)
    shape = {o: (len(spec.seeds), len(spec.lambdas[o]), len(spec.lrs)) for o in spec.optimizers}
    errors = {o: np.zeros(s) for o, s in shape.items()}
    losses = {o: np.zeros(s) for o, s in shape.items()}
    flags = {o: np.zeros(s, dtype=bool) for o, s in shape.items()}
    for i, (opt_name, li, ri, si) in enumerate(population.cells):
        errors[opt_name][si, li, ri] = wrong[i]
        losses[opt_name][si, li, ri] = loss[i]
        flags[opt_name][si, li, ri] = diverged[i]
    result = GridResult(spec, errors, losses, flags, time.perf_counter() - start)
    for opt_name in spec.optimizers:
        result.analysis[opt_name] = analyse(
            result.mean_errors(opt_name),
            spec.lambdas[opt_name],
            spec.lrs,
            name=opt_name,
            edge_tolerance=edge_tolerance,
        )
    return result


def _line_fit(x: np.ndarray, y: np.ndarray) -> tuple[float, float, float]:
    """Least-squares ``y = slope·x + intercept`` and the slope's standard error (NaN with fewer than 3 points)."""
    if len(x) < 2:
        return math.nan, math.nan, math.nan
    slope, intercept = (float(v) for v in np.polyfit(x, y, 1))
    if len(x) < 3:
        return slope, intercept, math.nan
    residuals = y - (slope * x + intercept)
    spread = float(np.sum((x - x.mean()) ** 2))
    stderr = math.sqrt(float(np.sum(residuals**2)) / (len(x) - 2) / spread) if spread > 0 else math.nan
    return slope, intercept, stderr


def analyse(
    table: np.ndarray,
    lambdas: Sequence[float],
    lrs: Sequence[float],
    name: str = "",
    usable_factor: float | None = 2.0,
    edge_tolerance: float = 0.2,
) -> dict[str, Any]:
    """How the best λ, and the largest harmless λ, move with the learning rate.

    ``table`` is ``(lambdas, lrs)``, lower is better. Per learning rate (column):

    * ``best_lambda``: the argmin; ties (same mean error) take the geometric mean of the tied λ. Where the
      valley is flat this is mostly seed noise, hence the slope's standard error.
    * ``edge_lambda``: the largest λ whose value is within ``1 + edge_tolerance`` times the column's best,
      i.e. where decay starts to hurt. It is the boundary of the good region in the heatmap, the feature that
      Loshchilov & Hutter's figures show, and it is far less noisy than the argmin. ``edge_censored`` marks
      columns where even the largest λ of the grid is harmless (the edge is above the grid).

    Columns whose best value is more than ``usable_factor`` times the overall best (a learning rate too small to
    train in the budget, or one that diverges) are left out of both fits: their λ says nothing.
    ``slope`` / ``edge_slope``: of log10(λ) against log10(lr); 0 means λ does not depend on lr, -1 means only
    the product lr·λ matters.
    """
    lam = np.asarray(lambdas, dtype=float)
    lr = np.asarray(lrs, dtype=float)
    best_value = float(np.min(table))
    li, ri = np.unravel_index(int(np.argmin(table)), table.shape)
    best_lambda: list[float] = []
    edge_lambda: list[float] = []
    censored: list[bool] = []
    used: list[bool] = []
    for col in range(table.shape[1]):
        column = table[:, col]
        best = column.min()
        tied = np.flatnonzero(column == best)
        best_lambda.append(float(10 ** np.mean(np.log10(lam[tied]))))
        harmless = np.flatnonzero(column <= best * (1.0 + edge_tolerance))
        edge_lambda.append(float(lam[harmless.max()]))
        censored.append(bool(harmless.max() == len(lam) - 1))
        ok = bool(np.isfinite(best))
        if usable_factor is not None:
            ok = ok and best <= usable_factor * best_value
        used.append(ok)
    mask = np.asarray(used)
    x = np.log10(lr)
    slope, intercept, stderr = _line_fit(x[mask], np.log10(best_lambda)[mask])
    edge_mask = mask & ~np.asarray(censored)
    edge_slope, edge_intercept, edge_stderr = _line_fit(x[edge_mask], np.log10(edge_lambda)[edge_mask])
    return {
        "optimizer": name,
        "best_value": best_value,
        "best_lr": float(lr[ri]),
        "best_lambda_overall": float(lam[li]),
        "columns_used": used,
        "best_lambda": best_lambda,
        "slope": slope,
        "slope_stderr": stderr,
        "intercept": intercept,
        "edge_tolerance": edge_tolerance,
        "edge_lambda": edge_lambda,
        "edge_censored": censored,
        "edge_slope": edge_slope,
        "edge_slope_stderr": edge_stderr,
        "edge_intercept": edge_intercept,
    }


# ================================================================================================ Lightning runs


def _trainer(
    args: argparse.Namespace,
    run_dir: Path,
    version: str,
    *,
    max_steps: int,
    callbacks: list[Any] | None = None,
    log_every_n_steps: int = 10,
) -> L.Trainer:
    return L.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=CSVLogger(save_dir=str(run_dir), name="fits", version=version),
        callbacks=callbacks or [],
        log_every_n_steps=log_every_n_steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_model_summary=False,
        enable_progress_bar=not args.no_progress,
        deterministic=True,
    )


def _fit(
    args: argparse.Namespace,
    run_dir: Path,
    version: str,
    optimizer_name: str,
    lr: float,
    weight_decay: float,
    max_steps: int,
    *,
    seed: int,
    callbacks: list[Any] | None = None,
    log_every_n_steps: int = 10,
    print_groups: bool = False,
) -> tuple[DigitsMLP, L.Trainer]:
    L.seed_everything(seed, workers=True, verbose=False)
    model = DigitsMLP(
        optimizer_name,
        lr=lr,
        weight_decay=weight_decay,
        hidden=args.hidden,
        depth=args.depth,
        print_param_groups=print_groups,
    )
    trainer = _trainer(
        args, run_dir, version, max_steps=max_steps, callbacks=callbacks, log_every_n_steps=log_every_n_steps
    )
    with warnings.catch_warnings():
        # Lightning's hint about DataLoader workers: 0 workers is the fastest for 1,797 tiny images.
        warnings.filterwarnings("ignore", message=".*does not have many workers.*")
        trainer.fit(model, datamodule=datamodule(args))
    return model, trainer


def identity_check(args: argparse.Namespace, run_dir: Path) -> dict[str, Any]:
    """Adam and AdamW through ``Trainer.fit``: bit-identical weights at λ = 0, different ones at λ > 0."""
    out: dict[str, Any] = {"steps": args.identity_steps, "lr": args.identity_lr}
    for lam in (0.0, args.identity_lambda):
        weights = {}
        for name in ("adam_l2", "adamw"):
            model, _ = _fit(
                args,
                run_dir,
                f"identity_{name}_wd{lam:g}",
                name,
                args.identity_lr,
                lam,
                args.identity_steps,
                seed=args.seed,
                print_groups=lam == 0.0 and name == "adam_l2",
            )
            weights[name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        a, b = weights["adam_l2"], weights["adamw"]
        identical = all(torch.equal(a[k], b[k]) for k in a)
        max_diff = max(float((a[k] - b[k]).abs().max()) for k in a)
        out[f"wd={lam:g}"] = {"identical": identical, "max_abs_diff": max_diff, "tensors": len(a)}
    out["identical_at_zero"] = out["wd=0"]["identical"]
    out["differs_at_lambda"] = not out[f"wd={args.identity_lambda:g}"]["identical"]
    return out


def per_coordinate_rates(optimizer: torch.optim.Optimizer) -> dict[str, np.ndarray]:
    """``λ / (√v̂ + ε)`` of every coordinate of every decayed tensor of a coupled-L2 Adam, by parameter name.

    Multiply by a step's learning rate to get that step's effective decay rate. ``√v̂`` is computed the way
    torch's Adam does (``sqrt(v) / sqrt(1 - β2^t) + ε``), from the optimizer state after training.
    """
    rates: dict[str, np.ndarray] = {}
    for group in optimizer.param_groups:
        wd = float(group["weight_decay"])
        if wd <= 0:
            continue
        names = group.get("param_names") or [f"param{j}" for j in range(len(group["params"]))]
        _, beta2 = group["betas"]
        for name, p in zip(names, group["params"], strict=True):
            state = optimizer.state.get(p, {})
            if "exp_avg_sq" not in state:
                continue
            denom = adam_denominator(state["exp_avg_sq"], float(state["step"]), beta2, group["eps"])
            rates[name] = (wd / denom).flatten().numpy()
    return rates


class RateSnapshot(L.Callback):
    """Keeps :func:`per_coordinate_rates` of the optimizer right after optimizer step ``step`` (0-based)."""

    def __init__(self, step: int) -> None:
        self.step = step
        self.rates: dict[str, np.ndarray] | None = None

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        # global_step counts the steps taken, so step s has just been applied when it reads s + 1. The optimizer
        # state (v) is that of step s; the learning rate may already be the next step's, so it is not read here.
        if self.rates is None and trainer.global_step == self.step + 1:
            self.rates = per_coordinate_rates(trainer.optimizers[0])


def _series_at(series: dict[str, list[list[float]]], key: str, step: int) -> float:
    return next(v for s, v in series[key] if int(s) == step)


def effective_decay(args: argparse.Namespace, run_dir: Path, grid: GridResult) -> dict[str, Any]:
    """The best Adam + L2 and AdamW cells trained through Lightning with the WeightDecayMonitor.

    For Adam + L2 the per-coordinate rates are also computed from the optimizer state at the middle of training
    (a monitor logging step) and compared with the monitor's min / median / max of the same step.
    """
    out: dict[str, Any] = {}
    steps = args.effdecay_steps
    interval = max(1, steps // 50)
    # The snapshot step must be one the monitor logs: (step + 1) % interval == 0.
    snapshot_step = max(steps // 2 // interval, 1) * interval - 1
    for name in ("adam_l2", "adamw"):
        if name not in grid.analysis:
            continue
        best = grid.analysis[name]
        lr, lam = best["best_lr"], best["best_lambda_overall"]
        monitor = WeightDecayMonitor(log_every_n_steps=interval, per_layer=True)
        snapshot = RateSnapshot(snapshot_step)
        model, trainer = _fit(
            args,
            run_dir,
            f"effective_decay_{name}",
            name,
            lr,
            lam,
            steps,
            seed=args.seed,
            callbacks=[monitor, snapshot],
            log_every_n_steps=interval,
        )
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            tested = trainer.test(model, datamodule=datamodule(args), verbose=False)[0]
        log_dir = Path(trainer.logger.log_dir) if trainer.logger and trainer.logger.log_dir else run_dir
        entry: dict[str, Any] = {
            "lr": lr,
            "lambda": lam,
            "steps": steps,
            "test_error": float(tested["test_error"]),
            "grid_test_error": best["best_value"],
            "history": monitor.history,
            "monitor_figure": monitor.figure_path,
            "log_dir": str(log_dir),
            "snapshot_step": snapshot_step,
        }
        if name == "adamw":
            rates = dict(zip(*_adamw_rates(log_dir / "metrics.csv"), strict=True))
            entry["rate_at_snapshot"] = rates.get(float(snapshot_step), math.nan)
        if name == "adam_l2" and snapshot.rates:
            series = monitor.history["adam_l2/decay"]
            step_lr = _series_at(series, "uniform_decay_rate", snapshot_step) / lam
            rates = {k: v * step_lr for k, v in snapshot.rates.items()}  # lr_s·λ/(√v̂+ε)
            everything = np.concatenate(list(rates.values()))
            own = {
                "min": float(everything.min()),
                # torch.median's (lower) median, as the monitor reports it
                "median": float(np.sort(everything)[(everything.size - 1) // 2]),
                "max": float(everything.max()),
            }
            logged = {k: _series_at(series, f"eff_decay_rate_{k}", snapshot_step) for k in own}
            entry["rates_at_snapshot"] = {k: v.tolist() for k, v in rates.items()}
            entry["uniform_rate_at_snapshot"] = step_lr * lam
            entry["check_against_monitor"] = {
                "step": snapshot_step,
                "monitor": logged,
                "from_optimizer_state": own,
                "max_rel_diff": max(abs(own[k] - logged[k]) / abs(logged[k]) for k in own),
            }
            entry["spread_max_over_min"] = own["max"] / own["min"]
            entry["median_over_uniform"] = own["median"] / (step_lr * lam)
        out[name] = entry
    return out


# ================================================================================================ plots


def plot_heatmaps(grid: GridResult, path: Path) -> Path:
    """Test error heatmaps side by side (x: learning rate, y: λ), best λ per lr marked, fitted slope drawn."""
    spec = grid.spec
    names = spec.optimizers
    fig = Figure(figsize=(5.6 * len(names), 5.2), layout="constrained")
    axes = fig.subplots(1, len(names), squeeze=False)[0]
    every = np.concatenate([grid.mean_errors(o).ravel() for o in names])
    lo = float(every.min())
    # Colour range from the best cell to a few times it: the interesting valley keeps its contrast and the
    # diverged corners saturate instead of flattening everything else.
    hi = max(lo * 3.0, lo + 5.0)
    image = None
    for ax, name in zip(axes, names, strict=True):
        table = grid.mean_errors(name)
        lams = spec.lambdas[name]
        image = ax.imshow(table, origin="lower", cmap="viridis_r", vmin=lo, vmax=hi, aspect="auto")
        for li in range(table.shape[0]):
            for ri in range(table.shape[1]):
                value = table[li, ri]
                ax.text(
                    ri,
                    li,
                    f"{value:.1f}" if value < 99.95 else "div",
                    ha="center",
                    va="center",
                    fontsize=7,
                    color="white" if value > (lo + hi) / 2 else "black",
                )
        info = grid.analysis[name]
        lam_index = np.log10(lams)
        step = (lam_index[-1] - lam_index[0]) / max(len(lams) - 1, 1)
        lr_index = np.log10(spec.lrs)
        lr_step = (lr_index[-1] - lr_index[0]) / max(len(spec.lrs) - 1, 1)
        xs = np.arange(len(spec.lrs))
        used = np.asarray(info["columns_used"])

        def to_row(
            values: Sequence[float], lam_index: np.ndarray = lam_index, step: float = step
        ) -> np.ndarray:
            return (np.log10(np.asarray(values, dtype=float)) - lam_index[0]) / step

        best_y = to_row(info["best_lambda"])
        ax.scatter(xs[used], best_y[used], s=90, facecolors="none", edgecolors="red", linewidths=1.5)
        ax.scatter(xs[~used], best_y[~used], s=90, facecolors="none", edgecolors="gray")
        # The edge of the good region: the largest λ that keeps the error within tolerance of the column's best.
        edge_y = to_row(info["edge_lambda"]) + 0.5
        edge_ok = used & ~np.asarray(info["edge_censored"])
        ax.scatter(xs[edge_ok], edge_y[edge_ok], marker="_", s=300, color="white", linewidths=2.5, zorder=3)
        ax.scatter(xs[~edge_ok], edge_y[~edge_ok], marker="_", s=300, color="gray", linewidths=2, zorder=3)
        li, ri = np.unravel_index(int(np.argmin(table)), table.shape)
        ax.scatter([ri], [li], marker="*", s=220, color="red", edgecolors="white", zorder=4)
        fits = (("slope", "intercept", "r--"), ("edge_slope", "edge_intercept", "w:"))
        for slope_key, intercept_key, style in fits:
            if not math.isfinite(info[slope_key]):
                continue
            fit = (info[intercept_key] + info[slope_key] * lr_index - lam_index[0]) / step
            if slope_key == "edge_slope":
                fit = fit + 0.5
            ax.plot((lr_index - lr_index[0]) / lr_step, fit, style, linewidth=1.3)

        def slope_text(key: str, info: dict[str, Any] = info) -> str:
            value, se = info[key], info[f"{key}_stderr"]
            if not math.isfinite(value):
                return "n/a"
            return f"{value:+.2f}" + (f" ± {se:.2f}" if math.isfinite(se) else "")

        ax.set_xlim(-0.5, len(spec.lrs) - 0.5)
        ax.set_ylim(-0.5, len(lams) - 0.5)
        ax.set_xticks(range(len(spec.lrs)), [f"{v:.0e}" for v in spec.lrs], rotation=45, fontsize=8)
        ax.set_yticks(range(len(lams)), [f"{v:.0e}" for v in lams], fontsize=8)
        ax.set_xlabel("learning rate (peak of the cosine schedule)")
        ax.set_ylabel(OPTIMIZERS[name]["axis"], fontsize=8)
        ax.set_title(
            f"{OPTIMIZERS[name]['label']}\nbest test error {info['best_value']:.2f}%\n"
            f"slope vs lr: best λ {slope_text('slope')}, edge λ {slope_text('edge_slope')}",
            fontsize=9,
        )
    if image is not None:
        fig.colorbar(image, ax=list(axes), label="test error (%), mean over seeds", shrink=0.9)
    fig.suptitle(
        f"Digits MLP, {spec.steps} steps, batch {spec.batch_size}, {len(spec.seeds)} seed(s); "
        f"red circles / dashed fit: best λ per lr; white bars / dotted fit: edge λ (largest λ within "
        f"{grid.analysis[names[0]]['edge_tolerance']:.0%} of the lr's best); gray: left out of the fits; star: best",
        fontsize=9,
    )
    fig.savefig(path, dpi=110)
    return path


def plot_effective_decay(eff: dict[str, Any], path: Path) -> Path:
    """Left: Adam + L2's per-coordinate decay rate band over training vs AdamW's ``lr·λ``. Right: distribution."""
    fig = Figure(figsize=(12.0, 4.6), layout="constrained")
    ax_time, ax_hist = fig.subplots(1, 2)
    l2 = eff.get("adam_l2")
    aw = eff.get("adamw")
    if l2 is not None:
        series = l2["history"].get("adam_l2/decay", {})
        xs = [s for s, _ in series.get("eff_decay_rate_min", [])]
        lo = [v for _, v in series.get("eff_decay_rate_min", [])]
        hi = [v for _, v in series.get("eff_decay_rate_max", [])]
        med = [v for _, v in series.get("eff_decay_rate_median", [])]
        uni = [v for _, v in series.get("uniform_decay_rate", [])]
        label = f"Adam+L2 (lr={l2['lr']:.0e}, λ={l2['lambda']:.0e})"
        if xs:
            ax_time.fill_between(
                xs, lo, hi, color="tab:purple", alpha=0.2, label=f"{label}: min..max over coords"
            )
            ax_time.plot(xs, med, color="tab:purple", label=f"{label}: median")
            ax_time.plot(
                xs, uni, color="tab:purple", linestyle=":", label="lr·λ with the same lr, λ (uniform)"
            )
    if aw is not None:
        # AdamW multiplies every coordinate by (1 - lr_t·λ): its rate lr_t·λ is 1 / ema_timescale_steps, which the
        # monitor logs at every logging step (read back from the run's CSV log).
        csv_path = Path(aw["log_dir"]) / "metrics.csv" if aw.get("log_dir") else None
        steps, rates = _adamw_rates(csv_path)
        if steps:
            ax_time.plot(
                steps,
                rates,
                color="tab:red",
                linewidth=2,
                label=f"AdamW (lr={aw['lr']:.0e}, λ={aw['lambda']:.0e}): lr·λ",
            )
    ax_time.set_yscale("log")
    ax_time.set_xlabel("optimizer step")
    ax_time.set_ylabel("decay rate per step (fraction of w removed)")
    ax_time.set_title("Effective weight decay per coordinate (WeightDecayMonitor)")
    ax_time.grid(True, which="both", alpha=0.3)
    ax_time.legend(fontsize=7, loc="lower left")
    if l2 is not None and l2.get("rates_at_snapshot"):
        per_tensor = {k: np.asarray(v) for k, v in l2["rates_at_snapshot"].items()}
        everything = np.concatenate(list(per_tensor.values()))
        bins = np.logspace(math.log10(everything.min()), math.log10(everything.max()), 60)
        ax_hist.hist(list(per_tensor.values()), bins=bins, stacked=True, label=list(per_tensor))
        ax_hist.axvline(
            l2["uniform_rate_at_snapshot"],
            color="tab:purple",
            linestyle=":",
            label="lr·λ (same lr, λ, uniform)",
        )
        if aw is not None and math.isfinite(aw.get("rate_at_snapshot", math.nan)):
            ax_hist.axvline(
                aw["rate_at_snapshot"], color="tab:red", linewidth=2, label="AdamW lr·λ (every coordinate)"
            )
        ax_hist.set_xscale("log")
        ax_hist.set_xlabel(f"decay rate lr·λ/(√v̂+ε) applied at step {l2['snapshot_step']}")
        ax_hist.set_ylabel("coordinates")
        ax_hist.set_title(
            f"Adam+L2 at step {l2['snapshot_step']}: {everything.size:,} decayed coordinates, "
            f"max/min = {everything.max() / everything.min():.0e}",
            fontsize=10,
        )
        ax_hist.legend(fontsize=7)
    fig.savefig(path, dpi=110)
    return path


def _adamw_rates(csv_path: Path | None) -> tuple[list[float], list[float]]:
    """``(step, lr·λ)`` of an AdamW run from the monitor's ``ema_timescale_steps`` (= 1/(lr·λ)) in its CSV log."""
    if csv_path is None or not csv_path.exists():
        return [], []
    steps, rates = [], []
    with csv_path.open() as handle:
        for row in csv.DictReader(handle):
            value = row.get("adamw/decay/ema_timescale_steps")
            if value:
                steps.append(float(row["step"]))
                rates.append(1.0 / float(value))
    return steps, rates


# ================================================================================================ main


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="adam_vs_adamw",
        description=(
            "Adam + L2 versus AdamW on scikit-learn's digits: bit-identity at weight decay 0, a learning-rate x "
            "weight-decay test-error grid (Loshchilov & Hutter 2019, Fig. 2 style) and the effective decay seen "
            "by WeightDecayMonitor. Results and plots go to <log-dir>/adam_vs_adamw/version_N/."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes for a smoke test (6x6 grid, 1 seed)")
    parser.add_argument("--log-dir", default="lightning_logs", help="root directory of the run")
    grid = parser.add_argument_group("grid")
    grid.add_argument(
        "--optimizers",
        nargs="+",
        choices=list(OPTIMIZERS),
        default=list(OPTIMIZERS),
        help="panels of the grid (adamw_paper: AdamW with the paper's lr-independent decay)",
    )
    grid.add_argument("--lr-range", nargs=2, type=float, default=(3e-4, 1e-1), metavar=("MIN", "MAX"))
    grid.add_argument("--num-lr", type=int, default=7, help="learning rates, log-spaced (>= 6)")
    grid.add_argument("--l2-range", nargs=2, type=float, default=(1e-4, 1.0), metavar=("MIN", "MAX"))
    grid.add_argument("--wd-range", nargs=2, type=float, default=(1e-1, 1e3), metavar=("MIN", "MAX"))
    grid.add_argument("--paper-wd-range", nargs=2, type=float, default=(1e-5, 1e-1), metavar=("MIN", "MAX"))
    grid.add_argument(
        "--num-lambda", type=int, default=9, help="weight decays per optimizer, log-spaced (>= 6)"
    )
    grid.add_argument("--seeds", type=int, default=3, help="seeds per cell (init and batch order)")
    grid.add_argument("--steps", type=int, default=300, help="optimizer steps per run")
    grid.add_argument(
        "--edge-tolerance",
        type=float,
        default=0.2,
        help="the 'edge' λ of a learning rate is the largest λ whose error is within (1 + this) x its best",
    )
    grid.add_argument("--batch-size", type=int, default=128)
    grid.add_argument("--hidden", type=int, default=64, help="MLP width")
    grid.add_argument("--depth", type=int, default=2, help="MLP hidden layers")
    data = parser.add_argument_group("data")
    data.add_argument("--val-fraction", type=float, default=0.2, help="held out, unused by the grid")
    data.add_argument(
        "--test-fraction", type=float, default=0.5, help="test set share (large: precise error)"
    )
    data.add_argument("--split-seed", type=int, default=0)
    runs = parser.add_argument_group("Lightning runs")
    runs.add_argument("--seed", type=int, default=0, help="seed of the Lightning runs")
    runs.add_argument("--identity-steps", type=int, default=100, help="steps of the Adam/AdamW identity runs")
    runs.add_argument("--identity-lr", type=float, default=3e-3)
    runs.add_argument(
        "--identity-lambda", type=float, default=1e-2, help="the λ > 0 at which Adam and AdamW must differ"
    )
    runs.add_argument("--effdecay-steps", type=int, default=400, help="steps of the monitored runs")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads; the grid's many small ops run fastest on one thread per process",
    )
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bars")
    return parser


def apply_quick(args: argparse.Namespace) -> None:
    """Shrink everything for ``--quick`` (explicit values given on the command line still win)."""
    defaults = build_parser().parse_args([])
    quick = {
        "num_lr": 6,
        "num_lambda": 6,
        "seeds": 1,
        "steps": 60,
        "hidden": 32,
        "identity_steps": 12,
        "effdecay_steps": 40,
    }
    for key, value in quick.items():
        if getattr(args, key) == getattr(defaults, key):
            setattr(args, key, value)


def grid_spec(args: argparse.Namespace) -> GridSpec:
    if args.num_lr < 2 or args.num_lambda < 2:
        raise SystemExit("--num-lr and --num-lambda must be >= 2 (the issue asks for at least 6)")
    ranges = {"adam_l2": args.l2_range, "adamw": args.wd_range, "adamw_paper": args.paper_wd_range}
    return GridSpec(
        optimizers=list(args.optimizers),
        lrs=_logspace(*args.lr_range, args.num_lr),
        lambdas={o: _logspace(*ranges[o], args.num_lambda) for o in args.optimizers},
        seeds=list(range(args.seeds)),
        steps=args.steps,
        batch_size=args.batch_size,
        hidden=args.hidden,
        depth=args.depth,
    )


def _run_dir(args: argparse.Namespace) -> Path:
    logger = CSVLogger(save_dir=args.log_dir, name="adam_vs_adamw")
    path = Path(logger.log_dir)
    path.mkdir(parents=True, exist_ok=True)
    return path


def write_grid_csv(grid: GridResult, path: Path) -> None:
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(
            ["optimizer", "lr", "lambda", "torch_weight_decay", "seed", "test_error", "test_loss", "diverged"]
        )
        for name in grid.spec.optimizers:
            for si, seed in enumerate(grid.spec.seeds):
                for li, lam in enumerate(grid.spec.lambdas[name]):
                    for ri, lr in enumerate(grid.spec.lrs):
                        writer.writerow(
                            [
                                name,
                                lr,
                                lam,
                                torch_weight_decay(name, lr, lam),
                                seed,
                                f"{grid.errors[name][si, li, ri]:.4f}",
                                f"{grid.losses[name][si, li, ri]:.6f}",
                                int(grid.diverged[name][si, li, ri]),
                            ]
                        )


def jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return jsonable(value.tolist())
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, (np.integer, np.bool_)):
        return value.item()
    return value


def summary_lines(results: dict[str, Any]) -> list[str]:
    lines = ["", "=" * 100, "Adam + L2 versus AdamW on digits: summary", "=" * 100]
    ident = results["identity"]
    lines.append(
        f"λ = 0: Adam and AdamW weights after {ident['steps']} Trainer steps are "
        f"{'BIT-IDENTICAL' if ident['identical_at_zero'] else 'DIFFERENT'} "
        f"({ident['wd=0']['tensors']} tensors, max |Δ| = {ident['wd=0']['max_abs_diff']:.1e}); "
        f"at λ = {results['args']['identity_lambda']:g} they differ by up to "
        f"{ident['wd=' + format(results['args']['identity_lambda'], 'g')]['max_abs_diff']:.1e}."
    )
    grid = results["grid"]
    lines.append(
        f"grid: {grid['cells']} runs ({len(grid['lrs'])} lr x {grid['num_lambda']} λ x {grid['seeds']} seed(s)"
        f" x {len(grid['analysis'])} optimizers, {grid['steps']} steps each) in {grid['seconds']:.0f}s"
    )
    tol = next(iter(grid["analysis"].values()))["edge_tolerance"]
    lines.append(
        f"{'optimizer':<36} {'best test error':>15} {'at lr':>7} {'at λ':>7}   "
        f"{'slope: best λ vs lr':>20}   {'slope: edge λ vs lr':>20}"
    )

    def fmt(value: float | None, stderr: float | None) -> str:
        if value is None:
            return "n/a"
        return f"{value:+.2f}" + (f" ± {stderr:.2f}" if stderr is not None else "")

    for name, info in grid["analysis"].items():
        lines.append(
            f"{OPTIMIZERS[name]['label']:<36} {info['best_value']:>14.2f}% {info['best_lr']:>7.0e} "
            f"{info['best_lambda_overall']:>7.0e}   {fmt(info['slope'], info['slope_stderr']):>20}   "
            f"{fmt(info['edge_slope'], info['edge_slope_stderr']):>20}"
        )
    lines.append(
        "  slope 0: the λ does not depend on lr; -1: only lr·λ matters. best λ = argmin of the mean test error; "
        f"edge λ = largest λ within {tol:.0%} of that lr's best error."
    )
    lines.append("  per lr (x: lr left out of the fits, ^: edge above the grid):")
    for name, info in grid["analysis"].items():
        cells = []
        for i, lr in enumerate(grid["lrs"]):
            mark = "" if info["columns_used"][i] else "(x)"
            edge = f"{info['edge_lambda'][i]:.0e}" + ("^" if info["edge_censored"][i] else "")
            cells.append(f"{lr:.0e}: {info['best_lambda'][i]:.0e}/{edge}{mark}")
        lines.append(f"  {OPTIMIZERS[name]['short']:<12} best/edge λ  " + "  ".join(cells))
    eff = results.get("effective_decay", {})
    if "adam_l2" in eff:
        e = eff["adam_l2"]
        chk = e["check_against_monitor"]
        lines.append(
            f"effective decay, Adam+L2 at lr={e['lr']:.0e}, λ={e['lambda']:.0e}, step {chk['step']}: the per-coordinate "
            f"rate lr·λ/(√v̂+ε) spans a factor {e['spread_max_over_min']:.1e} (max/min); its median is "
            f"{e['median_over_uniform']:.3g} x the uniform lr·λ. Monitor vs optimizer state: max rel. diff "
            f"{chk['max_rel_diff']:.1e}"
        )
    for name in ("adam_l2", "adamw"):
        if name in eff:
            e = eff[name]
            lines.append(
                f"Lightning run {OPTIMIZERS[name]['short']} (lr={e['lr']:.0e}, λ={e['lambda']:.0e}, {e['steps']} steps): "
                f"test error {e['test_error']:.2f}%"
            )
    lines.append(f"plots and numbers: {results['run_dir']}")
    return lines


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run all three parts; return (and save as ``results.json``) every number the summary prints."""
    args = build_parser().parse_args(argv)
    if args.quick:
        apply_quick(args)
    # Measured on 2 cores: the quick grid takes 6 s on one thread and 30-45 s on two when anything else runs
    # (OpenMP workers spin and wait on each other for kernels this small).
    torch.set_num_threads(args.threads)
    run_dir = _run_dir(args)
    start = time.perf_counter()
    print(f"adam_vs_adamw: writing to {run_dir}")

    print("\n[1/3] λ = 0: Adam and AdamW through Trainer.fit")
    identity = identity_check(args, run_dir)

    print("\n[2/3] learning-rate x weight-decay grid")
    spec = grid_spec(args)
    data = load_split(datamodule(args))
    grid = run_grid(spec, data, progress=not args.no_progress, edge_tolerance=args.edge_tolerance)
    write_grid_csv(grid, run_dir / "grid.csv")
    heatmap = plot_heatmaps(grid, run_dir / "grid_heatmaps.png")

    print("\n[3/3] effective decay with WeightDecayMonitor")
    eff = effective_decay(args, run_dir, grid)
    eff_plot = plot_effective_decay(eff, run_dir / "effective_decay.png")

    results: dict[str, Any] = {
        "run_dir": str(run_dir),
        "args": vars(args),
        "identity": identity,
        "grid": {
            "lrs": spec.lrs,
            "lambdas": spec.lambdas,
            "num_lambda": args.num_lambda,
            "seeds": len(spec.seeds),
            "steps": spec.steps,
            "batch_size": spec.batch_size,
            "train_samples": len(data.x_train),
            "test_samples": len(data.x_test),
            "cells": sum(e.size for e in grid.errors.values()),
            "seconds": grid.seconds,
            "mean_test_error": {o: grid.mean_errors(o) for o in spec.optimizers},
            "test_error_per_seed": grid.errors,
            "diverged": {o: grid.diverged[o].any(axis=0) for o in spec.optimizers},
            "analysis": grid.analysis,
        },
        "effective_decay": {
            k: {kk: vv for kk, vv in v.items() if kk not in ("history", "rates_at_snapshot")}
            for k, v in eff.items()
        },
        "plots": {"heatmaps": str(heatmap), "effective_decay": str(eff_plot)},
        "seconds": time.perf_counter() - start,
    }
    results = jsonable(results)
    (run_dir / "results.json").write_text(json.dumps(results, indent=2))
    print("\n".join(summary_lines(results)))
    print(f"total time {results['seconds']:.0f}s")
    return results


if __name__ == "__main__":
    main()
