"""Where the monitor's time goes on a GPU: host (Python) time per phase of ``update_split`` vs kernel time.

Run on a CUDA machine from the repository root (``python scripts/gpu_monitor_profile.py``). For the small GPT
(many tensors, tiny kernels) and the Llama skeleton, with fused AdamW, it prints: the fused step; a whole
``update_split(...).metrics()`` call; the host time of its stages (the plan, the scalars, the sums table, the
rest); and the fused Triton kernel alone (CUDA events). A diagnostic, not a benchmark: the figures that
count are in ``benchmarks/RESULTS.md`` (``python -m benchmarks.gpu``).
"""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning_adamw.update_split as us
from benchmarks.bench_naive import trained_optimizer
from benchmarks.gpu import GPU_MODEL, build_optimizer
from benchmarks.models import GPTConfig
from lightning_adamw.param_groups import build_param_groups
from lightning_adamw.update_split.backends import triton as ts
from lightning_adamw.update_split.contract import NUM_COLUMNS


def per_call_ms(fn: Callable[[], Any], n: int = 30) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3


CACHES = {True: us.PlanCache(), False: us.PlanCache()}


def split(opt: torch.optim.Optimizer, triton: bool = True) -> Any:
    return us.update_split(opt, triton=triton, cache=CACHES[triton])


def kernel_ms(opt: torch.optim.Optimizer, n: int = 30) -> float:
    split(opt)
    plan = CACHES[True].get(opt)
    assert plan is not None
    groups = [g for a in plan.assignments if a.backend == "triton" for g in a.prepared]
    table = torch.zeros(plan.num_rows, NUM_COLUMNS, dtype=torch.float64, device="cuda")
    both = ts.shared_scalars(1e-8, 1e-3, torch.device("cuda"))

    def run() -> None:
        for g in groups:
            ts.fused_table_sums(g, both[0:1], both[1:2], table)

    run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(n):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / n


def phases(opt: torch.optim.Optimizer, n: int = 30) -> dict[str, float]:
    totals: dict[str, float] = {}
    originals = {}
    for name in ("plan_for", "step_scalars", "sums_table"):
        f = getattr(us, name)
        originals[name] = f

        @functools.wraps(f)
        def timed(*a: Any, _f: Callable[..., Any] = f, _n: str = name, **k: Any) -> Any:
            t = time.perf_counter()
            r = _f(*a, **k)
            totals[_n] = totals.get(_n, 0.0) + time.perf_counter() - t
            return r

        setattr(us, name, timed)
    try:
        split(opt).metrics()
        totals.clear()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            split(opt).metrics()
        whole = time.perf_counter() - t
    finally:
        for name, f in originals.items():
            setattr(us, name, f)
    out = {k + " (host)": v / n * 1e3 for k, v in totals.items()}
    out["whole call"] = whole / n * 1e3
    return out


def main() -> None:
    cases = []
    _, opt = trained_optimizer(GPTConfig(dim=128, layers=24), device="cuda", fused=True)
    cases.append(("GPT 24x128 fp32 fused", opt))
    for dtype in (torch.float32, torch.bfloat16):
        _, opt = build_optimizer(GPU_MODEL, torch.device("cuda"), dtype, build_param_groups)
        cases.append((f"Llama 1.35B {dtype} fused", opt))
    for label, opt in cases:
        step = per_call_ms(opt.step)
        mon = per_call_ms(lambda opt=opt: split(opt).metrics())
        torch_path = per_call_ms(lambda opt=opt: split(opt, triton=False).metrics())
        parts = phases(opt)
        kern = kernel_ms(opt)
        print(
            f"== {label}: step {step:.3f} ms | monitor {mon:.3f} ms ({mon / step:.2f}x) | torch path "
            f"{torch_path:.3f} ms | kernel alone {kern:.3f} ms"
        )
        print("   " + ", ".join(f"{k} {v:.3f} ms" for k, v in parts.items()))
        del opt
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
