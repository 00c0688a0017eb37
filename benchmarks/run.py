"""The benchmark runner: ``python -m benchmarks`` (or ``python benchmarks/run.py``).

Runs the CPU set (items 1-4 of the benchmark issue), prints a table and rewrites ``benchmarks/RESULTS.md``
(and ``benchmarks/results_cpu.json``, the raw figures it is rendered from). About 5 minutes on 2 cores.

Examples::

    python -m benchmarks                      # the CPU set, rewrites RESULTS.md
    python -m benchmarks --only 2,4           # some items; RESULTS.md then shows only those
    python -m benchmarks --quick --out /tmp/b # ~1 min; tiny models, no verdicts, results in /tmp/b
    python -m benchmarks --merge-gpu gpu.json # fold the output of `python -m benchmarks.gpu` into RESULTS.md
    python -m benchmarks --render             # re-render RESULTS.md from results_cpu.json / results_gpu.json

Threads: the CPU set pins torch to one intra-op thread by default (``--threads``). On a 2-core machine two
OpenMP threads turn any other busy process into a stall at every parallel op's barrier (we saw single ops go
from 0.8 ms to 15 ms), which would swamp the differences measured here; one thread makes the figures
repeatable. Ratios are what the benchmarks report; absolute times are for one core.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/run.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import BENCH_DIR, Row, log, machine_info
from benchmarks.report import console_table, load, render, rows_of, save

# Cheap ones first, so a broken item fails fast; 1 before 2 so item 1's own rows come before the isolated
# monitor-vs-step rows that item 2 adds to it.
CPU_ITEMS = (4, 1, 2, 3)


def _runner(item: int) -> Callable[..., list[Row]]:
    # Imported lazily: `--merge-gpu` needs none of them.
    if item == 1:
        from benchmarks import bench_overhead

        return bench_overhead.run
    if item == 2:
        from benchmarks import bench_naive

        return bench_naive.run
    if item == 3:
        from benchmarks import bench_memory

        return bench_memory.run
    if item == 4:
        from benchmarks import bench_grouping

        return bench_grouping.run
    raise ValueError(f"unknown CPU item {item} (the CPU set is 1-4; 5 is `python -m benchmarks.gpu`)")


DEFAULT_REPEATS = {1: 5, 2: 5, 3: 3, 4: 7}


def run_items(
    items: Sequence[int], quick: bool = False, repeats: int | None = None
) -> tuple[list[Row], dict[str, float]]:
    """Run the given CPU items; returns the rows (ordered by item) and seconds per item."""
    rows: list[Row] = []
    durations: dict[str, float] = {}
    for item in items:
        n = repeats if repeats is not None else (2 if quick else DEFAULT_REPEATS[item])
        log(f"item {item}: {n} repeats{' (quick)' if quick else ''} ...")
        start = time.perf_counter()
        rows += _runner(item)(repeats=n, quick=quick)
        durations[f"item {item}"] = round(time.perf_counter() - start, 1)
        log(f"item {item}: done in {durations[f'item {item}']:.0f} s")
    if 1 in items:
        # item 1's fixed cost per fit last: its fits import matplotlib and start threads, which must not change the
        # process the other items are measured in (their figures are compared with earlier versions')
        from benchmarks import bench_overhead

        n = repeats if repeats is not None else (2 if quick else DEFAULT_REPEATS[1])
        log(f"item 1 (fixed cost per fit): {n} repeats ...")
        start = time.perf_counter()
        rows += bench_overhead.fixed_cost_rows(repeats=n, quick=quick)
        durations["item 1 (fixed cost)"] = round(time.perf_counter() - start, 1)
        from benchmarks import bench_first_call

        log(f"item 1 (first call in a new process): {n} repeats ...")
        start = time.perf_counter()
        rows += bench_first_call.first_call_rows(repeats=n, quick=quick)
        durations["item 1 (first call)"] = round(time.perf_counter() - start, 1)
    rows.sort(key=lambda r: r.item)  # stable: keeps each item's own order
    return rows, durations


def write_results(out_dir: Path, cpu: dict[str, Any] | None, gpu: dict[str, Any] | None) -> Path:
    """RESULTS.md from the CPU and GPU figures, and the A/B comparison of ``python -m benchmarks.ab`` when
    ``ab_cpu.json`` is there."""
    path = out_dir / "RESULTS.md"
    ab_file = out_dir / "ab_cpu.json"
    ab = json.loads(ab_file.read_text()) if ab_file.exists() else None
    path.write_text(render(cpu, gpu, ab))
    return path


def merge_gpu(gpu_file: Path, out_dir: Path) -> Path:
    """Copy the GPU script's JSON next to the CPU results and re-render RESULTS.md from both."""
    data = load(gpu_file)
    if data is None:
        raise SystemExit(f"--merge-gpu: {gpu_file} does not exist")
    if not data.get("rows"):
        raise SystemExit(f"--merge-gpu: {gpu_file} has no rows")
    target = out_dir / "results_gpu.json"
    if gpu_file.resolve() != target.resolve():
        shutil.copyfile(gpu_file, target)
    return write_results(out_dir, load(out_dir / "results_cpu.json"), data)


def _parse_items(text: str) -> list[int]:
    items = [int(x) for x in text.split(",") if x.strip()]
    bad = [i for i in items if i not in CPU_ITEMS]
    if bad:
        raise argparse.ArgumentTypeError(f"items must be among 1,2,3,4 (got {bad}); item 5 is benchmarks.gpu")
    return [i for i in CPU_ITEMS if i in items]


def main(argv: Sequence[str] | None = None) -> int:
    intro, details = __doc__.split("\n\n", 1)
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description=intro,
        epilog=details,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--only", type=_parse_items, default=list(CPU_ITEMS), help="comma-separated items (1-4)"
    )
    parser.add_argument("--repeats", type=int, default=None, help="rounds per comparison (default per item)")
    parser.add_argument(
        "--quick", action="store_true", help="tiny models, about a minute; checks the code paths"
    )
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (default 1, see below)"
    )
    parser.add_argument("--out", type=Path, default=BENCH_DIR, help="where RESULTS.md and the JSON go")
    parser.add_argument("--no-write", action="store_true", help="print the table only")
    parser.add_argument("--merge-gpu", type=Path, metavar="FILE", help="merge a benchmarks.gpu JSON and exit")
    parser.add_argument("--render", action="store_true", help="only re-render RESULTS.md from the JSON files")
    args = parser.parse_args(argv)

    args.out.mkdir(parents=True, exist_ok=True)
    if args.merge_gpu is not None:
        path = merge_gpu(args.merge_gpu, args.out)
        print(console_table(rows_of(load(args.out / "results_gpu.json"))))
        log(f"merged {args.merge_gpu} into {path}")
        return 0
    if args.render:
        cpu = load(args.out / "results_cpu.json")
        path = write_results(args.out, cpu, load(args.out / "results_gpu.json"))
        log(f"re-rendered {path}")
        return 0
    if args.quick and args.out.resolve() == BENCH_DIR.resolve() and not args.no_write:
        # Quick figures must never replace the real ones.
        args.no_write = True
        log("--quick: not writing benchmarks/RESULTS.md (pass --out DIR to write quick results elsewhere)")

    import torch

    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    rows, durations = run_items(args.only, quick=args.quick, repeats=args.repeats)
    total = time.perf_counter() - start
    print(console_table(rows))
    log(f"total {total:.0f} s ({', '.join(f'{k}: {v:.0f} s' for k, v in durations.items())})")
    if args.no_write:
        return 0
    settings = {
        "command": "python -m benchmarks"
        + (" " + " ".join(sys.argv[1:]) if argv is None and sys.argv[1:] else ""),
        "items run": ",".join(map(str, args.only)),
        "wall time": f"{total:.0f} s ({', '.join(f'{k}: {v:.0f} s' for k, v in durations.items())})",
    }
    if args.quick:
        settings["quick"] = "yes: tiny models, figures are not meaningful"
    machine = machine_info()
    save(args.out / "results_cpu.json", machine, rows, settings)
    gpu = load(args.out / "results_gpu.json")
    path = write_results(args.out, json.loads((args.out / "results_cpu.json").read_text()), gpu)
    log(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
