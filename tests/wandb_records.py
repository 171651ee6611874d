"""Read a W&B offline run back with W&B's own record schema (`wandb.proto.wandb_internal_pb2.Record`).

A `.wandb` file is a LevelDB-style log: a 7-byte header, then 32 KiB blocks of chunks, each with a 7-byte
header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from pathlib import Path


def records(run_file: Path) -> Iterator:
    from wandb.proto import wandb_internal_pb2

    data = Path(run_file).read_bytes()
    assert data[:4] == b":W&B"
    pending, pos, block = b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 0 and length == 0:
            continue
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            yield record


def _items(items) -> dict:
    """Update items as {key: value}; a nested key's parts joined by "/"."""
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def history(run_file: Path) -> list[dict]:
    return [_items(r.history.item) for r in records(run_file) if r.WhichOneof("record_type") == "history"]


def run_record(run_file: Path):
    """The run's own record (id, group, job type) and its initial config as a dict."""
    run = next(r.run for r in records(run_file) if r.WhichOneof("record_type") == "run")
    return run, _items(run.config.update)


def final_summary(run_file: Path) -> dict:
    """Every summary update, later ones winning."""
    summary: dict = {}
    for r in records(run_file):
        if r.WhichOneof("record_type") == "summary":
            summary.update(_items(r.summary.update))
    return summary


def defined_metrics(run_file: Path) -> list:
    return [r.metric for r in records(run_file) if r.WhichOneof("record_type") == "metric"]
