"""The benchmark code paths run and produce well-formed rows. Nothing here depends on timing.

Each benchmark runs in its ``quick`` form (tiny models, one or two rounds): the assertions are on structure
and on values that do not depend on the machine (row shapes, units, counts, the naive and batched
computations agreeing, the report rendering and the GPU merge), never on how fast anything was.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from benchmarks import (
    ab,
    bench_first_call,
    bench_grouping,
    bench_memory,
    bench_naive,
    bench_overhead,
    gpu,
    report,
    run,
)
from benchmarks.common import Row, interleaved, paired_ratios, stat
from benchmarks.models import LLAMA_SHAPES, build_meta, count_params


@pytest.fixture(autouse=True)
def _one_thread():
    # As `python -m benchmarks` does: two OpenMP threads on a busy 2-core machine stall at every barrier and
    # make these seconds-long paths take half a minute. Other tests get their thread count back.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def assert_well_formed(rows: list[Row], item: int | set[int]) -> None:
    items = {item} if isinstance(item, int) else item
    assert rows
    for r in rows:
        assert r.item in items, r
        assert r.bench and r.variant and r.metric, r
        assert r.value is not None and math.isfinite(r.value), r
        if r.lo is not None:
            assert r.lo <= r.value <= r.hi, r
            assert r.n == len(r.extra["samples"]) >= 1, r
        # a round trip through the JSON the report is rendered from
        assert Row.from_dict(json.loads(json.dumps(r.to_dict()))) == r


# ----------------------------------------------------------------------------------------------- harness


def test_interleaved_rotates_and_drops_warmup():
    calls: list[str] = []

    def trial(name: str):
        def fn() -> float:
            calls.append(name)
            return float(len(calls))

        return fn

    results = interleaved({"a": trial("a"), "b": trial("b"), "c": trial("c")}, repeats=3, warmup_rounds=1)
    assert calls == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert {k: len(v) for k, v in results.items()} == {"a": 3, "b": 3, "c": 3}
    ratios = paired_ratios(results, "a")
    assert ratios["a"] == [1.0, 1.0, 1.0]
    s = stat([3.0, 1.0, 2.0])
    assert (s.median, s.lo, s.hi, s.n) == (2.0, 1.0, 3.0, 3)


def test_llama_shapes_match_their_configs():
    for cfg in LLAMA_SHAPES[:3]:
        assert count_params(build_meta(cfg)) == (cfg.n_tensors, cfg.n_params)
    assert 65e9 < LLAMA_SHAPES[-1].n_params < 72e9


# ----------------------------------------------------------------------------------------------- items


def test_grouping_rows():
    rows = bench_grouping.run(repeats=1, quick=True)
    assert_well_formed(rows, 4)
    sizes = [r for r in rows if r.bench.endswith("meta device")]
    assert [r.extra["tensors"] for r in sizes] == [c.n_tensors for c in LLAMA_SHAPES[:2]]
    assert all(r.unit == "ms" and r.value > 0 for r in sizes)
    fit = [r for r in rows if r.metric.startswith("R^2")]
    assert len(fit) == 1 and fit[0].value <= 1.0


def test_naive_matches_batched_and_rows():
    # The comparison is only fair if both compute the same numbers.
    _, optimizer = bench_naive.trained_optimizer(bench_naive.QUICK_MODELS["GPT 17x32 (208 tensors)"])
    from lightning_adamw.update_split import update_split

    for per_layer in (False, True):
        batched = update_split(optimizer).metrics(per_layer=per_layer)
        naive = bench_naive.naive_update_split(optimizer, per_layer=per_layer)
        assert bench_naive.check_agreement(batched, naive) < 2e-3
    with pytest.raises(AssertionError):
        bench_naive.check_agreement({"a": 1.0}, {"a": 2.0})

    rows = bench_naive.run(repeats=1, quick=True, budget_s=0.001)
    assert_well_formed(rows, {1, 2})
    assert {r.variant for r in rows if r.metric == "speed-up"} == {
        "naive / batched, group metrics",
        "naive / batched, per-layer metrics",
        "reference backend / batched, group metrics",  # the tests' float64 oracle, timed as a baseline
    }
    assert all(r.extra["tensors"] >= 200 for r in rows if r.metric == "time per call")
    assert all(r.ok is None for r in rows)  # quick runs judge no target


def test_fit_overhead_rows():
    rows = bench_overhead.run(repeats=1, quick=True)
    assert_well_formed(rows, 1)
    per_step = [r for r in rows if r.metric == "ms / step"]
    assert len(per_step) == 2 * (len(bench_overhead.VARIANTS) + 1)
    # the every-step monitor really logged metrics during the fit
    every = [r for r in per_step if r.variant == "monitor, every step"]
    assert all(int(r.note.split()[0]) > 0 for r in every)
    assert all(r.ok is None for r in rows)
    # the fixed cost per fit: the monitor's hooks outside the step, with the figure written (checked inside)
    fixed = bench_overhead.fixed_cost_rows(repeats=1, quick=True)
    assert_well_formed(fixed, 1)
    hooks = [r for r in fixed if r.metric.startswith("training-thread time")]
    assert {r.variant for r in hooks} == {
        "monitor, default interval",
        "monitor, default interval, plot=False",
    }
    assert all(r.unit == "ms" and r.value >= 0 for r in hooks)
    assert {r.metric for r in fixed} >= {"whole fit / plain (CPU)", "whole fit / plain (wall)"}


def test_first_call_rows():
    """The first ``update_split`` call of a new process, cold and after the monitor's warm-up, in real child
    processes (the CPU kernel's backend named in the note)."""
    rows = bench_first_call.first_call_rows(repeats=1, quick=True)
    assert_well_formed(rows, 1)
    assert [r.variant for r in rows] == ["cold", "after warm-up", "later calls"]
    assert all(r.unit == "ms" and r.value > 0 for r in rows)
    assert "backend" in rows[0].note


@pytest.mark.skipif(not bench_memory.rss_supported(), reason="needs Linux /proc RSS counters")
def test_memory_worker_in_process():
    # The subprocess entry point, run in-process to stay fast; the parent side only adds spawning.
    spec = {
        "gpt": {"dim": 32, "layers": 2, "seq": 8},
        "batch": 2,
        "steps": 3,
        "monitor": {"log_every_n_steps": 1},
    }
    result = bench_memory.worker(spec)
    assert result["param_bytes"] > 0
    assert len(result["steps"]) == 3
    for step in result["steps"]:
        assert set(step) >= {"rss_start", "fwd_bwd_peak", "update_peak", "after_peak", "rss_after_update"}
        assert step["update_peak"] >= step["rss_after_update"] > 0
    summary = bench_memory._summarise(result, skip=1)
    # a page or two of slack: RSS may move between the read and the reset of the peak counter
    assert summary["step_peak"] > 0 and summary["after_growth"] >= -(1 << 20)


def test_gpu_script_dry_run(tmp_path: Path):
    rows, settings = gpu.run(device="cpu", dry_run=True, repeats=1, precisions=("fp32",))
    assert_well_formed(rows, 5)
    variants = {r.variant for r in rows}
    assert "naive loop / monitor (group metrics)" in variants
    assert any("AdamW step" in v for v in variants)
    # the >= 1B-style case (here tiny) and the many-small-tensors case, each with a checked naive baseline
    speedups = [r for r in rows if r.metric == "speed-up"]
    assert len(speedups) == 2 and all("results agree" in r.note for r in speedups)
    assert any(r.metric == "achieved bandwidth (essential bytes)" for r in rows)
    assert gpu.peak_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert gpu.peak_bandwidth("NVIDIA H200") == 4.8e12
    assert gpu.peak_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert gpu.peak_bandwidth("Some Future GPU") is None

    # The JSON it writes merges into RESULTS.md, keeping the CPU figures.
    out = tmp_path / "bench"
    out.mkdir()
    cpu_row = Row(4, "build_param_groups", "Llama 70B", "time", 12.5, unit="ms", target="< 1000 ms", ok=True)
    report.save(out / "results_cpu.json", {"cpu": "test cpu", "cores": 2}, [cpu_row], {"command": "x"})
    gpu_file = tmp_path / "gpu.json"
    report.save(gpu_file, {"gpu": "test gpu"}, rows, settings)
    assert run.main(["--merge-gpu", str(gpu_file), "--out", str(out)]) == 0
    text = (out / "RESULTS.md").read_text()
    assert "test cpu" in text and "test gpu" in text and "Llama 70B" in text
    assert "fused AdamW step" in text
    assert "not measured" not in text.split("## 5.")[1]


def test_report_without_gpu_says_not_measured(tmp_path: Path):
    rows = [
        Row(
            1,
            "fit",
            "plain",
            "ms / step",
            3.0,
            unit="ms",
            lo=2.5,
            hi=3.5,
            n=3,
            extra={"samples": [2.5, 3, 3.5]},
        ),
        Row(2, "naive", "naive / batched", "speed-up", 0.8, unit="x", target=">= 5x", ok=False),
    ]
    text = report.render(
        {"machine": {"cpu": "c", "cores": 2}, "settings": {}, "rows": [r.to_dict() for r in rows]}, None
    )
    gpu_part = text.split("## 5.")[1]
    assert gpu_part.count("not measured") >= 3
    assert "| 2 | naive | naive / batched | speed-up | 0.800 x | >= 5x | **no** |" in text
    assert "2.500 - 3.500" in text
    assert "Not measured in this run." in text  # items 3 and 4 had no rows
    assert "plain" in report.console_table(rows)


def test_ab_comparison_and_its_section(tmp_path: Path):
    def run_of(value: float) -> dict:
        row = Row(1, "fit", "monitor", "time / plain", value, unit="x", target="<= 1.3x")
        return {"rows": [row.to_dict(), Row(2, "naive", "x", "speed-up", 2 * value).to_dict()]}

    rows = ab.compare(
        {"baseline": [run_of(1.2), run_of(1.4), run_of(1.3)], "new": [run_of(1.0), run_of(1.1)]}
    )
    assert [(r["metric"], r["baseline"], r["new"], r["n"]) for r in rows] == [
        ("time / plain", [1.3, 1.2, 1.4], [1.05, 1.0, 1.1], [3, 2]),
        ("speed-up", [2.6, 2.4, 2.8], [2.1, 2.0, 2.2], [3, 2]),
    ]
    text = report.render(None, None, {"machine": {"cpu": "c"}, "settings": {"baseline": "b"}, "rows": rows})
    section = text.split("## Against the previous implementation")[1]
    assert (
        "| 1 | fit | monitor | time / plain | 1.300 x (1.200 - 1.400) | 1.050 x (1.000 - 1.100) |" in section
    )
    assert "better" in section and "**worse**" in section  # lower time is better, lower speed-up is worse
