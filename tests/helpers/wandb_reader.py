"""Read back what a real offline wandb run wrote: history rows, summary, config and media files.

wandb stores an offline run as a LevelDB-style log of protobuf records (run-*.wandb). wandb 0.31
no longer ships a reader for it, so this is a small one: 7-byte header (":W&B", magic, version),
then 32 KiB blocks of chunks with a 7-byte header (crc32c, length, type).
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def _records(data: bytes) -> list[bytes]:
    assert data[:4] == b":W&B", "not a wandb run file"
    pos, out, pending = 7, [], b""
    while pos + 7 <= len(data):
        room = _BLOCK - pos % _BLOCK
        if room < 7:  # block trailer padding
            pos += room
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        if kind == _FULL:
            out.append(chunk)
        elif kind == _FIRST:
            pending = chunk
        elif kind == _MIDDLE:
            pending += chunk
        elif kind == _LAST:
            out.append(pending + chunk)
            pending = b""
    return out


@dataclass
class OfflineRun:
    directory: Path
    history: list[dict[str, Any]] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)

    def series(self, key: str) -> list[Any]:
        return [row[key] for row in self.history if key in row]

    def media(self, pattern: str = "*") -> list[Path]:
        return sorted((self.directory / "files" / "media").rglob(pattern))


def _complete_records(run_file: Path, timeout: float) -> list[Any]:
    """The run's records, waiting until wandb's service has written the final ``exit`` record.

    ``run.finish()`` can return before the service process has flushed the file to disk.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    deadline = time.monotonic() + timeout
    while True:
        records = []
        for raw in _records(run_file.read_bytes()):
            record = pb.Record()
            record.ParseFromString(raw)
            records.append(record)
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() > deadline:
            raise AssertionError(f"{run_file} never received its exit record: was finish() called?")
        time.sleep(0.2)


def read_offline_runs(save_dir: str | Path, timeout: float = 60.0) -> list[OfflineRun]:
    """Every finished offline run under ``save_dir`` (the ``save_dir``/``dir`` given to wandb)."""
    runs = []
    for run_file in sorted(Path(save_dir).rglob("offline-run-*/run-*.wandb")):
        run = OfflineRun(directory=run_file.parent)
        for record in _complete_records(run_file, timeout):
            kind = record.WhichOneof("record_type")
            if kind == "history":
                row = {}
                for item in record.history.item:
                    key = item.key or "/".join(item.nested_key)
                    row[key] = json.loads(item.value_json)
                run.history.append(row)
            elif kind == "summary":
                for item in record.summary.update:
                    run.summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
            elif kind == "config":
                for item in record.config.update:
                    run.config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
            elif kind == "run":
                for item in record.run.config.update:
                    run.config[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        runs.append(run)
    return runs
