"""Item 1, first call: what the monitor's first ``update_split`` call in a new process costs.

On a CPU the AdamW sums run in a kernel compiled by Numba (``update_split/backends/numba.py``): the first call
of a process imports Numba and loads the compiled kernel from Numba's on-disk cache (compiled once per machine).
Each trial is a fresh Python process that trains a small model one step and times its first call, either cold
(nothing done before) or after ``warm_up`` (what ``WeightDecayMonitor`` starts in a background thread when
training starts), given the time a short fit's first logging interval gives it. The later calls of the same
process are timed too. Wall-clock time: a process start is what a user waits for.
"""

from __future__ import annotations

import json
import subprocess
import sys
from typing import Any

from benchmarks.common import Row, interleaved, stat

ITEM = 1

_CHILD = r"""
import json, sys, time
import torch
from torch import nn
from lightning_adamw import build_param_groups
from lightning_adamw.update_split import PlanCache, update_split
from lightning_adamw.update_split.backends import numba as numba_backend

torch.manual_seed(0)
model = nn.Sequential(nn.Linear(128, 512), nn.LayerNorm(512), nn.Linear(512, 128))
opt = torch.optim.AdamW(build_param_groups(model, 0.1), lr=1e-3)
if sys.argv[1] == "warm":
    thread = numba_backend.warm_up([torch.float32])
    if thread is not None:
        thread.join()  # (a fit's first logging steps give it this time on the training thread's side)
model(torch.randn(8, 128)).square().mean().backward()
opt.step()
cache = PlanCache()
start = time.perf_counter()
update_split(opt, cache=cache).metrics()
first = time.perf_counter() - start
start = time.perf_counter()
for _ in range(20):
    update_split(opt, cache=cache).metrics()
later = (time.perf_counter() - start) / 20
print(json.dumps({"first_s": first, "later_s": later, "backends": [a.backend for a in cache.get(opt).assignments]}))
"""


def _trial(mode: str) -> dict[str, Any]:
    out = (
        subprocess.run([sys.executable, "-c", _CHILD, mode], check=True, capture_output=True, text=True)
        .stdout.strip()
        .splitlines()[-1]
    )
    return json.loads(out)


def first_call_rows(repeats: int = 5, quick: bool = False) -> list[Row]:
    """Rows of the first call in a new process, cold and after the monitor's warm-up."""
    results = interleaved(
        {"cold": lambda: _trial("cold"), "after warm-up": lambda: _trial("warm")},
        repeats=repeats,
        warmup_rounds=0 if quick else 1,
    )
    bench = "first update_split call in a new process (3 tensors, 132K params)"
    backends = sorted({b for r in results["cold"] for b in r["backends"]})
    rows = []
    for name, rs in results.items():
        rows.append(
            Row.from_stat(
                ITEM,
                bench,
                name,
                "first call (wall)",
                stat([r["first_s"] * 1e3 for r in rs]),
                unit="ms",
                note=f"backend {', '.join(backends)}; Numba's import and its cached kernel's load"
                if name == "cold"
                else "warm_up() run first, as the monitor does in a background thread when training starts",
            )
        )
    rows.append(
        Row.from_stat(
            ITEM,
            bench,
            "later calls",
            "time per call (wall)",
            stat([r["later_s"] * 1e3 for r in results["cold"]]),
            unit="ms",
        )
    )
    return rows
