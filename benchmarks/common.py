"""Shared pieces of the benchmarks: result rows, interleaved timing, statistics and machine facts.

Only the standard library and torch are imported here (no Lightning, no wandb, no jsonargparse), so the GPU
script can use it on a bare CUDA machine.

Timing discipline, because the machines these run on are small and shared:

* every variant of a comparison is run in the same process, **interleaved** round by round (the order rotates
  each round), so slow drifts of the machine (another process, thermal state) hit all variants alike;
* one or more **warm-up** rounds are thrown away (allocator, caches, lazy initialisation, JIT paths);
* ratios are computed **per round** (variant / baseline of the same round) and then summarised, which removes
  most of the between-round drift;
* figures are the **median** over rounds with the **min-max spread** next to them;
* CPU figures are **CPU time of the benchmark process** (:data:`cpu_clock`, user + system), not wall-clock: on
  a shared 2-core machine other processes take the cores away for whole milliseconds, which inflates wall time
  at random but not the work done. With one torch thread and no GPU the two agree on an idle machine. GPU
  figures are wall-clock with the device synchronised.
"""

from __future__ import annotations

import datetime as _dt
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch

__all__ = [
    "BENCH_DIR",
    "Row",
    "Stat",
    "calls_for",
    "cpu_clock",
    "interleaved",
    "machine_info",
    "paired_ratios",
    "stat",
    "time_per_call",
]

BENCH_DIR = Path(__file__).resolve().parent
T = TypeVar("T")

#: The clock of the CPU benchmarks: CPU seconds of this process (all its threads), nanosecond resolution.
cpu_clock: Callable[[], float] = time.process_time


# ----------------------------------------------------------------------------------------------- rows


@dataclass
class Row:
    """One figure of the results table.

    ``value`` is the median over ``n`` repeats and ``lo``/``hi`` the smallest and largest repeat (``None`` for
    a figure that is not a repeated measurement, e.g. a parameter count). ``ok`` says whether ``target`` is
    met (``None`` when there is no target or the figure was not measured).
    """

    item: int
    """Issue item: 1 overhead in fit, 2 naive vs batched, 3 memory, 4 grouping scale, 5 GPU."""
    bench: str
    """What was run, e.g. ``"fit: small transformer"``."""
    variant: str
    """Which variant, e.g. ``"monitor every step"``."""
    metric: str
    """What the number is, e.g. ``"ms / step"`` or ``"time vs plain"``."""
    value: float | None
    unit: str = ""
    lo: float | None = None
    hi: float | None = None
    n: int = 1
    target: str = ""
    ok: bool | None = None
    note: str = ""
    extra: dict[str, Any] = field(default_factory=dict)
    """Raw per-repeat values and other details, kept in the JSON only."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Row:
        known = {f for f in cls.__dataclass_fields__}
        return cls(**{k: v for k, v in data.items() if k in known})

    @classmethod
    def from_stat(cls, item: int, bench: str, variant: str, metric: str, s: Stat, **kwargs: Any) -> Row:
        return cls(
            item=item,
            bench=bench,
            variant=variant,
            metric=metric,
            value=s.median,
            lo=s.lo,
            hi=s.hi,
            n=s.n,
            extra={"samples": list(s.samples), **kwargs.pop("extra", {})},
            **kwargs,
        )


# ----------------------------------------------------------------------------------------------- statistics


@dataclass(frozen=True)
class Stat:
    """Median and min-max of repeated measurements."""

    median: float
    lo: float
    hi: float
    n: int
    samples: tuple[float, ...]

    @property
    def rel_spread(self) -> float:
        """(max - min) / median: how noisy the repeats were."""
        return (self.hi - self.lo) / self.median if self.median else math.nan


def stat(samples: Sequence[float]) -> Stat:
    """Summarise repeats; raises on an empty sequence (a benchmark that produced nothing is a bug)."""
    values = [float(v) for v in samples]
    if not values:
        raise ValueError("no samples to summarise")
    return Stat(statistics.median(values), min(values), max(values), len(values), tuple(values))


def paired_ratios(results: Mapping[str, Sequence[float]], baseline: str) -> dict[str, list[float]]:
    """Per-round ratio of each variant to ``baseline`` (round ``i`` of both were run back to back)."""
    base = results[baseline]
    return {name: [v / b for v, b in zip(values, base, strict=True)] for name, values in results.items()}


# ----------------------------------------------------------------------------------------------- timing


def interleaved(
    trials: Mapping[str, Callable[[], T]],
    repeats: int,
    warmup_rounds: int = 1,
    log: Callable[[str], None] | None = None,
) -> dict[str, list[T]]:
    """Run each trial once per round, ``warmup_rounds + repeats`` rounds, rotating the order every round.

    Each trial returns its own measurement (seconds per unit of work, bytes, ...); the warm-up rounds are
    discarded. Rotation rather than a fixed order, so no variant always runs right after the same neighbour
    (a variant that leaves the caches cold or the allocator fragmented would otherwise always hurt the same
    one).
    """
    names = list(trials)
    results: dict[str, list[T]] = {name: [] for name in names}
    for round_idx in range(warmup_rounds + repeats):
        shift = round_idx % len(names)
        order = names[shift:] + names[:shift]
        for name in order:
            value = trials[name]()
            if round_idx >= warmup_rounds:
                results[name].append(value)
        if log is not None:
            tag = "warm-up" if round_idx < warmup_rounds else f"{round_idx - warmup_rounds + 1}/{repeats}"
            log(f"  round {tag} done")
    return results


def time_per_call(fn: Callable[[], Any], calls: int, clock: Callable[[], float] = cpu_clock) -> float:
    """Seconds per call of ``fn`` over ``calls`` back-to-back calls, on ``clock``."""
    start = clock()
    for _ in range(calls):
        fn()
    return (clock() - start) / calls


def calls_for(fn: Callable[[], Any], budget_s: float, clock: Callable[[], float] = cpu_clock) -> int:
    """How many calls of ``fn`` fill about ``budget_s`` seconds (at least 3), from one timed call."""
    once = time_per_call(fn, 1, clock)
    return max(3, int(budget_s / max(once, 1e-7)))


# ----------------------------------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def _git_revision() -> str | None:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=BENCH_DIR,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=BENCH_DIR,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return f"{rev}{' (+ uncommitted changes)' if dirty else ''}"


def _version(module: str) -> str | None:
    try:
        mod = __import__(module)
    except Exception:  # a missing optional package is a fact to record, not an error
        return None
    return getattr(mod, "__version__", None)


def machine_info() -> dict[str, Any]:
    """Where and with what the figures were measured."""
    info: dict[str, Any] = {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": _mem_total_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "lightning": _version("lightning"),
        "lightning_adamw": _version("lightning_adamw"),
        "git": _git_revision(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info["gpu"] = props.name
        info["gpu_memory_gib"] = round(props.total_memory / 2**30, 1)
        info["cuda"] = torch.version.cuda
    return info


def log(message: str) -> None:
    """Progress to stderr, so stdout stays the results table."""
    print(message, file=sys.stderr, flush=True)


def quiet_cpu_trainer(root: str, **kwargs: Any) -> Any:
    """The benchmarks' ``Trainer``: one CPU device, a CSV logger under ``root``, no validation, checkpoints,
    progress bar or model summary; ``kwargs`` (``max_steps``, ``callbacks``, ``log_every_n_steps``...) are
    added."""
    import lightning as L
    from lightning.pytorch.loggers import CSVLogger

    return L.Trainer(
        accelerator="cpu",
        devices=1,
        logger=CSVLogger(root, name="bench"),
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
        **kwargs,
    )
