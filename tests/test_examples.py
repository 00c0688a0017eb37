"""The examples under ``examples/``, each run as a real process in a shortened version, checked by its numbers.

Every test starts the script with ``sys.executable`` the way a user would (``python examples/<name>.py ...``) in
a temporary directory, then reads what the script wrote (``results.json`` / ``summary.json``, the CSV or W&B
logs, the PNGs) and asserts on the values: accuracy floors, bit-identity at weight decay 0, grid shape and
finite values, the monitor's numbers against the optimizer state. The subprocesses run on one thread
(``OMP_NUM_THREADS=1``): on a busy 2-core CI machine that is several times faster for models this small.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from tests.helpers.wandb_reader import read_run, wandb_offline  # noqa: F401  (pytest fixture)

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def run_example(script: str, *args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """``python examples/<script> *args`` in ``cwd``; fails the test with the output tail on a non-zero exit."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if proc.returncode != 0:
        pytest.fail(
            f"{script} {' '.join(args)} exited with {proc.returncode}\n--- stdout ---\n{proc.stdout[-4000:]}"
            f"\n--- stderr ---\n{proc.stderr[-6000:]}"
        )
    return proc


def load_example(name: str) -> ModuleType:
    """Import ``examples/<name>.py`` as a module (the directory is not a package)."""
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def assert_png(path: str | Path) -> None:
    data = Path(path).read_bytes()
    assert data[:8] == PNG_MAGIC, f"{path} is not a PNG"
    assert len(data) > 5_000, f"{path} is suspiciously small ({len(data)} bytes)"


def read_metrics_csv(path: Path) -> list[dict[str, str]]:
    with path.open() as handle:
        return list(csv.DictReader(handle))


def last_value(rows: list[dict[str, str]], key: str) -> float:
    values = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    assert values, f"no values for {key!r} in metrics.csv"
    return values[-1]


# ================================================================================================ --help


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("adam_vs_adamw", ["--quick", "--optimizers", "--seeds", "--log-dir"]),
        ("digits_classifier", ["--model.weight_decay", "--monitor.per_layer", "--optimizer", "--config"]),
        ("tiny_gpt", ["--model.exclude_embeddings", "--model.norm", "--monitor.per_layer", "--data.modules"]),
        ("weight_decay_schedules", ["--quick", "--seeds", "--lr-range", "--log-dir"]),
    ],
)
def test_help_lists_the_options(
    name: str, expected: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    module = load_example(name)
    monkeypatch.setattr(
        sys, "argv", [f"{name}.py"]
    )  # LightningCLI warns when argv and args both hold options
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    for option in expected:
        assert option in out, f"{option} missing from {name} --help"


# ================================================================================================ adam_vs_adamw


def test_adam_vs_adamw_quick(tmp_path: Path) -> None:
    proc = run_example(
        "adam_vs_adamw.py", "--quick", "--no-progress", "--log-dir", str(tmp_path / "logs"), cwd=tmp_path
    )
    run_dirs = sorted((tmp_path / "logs" / "adam_vs_adamw").glob("version_*"))
    assert len(run_dirs) == 1
    run_dir = run_dirs[0]
    results = json.loads((run_dir / "results.json").read_text())

    # 1. λ = 0: Adam and AdamW bit-identical after real Trainer steps; at λ > 0 they are not (the check can fail).
    ident = results["identity"]
    assert ident["identical_at_zero"] is True
    assert ident["wd=0"]["max_abs_diff"] == 0.0
    assert ident["wd=0"]["tensors"] == 10  # 3 Linear (w, b) + 2 LayerNorm (w, b)
    lam = results["args"]["identity_lambda"]
    assert ident[f"wd={lam:g}"]["identical"] is False
    assert ident[f"wd={lam:g}"]["max_abs_diff"] > 1e-4
    assert "BIT-IDENTICAL" in proc.stdout

    # 2. The grid: at least 6 x 6 per optimizer, every value finite and a percentage, a model that learned.
    grid = results["grid"]
    assert len(grid["lrs"]) == 6
    assert set(grid["analysis"]) == {"adam_l2", "adamw", "adamw_paper"}
    for name, table in grid["mean_test_error"].items():
        assert len(grid["lambdas"][name]) == 6
        assert len(table) == 6 and all(len(row) == 6 for row in table), name
        values = [v for row in table for v in row]
        assert all(v is not None and math.isfinite(v) and 0.0 <= v <= 100.0 for v in values), name
        per_seed = grid["test_error_per_seed"][name]
        assert len(per_seed) == results["grid"]["seeds"] == 1
        info = grid["analysis"][name]
        assert info["best_value"] == pytest.approx(min(values))
        assert info["best_value"] < 15.0, f"{name}: best test error {info['best_value']}% (chance is 90%)"
        assert len(info["best_lambda"]) == 6
        assert all(
            lo <= b <= hi
            for b, lo, hi in [
                (b, min(grid["lambdas"][name]), max(grid["lambdas"][name])) for b in info["best_lambda"]
            ]
        )
        assert sum(info["columns_used"]) >= 2
        assert info["slope"] is not None and math.isfinite(info["slope"])
    # grid.csv: one row per optimizer, λ, lr and seed, consistent with the JSON means
    rows = read_metrics_csv(run_dir / "grid.csv")
    assert len(rows) == 3 * 6 * 6 * 1
    first = next(r for r in rows if r["optimizer"] == "adamw" and r["seed"] == "0")
    assert float(first["test_error"]) == pytest.approx(grid["mean_test_error"]["adamw"][0][0], abs=1e-3)
    paper = next(r for r in rows if r["optimizer"] == "adamw_paper")
    assert float(paper["torch_weight_decay"]) == pytest.approx(float(paper["lambda"]) / float(paper["lr"]))

    # 3. Effective decay: the monitor's Adam+L2 statistics equal the ones computed from the optimizer state,
    # and the per-coordinate rates spread over orders of magnitude where AdamW applies one rate.
    eff = results["effective_decay"]
    check = eff["adam_l2"]["check_against_monitor"]
    assert check["max_rel_diff"] < 1e-5
    assert check["monitor"]["min"] < check["monitor"]["median"] < check["monitor"]["max"]
    assert eff["adam_l2"]["spread_max_over_min"] > 100.0
    for name in ("adam_l2", "adamw"):
        assert eff[name]["test_error"] < 25.0
        assert_png(eff[name]["monitor_figure"])
    assert_png(results["plots"]["heatmaps"])
    assert_png(results["plots"]["effective_decay"])
    assert "slope: edge λ vs lr" in proc.stdout


def test_adam_vs_adamw_analysis_on_known_tables() -> None:
    """The slope and tie handling of the analysis, on tables whose answer is known."""
    module = load_example("adam_vs_adamw")
    lrs = [1e-3, 1e-2, 1e-1]
    lams = [1e-4, 1e-3, 1e-2, 1e-1]
    # best λ = 1e-4 / lr: slope -1 (only the product matters)
    table = [[5.0] * 3 for _ in lams]
    for ri, li in zip(range(3), (3, 2, 1), strict=True):
        table[li][ri] = 1.0
    import numpy as np

    info = module.analyse(np.asarray(table), lams, lrs)
    assert info["slope"] == pytest.approx(-1.0)
    assert info["best_lambda"] == pytest.approx([1e-1, 1e-2, 1e-3])
    # one λ for every lr: slope 0; a tie between 1e-3 and 1e-1 is their geometric mean 1e-2
    flat = np.full((4, 3), 5.0)
    flat[2, :] = 1.0
    flat[1, 0] = flat[3, 0] = 1.0
    flat[2, 0] = 2.0
    info = module.analyse(flat, lams, lrs)
    assert info["best_lambda"] == pytest.approx([1e-2, 1e-2, 1e-2])
    assert info["slope"] == pytest.approx(0.0, abs=1e-12)
    # a column that did not train (best 50%) is left out of the fit
    flat[:, 2] = 50.0
    info = module.analyse(flat, lams, lrs)
    assert info["columns_used"] == [True, True, False]
    # torch's AdamW and the paper's parameterisation
    assert module.torch_weight_decay("adamw", 1e-2, 0.1) == 0.1
    assert module.torch_weight_decay("adamw_paper", 1e-2, 1e-3) == pytest.approx(0.1)


def test_grid_cells_are_independent_standard_runs() -> None:
    """A cell trained side by side in the grid ends where the same run trained alone, with its own optimizer, ends.

    Proves the grid's shortcuts (batched forward, merged optimizer groups) change nothing but float rounding.
    """
    import torch

    from lightning_adamw import WarmupCosineLR, build_param_groups

    module = load_example("adam_vs_adamw")
    torch.set_num_threads(1)
    data = module.load_split(module.datamodule(module.build_parser().parse_args([])))
    spec = module.GridSpec(
        optimizers=["adam_l2", "adamw_paper"],
        lrs=[3e-3, 3e-2],
        lambdas={"adam_l2": [1e-3, 3e-1], "adamw_paper": [1e-4, 1e-2]},
        seeds=[0, 1],
        steps=25,
        batch_size=100,
        hidden=16,
        depth=2,
    )
    population = module.Population(spec)
    population.train(data, progress=False)
    assert len(population) == 2 * 2 * 2 * 2
    checked = 0
    for member, (opt_name, li, ri, si) in zip(population.members, population.cells, strict=True):
        if (li, ri) not in ((1, 1), (0, 0)):
            continue
        lr, lam, seed = spec.lrs[ri], spec.lambdas[opt_name][li], spec.seeds[si]
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            alone = module.make_mlp(spec.hidden, spec.depth)
        groups = build_param_groups(alone, module.torch_weight_decay(opt_name, lr, lam))
        optimizer = module.OPTIMIZERS[opt_name]["cls"](groups, lr=lr, foreach=True)
        scheduler = WarmupCosineLR(optimizer, warmup_steps=0, total_steps=spec.steps, min_lr_ratio=0.0)
        batches = module.batch_order(len(data.x_train), spec.batch_size, seed)
        for _ in range(spec.steps):
            index = next(batches)
            loss = torch.nn.functional.cross_entropy(alone(data.x_train[index]), data.y_train[index])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        for (name, expected), actual in zip(alone.named_parameters(), member.parameters(), strict=True):
            torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-6, msg=f"{opt_name} {name}")
        checked += 1
    assert checked == 8


# ================================================================================================ digits_classifier


def test_digits_classifier(tmp_path: Path) -> None:
    proc = run_example(
        "digits_classifier.py",
        "--trainer.max_epochs",
        "3",
        "--trainer.logger.init_args.save_dir",
        str(tmp_path / "logs"),
        cwd=tmp_path,
    )
    log_dir = tmp_path / "logs" / "digits_classifier" / "version_0"
    summary = json.loads((log_dir / "summary.json").read_text())
    assert summary["epochs"] == 3
    test, val = summary["test"], summary["val"]
    assert test["test_acc"] > 0.93, test
    assert test["test_f1"] > 0.93, test
    assert val["val_acc"] > 0.93, val
    assert test["test_loss"] < 0.3
    # The confusion matrix covers the test set and reproduces torchmetrics' (macro) accuracy: mean per-class recall.
    matrix = summary["confusion_matrix"]
    assert sum(map(sum, matrix)) == 270  # 15% of 1,797
    recalls = [row[i] / sum(row) for i, row in enumerate(matrix)]
    assert sum(recalls) / len(recalls) == pytest.approx(test["test_acc"], abs=1e-5)
    # The monitor ran on the real optimizer: decay only in the decay group, per layer too.
    mon = summary["monitor_last"]
    assert mon["adamw/no_decay/decay_norm"] == 0.0
    assert 0.0 < mon["adamw/decay/decay_to_grad_ratio"] < 10.0
    assert mon["adamw/decay/equilibrium_angular_update"] > 0.0
    rows = read_metrics_csv(log_dir / "metrics.csv")
    assert last_value(rows, "adamw/decay/decay_norm") > 0.0
    assert last_value(rows, "adamw_layer/head.2.weight/decay_norm") > 0.0
    assert last_value(rows, "adamw_layer/head.2.bias/decay_norm") == 0.0
    assert last_value(rows, "adamw_layer/features.1.weight/decay_norm") == 0.0  # BatchNorm gain
    for plot in ("confusion_matrix", "learning_curves", "weight_decay_monitor"):
        assert_png(summary["plots"][plot])
    assert "digits_classifier: final metrics" in proc.stdout
    assert re.search(r"test_acc=0\.9\d{3}", proc.stdout)


# ================================================================================================ tiny_gpt

TINY_GPT_ARGS = (
    "--trainer.max_steps",
    "80",
    "--trainer.val_check_interval",
    "40",
    "--trainer.log_every_n_steps",
    "10",
    "--monitor.log_every_n_steps",
    "10",
    "--model.d_model",
    "48",
    "--model.n_heads",
    "4",
    "--model.warmup_steps",
    "10",
    "--model.lr",
    "0.01",
    "--data.block_size",
    "48",
    "--data.batch_size",
    "16",
    "--data.modules",
    "[textwrap, heapq, string]",
    "--sample_chars",
    "60",
)


@pytest.mark.parametrize(
    "exclude_embeddings", [False, True], ids=["embeddings-decayed", "embeddings-excluded"]
)
def test_tiny_gpt(tmp_path: Path, exclude_embeddings: bool) -> None:
    args = [*TINY_GPT_ARGS, "--trainer.logger.init_args.save_dir", str(tmp_path / "logs")]
    if exclude_embeddings:
        # the switch through the example YAML, as the docs show it, then the short-run overrides
        args = [
            "--config",
            str(EXAMPLES / "configs" / "tiny_gpt.yaml"),
            *args,
            "--model.exclude_embeddings",
            "true",
        ]
        args += ["--trainer.max_steps", "30", "--trainer.val_check_interval", "30"]
    proc = run_example("tiny_gpt.py", *args, cwd=tmp_path)
    summary = json.loads((tmp_path / "logs" / "tiny_gpt" / "version_0" / "summary.json").read_text())
    assert summary["exclude_embeddings"] is exclude_embeddings

    # Grouping: the tied head is the embedding (one tensor, listed once); norms and biases never decayed.
    decay, no_decay = summary["groups"]["decay"], summary["groups"]["no_decay"]
    everything = decay + no_decay
    assert "head.weight" not in everything and everything.count("tok_emb.weight") == 1
    embeddings = {"tok_emb.weight", "pos_emb.weight"}
    assert embeddings <= set(no_decay if exclude_embeddings else decay)
    assert all(n in no_decay for n in everything if n.endswith(".bias") or "norm" in n)
    assert re.search(r"tok_emb\.weight\s+\S+\s+embedding\s+\S+\s+head\.weight", proc.stdout), (
        "tied alias not shown"
    )

    # Per-layer monitor: decay norm > 0 exactly for decayed tensors, 0 for the others.
    per_layer = {row["tensor"]: row for row in summary["per_layer"]}
    assert set(per_layer) == set(everything)
    for name, row in per_layer.items():
        assert row["grad_update_norm"] > 0.0, name
        if name in decay:
            assert row["decay_norm"] > 0.0, name
        else:
            assert row["decay_norm"] == 0.0, name
    assert (per_layer["tok_emb.weight"]["decay_norm"] == 0.0) is exclude_embeddings
    assert "WeightDecayMonitor, per layer" in proc.stdout
    assert_png(summary["plots"]["per_layer"])
    assert_png(summary["plots"]["monitor"])
    assert summary["sample"].startswith("def ") and len(summary["sample"]) == len("def ") + 60

    # It learned something: well below the unigram baseline (4.5 bits/char on this text; 3.5 measured) after 80 steps.
    assert math.isfinite(summary["test_bpc"])
    if not exclude_embeddings:
        assert summary["test_bpc"] < summary["unigram_bpc"] - 0.5, summary


# ================================================================================================ W&B


DOC_METRIC = re.compile(r"`((?:adamw|adam_l2)(?:_layer|_hist)?/[^`\s]+)`")


@pytest.mark.usefixtures("wandb_offline")
def test_wandb_dashboard_metrics_exist(tmp_path: Path) -> None:
    """Run the digits example with the W&B logger (offline) and find every metric the dashboard doc names."""
    save_dir = tmp_path / "wandb_run"
    save_dir.mkdir()
    run_example(
        "digits_classifier.py",
        "--config",
        str(ROOT / "configs" / "wandb.yaml"),
        "--trainer.logger.init_args.save_dir",
        str(save_dir),
        "--trainer.max_epochs",
        "1",
        "--monitor.histogram_every_n_steps",
        "10",
        cwd=tmp_path,
    )
    run = read_run(save_dir, timeout=60)
    keys = {k for row in run.history for k in row}
    assert {"train_loss", "val_acc", "val_f1", "test_acc", "trainer/global_step"} <= keys

    doc = (EXAMPLES / "wandb_dashboard.md").read_text()
    named = set(DOC_METRIC.findall(doc))
    assert len(named) >= 10, "the doc should name the panels' metrics"
    from lightning_adamw.update_split import ADAM_L2_GROUP_METRICS

    checked = 0
    for metric in sorted(named):
        concrete = metric.replace("<group>", "decay").replace("<param>", "head.2.weight")
        if "*" in concrete or "<" in concrete or concrete.endswith("/..."):
            continue  # a pattern for a panel regex or a whole prefix, not one metric
        if concrete.startswith("adam_l2"):
            # an AdamW run has no Adam+L2 metrics: check the name against the monitor's documented list
            assert concrete.rsplit("/", 1)[-1] in ADAM_L2_GROUP_METRICS, metric
            continue
        assert concrete in keys, f"the dashboard doc names {metric!r}, the W&B run has no {concrete!r}"
        checked += 1
    assert checked >= 8
    # The metric lists in the doc's table are the monitor's own.
    from lightning_adamw import update_split

    known = {
        *update_split.ADAMW_GROUP_METRICS,
        *update_split.ADAMW_LAYER_METRICS,
        *update_split.ADAM_L2_GROUP_METRICS,
        *update_split.ADAM_L2_LAYER_METRICS,
    }
    table_words = {
        word
        for line in doc.splitlines()
        if line.startswith("| `")
        for word in re.findall(r"`([a-z][a-z0-9_]*)`", line)
    }
    assert table_words - {"histogram_every_n_steps", "fit"} <= known, table_words - known
    assert len(table_words & known) >= 15

    # Healthy-run claims of the doc, on this run: no decay in the no-decay group, finite ratios, no NaN steps.
    no_decay = run.series("adamw/no_decay/decay_norm", step_key="trainer/global_step")
    assert no_decay and all(v == 0.0 for _, v in no_decay)
    ratio = run.series("adamw/decay/decay_to_grad_ratio", step_key="trainer/global_step")
    assert ratio and all(0.0 < v < 10.0 for _, v in ratio)
    # logged against the trainer step: 1 epoch of 20 batches, monitor every 5 steps -> steps 4, 9, 14, 19
    assert [s for s, _ in ratio] == [4, 9, 14, 19]
    assert all(v == 0.0 for _, v in run.series("adamw/nonfinite_steps", step_key="trainer/global_step"))
    hist_rows = run.rows_with("adamw_hist/decay/decay_to_grad_ratio")
    assert hist_rows and hist_rows[0]["adamw_hist/decay/decay_to_grad_ratio"]["_type"] == "histogram"
    image_rows = run.rows_with("adamw/summary")
    assert image_rows and "image" in str(image_rows[-1]["adamw/summary"].get("_type", "")), image_rows[-1:]


# ================================================================================================ weight_decay_schedules


def test_weight_decay_schedules(tmp_path: Path) -> None:
    """The three schedules apply the decay their formulas say, step by step, and the grid is complete.

    Per-step values are compared in float64 against the formula evaluated on the recorded lr: each side is
    two or three roundings away from the exact value, hence ``gamma(4)`` with the usual safety factor.
    """
    import torch

    from tests.helpers.tolerance import SAFETY, gamma, unit_roundoff

    proc = run_example(
        "weight_decay_schedules.py", "--quick", "--no-progress", "--log-dir", "logs", cwd=tmp_path
    )
    run_dir = tmp_path / "logs" / "weight_decay_schedules" / "version_0"
    results = json.loads((run_dir / "results.json").read_text())
    args = results["args"]
    lr_max, steps, warmup = args["lr"], args["steps"], args["warmup_steps"]
    rel64 = SAFETY * gamma(4, unit_roundoff(torch.float64))

    runs = results["runs"]
    assert set(runs) == {"constant", "independent", "adamc"}
    rows = {name: run["steps"] for name, run in runs.items()}
    assert all(len(r) == steps for r in rows.values())
    lam = {name: run["base_weight_decay"]["decay"] for name, run in runs.items()}
    # λ from ema_timescale_fraction: τ = fraction x steps at the peak lr, in each schedule's own units.
    tau = args["tau_fraction"] * steps
    assert lam["constant"] == pytest.approx(1.0 / (lr_max * tau), rel=rel64)
    assert lam["adamc"] == pytest.approx(lam["constant"], rel=rel64)
    assert lam["independent"] == pytest.approx(1.0 / tau, rel=rel64)  # per-step decay at the peak
    # AdamC leaves the output layer (the tied embedding's own group) on plain AdamW; the others follow everywhere.
    assert runs["adamc"]["follows_schedule"] == {"decay": True, "decay/head": False}
    assert runs["constant"]["follows_schedule"] == {"decay": True, "decay/head": True}

    def per_step(name: str, group: str = "decay") -> list[float]:
        return [r[f"{group}/lr"] * r[f"{group}/weight_decay"] for r in rows[name]]

    for t in range(steps):
        const, indep, adamc = rows["constant"][t], rows["independent"][t], rows["adamc"][t]
        lr_t = const["decay/lr"]
        assert indep["decay/lr"] == adamc["decay/lr"] == lr_t  # one lr schedule for all three
        assert const["decay/weight_decay"] == lam["constant"]
        assert indep["decay/weight_decay"] == pytest.approx(lam["independent"] / lr_max, rel=rel64)
        assert adamc["decay/weight_decay"] == pytest.approx(lam["adamc"] * lr_t / lr_max, rel=rel64)
        assert adamc["decay/head/weight_decay"] == lam["adamc"]  # not scheduled: plain AdamW
    # constant and independent apply the same per-step decay at one lr (τ fixed): the same run, other units.
    assert per_step("independent") == pytest.approx(per_step("constant"), rel=rel64)
    # AdamC equals AdamW at the peak lr (end of the warm-up) and decays by lr_t/lr_max less everywhere else,
    # step 0 included (the warm-up starts below the peak).
    peak = rows["constant"][warmup]["decay/lr"]
    assert peak == pytest.approx(lr_max, rel=rel64)
    assert per_step("adamc")[warmup] == pytest.approx(per_step("constant")[warmup], rel=rel64)
    assert all(
        a < c
        for t, (a, c) in enumerate(zip(per_step("adamc"), per_step("constant"), strict=True))
        if t != warmup
    )
    assert per_step("adamc")[0] == pytest.approx(
        per_step("constant")[0] * rows["adamc"][0]["decay/lr"] / lr_max, rel=rel64
    )

    # The monitor ran on every run; at the last logged step (lr nearly 0) AdamC's decay is a sliver of AdamW's.
    for name, summary in results["schedules"].items():
        assert math.isfinite(summary["val_bpc"]) and summary["grad_norm_end"] > 0.0, name
        assert summary["monitor_weight_norm_last"] > 0.0, name
    last = {n: s["monitor_decay_to_grad_ratio_last"] for n, s in results["schedules"].items()}
    assert last["adamc"] < 0.1 * last["constant"]
    assert last["independent"] == pytest.approx(last["constant"], rel=1e-3)
    # Where the monitor logs grad_norm, it is this script's own ‖g‖ (float32 sums of the squares: n·u each).
    params = runs["constant"]["parameters"]
    for name, check in results["monitor_grad_norm_check"].items():
        if check is not None:
            assert check["max_rel_diff"] <= SAFETY * gamma(params, unit_roundoff(torch.float32)), name

    # The grid: every cell trained and finite, the analysis and CSV complete.
    grid = results["grid"]
    assert set(grid["analysis"]) == {"constant", "independent"}
    for name, table in grid["val_bpc_per_seed"].items():
        assert len(table) == grid["seeds"] == 2
        values = [v for seed in table for row in seed for v in row]
        assert len(values) == 2 * len(grid["lambdas"][name]) * len(grid["lrs"])
        assert all(v is not None and math.isfinite(v) and 0.0 < v < 8.0 for v in values), name
        info = grid["analysis"][name]
        assert info["slope"] is not None and math.isfinite(info["slope"])
        assert len(info["slope_per_seed"]) == 2
    rows_csv = read_metrics_csv(run_dir / "grid.csv")
    assert len(rows_csv) == 2 * len(grid["lrs"]) * sum(len(v) for v in grid["lambdas"].values())
    for row in rows_csv:
        factor = float(row["lr"]) if row["schedule"] == "constant" else 1.0
        assert float(row["per_step_decay_at_peak"]) == pytest.approx(float(row["lambda"]) * factor, rel=1e-5)
    assert_png(results["plots"]["schedules"])
    assert_png(results["plots"]["grid"])
    assert "slope best λ" in proc.stdout
