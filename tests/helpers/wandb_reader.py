"""Read W&B offline run files (``run-<id>.wandb``) back from disk, for tests.

The installed wandb (0.31) writes this transaction log from its Go ``wandb-core`` service and
ships no Python reader for it (``wandb.sdk.internal.datastore`` is gone), so this module
implements the on-disk framing itself and only borrows wandb's protobuf classes to decode records.

File layout (as written by wandb-core's ``leveldb`` package, verified against wandb 0.31.0):

* A 7-byte W&B header: ident ``b":W&B"``, magic ``0xBEE1`` (uint16 little-endian), store
  version (uint8, ``0`` in wandb 0.31).
* The file is then LevelDB-log framed in 32 KiB blocks counted from the start of the file (the
  header occupies the first 7 bytes of block 0). Each chunk has a 7-byte header: checksum
  (uint32 LE), payload length (uint16 LE), chunk type (uint8: FULL=1, FIRST=2, MIDDLE=3,
  LAST=4), followed by the payload. Chunks never cross a block boundary; if fewer than 7 bytes
  remain in a block they are zero padding and the next chunk starts in the next block.
* The checksum is a plain (unmasked) IEEE CRC-32 -- ``zlib.crc32`` -- over the type byte and
  the payload. (Upstream LevelDB uses a masked CRC-32C; W&B does not.)
* Each logical record (the concatenated payloads of FULL or FIRST..MIDDLE*..LAST chunks) is a
  serialized ``wandb_internal_pb2.Record``.

Value decoding: wandb-core stores every history/summary value as JSON (``value_json``; NaN and
infinities are spelled ``NaN`` / ``Infinity`` / ``-Infinity``) and splits logged dicts, including
media such as ``wandb.Histogram``, into one item per leaf with a ``nested_key`` path. This reader
rebuilds those trees and then flattens them: nested keys are joined with ``"/"`` and any dict that
carries a ``"_type"`` entry (histograms, images, tables, ...) is kept whole as the dict W&B stores.
wandb-core re-encodes the JSON, so a whole-number float (``3.0``, ``-0.0``) reads back as the int
``3`` / ``0``: compare values, not types (:func:`metric_series` returns floats).

Timing: ``run.finish()`` may return before wandb-core has flushed the file; :func:`read_run` waits
for the run's ``exit`` record (see :func:`wait_for_finished_run`).
"""

from __future__ import annotations

import json
import math
import os
import struct
import tempfile
import time
import zlib
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from wandb.proto import wandb_internal_pb2

__all__ = [
    "BLOCK_SIZE",
    "CHUNK_HEADER_SIZE",
    "SUPPORTED_STORE_VERSIONS",
    "WANDB_HEADER_SIZE",
    "WandbLogFormatError",
    "WandbRun",
    "find_run_files",
    "iter_raw_records",
    "iter_records",
    "metric_series",
    "read_config",
    "read_history",
    "read_run",
    "read_summary",
    "set_offline_wandb_env",
    "shutdown_wandb",
    "wait_for_finished_run",
    "wandb_offline",
]

WANDB_HEADER_IDENT = b":W&B"
WANDB_HEADER_MAGIC = 0xBEE1
WANDB_HEADER_SIZE = 7
SUPPORTED_STORE_VERSIONS = frozenset({0})

BLOCK_SIZE = 32 * 1024
CHUNK_HEADER_SIZE = 7
CHUNK_FULL, CHUNK_FIRST, CHUNK_MIDDLE, CHUNK_LAST = 1, 2, 3, 4

_WANDB_HEADER = struct.Struct("<4sHB")
_CHUNK_HEADER = struct.Struct("<IHB")

#: Config key under which W&B keeps its own bookkeeping (telemetry, define_metric state, ...).
WANDB_INTERNAL_CONFIG_KEY = "_wandb"


class WandbLogFormatError(ValueError):
    """A ``.wandb`` file is corrupt, truncated or in an unsupported format.

    Attributes:
        path: the file being read.
        offset: byte offset in the file where the problem was found.
        truncated: the data simply ends early (as it does while wandb-core is still writing),
            as opposed to bytes that are present but wrong.
    """

    def __init__(self, path: Path, offset: int, message: str, *, truncated: bool = False) -> None:
        super().__init__(f"{path}: {message} (at byte offset {offset})")
        self.path = path
        self.offset = offset
        self.truncated = truncated


# --------------------------------------------------------------------------------------------
# Framing
# --------------------------------------------------------------------------------------------


def find_run_files(save_dir: str | os.PathLike[str]) -> list[Path]:
    """Return all ``*.wandb`` run files below ``save_dir`` (recursively, symlinks skipped), sorted."""
    found: list[Path] = []
    # os.walk does not follow symlinks, so W&B's ``wandb/latest-run`` link is not counted twice.
    for dirpath, _dirnames, filenames in os.walk(save_dir):
        for name in filenames:
            candidate = Path(dirpath, name)
            if name.endswith(".wandb") and candidate.is_file() and not candidate.is_symlink():
                found.append(candidate)
    return sorted(found)


def _check_header(path: Path, data: bytes) -> None:
    if len(data) < WANDB_HEADER_SIZE:
        raise WandbLogFormatError(
            path,
            0,
            f"file is {len(data)} bytes, too short for the {WANDB_HEADER_SIZE}-byte W&B header",
            truncated=True,
        )
    ident, magic, version = _WANDB_HEADER.unpack_from(data, 0)
    if ident != WANDB_HEADER_IDENT:
        raise WandbLogFormatError(path, 0, f"not a W&B run file: ident {ident!r} != {WANDB_HEADER_IDENT!r}")
    if magic != WANDB_HEADER_MAGIC:
        raise WandbLogFormatError(
            path, 4, f"bad W&B header magic 0x{magic:04X} != 0x{WANDB_HEADER_MAGIC:04X}"
        )
    if version not in SUPPORTED_STORE_VERSIONS:
        raise WandbLogFormatError(
            path,
            6,
            f"unsupported W&B store version {version} (this reader understands "
            f"{sorted(SUPPORTED_STORE_VERSIONS)}; the installed wandb changed its on-disk format, "
            "update tests/wandb_reader.py)",
        )


def iter_raw_records(path: str | os.PathLike[str]) -> Iterator[tuple[int, bytes]]:
    """Yield ``(offset, payload)`` for every logical record in a ``.wandb`` file, in order.

    ``offset`` is the file offset of the record's first chunk header. Every chunk's checksum is
    verified. Raises :class:`WandbLogFormatError` (a ``ValueError``) naming the file and offset on
    a bad header, checksum mismatch, malformed chunk sequence, non-zero block padding or a
    truncated tail.
    """
    path = Path(path)
    data = path.read_bytes()
    _check_header(path, data)
    size = len(data)

    pos = WANDB_HEADER_SIZE
    pending: bytearray | None = None  # payload of a record begun by a FIRST chunk
    pending_offset = 0

    while pos < size:
        block_end = (pos // BLOCK_SIZE + 1) * BLOCK_SIZE
        if block_end - pos < CHUNK_HEADER_SIZE:
            # Block trailer: too small for a chunk header, must be zero padding.
            if block_end > size:
                raise WandbLogFormatError(
                    path,
                    pos,
                    f"truncated file: {size - pos} stray byte(s) after the last chunk",
                    truncated=True,
                )
            if any(data[pos:block_end]):
                raise WandbLogFormatError(path, pos, "non-zero bytes in block padding")
            pos = block_end
            continue

        if pos + CHUNK_HEADER_SIZE > size:
            raise WandbLogFormatError(
                path,
                pos,
                f"truncated file: {size - pos} byte(s) of an incomplete chunk header at end of file",
                truncated=True,
            )
        checksum, length, chunk_type = _CHUNK_HEADER.unpack_from(data, pos)

        if checksum == 0 and length == 0 and chunk_type == 0:
            # wandb-core's reader skips zeroed blocks (e.g. preallocated files). Accept that only
            # at a record boundary and only if the rest of the block really is all zero.
            rest = data[pos : min(block_end, size)]
            if pending is None and not any(rest):
                pos = block_end
                continue
            raise WandbLogFormatError(path, pos, "zeroed chunk header inside a record or before data")

        payload_start = pos + CHUNK_HEADER_SIZE
        payload_end = payload_start + length
        if payload_end > block_end:
            raise WandbLogFormatError(
                path, pos, f"chunk length {length} runs past the end of its 32 KiB block (corrupt header)"
            )
        if payload_end > size:
            raise WandbLogFormatError(
                path,
                pos,
                f"truncated file: chunk needs {length} payload bytes but only {size - payload_start} remain",
                truncated=True,
            )
        payload = data[payload_start:payload_end]
        actual = zlib.crc32(payload, zlib.crc32(bytes((chunk_type,))))
        if actual != checksum:
            raise WandbLogFormatError(
                path, pos, f"checksum mismatch: stored 0x{checksum:08X}, computed 0x{actual:08X}"
            )

        if chunk_type == CHUNK_FULL:
            if pending is not None:
                raise WandbLogFormatError(
                    path, pos, f"FULL chunk while record at {pending_offset} is unfinished"
                )
            yield pos, bytes(payload)
        elif chunk_type == CHUNK_FIRST:
            if pending is not None:
                raise WandbLogFormatError(
                    path, pos, f"FIRST chunk while record at {pending_offset} is unfinished"
                )
            pending, pending_offset = bytearray(payload), pos
        elif chunk_type in (CHUNK_MIDDLE, CHUNK_LAST):
            if pending is None:
                kind = "MIDDLE" if chunk_type == CHUNK_MIDDLE else "LAST"
                raise WandbLogFormatError(path, pos, f"{kind} chunk without a preceding FIRST chunk")
            pending += payload
            if chunk_type == CHUNK_LAST:
                yield pending_offset, bytes(pending)
                pending = None
        else:
            raise WandbLogFormatError(path, pos, f"unknown chunk type {chunk_type}")
        pos = payload_end

    if pending is not None:
        raise WandbLogFormatError(
            path,
            pending_offset,
            "truncated file: multi-chunk record has no LAST chunk before end of file",
            truncated=True,
        )


def iter_records(path: str | os.PathLike[str]) -> Iterator[wandb_internal_pb2.Record]:
    """Yield every ``wandb_internal_pb2.Record`` stored in a ``.wandb`` file, in order.

    Raises :class:`WandbLogFormatError` (a ``ValueError``) naming the file and offset if the
    framing is corrupt or truncated, or a payload does not parse as a ``Record``.
    """
    path = Path(path)
    for offset, payload in iter_raw_records(path):
        record = wandb_internal_pb2.Record()
        try:
            record.ParseFromString(payload)
        except Exception as exc:  # protobuf raises DecodeError, which is not a ValueError
            raise WandbLogFormatError(
                path, offset, f"record does not parse as a protobuf Record: {exc}"
            ) from exc
        yield record


# --------------------------------------------------------------------------------------------
# Value decoding
# --------------------------------------------------------------------------------------------


def _item_path(item: Any) -> list[str]:
    """Key path of a HistoryItem / SummaryItem / ConfigItem (``nested_key`` wins over ``key``)."""
    if item.nested_key:
        return list(item.nested_key)
    return [item.key]


def _decode_json(text: str) -> Any:
    # Python's json accepts the NaN / Infinity / -Infinity spellings W&B uses.
    return json.loads(text)


def _history_item_value(item: wandb_internal_pb2.HistoryItem) -> Any:
    """Decode a history item: the typed oneof if present (exact), else ``value_json``."""
    which = item.WhichOneof("value")
    if which == "none":
        return None
    if which in ("boolean", "integer", "number", "text"):
        return getattr(item, which)
    if which == "json":
        return _decode_json(item.json)
    return _decode_json(item.value_json)


def _set_path(tree: dict[str, Any], path: Sequence[str], value: Any) -> None:
    node = tree
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[path[-1]] = value


def _remove_path(tree: dict[str, Any], path: Sequence[str]) -> None:
    node: Any = tree
    for part in path[:-1]:
        node = node.get(part) if isinstance(node, dict) else None
        if node is None:
            return
    if isinstance(node, dict):
        node.pop(path[-1], None)


def _flatten(tree: dict[str, Any], where: str) -> dict[str, Any]:
    """Flatten nested dicts with "/" joins; dicts with a ``_type`` (W&B media) and empty dicts stay."""
    out: dict[str, Any] = {}

    def walk(prefix: str, node: dict[str, Any]) -> None:
        for key, value in node.items():
            name = f"{prefix}/{key}" if prefix else key
            if isinstance(value, dict) and value and "_type" not in value:
                walk(name, value)
            else:
                if name in out:
                    raise ValueError(f"{where}: key {name!r} appears both nested and with a literal '/'")
                out[name] = value

    walk("", tree)
    return out


def _apply_items(tree: dict[str, Any], updates: Iterable[Any], removes: Iterable[Any] = ()) -> None:
    for item in updates:
        _set_path(tree, _item_path(item), _decode_json(item.value_json))
    for item in removes:
        _remove_path(tree, _item_path(item))


# --------------------------------------------------------------------------------------------
# High-level readers
# --------------------------------------------------------------------------------------------


def _history_from_records(path: Path, records: Iterable[wandb_internal_pb2.Record]) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    for record in records:
        if record.WhichOneof("record_type") != "history":
            continue
        tree: dict[str, Any] = {}
        for item in record.history.item:
            _set_path(tree, _item_path(item), _history_item_value(item))
        row = _flatten(tree, f"{path}: history row {len(rows)}")
        if "_step" not in row and record.history.HasField("step"):
            row["_step"] = record.history.step.num
        rows.append(row)
    return rows


def _config_from_records(
    records: Iterable[wandb_internal_pb2.Record], include_internal: bool
) -> dict[str, Any]:
    config: dict[str, Any] = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run" and record.run.HasField("config"):
            _apply_items(config, record.run.config.update, record.run.config.remove)
        elif kind == "config":
            _apply_items(config, record.config.update, record.config.remove)
    if not include_internal:
        config.pop(WANDB_INTERNAL_CONFIG_KEY, None)
    return config


def _summary_from_records(path: Path, records: Iterable[wandb_internal_pb2.Record]) -> dict[str, Any]:
    tree: dict[str, Any] = {}
    for record in records:
        kind = record.WhichOneof("record_type")
        if kind == "run" and record.run.HasField("summary"):
            _apply_items(tree, record.run.summary.update, record.run.summary.remove)
        elif kind == "summary":
            _apply_items(tree, record.summary.update, record.summary.remove)
    return _flatten(tree, f"{path}: summary")


def read_history(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Return one dict per history row (``wandb.log`` call), in file order.

    Reads the file as it is now; use :func:`read_run` or :func:`wait_for_finished_run` right
    after ``finish()``, which may return before wandb-core has flushed the file.

    Keys are metric names, with nested keys joined by ``"/"`` (a key logged as ``"a/b"`` and a
    dict logged as ``{"a": {"b": ...}}`` both read back as ``"a/b"``). Values are decoded from
    JSON: floats come back as Python floats (``nan`` / ``inf`` included), ints as ints, and
    media such as histograms as the dict W&B stores (``{"_type": "histogram", "values": [...],
    "bins": [...]}``). W&B's own ``_step``, ``_timestamp`` and ``_runtime`` are included.
    """
    path = Path(path)
    return _history_from_records(path, iter_records(path))


def read_config(path: str | os.PathLike[str], *, include_internal: bool = False) -> dict[str, Any]:
    """Return the run config (``run.config`` / ``logger.log_hyperparams``), values decoded.

    Updates from the run record and later config records are applied in order. The config is
    not flattened: a dict value stays a nested dict. W&B's bookkeeping entry ``"_wandb"`` is
    dropped unless ``include_internal`` is true.
    """
    return _config_from_records(iter_records(path), include_internal)


def read_summary(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Return the final run summary: all summary updates/removals applied in order, flattened
    like a history row (``"/"``-joined keys, media kept as dicts, W&B's ``_wandb/runtime`` etc.
    included)."""
    path = Path(path)
    return _summary_from_records(path, iter_records(path))


@dataclass
class WandbRun:
    """Everything :func:`read_run` reads back from one ``.wandb`` file."""

    path: Path
    history: list[dict[str, Any]]
    config: dict[str, Any]
    summary: dict[str, Any]
    run_id: str = ""
    project: str = ""
    record_types: list[str] = field(default_factory=list)

    def series(self, key: str, step_key: str = "_step") -> list[tuple[int, float]]:
        """Shortcut for :func:`metric_series` on this run's history."""
        return metric_series(self.history, key, step_key=step_key)

    def rows_with(self, key: str) -> list[dict[str, Any]]:
        """History rows that contain ``key``."""
        return [row for row in self.history if key in row]


def wait_for_finished_run(
    path: str | os.PathLike[str], timeout: float = 10.0, poll_interval: float = 0.05
) -> list[wandb_internal_pb2.Record]:
    """Wait until ``path`` holds a complete, finished run and return all of its records.

    In wandb 0.31, ``run.finish()`` can return *before* wandb-core has flushed the ``.wandb``
    file (it may still be just the 7-byte header for a few milliseconds). This polls until the
    file parses cleanly and contains the run's ``exit`` record, which wandb-core writes after
    every history/summary record of the run. Truncation (a file still being written) is retried;
    any other format error is raised at once. Raises ``TimeoutError`` (naming the file, its
    size and the last problem) if the run is not complete within ``timeout`` seconds -- e.g.
    because ``finish()`` was never called.
    """
    path = Path(path)
    deadline = time.monotonic() + timeout
    while True:
        try:
            records = list(iter_records(path))
        except WandbLogFormatError as exc:
            if not exc.truncated:
                raise
            problem = str(exc)
        else:
            if any(record.WhichOneof("record_type") == "exit" for record in records):
                return records
            problem = f"{len(records)} records but no 'exit' record yet"
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"{path}: W&B run not complete after {timeout} s ({path.stat().st_size} bytes; {problem}). "
                "Call run.finish() / logger.experiment.finish() before reading."
            )
        time.sleep(poll_interval)


def read_run(save_dir: str | os.PathLike[str], *, timeout: float = 10.0) -> WandbRun:
    """Read the single, finished W&B run stored below ``save_dir`` (e.g. a ``WandbLogger``'s save_dir).

    Waits up to ``timeout`` seconds for wandb-core to finish writing the file (see
    :func:`wait_for_finished_run`); pass ``timeout=0`` to read an unfinished run as it is now.
    Raises ``FileNotFoundError`` if there is no ``*.wandb`` file and ``ValueError`` if there are
    several; both messages name ``save_dir`` and what was found.
    """
    files = find_run_files(save_dir)
    if not files:
        raise FileNotFoundError(f"no W&B run file (*.wandb) found under {os.fspath(save_dir)!r}")
    if len(files) > 1:
        listing = ", ".join(str(p) for p in files)
        raise ValueError(
            f"expected exactly one W&B run under {os.fspath(save_dir)!r}, found {len(files)}: {listing}"
        )
    path = files[0]
    records = wait_for_finished_run(path, timeout) if timeout > 0 else list(iter_records(path))
    run_id = project = ""
    for record in records:
        if record.WhichOneof("record_type") == "run":
            run_id, project = record.run.run_id, record.run.project
            break
    return WandbRun(
        path=path,
        history=_history_from_records(path, records),
        config=_config_from_records(records, include_internal=False),
        summary=_summary_from_records(path, records),
        run_id=run_id,
        project=project,
        record_types=[record.WhichOneof("record_type") or "" for record in records],
    )


def metric_series(
    history: Iterable[dict[str, Any]], key: str, step_key: str = "_step"
) -> list[tuple[int, float]]:
    """Return ``[(step, value), ...]`` for every history row containing ``key``, in order.

    ``step_key`` selects the x-axis: W&B's own ``"_step"`` (default) or e.g.
    ``"trainer/global_step"`` for runs logged through Lightning's ``WandbLogger``. Values are
    converted to ``float`` (ints and bools included; nan/inf preserved). Raises ``KeyError`` if a
    row has ``key`` but not ``step_key`` and ``TypeError`` if a value is not numeric.
    """
    series: list[tuple[int, float]] = []
    for index, row in enumerate(history):
        if key not in row:
            continue
        if step_key not in row:
            raise KeyError(
                f"history row {index} has {key!r} but no step key {step_key!r}: keys {sorted(row)}"
            )
        value = row[key]
        if not isinstance(value, (int, float)):
            raise TypeError(
                f"history row {index}: {key!r} is {type(value).__name__}, not a number: {value!r}"
            )
        step = row[step_key]
        if isinstance(step, float):
            if not step.is_integer() or math.isinf(step):
                raise TypeError(f"history row {index}: step {step_key!r}={step!r} is not an integer")
            step = int(step)
        series.append((step, float(value)))
    return series


# --------------------------------------------------------------------------------------------
# Offline W&B environment for tests
# --------------------------------------------------------------------------------------------


def set_offline_wandb_env(monkeypatch: pytest.MonkeyPatch, root: str | os.PathLike[str]) -> Path:
    """Point every W&B directory at ``root`` and force offline, silent mode (undone by monkeypatch).

    Also points ``TMPDIR`` / ``tempfile.tempdir`` at ``root / "tmp"``, unsets credentials and
    run-selection variables, and disables code/git/console capture and system-stats sampling,
    which would otherwise read outside ``root`` or slow tests down. Returns ``root`` as a ``Path``.
    """
    root = Path(root)
    env = {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": root / "wandb_dir",
        "WANDB_CACHE_DIR": root / "wandb_cache",
        "WANDB_CONFIG_DIR": root / "wandb_config",
        "WANDB_DATA_DIR": root / "wandb_data",
        "WANDB_ARTIFACT_DIR": root / "wandb_artifacts",
        "WANDB_DISABLE_GIT": "true",
        "WANDB_DISABLE_CODE": "true",
        "WANDB_CONSOLE": "off",
        "WANDB_X_DISABLE_STATS": "true",
        "WANDB_X_DISABLE_META": "true",
    }
    for name, value in env.items():
        if isinstance(value, Path):
            value.mkdir(parents=True, exist_ok=True)
        monkeypatch.setenv(name, os.fspath(value))
    # wandb's service launcher puts its port file in a TemporaryDirectory; keep that under root too.
    tmp_dir = root / "tmp"
    tmp_dir.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("TMPDIR", os.fspath(tmp_dir))
    monkeypatch.setattr(tempfile, "tempdir", os.fspath(tmp_dir))
    for name in (
        "WANDB_API_KEY",
        "WANDB_BASE_URL",
        "WANDB_ENTITY",
        "WANDB_PROJECT",
        "WANDB_RUN_ID",
        "WANDB_RESUME",
    ):
        monkeypatch.delenv(name, raising=False)
    return root


def shutdown_wandb() -> None:
    """Finish any active run and stop the wandb-core service process so nothing outlives a test.

    ``wandb.teardown()`` also drops wandb's settings singleton, so the next ``wandb.init`` re-reads
    the (monkeypatched) environment.
    """
    import wandb

    if wandb.run is not None:
        wandb.finish()
    wandb.teardown()


@pytest.fixture
def wandb_offline(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[Path]:
    """Offline, silent W&B confined to ``tmp_path``; tears the wandb service down afterwards.

    Yields ``tmp_path / "wandb_env"`` (where W&B's own dirs live); put run ``dir`` / ``save_dir``
    elsewhere under ``tmp_path`` so :func:`read_run` finds only the run. To use it from a test
    module::

        from tests.helpers.wandb_reader import wandb_offline  # noqa: F401  (pytest fixture)

        @pytest.mark.usefixtures("wandb_offline")
        def test_something(tmp_path): ...
    """
    root = set_offline_wandb_env(monkeypatch, tmp_path / "wandb_env")
    try:
        yield root
    finally:
        shutdown_wandb()
