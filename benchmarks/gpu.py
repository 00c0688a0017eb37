"""Item 5: the GPU set. Fused AdamW step vs the monitor's computation on a >= 1B-parameter model.

Run on a machine with one CUDA GPU (needs torch and this repository; not jsonargparse, wandb or the package
installed), from the repository root::

    python -m benchmarks.gpu --out "$OUT/gpu_results.json"      # < 4 minutes on an H100 / H200

then, back on the development machine::

    python -m benchmarks --merge-gpu path/to/gpu_results.json   # folds the rows into benchmarks/RESULTS.md

What it measures, per precision (interleaved rounds, warm-up, median and min-max as in the CPU set):

* **fp32**: fp32 parameters, gradients and Adam state: the layout of Lightning's ``bf16-mixed`` /
  ``16-mixed`` precision, where the fp32 parameters are the master weights and only the compute is in bf16;
* **bf16**: bf16 parameters, gradients and Adam state (``bf16-true``); the monitor computes in fp32.

On a Llama-shaped model of ~1.35B parameters (``LlamaSkeleton``, 219 tensors; only the parameters exist, the
gradients are random: the optimizer's work does not depend on where gradients come from), and on item 2's
292-tensor, 4.8M-parameter GPT (fp32, where per-tensor kernel launches and syncs decide, not bytes):

* ``fused AdamW step``: ``torch.optim.AdamW(groups, fused=True).step()``;
* ``monitor (update_split), group metrics`` / ``per-layer``: what ``WeightDecayMonitor``'s step hook computes
  after each logged step, including its one device-to-host transfer;
* ``monitor, torch path``: the same sums with ``update_split(..., triton=False)``, the eager torch kernels that
  the fused Triton kernel replaces on CUDA (see ``lightning_adamw/triton_sums.py``);
* ``naive loop``: the per-parameter ``.norm().item()`` loop of item 2 (one host sync per ``.item()``);
* achieved bandwidth: essential bytes per call / time. AdamW reads w, g, m, v and writes w, m, v (7 tensors
  per element); the monitor's essential traffic is reading w, m, v once (3 tensors per element). Compared with
  the card's datasheet peak and with a measured device-to-device copy (the practical ceiling);
* memory: ``torch.cuda.max_memory_allocated`` during a step with the monitor vs without, as a share of the
  parameter memory, and the monitor's own working memory (its peak above the memory allocated before it ran).

``--dry-run`` runs every code path on the CPU with a tiny model in seconds (used by the test suite).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

if __package__ in (None, ""):  # `python benchmarks/gpu.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import Row, interleaved, log, machine_info, paired_ratios, stat
from benchmarks.models import LlamaConfig, LlamaSkeleton

ITEM = 5
BUDGET_S = 200.0  # the whole script must finish in < 4 minutes; stop starting new work after this

GPU_MODEL = LlamaConfig("1.35B", dim=2048, layers=24, ffn=5504, heads=16, kv_heads=16)
DRY_MODEL = LlamaConfig("tiny", dim=64, layers=2, ffn=128, heads=4, kv_heads=4, vocab=256)

#: Datasheet peak memory bandwidth in bytes/s, matched against ``torch.cuda.get_device_name()`` (first match
# wins).
PEAK_BANDWIDTH: tuple[tuple[tuple[str, ...], float], ...] = (
    (("H200",), 4.8e12),
    (("H100", "NVL"), 3.9e12),
    (("H100", "PCIe"), 2.0e12),
    (("H100",), 3.35e12),  # SXM5, HBM3
    (("GH200",), 4.0e12),
    (("A100", "80GB"), 2.039e12),
    (("A100",), 1.555e12),
    (("L40S",), 0.864e12),
    (("L4",), 0.3e12),
)


def peak_bandwidth(name: str) -> float | None:
    """Datasheet bandwidth of a GPU by name, or ``None`` when it is not in :data:`PEAK_BANDWIDTH`."""
    for words, bandwidth in PEAK_BANDWIDTH:
        if all(w.lower() in name.lower() for w in words):
            return bandwidth
    return None


# ----------------------------------------------------------------------------------------------- imports


def import_core() -> tuple[Callable[..., Any], Callable[..., Any]]:
    """``(build_param_groups, update_split)`` from the package (pure torch: no Lightning is imported).

    ``update_split`` keeps one plan cache per optimizer and choice of path, as the monitor does (its own
    :class:`~lightning_adamw.update_split.PlanCache`): the torch path (``triton=False``) gets a cache of its own,
    so the interleaved variants do not rebuild each other's plans.
    """
    from lightning_adamw.param_groups import build_param_groups
    from lightning_adamw.update_split import PlanCache, update_split

    caches = {True: PlanCache(), False: PlanCache()}

    def split(optimizer: torch.optim.Optimizer, *, triton: bool = True, **kwargs: Any) -> Any:
        return update_split(optimizer, triton=triton, cache=caches[triton], **kwargs)

    return build_param_groups, split


# ----------------------------------------------------------------------------------------------- setup


def build_optimizer(
    cfg: LlamaConfig, device: torch.device, dtype: torch.dtype, build_param_groups: Callable[..., Any]
) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """The skeleton on ``device`` in ``dtype``, random weights and gradients, and an AdamW past 3 steps."""
    with torch.device("meta"):
        model = LlamaSkeleton(cfg)
    model = model.to_empty(device=device).to(dtype)
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.fill_(1.0)  # norm gains
            else:
                p.normal_(0.0, 0.02, generator=gen)
            p.grad = torch.empty_like(p).normal_(0.0, 1e-3, generator=gen)
    kwargs: dict[str, Any] = {"lr": 3e-4, "betas": (0.9, 0.95), "eps": 1e-8}
    kwargs["fused" if device.type == "cuda" else "foreach"] = True
    optimizer = torch.optim.AdamW(build_param_groups(model, weight_decay=0.1), **kwargs)
    for _ in range(3):
        optimizer.step()
    return model, optimizer


def naive_metrics(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    from benchmarks.bench_naive import naive_update_split

    return naive_update_split(optimizer)


# ----------------------------------------------------------------------------------------------- measurements


class Clock:
    """Seconds per call, the device drained before and after (the monitor syncs anyway; AdamW does not)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def per_call(self, fn: Callable[[], Any], calls: int) -> float:
        self.sync()
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        self.sync()
        return (time.perf_counter() - start) / calls

    def calls_for(self, fn: Callable[[], Any], budget_s: float) -> int:
        once = self.per_call(fn, 1)
        return max(2, min(200, int(budget_s / max(once, 1e-6))))


def copy_bandwidth(device: torch.device, clock: Clock, nbytes: int, repeats: int) -> Any:
    """Device-to-device copy bandwidth (read + write), the practical ceiling for streaming kernels."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)

    def fn() -> None:
        dst.copy_(src)

    calls = clock.calls_for(fn, 0.2)
    samples = [2 * nbytes / clock.per_call(fn, calls) for _ in range(repeats)]
    return stat([s / 1e9 for s in samples])


def memory_rows(
    optimizer: torch.optim.Optimizer,
    update_split: Callable[..., Any],
    param_bytes: int,
    precision: str,
    bench: str,
) -> list[Row]:
    """``max_memory_allocated`` of a step with / without the monitor (CUDA only)."""
    device = next(iter(optimizer.state)).device
    gc.collect()
    torch.cuda.synchronize(device)

    def peak(fn: Callable[[], Any]) -> int:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - base

    def monitored() -> None:
        optimizer.step()
        update_split(optimizer).metrics()

    plain = [peak(optimizer.step) for _ in range(3)]
    mon = [peak(monitored) for _ in range(3)]
    working = [peak(lambda: update_split(optimizer).metrics()) for _ in range(3)]
    extra = stat([100 * (m - p) / param_bytes for m, p in zip(mon, plain, strict=True)])
    own = stat([100 * w / param_bytes for w in working])
    return [
        Row.from_stat(
            ITEM,
            bench,
            f"{precision}: step + monitor vs step",
            "extra peak / parameter memory",
            extra,
            unit="%",
            target="<= 10%",
            ok=extra.median <= 10.0,
            note=f"torch.cuda.max_memory_allocated; plain step peak {max(plain) / 2**20:.0f} MiB",
        ),
        Row.from_stat(
            ITEM,
            bench,
            f"{precision}: monitor alone",
            "working memory / parameter memory",
            own,
            unit="%",
            note="peak above memory_allocated before update_split()",
        ),
    ]


def _small_tensor_case(device: torch.device, dry_run: bool) -> tuple[str, Any, torch.optim.Optimizer]:
    """Item 2's 292-tensor GPT (4.8M parameters): where per-tensor launches and syncs, not bytes, decide."""
    from benchmarks.bench_naive import QUICK_MODELS, trained_optimizer
    from benchmarks.models import GPTConfig

    cfg = next(iter(QUICK_MODELS.values())) if dry_run else GPTConfig(dim=128, layers=24)
    fused = {"fused": True} if device.type == "cuda" else {}
    model, optimizer = trained_optimizer(cfg, device=device, **fused)
    n_tensors = sum(len(g["params"]) for g in optimizer.param_groups)
    return f"GPT {cfg.layers}x{cfg.dim} ({n_tensors} tensors), fp32", model, optimizer


def measure_case(
    *,
    bench: str,
    optimizer: torch.optim.Optimizer,
    update_split: Callable[..., Any],
    clock: Clock,
    repeats: int,
    call_budget: float,
    judge: bool,
    bandwidth: tuple[int, int, float | None, float] | None = None,
    check: bool = True,
) -> list[Row]:
    """Interleaved timings of the step, the monitor and the naive loop on one optimizer, and their ratios.

    ``bandwidth`` = ``(n_params, bytes per element, datasheet peak or None, measured copy GB/s)`` adds the
    achieved-bandwidth rows.
    """
    agreement = ""
    if check:
        # Same numbers both ways before anything is timed (in bf16 the naive loop would compute in bf16).
        from benchmarks.bench_naive import check_agreement

        try:
            worst = check_agreement(update_split(optimizer).metrics(), naive_metrics(optimizer))
            agreement = f"results agree to {worst:.1e} relative"
        except AssertionError as err:
            agreement = f"results DISAGREE: {err}"
    step, group, layer, naive = (
        "fused AdamW step" if clock.device.type == "cuda" else "foreach AdamW step (dry run)",
        "monitor (update_split), group metrics",
        "monitor (update_split), per-layer",
        "naive loop (.norm().item() per tensor)",
    )
    fns: dict[str, Callable[[], Any]] = {
        step: optimizer.step,
        group: lambda: update_split(optimizer).metrics(),
        layer: lambda: update_split(optimizer).metrics(per_layer=True),
        naive: lambda: naive_metrics(optimizer),
    }
    torch_path = "monitor, torch path (triton=False), group metrics"
    if (
        clock.device.type == "cuda"
    ):  # the fused Triton kernel's baseline: the same sums in eager torch kernels
        fns[torch_path] = lambda: update_split(optimizer, triton=False).metrics()
    calls = {k: clock.calls_for(fn, call_budget) for k, fn in fns.items()}
    trials = {k: (lambda fn=fn, n=calls[k]: clock.per_call(fn, n)) for k, fn in fns.items()}
    results = interleaved(trials, repeats=repeats, warmup_rounds=1)
    rows = [
        Row.from_stat(
            ITEM,
            bench,
            k,
            "time per call",
            stat([v * 1e3 for v in samples]),
            unit="ms",
            extra={"calls_per_repeat": calls[k]},
        )
        for k, samples in results.items()
    ]
    ratios = paired_ratios(results, step)
    for k in (group, layer):
        s = stat(ratios[k])
        rows.append(
            Row.from_stat(
                ITEM,
                bench,
                k,
                "time / fused AdamW step",
                s,
                unit="x",
                target="<= 1.3x",
                ok=(s.median <= 1.3) if judge else None,
            )
        )
    if torch_path in results:
        rows.append(
            Row.from_stat(
                ITEM,
                bench,
                torch_path,
                "time / fused AdamW step",
                stat(ratios[torch_path]),
                unit="x",
                note="the packed torch kernels the Triton kernel replaces on CUDA",
            )
        )
    speedup = stat(paired_ratios(results, group)[naive])
    rows.append(
        Row.from_stat(
            ITEM,
            bench,
            "naive loop / monitor (group metrics)",
            "speed-up",
            speedup,
            unit="x",
            target=">= 5x",
            ok=(speedup.median >= 5.0) if judge else None,
            note=agreement,
        )
    )
    if bandwidth is not None:
        n_params, elem, peak, copy_gbs = bandwidth
        # Essential traffic per element: AdamW 7 tensors (w, g, m, v read; w, m, v written); monitor 3 (w, m,
        # v).
        for k, tensors in ((step, 7), (group, 3)):
            bw = stat([tensors * elem * n_params / v / 1e9 for v in results[k]])
            note = f"{tensors} x {elem} B per parameter"
            if peak:
                note += f"; {100 * bw.median * 1e9 / peak:.0f}% of datasheet peak"
            note += f"; {100 * bw.median / copy_gbs:.0f}% of measured copy"
            rows.append(
                Row.from_stat(
                    ITEM, bench, k, "achieved bandwidth (essential bytes)", bw, unit="GB/s", note=note
                )
            )
    return rows


def run(
    device: str = "cuda",
    dry_run: bool = False,
    repeats: int = 5,
    budget_s: float = BUDGET_S,
    precisions: tuple[str, ...] = ("fp32", "bf16"),
) -> tuple[list[Row], dict[str, Any]]:
    """All GPU rows and the settings to record."""
    start = time.perf_counter()
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks.gpu: no CUDA device (use --dry-run to exercise the code on the CPU)")
    if dev.type == "cpu":
        # See benchmarks.run: two OpenMP threads on a shared 2-core box stall at every barrier.
        torch.set_num_threads(1)
    build_param_groups, update_split = import_core()
    cfg = DRY_MODEL if dry_run else GPU_MODEL
    clock = Clock(dev)
    name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu (dry run)"
    peak = peak_bandwidth(name) if dev.type == "cuda" else None
    repeats = 2 if dry_run else repeats
    call_budget = 0.01 if dry_run else 0.4
    judge = not dry_run
    rows: list[Row] = []

    def over_budget(what: str) -> bool:
        if time.perf_counter() - start <= budget_s:
            return False
        rows.append(Row(ITEM, f"{name}, {what}", "all", "all", None, note="not measured: time budget spent"))
        return True

    copy = copy_bandwidth(dev, clock, (1 << 20) if dry_run else (1 << 30), repeats)
    rows.append(
        Row.from_stat(
            ITEM,
            f"memory bandwidth, {name}",
            "device copy (read + write)",
            "achieved bandwidth",
            copy,
            unit="GB/s",
            note=f"datasheet peak {peak / 1e9:,.0f} GB/s" if peak else "datasheet peak unknown",
        )
    )

    for precision in precisions:
        if over_budget(f"Llama {cfg.name}, {precision}"):
            continue
        dtype = torch.float32 if precision == "fp32" else torch.bfloat16
        model, optimizer = build_optimizer(cfg, dev, dtype, build_param_groups)
        n_params = sum(p.numel() for p in model.parameters())
        n_tensors = sum(1 for _ in model.parameters())
        elem = torch.finfo(dtype).bits // 8
        size = f"{n_params / 1e9:.2f}B" if n_params >= 1e8 else f"{n_params / 1e6:.2f}M"
        bench = f"{name}, Llama {size} ({n_tensors} tensors), {precision} params+state"
        rows += measure_case(
            bench=bench,
            optimizer=optimizer,
            update_split=update_split,
            clock=clock,
            repeats=repeats,
            call_budget=call_budget,
            judge=judge,
            bandwidth=(n_params, elem, peak, copy.median),
            check=precision == "fp32",
        )
        if dev.type == "cuda":
            rows += memory_rows(optimizer, update_split, n_params * elem, precision, bench)
        del model, optimizer
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.empty_cache()

    if not over_budget("many small tensors"):
        label, model, optimizer = _small_tensor_case(dev, dry_run)
        rows += measure_case(
            bench=f"{name}, {label}",
            optimizer=optimizer,
            update_split=update_split,
            clock=clock,
            repeats=repeats,
            call_budget=call_budget / 2,
            judge=judge,
        )
        del model, optimizer

    settings = {
        "command": "python -m benchmarks.gpu" + (" --dry-run" if dry_run else ""),
        "wall time": f"{time.perf_counter() - start:.0f} s",
        "precision_note": " ".join(
            """
            Precisions: fp32 = fp32 parameters, gradients and Adam state (the master weights of
            Lightning's bf16-mixed); bf16 = bf16 parameters, gradients and Adam state (bf16-true), the
            monitor's fused kernel computing in fp32 as it loads them. Llama gradients are random (the optimizer's and the monitor's
            work does not depend on them); the small GPT has real gradients from two training steps.
            """.split()
        ),
    }
    return rows, settings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__.split("\n\n")[0])
    default_out = (
        Path(os.environ["OUT"]) / "gpu_results.json" if os.environ.get("OUT") else Path("gpu_results.json")
    )
    parser.add_argument(
        "--out", type=Path, default=default_out, help=f"JSON to write (default {default_out})"
    )
    parser.add_argument("--dry-run", action="store_true", help="tiny model on the CPU: checks the code paths")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--precision", choices=("fp32", "bf16", "both"), default="both")
    parser.add_argument(
        "--budget-s", type=float, default=BUDGET_S, help="stop starting new cases after this many seconds"
    )
    args = parser.parse_args(argv)

    from benchmarks.report import console_table, save

    precisions = ("fp32", "bf16") if args.precision == "both" else (args.precision,)
    rows, settings = run(
        device="cpu" if args.dry_run else "cuda",
        dry_run=args.dry_run,
        repeats=args.repeats,
        budget_s=args.budget_s,
        precisions=precisions,
    )
    print(console_table(rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    save(args.out, machine_info(), rows, settings)
    log(f"wrote {args.out}; merge with: python -m benchmarks --merge-gpu {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
