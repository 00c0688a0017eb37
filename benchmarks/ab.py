"""A/B: the CPU benchmark items of two source trees, interleaved, on one machine.

``python -m benchmarks.ab BASELINE_TREE`` runs ``python -m benchmarks --only ITEMS`` in the baseline tree and in
this one, alternately (the order flips every round), each in a fresh process whose working directory is that
tree, so each imports its own package and its own benchmark code. Every run is itself interleaved and measured as
``python -m benchmarks`` measures (CPU time, one torch thread). Rows present in both trees are matched by
``(item, what, variant, metric)``; each tree's figure is the median over rounds of its runs' medians, beside the
smallest and largest. The result goes to ``benchmarks/ab_cpu.json``, which ``python -m benchmarks --render`` (and
every later run) shows in RESULTS.md next to the current figures.

Example (a baseline from the last commit, kept outside the repository)::

    git worktree add --detach /tmp/baseline HEAD
    python -m benchmarks.ab /tmp/baseline --items 1,2,3 --rounds 3 --repeats 3
    git worktree remove /tmp/baseline
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python benchmarks/ab.py`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import BENCH_DIR, log, machine_info

AB_FILE = BENCH_DIR / "ab_cpu.json"
SCHEMA = "lightning-adamw-ab/1"


def _git_revision(tree: Path) -> str:
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=tree, capture_output=True, text=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=tree, capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return f"{rev}{' (+ uncommitted changes)' if dirty else ''}" if rev else "unknown"


def run_tree(tree: Path, items: str, repeats: int, out: Path) -> dict[str, Any]:
    """``python -m benchmarks --only items`` in ``tree`` (its own package); its results_cpu.json."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    cmd = [sys.executable, "-m", "benchmarks", "--only", items, "--repeats", str(repeats), "--out", str(out)]
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{tree}: {' '.join(cmd)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}")
    return json.loads((out / "results_cpu.json").read_text())


def _key(row: dict[str, Any]) -> str:
    return " | ".join(str(row[k]) for k in ("item", "bench", "variant", "metric"))


def compare(rounds: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Per row present in both trees: each tree's median over rounds (and min, max) of the run medians."""
    values: dict[str, dict[str, list[float]]] = {"baseline": {}, "new": {}}
    meta: dict[str, dict[str, Any]] = {}
    for tree, runs in rounds.items():
        for run in runs:
            for row in run["rows"]:
                if row.get("value") is None:
                    continue
                values[tree].setdefault(_key(row), []).append(float(row["value"]))
                meta.setdefault(_key(row), row)
    out = []
    for key, new in values["new"].items():
        base = values["baseline"].get(key)
        if not base:
            continue
        row = meta[key]
        out.append(
            {
                "item": row["item"],
                "bench": row["bench"],
                "variant": row["variant"],
                "metric": row["metric"],
                "unit": row.get("unit", ""),
                "target": row.get("target", ""),
                "baseline": [statistics.median(base), min(base), max(base)],
                "new": [statistics.median(new), min(new), max(new)],
                "n": [len(base), len(new)],
            }
        )
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.ab", description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("baseline", type=Path, help="the baseline source tree (e.g. a git worktree)")
    parser.add_argument("--items", default="1,2,3", help="CPU items to run in both trees (default 1,2,3)")
    parser.add_argument("--rounds", type=int, default=3, help="runs per tree, alternating (default 3)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds inside each run (default 3)")
    parser.add_argument("--out", type=Path, default=AB_FILE, help="the JSON to write")
    args = parser.parse_args(argv)
    trees = {"baseline": args.baseline.resolve(), "new": BENCH_DIR.parent}
    rounds: dict[str, list[dict[str, Any]]] = {"baseline": [], "new": []}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="lightning-adamw-ab-") as tmp:
        for r in range(args.rounds):
            order = ["baseline", "new"] if r % 2 == 0 else ["new", "baseline"]
            for name in order:
                out = Path(tmp) / f"{name}{r}"
                out.mkdir()
                log(f"round {r + 1}/{args.rounds}: {name} ({trees[name]}) ...")
                rounds[name].append(run_tree(trees[name], args.items, args.repeats, out))
    rows = compare(rounds)
    payload = {
        "schema": SCHEMA,
        "machine": machine_info(),
        "settings": {
            "command": "python -m benchmarks.ab " + " ".join(sys.argv[1:] if argv is None else argv),
            "baseline": f"{trees['baseline']} at {_git_revision(trees['baseline'])}",
            "new": f"{trees['new']} at {_git_revision(trees['new'])}",
            "rounds": args.rounds,
            "repeats per run": args.repeats,
            "wall time": f"{time.perf_counter() - start:.0f} s",
        },
        "rows": rows,
    }
    args.out.write_text(json.dumps(payload, indent=1) + "\n")
    for row in rows:
        b, n = row["baseline"][0], row["new"][0]
        print(f"{row['bench'][:50]:50} {row['variant'][:36]:36} {row['metric'][:34]:34} {b:10.4g} {n:10.4g}")
    log(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
