"""Prove ``tests.helpers.wandb_reader`` on real offline W&B runs (plain ``wandb`` and Lightning's WandbLogger)."""

from __future__ import annotations

import math
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import wandb
from lightning.pytorch.loggers import WandbLogger
from wandb.proto import wandb_internal_pb2

from tests.helpers.lit_monitor import RecordingLogger
from tests.helpers.wandb_reader import (
    BLOCK_SIZE,
    CHUNK_HEADER_SIZE,
    WandbLogFormatError,
    find_run_files,
    iter_raw_records,
    iter_records,
    metric_series,
    read_config,
    read_history,
    read_run,
    read_summary,
    set_offline_wandb_env,
    shutdown_wandb,
    wait_for_finished_run,
    wandb_offline,  # noqa: F401  (pytest fixture, used via usefixtures)
)

# --------------------------------------------------------------------------------------------
# A plain wandb run with known values (created once per module, copied by the tests that corrupt it)
# --------------------------------------------------------------------------------------------

HIST_COUNTS = [1, 2, 3]
HIST_EDGES = [0.0, 0.5, 1.0, 1.5]
BIG = [i * 0.5 + 0.25 for i in range(12_000)]  # ~90 KB of JSON: one record spans several 32 KiB blocks
CONFIG = {"lr": 1e-3, "betas": [0.9, 0.999], "sched": {"name": "cosine", "warmup": 10}}

# (step, what is passed to wandb.log)
LOGGED: list[tuple[int, dict[str, Any]]] = [
    (
        0,
        {
            "adamw/decay/decay_norm": 0.1,
            "loss": 1 / 3,
            "count": 7,
            "grad": {"norm": 0.125},
            "f32": np.float32(0.1),
            "nan": math.nan,
            "inf": math.inf,
            "ninf": -math.inf,
            "hist": wandb.Histogram(np_histogram=(HIST_COUNTS, HIST_EDGES)),
        },
    ),
    (3, {"adamw/decay/decay_norm": 2.5e-7, "loss": 0.2, "tiny": 1e-300}),
    (7, {"adamw/decay/decay_norm": 123.456, "count": 9, "big": BIG}),
]

# What each history row must contain when read back (besides _timestamp / _runtime).
EXPECTED_ROWS: list[dict[str, Any]] = [
    {
        "_step": 0,
        "adamw/decay/decay_norm": 0.1,
        "loss": 1 / 3,
        "count": 7,
        "grad/norm": 0.125,
        "f32": float(np.float32(0.1)),
        "nan": math.nan,
        "inf": math.inf,
        "ninf": -math.inf,
        "hist": {"_type": "histogram", "values": HIST_COUNTS, "bins": HIST_EDGES},
    },
    {"_step": 3, "adamw/decay/decay_norm": 2.5e-7, "loss": 0.2, "tiny": 1e-300},
    {"_step": 7, "adamw/decay/decay_norm": 123.456, "count": 9, "big": BIG},
]


def _same(actual: Any, expected: Any) -> bool:
    """Exact equality, except that NaN equals NaN and floats must come back as floats."""
    if isinstance(expected, float):
        if not isinstance(actual, float):
            return False
        return (math.isnan(actual) and math.isnan(expected)) or actual == expected
    return bool(actual == expected)


def _rows_equal(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Dict equality that treats NaN as equal to NaN (plain ``==`` does not)."""
    return a.keys() == b.keys() and all(
        _same(a[k], b[k]) if isinstance(b[k], float) else a[k] == b[k] for k in b
    )


@pytest.fixture(scope="module")
def plain_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Log LOGGED with plain ``wandb.init(mode="offline")``; yield the finished run's save dir."""
    root = tmp_path_factory.mktemp("plain_run")
    with pytest.MonkeyPatch.context() as mp:
        set_offline_wandb_env(mp, root / "wandb_env")
        try:
            run = wandb.init(mode="offline", dir=root / "run", project="t", config=CONFIG)
            for step, data in LOGGED:
                run.log(data, step=step)
            run.summary["best"] = 0.05
            run.finish()
        finally:
            shutdown_wandb()
    yield root / "run"


def _copy_run_file(save_dir: Path, dest_dir: Path) -> Path:
    (src,) = find_run_files(save_dir)
    dest = dest_dir / src.name
    shutil.copyfile(src, dest)
    return dest


def _history_offsets(path: Path) -> list[tuple[int, int]]:
    """``(offset, payload length)`` of each history record, via the raw framing."""
    out = []
    for offset, payload in iter_raw_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(payload)
        if record.WhichOneof("record_type") == "history":
            out.append((offset, len(payload)))
    return out


def _first_multi_block_record(path: Path) -> tuple[int, int]:
    """``(offset, payload length)`` of the first record spanning at least three blocks.

    With ``BIG`` logged, that is the summary update W&B writes just before the history row.
    """
    return next(
        (offset, len(payload)) for offset, payload in iter_raw_records(path) if len(payload) > 2 * BLOCK_SIZE
    )


# --------------------------------------------------------------------------------------------
# 1. Plain wandb run: value-by-value read back
# --------------------------------------------------------------------------------------------


def test_plain_run_history_values(plain_run: Path) -> None:
    run = read_run(plain_run)
    assert run.path.name.startswith("run-") and run.path.suffix == ".wandb"
    assert run.project == "t"
    assert run.record_types[0] == "header" and run.record_types[-1] == "exit"

    assert len(run.history) == len(EXPECTED_ROWS)
    for index, (row, expected) in enumerate(zip(run.history, EXPECTED_ROWS, strict=True)):
        assert set(row) == set(expected) | {"_timestamp", "_runtime"}, index
        for key, value in expected.items():
            if key == "hist":
                assert row[key] == value
                continue
            assert _same(row[key], value), (index, key, row[key], value)
        assert isinstance(row["_timestamp"], float) and abs(row["_timestamp"] - time.time()) < 3600

    # ints stay ints; the logged Histogram comes back as the dict W&B itself serializes.
    assert type(run.history[0]["count"]) is int and type(run.history[2]["count"]) is int
    assert run.history[0]["hist"] == wandb.Histogram(np_histogram=(HIST_COUNTS, HIST_EDGES)).to_json()

    assert metric_series(run.history, "adamw/decay/decay_norm") == [(0, 0.1), (3, 2.5e-7), (7, 123.456)]
    assert run.series("count") == [(0, 7.0), (7, 9.0)]
    assert [row["_step"] for row in run.rows_with("loss")] == [0, 3]

    # The standalone reader agrees with read_run.
    standalone = read_history(run.path)
    assert len(standalone) == len(run.history)
    assert all(_rows_equal(a, b) for a, b in zip(standalone, run.history, strict=True))


def test_plain_run_config_and_summary(plain_run: Path) -> None:
    (path,) = find_run_files(plain_run)
    assert read_config(path) == CONFIG
    assert "_wandb" in read_config(path, include_internal=True)

    summary = read_summary(path)
    assert summary["adamw/decay/decay_norm"] == 123.456
    assert summary["loss"] == 0.2
    assert summary["count"] == 9
    assert summary["grad/norm"] == 0.125
    assert summary["tiny"] == 1e-300
    assert summary["best"] == 0.05
    assert summary["_step"] == 7
    assert math.isnan(summary["nan"]) and summary["inf"] == math.inf
    assert summary["hist"] == EXPECTED_ROWS[0]["hist"]
    assert _rows_equal(read_run(plain_run).summary, summary)


def test_multi_block_record_is_reassembled(plain_run: Path) -> None:
    (path,) = find_run_files(plain_run)
    assert path.stat().st_size > 2 * BLOCK_SIZE
    big_records = [(offset, size) for offset, size in _history_offsets(path) if size > BLOCK_SIZE]
    assert len(big_records) == 1  # FIRST + MIDDLE + LAST chunks across block boundaries
    assert read_history(path)[2]["big"] == BIG
    # Every record's protobuf parses and numbers increase.
    nums = [record.num for record in iter_records(path) if record.num]
    assert nums == sorted(nums)


# --------------------------------------------------------------------------------------------
# 2. Real Lightning Trainer.fit with WandbLogger(offline=True)
# --------------------------------------------------------------------------------------------


# Known per-step values, exactly representable in float32 (self.log goes through a float32 tensor).
TRAIN_X = [-1.0, 0.5, 0.3125, 3.0, -0.125, 2.75]
N_STEPS = len(TRAIN_X)


class _TinyModule(L.LightningModule):
    def __init__(self, lr: float = 0.125) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.layer = torch.nn.Linear(2, 1)

    def training_step(self, batch: list[torch.Tensor], batch_idx: int) -> torch.Tensor:
        self.log("train/x", TRAIN_X[batch_idx])
        return self.layer(batch[0]).pow(2).mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


@pytest.mark.usefixtures("wandb_offline")
def test_lightning_wandb_logger_history(tmp_path: Path) -> None:
    save_dir = tmp_path / "logs"
    wandb_logger = WandbLogger(save_dir=save_dir, offline=True, project="lightning-adamw-test")
    recorder = RecordingLogger()
    trainer = L.Trainer(
        accelerator="cpu",
        max_epochs=1,
        log_every_n_steps=1,
        logger=[wandb_logger, recorder],
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path / "pl",
    )
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(N_STEPS, 2)), batch_size=1)
    trainer.fit(_TinyModule(), data)
    wandb_logger.experiment.finish()

    run = read_run(save_dir)
    expected_x = TRAIN_X

    # The series against Lightning's global step and against W&B's own _step.
    assert run.series("train/x", step_key="trainer/global_step") == list(enumerate(expected_x))
    assert run.series("train/x") == list(enumerate(expected_x))
    assert [row["trainer/global_step"] for row in run.history] == list(range(N_STEPS))
    assert all(row["epoch"] == 0 for row in run.history)

    # Row by row, W&B has exactly what Lightning passed to log_metrics (+ trainer/global_step).
    assert len(run.history) == len(recorder.calls) == N_STEPS
    for row, (step, metrics) in zip(run.history, recorder.calls, strict=True):
        user_keys = {k for k in row if not k.startswith("_")}
        assert user_keys == set(metrics) | {"trainer/global_step"}
        assert row["trainer/global_step"] == step
        for key, value in metrics.items():
            assert row[key] == value, (key, row[key], value)

    assert run.config == {"lr": 0.125}
    assert run.project == "lightning-adamw-test"
    assert run.summary["train/x"] == expected_x[-1]
    assert run.summary["trainer/global_step"] == N_STEPS - 1
    # WandbLogger's define_metric("trainer/global_step") / ("*", step_metric=...) are on disk too.
    assert run.record_types.count("metric") >= 1


# --------------------------------------------------------------------------------------------
# 3. Corruption, truncation, bad headers, run discovery errors
# --------------------------------------------------------------------------------------------


def test_flipped_payload_byte_raises_checksum_error(plain_run: Path, tmp_path: Path) -> None:
    path = _copy_run_file(plain_run, tmp_path)
    offset, size = _history_offsets(path)[1]  # the small history row at step 3
    data = bytearray(path.read_bytes())
    data[offset + CHUNK_HEADER_SIZE + size // 2] ^= 0x40
    path.write_bytes(bytes(data))

    with pytest.raises(ValueError, match="checksum mismatch") as excinfo:
        read_history(path)
    err = excinfo.value
    assert isinstance(err, WandbLogFormatError)
    assert err.path == path and err.offset == offset
    assert str(path) in str(err) and f"offset {offset}" in str(err)


def test_flipped_byte_in_later_block_reports_that_chunk(plain_run: Path, tmp_path: Path) -> None:
    path = _copy_run_file(plain_run, tmp_path)
    big_offset, big_size = _first_multi_block_record(path)
    assert big_offset < BLOCK_SIZE and big_offset + big_size > 2 * BLOCK_SIZE  # a MIDDLE chunk fills block 1
    data = bytearray(path.read_bytes())
    data[BLOCK_SIZE + 1000] ^= 0x01
    path.write_bytes(bytes(data))

    with pytest.raises(WandbLogFormatError, match="checksum mismatch") as excinfo:
        list(iter_records(path))
    assert excinfo.value.offset == BLOCK_SIZE


def test_truncated_file_raises(plain_run: Path, tmp_path: Path) -> None:
    path = _copy_run_file(plain_run, tmp_path)
    full = path.read_bytes()
    last_offset = max(offset for offset, _ in iter_raw_records(path))
    big_offset, _ = _first_multi_block_record(path)

    path.write_bytes(full[: len(full) - 5])  # cut inside the last record's payload
    with pytest.raises(ValueError, match="truncated") as excinfo:
        read_history(path)
    assert excinfo.value.offset == last_offset and str(path) in str(excinfo.value)

    path.write_bytes(full[: last_offset + 3])  # cut inside a chunk header
    with pytest.raises(WandbLogFormatError, match="truncated"):
        list(iter_raw_records(path))

    path.write_bytes(full[: 2 * BLOCK_SIZE])  # cut exactly at a block boundary, mid multi-chunk record
    with pytest.raises(WandbLogFormatError, match="no LAST chunk") as excinfo:
        list(iter_records(path))
    assert excinfo.value.offset == big_offset


def test_bad_header_raises(plain_run: Path, tmp_path: Path) -> None:
    path = _copy_run_file(plain_run, tmp_path)
    full = path.read_bytes()
    assert full[:7] == b":W&B\xe1\xbe\x00"  # ident, magic 0xBEE1 (LE), store version 0

    path.write_bytes(b"X" + full[1:])
    with pytest.raises(ValueError, match="not a W&B run file") as excinfo:
        read_history(path)
    assert excinfo.value.offset == 0

    path.write_bytes(full[:6] + b"\x09" + full[7:])
    with pytest.raises(ValueError, match="unsupported W&B store version 9"):
        read_history(path)

    path.write_bytes(full[:4])
    with pytest.raises(ValueError, match="too short"):
        read_history(path)


def test_wait_for_finished_run(plain_run: Path, tmp_path: Path) -> None:
    path = _copy_run_file(plain_run, tmp_path)
    full = path.read_bytes()
    assert [r.WhichOneof("record_type") for r in wait_for_finished_run(path, timeout=0.1)][-1] == "exit"

    path.write_bytes(full[:7])  # what the file can look like right after finish() returns
    start = time.monotonic()
    with pytest.raises(TimeoutError, match=r"not complete after 0\.2 s") as excinfo:
        wait_for_finished_run(path, timeout=0.2)
    assert str(path) in str(excinfo.value) and time.monotonic() - start >= 0.2

    corrupt = bytearray(full)
    corrupt[-3] ^= 0xFF  # inside the exit record: present but wrong, so no point waiting
    path.write_bytes(bytes(corrupt))
    start = time.monotonic()
    with pytest.raises(WandbLogFormatError, match="checksum mismatch"):
        wait_for_finished_run(path, timeout=30)
    assert time.monotonic() - start < 5


def test_read_run_requires_exactly_one_run(plain_run: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no W&B run file") as excinfo:
        read_run(empty)
    assert str(empty) in str(excinfo.value)

    several = tmp_path / "several"
    (several / "a").mkdir(parents=True)
    (several / "b").mkdir()
    first = _copy_run_file(plain_run, several / "a")
    second = _copy_run_file(plain_run, several / "b")
    with pytest.raises(ValueError, match="found 2") as excinfo:
        read_run(several)
    message = str(excinfo.value)
    assert str(several) in message and str(first) in message and str(second) in message


# --------------------------------------------------------------------------------------------
# The wandb service does not outlive the fixture
# --------------------------------------------------------------------------------------------


def _wandb_core_children() -> list[int]:
    me = str(os.getpid())
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        ppid = stat.rsplit(")", 1)[1].split()[1]
        if ppid == me and b"wandb-core" in cmdline:
            pids.append(int(entry.name))
    return pids


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
@pytest.mark.usefixtures("wandb_offline")
def test_shutdown_stops_wandb_service(tmp_path: Path) -> None:
    run = wandb.init(mode="offline", dir=tmp_path / "run", project="t")
    run.log({"a": 1.5})
    assert _wandb_core_children(), "expected wandb.init to start a wandb-core service process"
    # An unfinished run has no exit record: read_run times out with a clear message.
    with pytest.raises(TimeoutError, match=r"no 'exit' record|truncated|too short"):
        read_run(tmp_path / "run", timeout=0.3)
    run.finish()
    shutdown_wandb()
    deadline = time.monotonic() + 10
    while _wandb_core_children() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _wandb_core_children() == []
    assert read_run(tmp_path / "run").history[0]["a"] == 1.5
    # Nothing was written to the real home / default W&B dirs: everything is under tmp_path.
    assert os.environ["WANDB_DIR"].startswith(str(tmp_path))
