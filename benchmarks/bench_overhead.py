"""Item 1: what ``WeightDecayMonitor`` costs in a real ``Trainer.fit`` on the CPU.

Two models, each trained by a real ``Trainer.fit`` with the package's mixin (foreach AdamW over the decay /
no-decay groups) and a ``CSVLogger`` (the CLI's default logger): a small GPT on synthetic tokens and the
built-in digits CNN. Variants, interleaved round by round (one fresh ``fit`` per variant per round):

* ``plain``: no monitor;
* ``monitor, default interval``: ``WeightDecayMonitor()`` (logs every ``Trainer(log_every_n_steps=50)``
  steps);
* ``monitor, default interval, per-layer``;
* ``monitor, every step``: ``WeightDecayMonitor(log_every_n_steps=1)``;
* ``monitor, every step, per-layer``.

Also in the same rotation: a bare foreach ``AdamW.step()`` on the same model's parameters and groups (no
Lightning), the reference of the every-step target.

Two measurements in every fit, both on the CPU clock of the process (see :mod:`benchmarks.common`):

* **whole steps**: a callback stamps every ``on_train_batch_start`` (so a step's time includes every hook of
  the previous step, the monitor's too); ``ms / step`` is the mean over the steady-state window (warm-up steps
  dropped, the window a whole number of default logging intervals) and ``time / plain`` the per-round ratio
  to the plain fit. This is the literal "steps per second" comparison, but fit-to-fit noise on a shared
  machine is several percent, far above the 1% target;
* **the monitor's own time**, instrumented inside the same fits: two optimizer step post-hooks bracket the
  monitor's (post-hooks run in registration order: one registered before the monitor's, in the first
  callback's ``on_train_start``, one after it, in a callback placed after the monitor). Everything the monitor
  does per step happens in its post-hook (computation, logger calls, history), so the time between the two
  stamps is its cost, measured on every step of the real fit with little noise. ``monitor slowdown`` =
  1 + (mean monitor time per step) / (mean step time without it), from the same fit; ``monitor time / bare
  AdamW step`` divides by a bare foreach ``AdamW.step()`` on the same parameters in the same round.

The monitor's end-of-fit figure (``plot``) is turned off in these fits: it is a one-off cost after the last step,
outside the step loop measured here. That **fixed cost per fit** is a benchmark of its own
(:func:`fixed_cost_rows`, which ``python -m benchmarks`` runs after all other items: its figures and threads
must not change the process the other items are measured in): a 60-step ``Trainer.fit`` of a 4-layer d=128 GPT with the monitor at its default
interval, ``plot=True`` and ``plot=False``, interleaved with plain fits. Its figure is the wall-clock time the
monitor spends on the training thread outside its optimizer step hook — every other hook it has
(``on_train_start``, ``on_train_batch_end``, ``on_train_end``, ``teardown``, the state hooks), waits for the
background figure included — with a target of 50 ms per fit; whole-fit ratios (CPU and wall) are reported beside
it.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.common import Row, calls_for, cpu_clock, interleaved, quiet_cpu_trainer, stat, time_per_call
from benchmarks.models import GPTConfig, gpt_loader, lightning_gpt

ITEM = 1
TARGET_DEFAULT = 1.01
TARGET_EVERY_VS_STEP = 1.3
TARGET_FIXED_MS = 50.0
LOG_EVERY = 50  # Lightning's default Trainer(log_every_n_steps)
FIXED_COST_STEPS = 60
#: every hook of WeightDecayMonitor besides its optimizer step hooks (they run on the training thread)
MONITOR_HOOKS = (
    "setup",
    "on_fit_start",
    "on_train_start",
    "on_train_batch_end",
    "on_train_end",
    "on_fit_end",
    "teardown",
    "state_dict",
    "load_state_dict",
)

VARIANTS: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "monitor, default interval": {},
    "monitor, default interval, per-layer": {"per_layer": True},
    "monitor, every step": {"log_every_n_steps": 1},
    "monitor, every step, per-layer": {"log_every_n_steps": 1, "per_layer": True},
}
STEP = "bare foreach AdamW step"


@dataclass(frozen=True)
class FitCase:
    """One model of the benchmark: how to build the LightningModule and its training data."""

    name: str
    module: Callable[[], Any]
    data: Callable[[], dict[str, Any]]


def _gpt_case(quick: bool) -> FitCase:
    # Small enough that a fit of 160 steps takes seconds on one core (the set must run in minutes), which also
    # makes it a hard case for the monitor: its per-tensor work weighs most against a cheap training step.
    cfg = GPTConfig(dim=32, layers=2, seq=16) if quick else GPTConfig(dim=64, layers=4, seq=32)
    batch = 8
    return FitCase(
        name=f"small transformer (GPT {cfg.layers}x{cfg.dim}, seq {cfg.seq}, batch {batch})",
        module=lambda: lightning_gpt(cfg, lr=1e-3, weight_decay=0.1),
        data=lambda: {"train_dataloaders": gpt_loader(cfg, batch_size=batch, n_samples=batch * 40)},
    )


def _cnn_case(quick: bool) -> FitCase:
    from lightning_adamw.demo import DigitsClassifier, DigitsDataModule

    channels = 8 if quick else 32

    def module() -> Any:
        model = DigitsClassifier(channels=channels)
        model.print_param_groups = False  # a mixin setting read from attributes; keeps the table off stdout
        return model

    return FitCase(
        name=f"small CNN (DigitsClassifier, {channels} channels, batch 64)",
        module=module,
        data=lambda: {"datamodule": DigitsDataModule(batch_size=64)},
    )


# ----------------------------------------------------------------------------------------------- timing
# callback


def _step_timer() -> tuple[Any, Any]:
    """``(head, tail)`` callbacks: ``head`` goes first in ``callbacks``, ``tail`` after the monitor."""
    from lightning.pytorch.callbacks import Callback

    class StepTimer(Callback):
        """CPU-time (and wall-clock) stamps of every training batch, and of the monitor's post-hook."""

        def __init__(self) -> None:
            self.starts: list[float] = []
            self.wall: list[float] = []
            self.hook_enter: list[float] = []
            self.hook_exit: list[float] = []

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            # Runs before the monitor's on_train_start, so this post-hook runs before the monitor's.
            trainer.optimizers[0].register_step_post_hook(lambda *_: self.hook_enter.append(cpu_clock()))

        def on_train_batch_start(self, *args: Any) -> None:
            self.starts.append(cpu_clock())
            self.wall.append(time.perf_counter())

        def on_train_end(self, *args: Any) -> None:
            self.starts.append(cpu_clock())  # closes the last step
            self.wall.append(time.perf_counter())

        def window(self, warmup: int) -> dict[str, float]:
            """Means after ``warmup``: CPU s per step, wall s per step, monitor CPU s per step."""
            steps = len(self.hook_exit)
            n = steps - warmup
            hook = sum(self.hook_exit[i] - self.hook_enter[i] for i in range(warmup, steps)) / n
            return {
                "step_s": (self.starts[steps] - self.starts[warmup]) / n,
                "wall_step_s": (self.wall[steps] - self.wall[warmup]) / n,
                "monitor_s": hook,
                "steps": steps,
            }

    class HookExit(Callback):
        def __init__(self, timer: StepTimer) -> None:
            self.timer = timer

        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            # Runs after the monitor's on_train_start: this post-hook runs right after the monitor's.
            trainer.optimizers[0].register_step_post_hook(lambda *_: self.timer.hook_exit.append(cpu_clock()))

    timer = StepTimer()
    return timer, HookExit(timer)


def _quiet() -> None:
    # Lightning's banner lines and the "num_workers" / "log_every_n_steps" hints would drown the table.
    for name in ("lightning.pytorch", "lightning.fabric", "lightning_adamw"):
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="lightning")
    warnings.filterwarnings("ignore", message=".*does not have many workers.*")
    warnings.filterwarnings("ignore", message=".*WeightDecayMonitor.*")


def fit_once(case: FitCase, monitor_kwargs: dict[str, Any] | None, warmup: int, steps: int) -> dict[str, Any]:
    """One ``Trainer.fit`` of ``warmup + steps`` steps; returns per-step timings and the monitor's metrics."""

    from lightning_adamw.monitor import WeightDecayMonitor

    _quiet()
    torch.manual_seed(0)
    timer, hook_exit = _step_timer()
    callbacks: list[Any] = [timer]
    monitor = None
    if monitor_kwargs is not None:
        monitor = WeightDecayMonitor(plot=False, **monitor_kwargs)
        callbacks.append(monitor)
    callbacks.append(hook_exit)
    with tempfile.TemporaryDirectory(prefix="lightning-adamw-bench-") as tmp:
        trainer = quiet_cpu_trainer(
            tmp, max_steps=warmup + steps, callbacks=callbacks, log_every_n_steps=LOG_EVERY
        )
        trainer.fit(case.module(), **case.data())
    return {**timer.window(warmup), "metrics": dict(monitor.last_metrics) if monitor is not None else {}}


def bare_step_trial(case: FitCase, budget_s: float) -> Callable[[], dict[str, Any]]:
    """Seconds per bare ``optimizer.step()`` of the case's module, groups and optimizer (gradients kept)."""
    module = case.module()
    optimizer = module.configure_optimizers()["optimizer"]
    # Real gradients from one batch of the case's data, so the step does the same work as in fit.
    data = case.data()
    if "datamodule" in data:
        dm = data["datamodule"]
        dm.setup("fit")
        batch = next(iter(dm.train_dataloader()))
    else:
        batch = next(iter(data["train_dataloaders"]))
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        module.training_step(batch, 0).backward()
        optimizer.step()
    calls = calls_for(optimizer.step, budget_s)

    def run() -> dict[str, Any]:
        s = time_per_call(optimizer.step, calls)
        return {"step_s": s, "wall_step_s": math.nan, "monitor_s": 0.0}

    return run


# ----------------------------------------------------------------------------------------------- benchmark


def run(repeats: int = 5, quick: bool = False) -> list[Row]:
    """Rows for item 1 (fit part). ``quick``: tiny models, a few steps, no targets judged (smoke test)."""
    _quiet()
    warmup, steps = (2, 4) if quick else (10, 3 * LOG_EVERY)
    rows: list[Row] = []
    for case in (_gpt_case(quick), _cnn_case(quick)):
        trials: dict[str, Callable[[], dict[str, Any]]] = {
            name: (lambda kw=kw, case=case: fit_once(case, kw, warmup, steps))
            for name, kw in VARIANTS.items()
        }
        trials[STEP] = bare_step_trial(case, budget_s=0.05 if quick else 0.3)
        results = interleaved(trials, repeats=repeats, warmup_rounds=0 if quick else 1)
        rows += _rows_for_case(case, results, quick, steps)
    return rows


# ----------------------------------------------------------------------------------------------- fixed cost


def _timed_monitor(**kwargs: Any) -> Any:
    """A ``WeightDecayMonitor`` whose non-step hooks add their wall-clock time to ``monitor.hook_s``."""
    from lightning_adamw.monitor import WeightDecayMonitor

    def timed(name: str) -> Callable[..., Any]:
        base = getattr(WeightDecayMonitor, name)

        def hook(self: Any, *args: Any, **kw: Any) -> Any:
            start = time.perf_counter()
            try:
                return base(self, *args, **kw)
            finally:
                self.hook_s += time.perf_counter() - start

        return hook

    namespace: dict[str, Any] = {name: timed(name) for name in MONITOR_HOOKS}
    cls = type("TimedWeightDecayMonitor", (WeightDecayMonitor,), namespace)
    monitor = cls(**kwargs)
    monitor.hook_s = 0.0
    return monitor


def fixed_fit(monitor_kwargs: dict[str, Any] | None, quick: bool) -> dict[str, float]:
    """One short ``Trainer.fit`` as a user's sweep runs it (CSV logger); CPU and wall seconds, and the
    monitor's wall seconds in its non-step hooks."""

    _quiet()
    cfg = GPTConfig(dim=32, layers=2, seq=16) if quick else GPTConfig(dim=128, layers=4, seq=32)
    steps = 6 if quick else FIXED_COST_STEPS
    torch.manual_seed(0)
    monitor = _timed_monitor(**monitor_kwargs) if monitor_kwargs is not None else None
    with tempfile.TemporaryDirectory(prefix="lightning-adamw-bench-") as tmp:
        trainer = quiet_cpu_trainer(
            tmp,
            max_steps=steps,
            callbacks=[monitor] if monitor is not None else [],
            log_every_n_steps=5 if quick else LOG_EVERY,  # (a quick fit logs once too)
        )
        module = lightning_gpt(cfg, lr=1e-3, weight_decay=0.1)
        data = gpt_loader(cfg, batch_size=8, n_samples=8 * steps)
        cpu, wall = cpu_clock(), time.perf_counter()
        trainer.fit(module, train_dataloaders=data)
        cpu, wall = cpu_clock() - cpu, time.perf_counter() - wall
        figure = (
            monitor is not None
            and monitor.figure_path is not None
            and os.path.getsize(monitor.figure_path) > 0
        )
    return {
        "cpu_s": cpu,
        "wall_s": wall,
        "hook_s": monitor.hook_s if monitor is not None else 0.0,
        "figure": float(figure),
    }


FIXED_VARIANTS: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "monitor, default interval": {},
    "monitor, default interval, plot=False": {"plot": False},
}


def fixed_cost_rows(repeats: int = 5, quick: bool = False) -> list[Row]:
    """Rows of the monitor's fixed cost per fit (see the module docstring)."""
    trials = {name: (lambda kw=kw: fixed_fit(kw, quick)) for name, kw in FIXED_VARIANTS.items()}
    results = interleaved(trials, repeats=repeats, warmup_rounds=0 if quick else 1)
    bench = (
        "fixed cost per fit, GPT 2x32 (6 steps)"
        if quick
        else f"fixed cost per fit, GPT 4x128 ({FIXED_COST_STEPS} steps, seq 32, batch 8)"
    )
    plain = results["plain"]
    rows = [
        Row.from_stat(
            ITEM,
            bench,
            "plain",
            "fit time (CPU)",
            stat([r["cpu_s"] * 1e3 for r in plain]),
            unit="ms",
            note="whole Trainer.fit, CSV logger",
        )
    ]
    for name in ("monitor, default interval", "monitor, default interval, plot=False"):
        rs = results[name]
        with_plot = "plot=False" not in name
        assert all(r["figure"] for r in rs) == with_plot, "the figure must be written (only) with plot=True"
        hook = stat([r["hook_s"] * 1e3 for r in rs])
        rows.append(
            Row.from_stat(
                ITEM,
                bench,
                name,
                "training-thread time outside the step hook (wall)",
                hook,
                unit="ms",
                target=f"<= {TARGET_FIXED_MS:g} ms" if with_plot else "",
                ok=(hook.median <= TARGET_FIXED_MS) if with_plot and not quick else None,
                note="figure drawn off the training thread, written and sent to the loggers"
                if with_plot
                else "no figure",
            )
        )
        for clock, key in (("CPU", "cpu_s"), ("wall", "wall_s")):
            ratio = stat([r[key] / p[key] for r, p in zip(rs, plain, strict=True)])
            rows.append(
                Row.from_stat(
                    ITEM,
                    bench,
                    name,
                    f"whole fit / plain ({clock})",
                    ratio,
                    unit="x",
                    note="all threads of the process" if clock == "CPU" else "",
                )
            )
    return rows


def _rows_for_case(
    case: FitCase, results: dict[str, list[dict[str, Any]]], quick: bool, steps: int
) -> list[Row]:
    bench = f"Trainer.fit, {case.name}"
    rows: list[Row] = []
    plain = results["plain"]
    n_metrics = {name: len(r[-1].get("metrics", {})) for name, r in results.items()}
    for name in VARIANTS:
        rs = results[name]
        note = (
            f"{n_metrics[name]} metrics logged per logging step"
            if name != "plain"
            else f"{steps} steps timed"
        )
        rows.append(
            Row.from_stat(
                ITEM, bench, name, "ms / step", stat([r["step_s"] * 1e3 for r in rs]), unit="ms", note=note
            )
        )
    step_ms = stat([r["step_s"] * 1e3 for r in results[STEP]])
    rows.append(
        Row.from_stat(ITEM, bench, STEP, "ms / step", step_ms, unit="ms", note="no Lightning, same groups")
    )

    monitored = [name for name in VARIANTS if name != "plain"]
    for name in monitored:
        ratio = stat([r["step_s"] / p["step_s"] for r, p in zip(results[name], plain, strict=True)])
        is_default = name == "monitor, default interval"
        note = ""
        if is_default:
            # Judge the whole-fit ratio only when its spread is on one side of the target.
            verdict = True if ratio.hi <= TARGET_DEFAULT else False if ratio.lo > TARGET_DEFAULT else None
            if verdict is None:
                note = "inconclusive: round-to-round spread wider than the target; see the instrumented row"
        rows.append(
            Row.from_stat(
                ITEM,
                bench,
                name,
                "time / plain (whole fits)",
                ratio,
                unit="x",
                target=f"<= {TARGET_DEFAULT:g}x" if is_default else "",
                ok=verdict if is_default and not quick else None,
                note=note,
            )
        )
    for name in monitored:
        slowdown = stat([1 + r["monitor_s"] / (r["step_s"] - r["monitor_s"]) for r in results[name]])
        per_step_ms = statistics.median(r["monitor_s"] * 1e3 for r in results[name])
        is_default = name == "monitor, default interval"
        rows.append(
            Row.from_stat(
                ITEM,
                bench,
                name,
                "monitor slowdown (instrumented)",
                slowdown,
                unit="x",
                target=f"<= {TARGET_DEFAULT:g}x" if is_default else "",
                ok=(slowdown.median <= TARGET_DEFAULT) if is_default and not quick else None,
                note=f"monitor's post-hook: {per_step_ms:.3f} ms per step on average",
                extra={"monitor_ms": [r["monitor_s"] * 1e3 for r in results[name]]},
            )
        )
    for name in ("monitor, every step", "monitor, every step, per-layer"):
        vs_step = stat(
            [r["monitor_s"] / s["step_s"] for r, s in zip(results[name], results[STEP], strict=True)]
        )
        is_target = name == "monitor, every step"
        rows.append(
            Row.from_stat(
                ITEM,
                bench,
                name,
                "monitor time / bare AdamW step",
                vs_step,
                unit="x",
                target=f"<= {TARGET_EVERY_VS_STEP:g}x" if is_target else "",
                ok=(vs_step.median <= TARGET_EVERY_VS_STEP) if is_target and not quick else None,
                note="instrumented post-hook time per step / bare step of the same round",
            )
        )
    return rows
