"""The configs under real multi-process launches: DDP from the CLI, two nodes on loopback (Lightning's own
environment, ``torchrun`` and the SLURM batch script), a rank that fails, and FSDP.

Everything runs on CPU with gloo, from the same ``configs/*.yaml`` a user runs, overridden only by
``configs/cpu.yaml`` and short-run flags. Each rank writes what it saw to JSON (``tests/helpers/cli_probe.py``),
so the assertions are on the ranks' own numbers: groups, ranks, learning rates, weight checksums and the
monitor's metrics. Every launched process is started in its own session and its whole process tree is killed
when the test ends, also when it fails or times out.
"""

from __future__ import annotations

import contextlib
import csv
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch

from lightning_adamw.schedules import warmup_cosine_factor
from tests.helpers.cli_probe import read_probes

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs"
BIN = Path(sys.executable).parent

#: Upper bound for one launched run (generous: CI has 2 shared cores; a healthy run takes 10-30 s).
RUN_TIMEOUT = 240.0

MAX_STEPS = 4
WARMUP = 2
LR = 0.003
WEIGHT_DECAY = 0.05
#: Short runs, the monitor on every other step, warm-up short enough that the cosine part shows.
FAST = [
    f"--trainer.max_steps={MAX_STEPS}",
    "--trainer.log_every_n_steps=2",
    "--trainer.limit_val_batches=1",
    "--trainer.num_sanity_val_steps=0",
    "--trainer.enable_checkpointing=false",
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    f"--lr_scheduler.init_args.warmup_steps={WARMUP}",
]
DIGITS_DECAY = ["features.0.weight", "features.3.weight", "head.2.weight", "head.5.weight"]
DIGITS_NO_DECAY = [
    "features.1.weight",
    "features.1.bias",
    "features.4.weight",
    "features.4.bias",
    "head.1.weight",
    "head.1.bias",
    "head.2.bias",
    "head.5.bias",
]
DIGITS_NUMEL = 153_450  # all parameters of the digits classifier
# Variables that select a cluster environment or a rank: a test must not inherit them from a CI runner.
_LAUNCH_ENV_PREFIXES = ("SLURM_", "TORCHELASTIC_", "PL_", "OMPI_", "PMI_", "LSB_", "KUBERNETES_")
_LAUNCH_ENV_NAMES = (
    "LOCAL_RANK",
    "RANK",
    "GROUP_RANK",
    "NODE_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
    "JSM_NAMESPACE_RANK",
)


# ---------------------------------------------------------------------------------------------------- launching


def cli() -> list[str]:
    """The installed ``lightning-adamw`` console script (what users run), else ``python -m lightning_adamw``."""
    script = BIN / "lightning-adamw"
    return [str(script)] if script.exists() else [sys.executable, "-m", "lightning_adamw"]


def config_args(*names: str) -> list[str]:
    return [arg for name in names for arg in ("--config", str(CONFIGS / name))]


def probe_args(out_dir: Path) -> list[str]:
    return [
        "--trainer.callbacks+=tests.helpers.cli_probe.RankProbe",
        f"--trainer.callbacks.out_dir={out_dir}",
    ]


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def clean_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The test's environment without launcher variables, W&B confined to ``tmp_path``, this repo importable."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_LAUNCH_ENV_PREFIXES)
        and k not in _LAUNCH_ENV_NAMES
        and not k.startswith("WANDB_")
    }
    wandb_root = tmp_path / "wandb_env"
    for name in ("DIR", "CACHE_DIR", "CONFIG_DIR", "DATA_DIR", "ARTIFACT_DIR"):
        (wandb_root / name.lower()).mkdir(parents=True, exist_ok=True)
        env[f"WANDB_{name}"] = str(wandb_root / name.lower())
    # WANDB_MODE stays unset: the CLI must make W&B offline by itself.
    env.update(
        WANDB_SILENT="true",
        WANDB_DISABLE_GIT="true",
        WANDB_DISABLE_CODE="true",
        WANDB_CONSOLE="off",
        WANDB_X_DISABLE_STATS="true",
        WANDB_X_DISABLE_META="true",
        PYTHONPATH=os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p),
        PATH=os.pathsep.join((str(BIN), env.get("PATH", ""))),
        PYTHONUNBUFFERED="1",
        OMP_NUM_THREADS="1",  # two processes on two cores: no thread oversubscription
        MPLBACKEND="Agg",
    )
    env.update(extra)
    return env


def _children() -> dict[int, list[int]]:
    """``{parent pid: [child pids]}`` from /proc (Linux)."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # "pid (comm) state ppid ...": comm may contain spaces or parentheses, so split after the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants that are alive now."""
    tree = _children()
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        todo.extend(tree.get(current, []))
    return found


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited


def kill_tree(root: subprocess.Popen) -> None:
    """SIGKILL ``root``'s session and every descendant, including those that started a session of their own
    (torchrun puts each worker in a new session), collected before anything dies so no orphan escapes."""
    pids = process_tree(root.pid)
    own_group = os.getpgrp()
    groups = set()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            groups.add(os.getpgid(pid))
    groups.add(root.pid)  # start_new_session=True: the root leads its own group
    for group in groups - {own_group}:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, signal.SIGKILL)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        root.wait(timeout=10)


@dataclass
class Launched:
    """Processes started together (e.g. one per simulated node) and their logs."""

    procs: list[subprocess.Popen] = field(default_factory=list)
    logs: list[Path] = field(default_factory=list)
    tree: set[int] = field(default_factory=set)
    timed_out: bool = False
    wall_s: float = 0.0

    def output(self, index: int | None = None) -> str:
        paths = self.logs if index is None else [self.logs[index]]
        return "\n".join(p.read_text(errors="replace") for p in paths if p.exists())

    def describe(self) -> str:
        parts = [f"exit codes {[p.returncode for p in self.procs]}, timed out: {self.timed_out}"]
        for path in self.logs:
            text = path.read_text(errors="replace") if path.exists() else ""
            parts.append(f"----- {path.name} (last 6000 chars)\n{text[-6000:]}")
        return "\n".join(parts)

    def wait(self, timeout: float) -> list[int | None]:
        """Wait for every process; on timeout mark ``timed_out`` (the caller's ``finally`` kills them)."""
        start = time.monotonic()
        deadline = start + timeout
        while any(p.poll() is None for p in self.procs):
            for (
                p
            ) in self.procs:  # remember every descendant while it is alive, to check none outlives the run
                if p.poll() is None:
                    self.tree.update(process_tree(p.pid))
            if time.monotonic() > deadline:
                self.timed_out = True
                break
            time.sleep(0.2)
        self.wall_s = time.monotonic() - start
        return [p.returncode for p in self.procs]


@contextlib.contextmanager
def launch(runs: Sequence[tuple[Sequence[str], dict[str, str], Path]], log_dir: Path) -> Iterator[Launched]:
    """Start each ``(command, env, cwd)`` in a new session with output to a log file; kill all trees on exit."""
    launched = Launched()
    log_dir.mkdir(parents=True, exist_ok=True)
    try:
        for index, (command, env, cwd) in enumerate(runs):
            cwd.mkdir(parents=True, exist_ok=True)
            log = log_dir / f"process{index}.log"
            launched.logs.append(log)
            with log.open("w") as out:
                launched.procs.append(
                    subprocess.Popen(
                        list(command),
                        cwd=cwd,
                        env=env,
                        stdout=out,
                        stderr=subprocess.STDOUT,
                        start_new_session=True,
                    )
                )
        yield launched
    finally:
        for proc in launched.procs:
            kill_tree(proc)


def run_all(runs: Sequence[tuple[Sequence[str], dict[str, str], Path]], log_dir: Path) -> Launched:
    """Launch, wait (bounded), clean up; fail the test with the logs if anything failed or hung."""
    with launch(runs, log_dir) as launched:
        codes = launched.wait(RUN_TIMEOUT)
    assert not launched.timed_out and codes == [0] * len(runs), launched.describe()
    return launched


# ---------------------------------------------------------------------------------------------------- checks


def expected_lrs(total_steps: int = MAX_STEPS) -> list[float]:
    """The lr each step after the first uses: WarmupCosineLR with total_steps filled in from the trainer."""
    return [LR * warmup_cosine_factor(step, WARMUP, total_steps, 0.05) for step in range(1, total_steps + 1)]


def check_groups(record: dict[str, Any], fused: bool | None = True) -> None:
    groups = record["groups"]
    assert [g["name"] for g in groups] == ["decay", "no_decay"]
    assert [g["weight_decay"] for g in groups] == [WEIGHT_DECAY, 0.0]
    assert groups[0]["param_names"] == DIGITS_DECAY
    assert groups[1]["param_names"] == DIGITS_NO_DECAY
    assert [g["initial_lr"] for g in groups] == [LR, LR]
    assert groups[0]["betas"] == [0.9, 0.999] and groups[0]["eps"] == 1e-8
    if fused is not None:
        assert groups[0]["fused"] is fused
    assert record["optimizer"] == "AdamW"
    assert record["schedulers"] == [{"class": "WarmupCosineLR", "interval": "step", "frequency": 1}]


def check_same_on_all_ranks(records: dict[int, dict[str, Any]], world_size: int) -> None:
    assert sorted(records) == list(range(world_size))
    first = records[0]
    for rank, record in records.items():
        assert record["stage"] == "train_end", (rank, record.get("exception"))
        assert record["global_rank"] == record["dist_rank"] == rank
        assert record["world_size"] == world_size
        assert record["backend"] == "gloo"
        assert record["global_step"] == MAX_STEPS
        # Identical groups (names, decay, member tensors, shapes) and identical schedule on every rank.
        # (shapes and sizes are per rank under FSDP: each holds its own shard)
        assert [_without(g, "shapes", "numel") for g in record["groups"]] == [
            _without(g, "shapes", "numel") for g in first["groups"]
        ]
        assert [lr for step in record["lrs"] for lr in step] == pytest.approx(
            [lr for lr in expected_lrs() for _group in range(2)], rel=1e-12
        )
    assert len({r["pid"] for r in records.values()}) == world_size


def _without(d: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: v for k, v in d.items() if k not in keys}


def check_monitor_rank_zero_only(records: dict[int, dict[str, Any]]) -> dict[str, float]:
    """Rank zero computed the monitor's metrics; under DDP no other rank computed (or logged) anything."""
    (metrics,) = records[0]["monitor_last_metrics"]
    for rank, record in records.items():
        if rank:
            assert record["monitor_last_metrics"] == [{}], rank
    check_monitor_numbers(metrics, records[0])
    return metrics


def check_monitor_numbers(metrics: dict[str, float], record: dict[str, Any]) -> None:
    # The last logged step is step 3 (log every 2 steps: steps 1, 3); its lr is the one set after step 2.
    lr_step3 = record["lrs"][2][0]
    decay_norm = metrics["adamw/decay/decay_norm"]
    # decay part = lr * wd * ||w_old|| (weight_norm is ||w_new||, one small step away).
    assert decay_norm == pytest.approx(lr_step3 * WEIGHT_DECAY * metrics["adamw/decay/weight_norm"], rel=0.02)
    assert decay_norm > 0
    assert metrics["adamw/no_decay/decay_norm"] == 0.0
    assert metrics["adamw/decay/grad_update_norm"] > 0 and metrics["adamw/no_decay/grad_update_norm"] > 0
    assert metrics["adamw/nonfinite_tensors"] == 0.0


def read_csv_metrics(log_root: Path) -> list[dict[str, str]]:
    (metrics_csv,) = log_root.glob("lightning_logs/version_*/metrics.csv")
    with metrics_csv.open() as f:
        return list(csv.DictReader(f))


def check_csv_log_of_rank_zero(node_dirs: list[Path], records: dict[int, dict[str, Any]]) -> None:
    """One directory per simulated node: only node 0 (global rank zero) has logs, with the monitor in them."""
    rows = read_csv_metrics(node_dirs[0])
    monitored = [r for r in rows if r.get("adamw/decay/decay_norm")]
    assert [int(r["step"]) for r in monitored] == [1, 3]  # once per logged step: a single writer
    last = records[0]["monitor_last_metrics"][0]
    assert float(monitored[-1]["adamw/decay/decay_norm"]) == pytest.approx(last["adamw/decay/decay_norm"])
    for other in node_dirs[1:]:
        assert not (other / "lightning_logs").exists(), sorted(str(p) for p in other.rglob("*"))


# ---------------------------------------------------------------------------------------------------- DDP


@pytest.fixture(scope="module")
def ddp_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[int, dict[str, Any]], Launched]:
    """``lightning-adamw fit --config ddp.yaml --config cpu.yaml --config wandb.yaml --trainer.devices 2``."""
    tmp = tmp_path_factory.mktemp("ddp")
    run_dir, probe_dir = tmp / "run", tmp / "probe"
    command = [
        *cli(),
        "fit",
        *config_args("ddp.yaml", "cpu.yaml", "wandb.yaml"),
        "--trainer.devices=2",
        "--trainer.logger.init_args.name=ddp-test",
        *FAST,
        *probe_args(probe_dir),
    ]
    launched = run_all([(command, clean_env(tmp), run_dir)], tmp / "logs")
    return run_dir, read_probes(probe_dir), launched


def test_ddp_two_processes_from_the_cli(ddp_run: tuple[Path, dict[int, dict[str, Any]], Launched]) -> None:
    _, records, launched = ddp_run
    check_same_on_all_ranks(records, world_size=2)
    for rank, record in records.items():
        check_groups(record)
        assert (record["strategy"], record["cluster_environment"]) == ("DDPStrategy", "LightningEnvironment")
        assert (record["node_rank"], record["local_rank"], record["precision"]) == (0, rank, "32-true")
    # DDP kept the replicas identical through 4 AdamW steps with decay.
    assert records[0]["weights_checksum"] == records[1]["weights_checksum"]
    check_monitor_rank_zero_only(records)
    assert "lightning-adamw parameter groups" in launched.output()


def test_ddp_with_wandb_fragment_logs_one_offline_run_from_rank_zero(
    ddp_run: tuple[Path, dict[int, dict[str, Any]], Launched],
) -> None:
    from tests.helpers.wandb_reader import iter_records, read_run

    run_dir, records, launched = ddp_run
    assert "W&B runs offline (WANDB_MODE was unset" in launched.output()
    run = read_run(run_dir)  # exactly one run: rank 1 created none
    assert run.path.parent.name.startswith("offline-run-")
    assert run.project == "lightning-adamw"
    (run_record,) = [r.run for r in iter_records(run.path) if r.WhichOneof("record_type") == "run"]
    assert list(run_record.tags) == ["adamw", "decoupled-weight-decay"]
    assert run_record.display_name == "ddp-test"
    series = run.series("adamw/decay/decay_norm", step_key="trainer/global_step")
    assert [step for step, _ in series] == [1, 3]
    last = records[0]["monitor_last_metrics"][0]
    assert series[-1][1] == pytest.approx(last["adamw/decay/decay_norm"])
    assert [v for _, v in run.series("adamw/no_decay/decay_norm", step_key="trainer/global_step")] == [
        0.0,
        0.0,
    ]
    # The group sizes the mixin logs as hyperparameters reach W&B's config.
    assert run.config["param_groups/decay/tensors"] == 4 and run.config["param_groups/no_decay/tensors"] == 8


# ---------------------------------------------------------------------------------------------------- two nodes


def _two_node_check(records: dict[int, dict[str, Any]], environment: str, node_dirs: list[Path]) -> None:
    check_same_on_all_ranks(records, world_size=2)
    for rank, record in records.items():
        check_groups(record)
        assert record["cluster_environment"] == environment
        assert (record["node_rank"], record["local_rank"], record["num_nodes"]) == (rank, 0, 2)
        assert record["main_address"] == "127.0.0.1"
    assert records[0]["main_port"] == records[1]["main_port"]
    assert records[0]["weights_checksum"] == records[1]["weights_checksum"]
    check_monitor_rank_zero_only(records)
    check_csv_log_of_rank_zero(node_dirs, records)


def test_two_nodes_on_loopback_with_lightning_environment(tmp_path: Path) -> None:
    """Each "node" is started by hand, as on two machines: MASTER_ADDR/MASTER_PORT/NODE_RANK/WORLD_SIZE."""
    port = free_port()
    probe = tmp_path / "probe"
    node_dirs = [tmp_path / f"node{i}" for i in range(2)]
    command = [
        *cli(),
        "fit",
        *config_args("multinode.yaml", "cpu.yaml"),
        "--trainer.devices=1",
        *FAST,
        *probe_args(probe),
    ]
    runs = [
        (
            command,
            clean_env(
                tmp_path, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK=str(i), WORLD_SIZE="2"
            ),
            node_dirs[i],
        )
        for i in range(2)
    ]
    run_all(runs, tmp_path / "logs")
    records = read_probes(probe)
    _two_node_check(records, "LightningEnvironment", node_dirs)
    assert records[0]["main_port"] == port


def test_two_nodes_with_torchrun(tmp_path: Path) -> None:
    """``torchrun --nnodes=2 --nproc_per_node=1 --node_rank=i --master_addr=127.0.0.1 --master_port=P``."""
    port = free_port()
    probe = tmp_path / "probe"
    node_dirs = [tmp_path / f"node{i}" for i in range(2)]
    runs = []
    for node_rank in range(2):
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",  # = the `torchrun` console script
            "--nnodes=2",
            "--nproc_per_node=1",
            f"--node_rank={node_rank}",
            "--master_addr=127.0.0.1",
            f"--master_port={port}",
            "-m",
            "lightning_adamw",
            "fit",
            *config_args("multinode.yaml", "cpu.yaml"),
            "--trainer.devices=1",
            *FAST,
            *probe_args(probe),
        ]
        runs.append((command, clean_env(tmp_path), node_dirs[node_rank]))
    run_all(runs, tmp_path / "logs")
    records = read_probes(probe)
    _two_node_check(records, "TorchElasticEnvironment", node_dirs)


def test_slurm_batch_script_on_two_simulated_nodes(tmp_path: Path) -> None:
    """``configs/slurm.sbatch`` itself, with a stand-in ``srun`` that starts the tasks with SLURM's variables."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    srun = bin_dir / "srun"
    srun.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m tests.scripts.cli_fake_srun "$@"\n')
    srun.chmod(0o755)
    probe = tmp_path / "probe"
    submit_dir = tmp_path / "submit"
    env = clean_env(
        tmp_path,
        SLURM_JOB_ID="4242",
        SLURM_JOB_NAME="lightning-adamw",
        SLURM_NNODES="2",
        SLURM_JOB_NUM_NODES="2",
        SLURM_NTASKS_PER_NODE="1",
        SLURM_NODELIST="127.0.0.1",
        SLURM_CPUS_PER_TASK="1",
        SLURM_SUBMIT_DIR=str(submit_dir),
        MASTER_PORT=str(free_port()),  # instead of 15000 + job id, which may be taken on a CI machine
        CONFIGS=f"{CONFIGS / 'multinode.yaml'} {CONFIGS / 'cpu.yaml'}",
    )
    env["PATH"] = os.pathsep.join((str(bin_dir), env["PATH"]))
    command = ["bash", str(CONFIGS / "slurm.sbatch"), *FAST, *probe_args(probe)]
    launched = run_all([(command, env, submit_dir)], tmp_path / "logs")
    records = read_probes(probe)
    check_same_on_all_ranks(records, world_size=2)
    for rank, record in records.items():
        check_groups(record)
        assert record["cluster_environment"] == "SLURMEnvironment"
        assert (record["node_rank"], record["local_rank"], record["num_nodes"]) == (rank, 0, 2)
    assert records[0]["weights_checksum"] == records[1]["weights_checksum"]
    check_monitor_rank_zero_only(records)
    assert "srun` command is available on your system but is not used" not in launched.output()


# ---------------------------------------------------------------------------------------------------- failure


def test_exception_in_one_rank_ends_the_whole_run(tmp_path: Path) -> None:
    """Rank 1 raises in training_step at step 2; rank 0 would wait in the next all-reduce forever."""
    from tests.helpers.cli_models import FailingDigitsClassifier

    probe = tmp_path / "probe"
    command = [
        *cli(),
        "fit",
        *config_args("ddp.yaml", "cpu.yaml"),
        "--trainer.devices=2",
        "--model=tests.helpers.cli_models.FailingDigitsClassifier",
        "--model.fail_on_rank=1",
        "--model.fail_at_step=2",
        *FAST,
        "--trainer.max_steps=50",
        *probe_args(probe),
    ]
    with launch([(command, clean_env(tmp_path), tmp_path / "run")], tmp_path / "logs") as launched:
        (code,) = launched.wait(RUN_TIMEOUT)
        assert not launched.timed_out, "the run hung after rank 1 failed\n" + launched.describe()
        assert code not in (0, None), launched.describe()
        output = launched.output()
        assert f"{FailingDigitsClassifier.MESSAGE} on rank 1 at step 2" in output, launched.describe()
        records = read_probes(probe)
        assert records[1]["stage"] == "exception" and "deliberate failure" in records[1]["exception"]
        assert records[0]["stage"] != "train_end"  # rank 0 never finished training
        # Nothing of the run is left: both ranks are gone once the launcher returned (a few seconds of grace
        # for the OS to reap them; no timing is asserted beyond that bound).
        deadline = time.monotonic() + 30
        while any(alive(pid) for pid in launched.tree) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [pid for pid in launched.tree if alive(pid)], launched.describe()


# ---------------------------------------------------------------------------------------------------- FSDP


def test_fsdp_config_sharded_over_two_cpu_ranks(
    tmp_path: Path, ddp_run: tuple[Path, dict[int, dict[str, Any]], Launched]
) -> None:
    """``fsdp.yaml`` really sharded (FULL_SHARD, 2 ranks, gloo) through a test-only CPU subclass of FSDPStrategy.

    The groups must come from the original names and shapes although each rank holds 1-D shard views, and the
    monitor's sharded reduction must give every rank the whole model's numbers: the same as the DDP run.
    """
    probe = tmp_path / "probe"
    command = [
        *cli(),
        "fit",
        *config_args("fsdp.yaml", "cpu.yaml"),
        "--trainer.strategy.class_path=tests.helpers.cli_strategies.CPUFSDPStrategy",
        "--trainer.devices=2",
        *FAST,
        *probe_args(probe),
    ]
    run_all([(command, clean_env(tmp_path), tmp_path / "run")], tmp_path / "logs")
    records = read_probes(probe)
    for record in records.values():
        assert record["strategy"] == "CPUFSDPStrategy"
        check_groups(record)
        # Really sharded: this rank holds only part of the weights, as flat views.
        assert sum(g["numel"] for g in record["groups"]) < DIGITS_NUMEL
    check_same_on_all_ranks(records, world_size=2)
    # Every rank took part in the reduction and got the same, whole-model numbers ...
    metrics = [r["monitor_last_metrics"][0] for r in records.values()]
    assert metrics[0] == pytest.approx(metrics[1], rel=1e-12)
    check_monitor_numbers(metrics[0], records[0])
    # ... which are those of the same training under DDP (same seed, data split and steps).
    ddp_metrics = ddp_run[1][0]["monitor_last_metrics"][0]
    for key in ("decay_norm", "grad_update_norm", "weight_norm", "update_norm"):
        for group in ("decay", "no_decay"):
            name = f"adamw/{group}/{key}"
            assert metrics[0][name] == pytest.approx(ddp_metrics[name], rel=1e-5, abs=1e-12), name


requires_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="needs a CUDA GPU: Lightning's FSDPStrategy and bf16/fused AdamW on GPU refuse or differ on CPU "
    "(run scripts/gpu_configs_check.sh on a GPU machine)",
)


@requires_cuda
@pytest.mark.parametrize("config", ["gpu.yaml", "fsdp.yaml"])
def test_gpu_configs_on_one_gpu(tmp_path: Path, config: str) -> None:
    probe = tmp_path / "probe"
    command = [*cli(), "fit", *config_args(config), "--trainer.devices=1", *FAST, *probe_args(probe)]
    run_all([(command, clean_env(tmp_path), tmp_path / "run")], tmp_path / "logs")
    (record,) = read_probes(probe).values()
    assert record["stage"] == "train_end" and record["global_step"] == MAX_STEPS
    assert record["precision"] == "bf16-mixed"
    check_groups(record, fused=True)
    check_monitor_numbers(record["monitor_last_metrics"][0], record)
    assert record["strategy"] == ("FSDPStrategy" if config == "fsdp.yaml" else "SingleDeviceStrategy")


@pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="needs 2 or more CUDA GPUs (DDP over the GPUs of one node)"
)
def test_ddp_config_on_two_gpus(tmp_path: Path) -> None:
    probe = tmp_path / "probe"
    command = [*cli(), "fit", *config_args("ddp.yaml"), "--trainer.devices=2", *FAST, *probe_args(probe)]
    run_all([(command, clean_env(tmp_path), tmp_path / "run")], tmp_path / "logs")
    records = read_probes(probe)
    assert sorted(records) == [0, 1]
    for record in records.values():
        check_groups(record)
        assert record["backend"] == "nccl"
    assert math.isclose(records[0]["weights_checksum"], records[1]["weights_checksum"], rel_tol=0, abs_tol=0)
