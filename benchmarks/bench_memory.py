"""Item 3: extra peak memory of a monitored training step over a plain one, as a share of parameter memory.

On the CPU memory is measured as resident set size (RSS), each variant in a **fresh subprocess** (so one
variant's allocator state cannot leak into another's), interleaved over several repeats. Two things make RSS
precise enough to resolve a fraction of a percent of a ~100 MB model:

* ``MALLOC_MMAP_THRESHOLD_=65536`` in the worker's environment: every tensor buffer above 64 KiB gets its own
  ``mmap`` and goes back to the kernel when freed. Without it glibc raises the threshold after the first free
  and serves later buffers from a heap that stays resident, so a temporary would show once, or never.
* the kernel's peak-RSS counter (``VmHWM``) is reset (``/proc/self/clear_refs`` = 5) at every phase boundary,
  so each phase of each step has its own peak instead of the process's lifetime peak.

Phases of one step, with probes at their boundaries: forward/backward (``on_train_batch_start`` ->
``on_before_optimizer_step``), the AdamW update (-> a step post-hook registered *before* the monitor's), and
everything after the update (the monitor's post-hook, logging, scheduler -> ``on_train_batch_end``). Figures
(medians over the steady-state steps of each process, then over processes):

* ``extra peak of the step``: peak RSS of the whole step, monitored minus plain: what a user sees;
* ``monitor working memory``: peak growth of the after-update phase over its start, monitored minus plain: the
  monitor's own temporaries even where they do not raise the step's peak (the update's temporaries are
  larger).

Every variant imports the monitor and loads Numba with the monitor's compiled CPU kernel before it trains, so the
same code is resident in all: that library memory (about 150 MiB, once per process whatever the model's size) is
reported as a row of its own, not as part of a step's peak.

The GPU equivalent (``torch.cuda.max_memory_allocated``) is in :mod:`benchmarks.gpu`.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from benchmarks.common import BENCH_DIR, Row, interleaved, quiet_cpu_trainer, stat

ITEM = 3
TARGET_FRACTION = 0.10
VARIANTS: dict[str, dict[str, Any] | None] = {
    "plain": None,
    "monitor, every step": {"log_every_n_steps": 1},
    "monitor, every step, per-layer": {"log_every_n_steps": 1, "per_layer": True},
}


# ----------------------------------------------------------------------------------------------- worker side


def _status_kib() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, value = line.split(":", 1)
            out[key] = int(value.split()[0])
    return out


def _reset_peak() -> None:
    # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def rss_supported() -> bool:
    """Whether this OS lets a process read its RSS and reset its own peak (Linux)."""
    try:
        _reset_peak()
        return "VmHWM" in _status_kib()
    except OSError:
        return False


def worker(spec: dict[str, Any]) -> dict[str, Any]:
    """In the subprocess: a short ``Trainer.fit`` with the probes; returns per-step figures in bytes."""
    import torch
    from lightning.pytorch.callbacks import Callback

    from benchmarks.bench_overhead import _quiet
    from benchmarks.models import GPTConfig, gpt_loader, lightning_gpt
    from lightning_adamw.monitor import WeightDecayMonitor  # imported by every variant: same code resident
    from lightning_adamw.update_split.backends import numba as numba_backend

    # Numba and the monitor's compiled CPU kernel too, in every variant: their resident memory is a fixed cost
    # per process (reported as its own row), not a temporary of the step
    before = _status_kib()["VmRSS"]
    thread = numba_backend.warm_up([torch.float32])
    if thread is not None:
        thread.join()
    library_bytes = (_status_kib()["VmRSS"] - before) * 1024
    _quiet()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = GPTConfig(**spec["gpt"])
    kib = 1024
    steps: list[dict[str, int]] = []
    current: dict[str, int] = {}

    def post_hook(optimizer: Any, args: Any, kwargs: Any) -> None:
        status = _status_kib()  # one read: the kernel reports VmHWM >= VmRSS within it
        current["update_peak"] = status["VmHWM"] * kib
        current["rss_after_update"] = status["VmRSS"] * kib
        _reset_peak()

    class Head(Callback):
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            # Registered before the monitor's own post-hook (callbacks run in list order), so it runs first.
            trainer.optimizers[0].register_step_post_hook(post_hook)

        def on_train_batch_start(self, *args: Any) -> None:
            current.clear()
            current["rss_start"] = _status_kib()["VmRSS"] * kib
            _reset_peak()

        def on_before_optimizer_step(self, *args: Any) -> None:
            status = _status_kib()
            current["fwd_bwd_peak"] = status["VmHWM"] * kib
            current["rss_before_update"] = status["VmRSS"] * kib
            _reset_peak()

    class Tail(Callback):
        def on_train_batch_end(self, *args: Any) -> None:
            current["after_peak"] = _status_kib()["VmHWM"] * kib
            steps.append(dict(current))

    callbacks: list[Any] = [Head()]
    if spec["monitor"] is not None:
        callbacks.append(WeightDecayMonitor(plot=False, **spec["monitor"]))
    callbacks.append(Tail())
    module = lightning_gpt(cfg, lr=1e-3, weight_decay=0.1)
    param_bytes = sum(p.numel() * p.element_size() for p in module.parameters())
    with tempfile.TemporaryDirectory(prefix="lightning-adamw-mem-") as tmp:
        trainer = quiet_cpu_trainer(tmp, max_steps=spec["steps"], callbacks=callbacks)
        trainer.fit(
            module, train_dataloaders=gpt_loader(cfg, batch_size=spec["batch"], n_samples=spec["batch"] * 8)
        )
    return {"param_bytes": param_bytes, "steps": steps, "library_bytes": library_bytes}


def _summarise(result: dict[str, Any], skip: int) -> dict[str, float]:
    """Median over the steady-state steps (the first steps allocate the optimizer state)."""
    steps = result["steps"][skip:]
    step_peak = [max(s["fwd_bwd_peak"], s["update_peak"], s["after_peak"]) for s in steps]
    after_growth = [s["after_peak"] - s["rss_after_update"] for s in steps]
    return {
        "step_peak": statistics.median(step_peak),
        "after_growth": statistics.median(after_growth),
        "update_growth": statistics.median(s["update_peak"] - s["rss_before_update"] for s in steps),
        "param_bytes": result["param_bytes"],
        "library_bytes": result["library_bytes"],
    }


# ----------------------------------------------------------------------------------------------- parent side


def _spawn(spec: dict[str, Any], timeout_s: float = 300) -> dict[str, Any]:
    env = dict(os.environ)
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    env["OMP_NUM_THREADS"] = "1"
    env["PYTHONPATH"] = os.pathsep.join([str(BENCH_DIR.parent), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.bench_memory", "--worker", json.dumps(spec)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout_s,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory worker failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    # The result is the last line; Lightning may print before it.
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run(repeats: int = 3, quick: bool = False) -> list[Row]:
    """Rows for item 3. ``quick``: a tiny model and two repeats (smoke test; no target judged)."""
    if not rss_supported():
        return [
            Row(
                ITEM,
                "peak RSS of a training step",
                name,
                "extra peak / parameter memory",
                None,
                note="not measured: needs Linux /proc RSS counters",
            )
            for name in VARIANTS
            if name != "plain"
        ]
    # ~100 MiB of parameters (1% = 1 MiB, far above RSS noise) but little compute: a short sequence, batch 2.
    gpt = {"dim": 64, "layers": 2, "seq": 16} if quick else {"dim": 512, "layers": 8, "seq": 16}
    spec_base = {"gpt": gpt, "batch": 2, "steps": 4 if quick else 10}
    skip = 1 if quick else 3
    trials = {
        name: (lambda kw=kw: _summarise(_spawn({**spec_base, "monitor": kw}), skip))
        for name, kw in VARIANTS.items()
    }
    results = interleaved(trials, repeats=repeats, warmup_rounds=0)
    param_bytes = results["plain"][0]["param_bytes"]
    size = f"GPT {gpt['layers']}x{gpt['dim']} ({param_bytes / 2**20:.3g} MiB params)"
    bench = f"peak RSS of a training step, {size}"
    rows: list[Row] = []
    for name in VARIANTS:
        rs = results[name]
        rows.append(
            Row.from_stat(
                ITEM,
                bench,
                name,
                "peak RSS of the step",
                stat([r["step_peak"] / 2**20 for r in rs]),
                unit="MiB",
                extra={
                    "after_growth": [r["after_growth"] for r in rs],
                    "update_growth": [r["update_growth"] for r in rs],
                },
            )
        )
    update = stat([100 * r["update_growth"] / param_bytes for r in results["plain"]])
    rows.append(
        Row.from_stat(
            ITEM,
            bench,
            "plain",
            "AdamW update's own temporaries / parameter memory",
            update,
            unit="%",
            note="peak growth during the foreach update (context: why the monitor's buffer hides under it)",
        )
    )
    rows.append(
        Row.from_stat(
            ITEM,
            "resident memory of the CPU kernel, once per process",
            "Numba and its compiled kernel",
            "RSS growth",
            stat([r["library_bytes"] / 2**20 for rs in results.values() for r in rs]),
            unit="MiB",
            note="imported and loaded in every variant above (same code resident); not per step, not per"
            " parameter; none with LIGHTNING_ADAMW_NUMBA=0 or on CUDA",
        )
    )
    plain_peak = statistics.median(r["step_peak"] for r in results["plain"])
    plain_after = statistics.median(r["after_growth"] for r in results["plain"])
    for name in VARIANTS:
        if name == "plain":
            continue
        extra_peak = stat([(r["step_peak"] - plain_peak) / param_bytes for r in results[name]])
        working = stat([(r["after_growth"] - plain_after) / param_bytes for r in results[name]])
        for metric, s, judged in (
            ("extra peak of the step / parameter memory", extra_peak, True),
            ("monitor working memory / parameter memory", working, False),
        ):
            rows.append(
                Row.from_stat(
                    ITEM,
                    bench,
                    name,
                    metric,
                    stat([100 * v for v in s.samples]),
                    unit="%",
                    target=f"<= {100 * TARGET_FRACTION:g}%" if judged else "",
                    ok=(s.median <= TARGET_FRACTION) if judged and not quick else None,
                    note="fresh process per variant and repeat; spread over processes",
                )
            )
    return rows


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
    else:
        raise SystemExit(
            "usage: python -m benchmarks.bench_memory --worker SPEC_JSON (called by benchmarks.run)"
        )
