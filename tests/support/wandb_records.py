"""Read back the records of an offline W&B run (``run-<id>.wandb``) in tests.

wandb >= 0.2x ships no Python reader for its run files (the old ``datastore`` module is
gone; the Go core writes them), so this reads the container by hand: a ``:W&B`` header,
then LevelDB-log framing (32 KiB blocks; per record a 4-byte checksum, 2-byte length,
1-byte type FULL/FIRST/MIDDLE/LAST), each payload one ``wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

BLOCK = 32 * 1024
HEADER = 7  # ":W&B", a 2-byte magic, a 1-byte version
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: str | Path) -> list[Any]:
    from wandb.proto import wandb_internal_pb2 as pb

    data = Path(path).read_bytes()
    if len(data) < HEADER:  # not written yet
        return []
    assert data[:4] == b":W&B", f"{path} is not a W&B run file"
    out, pos, pending = [], HEADER, b""
    while pos + 7 <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < 7:  # the block's tail is padding
            pos += left_in_block
            continue
        length, kind = struct.unpack("<HB", data[pos + 4:pos + 7])
        if pos + 7 + length > len(data):  # the record is still being written
            break
        payload = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            break
        pending = payload if kind in (FULL, FIRST) else pending + payload
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def run_file(run_root: str | Path, timeout: float = 60.0) -> Path:
    """The one offline run file under ``<run_root>/wandb``, once it exists."""
    import time

    deadline = time.monotonic() + timeout
    while not (found := sorted(Path(run_root).glob("wandb/offline-run-*/run-*.wandb"))):
        assert time.monotonic() < deadline, f"no W&B run file under {run_root} after {timeout:.0f} s"
        time.sleep(0.2)
    assert len(found) == 1, found
    return found[0]


def finished_records(path: str | Path, timeout: float = 60.0) -> list[Any]:
    """The run file's records once its ``exit`` record is on disk.

    ``wandb.finish`` returning does not mean the service has written the file: under load CI
    read a run file that had no ``run`` record yet. Poll (the exit record is written last)
    and name what was there if it never comes.
    """
    import time

    deadline = time.monotonic() + timeout
    while True:
        found = records(path) if Path(path).exists() else []
        if any(r.WhichOneof("record_type") == "exit" for r in found):
            return found
        if time.monotonic() > deadline:
            kinds = [r.WhichOneof("record_type") for r in found]
            raise AssertionError(f"{path} has no exit record after {timeout:.0f} s: {kinds}")
        time.sleep(0.2)


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)  # W&B stores some keys split at "/"


def run_summary(path: str | Path) -> dict[str, Any]:
    """{"group", "name", "config": {key: value}, "history": [{key: value}], "summary": {..}}."""
    out: dict[str, Any] = {"config": {}, "history": [], "summary": {}}
    for record in finished_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            out["group"], out["name"] = record.run.run_group, record.run.display_name
            for item in record.run.config.update:
                out["config"][_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                out["config"][_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            out["history"].append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                out["summary"][_key(item)] = json.loads(item.value_json)
    return out
