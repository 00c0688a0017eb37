"""Turn result rows into the console table and ``benchmarks/RESULTS.md``.

Results live in two JSON files next to this module: ``results_cpu.json`` (rewritten by every ``python -m
benchmarks`` run) and ``results_gpu.json`` (written by ``--merge-gpu`` from the GPU script's output).
RESULTS.md is always rendered from both, so a CPU rerun keeps the GPU figures and a GPU merge keeps the CPU
ones.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from benchmarks.common import Row

SCHEMA = "lightning-adamw-benchmarks/1"

ITEM_TITLES: dict[int, str] = {
    1: "1. Monitor overhead in a real Trainer.fit (CPU)",
    2: "2. Against the usual way: per-parameter `.norm().item()` loop vs batched (CPU)",
    3: "3. Memory: extra peak of a monitored step (CPU, RSS)",
    4: "4. Grouping scale: `build_param_groups` on meta-device models",
    5: "5. GPU: fused AdamW step vs monitor, bandwidth, memory",
}


def _para(text: str) -> str:
    """One paragraph from a wrapped triple-quoted string (so the source can keep its line length)."""
    return " ".join(text.split())


ITEM_NOTES: dict[int, str] = {
    1: _para(
        """
        One fresh `Trainer.fit` per variant per round, variants interleaved; CSVLogger; the mixin's foreach
        AdamW; CPU time of the process (see "Method"). `ms / step` is the steady-state mean (warm-up steps
        dropped, a whole number of default logging intervals) and `time / plain (whole fits)` its per-round
        ratio: the literal comparison, but fit-to-fit noise on a shared machine is several percent, more than
        the 1% target. `monitor slowdown (instrumented)` is measured inside the same fits: two optimizer step
        post-hooks bracket the monitor's own post-hook, where all its per-step work happens (computation,
        logger calls, history); slowdown = 1 + monitor time / (step time - monitor time) of the same fit.
        `monitor time / bare AdamW step` divides the same monitor time by a bare foreach `AdamW.step()` on the
        same parameters in the same round. The *isolated* rows time `update_split()` (what the post-hook
        calls) against `optimizer.step()` outside Lightning, on the larger models of item 2. The *fixed cost per
        fit* rows are short fits (60 steps of a 4-layer d=128 GPT, default interval, the summary figure on and
        off) interleaved with plain ones: `training-thread time outside the step hook` is the wall-clock time
        spent in every other hook of the monitor (`on_train_start`, `on_train_batch_end`, `on_train_end`,
        `teardown`, state hooks), including any wait for the figure, which is drawn in a background thread
        and still written and sent to the loggers; the whole-fit ratios count all threads (CPU) or the clock
        on the wall. The *first update_split call in a new process* rows time, in fresh Python processes
        (wall clock), the first call after Numba's import and the load of its cached CPU kernel, cold and
        after `warm_up()`, which the monitor starts in a background thread when training starts.
        """
    ),
    2: _para(
        """
        Both compute the same metrics from the same post-step optimizer state (checked to agree before
        timing); the naive loop calls `.norm().item()` / `.sum().item()` per tensor, the package uses its
        `numba` backend (one compiled pass over the optimizer's tensors; on CUDA its fused Triton kernel) and
        one host transfer. `torch kernels (packed backend, no Numba)` is the package's fallback without Numba
        (or with `LIGHTNING_ADAMW_NUMBA=0`), on the same state. On a CPU `.item()` is not a
        device sync and a foreach kernel is a C++ loop over the tensors, so the CPU ratio shows the
        Python/dispatch saving only; the GPU rows (item 5) show the sync saving. The package's `reference`
        backend (a float64 loop over the tensors: the oracle of the tests) is timed on the same state as the
        baseline of the backends.
        """
    ),
    3: _para(
        """
        Each variant in a fresh subprocess with `MALLOC_MMAP_THRESHOLD_=65536` (every buffer > 64 KiB is its
        own mmap, returned on free) and the kernel's peak-RSS counter reset at each phase boundary. `extra
        peak of the step` compares whole-step peaks (what a user sees); `monitor working memory` compares the
        peak growth of the phase after the update (the monitor's step hook, logging, scheduler), i.e. the
        monitor's own temporaries even where AdamW's larger temporaries hide them from the step's peak.
        """
    ),
    4: _para(
        """
        Llama-shaped skeletons (RMSNorm, SwiGLU, GQA, untied head; 9 tensors per layer) built under
        `torch.device('meta')`: shapes only. The depth sweep keeps the 70B width and varies the layer count to
        show growth in the number of tensors: linear growth means a flat time per tensor and R^2 near 1.
        """
    ),
    5: _para(
        """
        Run by `python -m benchmarks.gpu` on one CUDA GPU (see the module docstring); merged with `python -m
        benchmarks --merge-gpu FILE`. `monitor (update_split)` is what `WeightDecayMonitor` runs on CUDA: the
        `triton` backend, one fused kernel (`lightning_adamw/update_split/backends/triton.py`: reads w, m, v
        once), plus the Python around it; `monitor, torch path` is the same computation with `triton=False` (the
        `packed` backend's torch kernels, what runs on a CPU without Numba). On the 292-tensor model the call is bound by its Python (about
        1 ms on that machine), not by the GPU.
        """
    ),
}


# ----------------------------------------------------------------------------------------------- files


def load(path: Path) -> dict[str, Any] | None:
    """A results file, or ``None`` when it does not exist."""
    if not path.exists():
        return None
    data = json.loads(path.read_text())
    if data.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a benchmark results file (schema {data.get('schema')!r})")
    return data


def save(path: Path, machine: dict[str, Any], rows: Sequence[Row], settings: dict[str, Any]) -> None:
    payload = {
        "schema": SCHEMA,
        "machine": machine,
        "settings": settings,
        "rows": [r.to_dict() for r in rows],
    }
    path.write_text(json.dumps(payload, indent=1, default=_json_default) + "\n")


def _json_default(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if hasattr(value, "tolist"):
        return value.tolist()
    return str(value)


def rows_of(data: dict[str, Any] | None) -> list[Row]:
    return [Row.from_dict(r) for r in data["rows"]] if data else []


# ----------------------------------------------------------------------------------------------- formatting


def fmt(value: float | None) -> str:
    """Three or four significant digits, no scientific notation for the ranges these figures live in."""
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    mag = abs(value)
    if mag >= 100:
        return f"{value:,.0f}"
    if mag >= 10:
        return f"{value:.1f}"
    if mag >= 1:
        return f"{value:.3f}"  # ratios near 1 are the point: 1.004x, not 1.00x
    if mag >= 0.01:
        return f"{value:.3f}"
    if mag == 0:
        return "0"
    return f"{value:.2e}"


def verdict(ok: bool | None, note: str = "") -> str:
    if ok is None and note.startswith("inconclusive"):
        return "inconclusive"
    return {True: "yes", False: "**no**", None: ""}[ok]


def _spread(row: Row) -> str:
    if row.lo is None or row.hi is None or row.n <= 1:
        return ""
    return f"{fmt(row.lo)} - {fmt(row.hi)}"


def _md_table(rows: Iterable[Row], with_bench: bool = True) -> list[str]:
    head = ["what", "variant", "metric", "median", "min - max", "n", "target", "met", "note"]
    if not with_bench:
        head = head[1:]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        value = "not measured" if r.value is None else f"{fmt(r.value)} {r.unit}".strip()
        cells = [
            r.bench,
            r.variant,
            r.metric,
            value,
            _spread(r),
            str(r.n),
            r.target,
            verdict(r.ok, r.note),
            r.note,
        ]
        if not with_bench:
            cells = cells[1:]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return lines


def console_table(rows: Sequence[Row]) -> str:
    """Plain-text table for the terminal."""
    out = []
    widths = (44, 38, 40, 22, 10)
    header = ("what", "variant", "metric", "median [min-max]", "target")
    out.append("  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)) + "  met")
    item = None
    for r in rows:
        if r.item != item:
            item = r.item
            out.append(f"-- {ITEM_TITLES.get(item, item)}")
        value = "not measured" if r.value is None else f"{fmt(r.value)} {r.unit}".strip()
        if _spread(r):
            value += f" [{_spread(r)}]"
        cells = (r.bench, r.variant, r.metric, value, r.target)
        line = "  ".join(c[:w].ljust(w) for c, w in zip(cells, widths, strict=True))
        out.append(f"{line}  {verdict(r.ok, r.note).strip('*')}")
    return "\n".join(out)


# ----------------------------------------------------------------------------------------------- RESULTS.md


def _machine_lines(machine: dict[str, Any], settings: dict[str, Any]) -> list[str]:
    keys = [
        ("date", "date"),
        ("cpu", "CPU"),
        ("cores", "cores"),
        ("torch_threads", "torch intra-op threads"),
        ("memory_gib", "memory (GiB)"),
        ("gpu", "GPU"),
        ("gpu_memory_gib", "GPU memory (GiB)"),
        ("cuda", "CUDA"),
        ("os", "OS"),
        ("python", "Python"),
        ("torch", "torch"),
        ("lightning", "lightning"),
        ("lightning_adamw", "lightning-adamw"),
        ("git", "git revision"),
    ]
    lines = ["| | |", "|---|---|"]
    for key, label in keys:
        if machine.get(key) is not None:
            lines.append(f"| {label} | {machine[key]} |")
    for key, value in settings.items():
        if key != "stale_note":  # printed above the GPU rows instead
            lines.append(f"| {key} | {value} |")
    return lines


def _headline(rows: Sequence[Row]) -> list[str]:
    """Rows that carry a target: the figures a README may quote."""
    judged = [r for r in rows if r.target]
    if not judged:
        return []
    lines = [
        "| item | what | variant | metric | measured: median (min - max) | target | met |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in judged:
        value = "not measured" if r.value is None else f"{fmt(r.value)} {r.unit}".strip()
        if _spread(r):
            value += f" ({_spread(r)})"
        cells = [str(r.item), r.bench, r.variant, r.metric, value, r.target, verdict(r.ok, r.note)]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _better(metric: str, base: list[float], new: list[float]) -> str:
    """``better`` / ``worse`` when the two trees' min-max ranges do not overlap, else ``within spread``
    (speed-ups are better higher, every other figure here lower)."""
    higher = "speed-up" in metric
    if new[1] > base[2]:
        return "better" if higher else "**worse**"
    if new[2] < base[1]:
        return "**worse**" if higher else "better"
    return "within spread"


def _ab_lines(ab: dict[str, Any]) -> list[str]:
    lines = [
        "## Against the previous implementation (A/B on this machine)",
        "",
        _para(
            """
            `python -m benchmarks.ab BASELINE_TREE` ran the same items with each tree's own package and
            benchmark code, alternating trees run by run (each run interleaved and timed as above). Per tree:
            the median over runs of each run's median, with the smallest and largest run. `better` / `worse`
            only where the two ranges do not overlap. Read the `worse` rows with their meaning: the *naive
            loop* is the comparison's yardstick, not the product, and each tree's loop computes that tree's
            metrics (the new one also the gradient norm and the rounded-away shares, hence slower); the
            absolute *peak RSS of the step* rows include, in every variant of the new tree, the resident
            memory of Numba and the monitor's compiled CPU kernel (item 3's own row: a fixed cost per process),
            which is why the plain variant rises too.
            """
        ),
        "",
        *_machine_lines(ab.get("machine", {}), ab.get("settings", {})),
        "",
        "| item | what | variant | metric | baseline: median (min - max) | this tree | new / baseline | |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in ab["rows"]:
        base, new = r["baseline"], r["new"]
        unit = r.get("unit", "")
        ratio = fmt(new[0] / base[0]) if base[0] else "-"
        cells = [
            str(r["item"]),
            r["bench"],
            r["variant"],
            r["metric"],
            f"{fmt(base[0])} {unit} ({fmt(base[1])} - {fmt(base[2])})",
            f"{fmt(new[0])} {unit} ({fmt(new[1])} - {fmt(new[2])})",
            ratio,
            _better(r["metric"], base, new),
        ]
        lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return [*lines, ""]


def render(cpu: dict[str, Any] | None, gpu: dict[str, Any] | None, ab: dict[str, Any] | None = None) -> str:
    """The whole RESULTS.md (``ab``: the output of ``python -m benchmarks.ab``, shown after the CPU items)."""
    cpu_rows = rows_of(cpu)
    gpu_rows = rows_of(gpu)
    lines = [
        "# lightning-adamw benchmarks",
        "",
        _para(
            """
            Measured figures, not promises: rewritten by `python -m benchmarks` (CPU set, under ten minutes on
            2 cores) and `python -m benchmarks --merge-gpu FILE` (GPU set from `python -m benchmarks.gpu`).
            Every ratio comes from one run with the variants interleaved round by round after a warm-up round;
            figures are the median over rounds with the smallest and largest round beside it. Timings on a
            shared machine are noisy: read the spread before the median.
            """
        ),
        "",
    ]
    lines += [
        "## Method",
        "",
        _para(
            """
            CPU figures are CPU time of the benchmark process (`time.process_time`, user + system), with torch
            pinned to one intra-op thread: on a shared 2-core machine other processes take the cores away for
            whole milliseconds (and two OpenMP threads stall at every barrier while one is descheduled), which
            inflates wall-clock time at random but not the work done; on an idle machine the two agree. GPU
            figures are wall-clock with the device synchronised. Nothing here is a test: `pytest` only checks
            that these code paths run (`tests/test_benchmarks_smoke.py`).
            """
        ),
        "",
    ]
    if cpu is None:
        lines += ["CPU set: not measured.", ""]
    else:
        lines += ["## CPU machine", "", *_machine_lines(cpu["machine"], cpu.get("settings", {})), ""]
    if gpu is not None:
        lines += ["## GPU machine", "", *_machine_lines(gpu["machine"], gpu.get("settings", {})), ""]
    headline = _headline(cpu_rows + gpu_rows)
    stale = (gpu or {}).get("settings", {}).get("stale_note")
    if headline:
        lines += ["## Headline figures (rows with a target)", "", *headline, ""]
        if stale and gpu_rows:
            lines += [f"**GPU rows (item 5):** {stale}", ""]
    for item in (1, 2, 3, 4):
        item_rows = [r for r in cpu_rows if r.item == item]
        lines += [f"## {ITEM_TITLES[item]}", "", ITEM_NOTES[item], ""]
        lines += [*_md_table(item_rows), ""] if item_rows else ["Not measured in this run.", ""]
    if ab is not None and ab.get("rows"):
        lines += _ab_lines(ab)
    lines += [f"## {ITEM_TITLES[5]}", "", ITEM_NOTES[5], ""]
    if gpu_rows:
        if stale:
            lines += [f"**{stale}**", ""]
        lines += [*_md_table(gpu_rows), ""]
        note = (gpu or {}).get("settings", {}).get("precision_note")
        if note:
            lines += [note, ""]
    else:
        lines += [
            "| what | metric | value |",
            "|---|---|---|",
            "| fused AdamW step, >= 1B params | ms / step | not measured |",
            "| monitor (update_split) per step | ms / step, time / AdamW step | not measured |",
            "| achieved memory bandwidth | GB/s, share of peak | not measured |",
            "| naive loop vs batched | speed-up | not measured |",
            "| extra peak memory (max_memory_allocated) | % of parameter memory | not measured |",
            "",
        ]
    return "\n".join(lines).rstrip() + "\n"
