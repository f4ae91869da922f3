"""Reading a real offline W&B run file back.  wandb 0.31 has no Python reader any more (the old
DataStore is gone, `wandb sync --view` too), so this follows the format: a 7-byte header (":W&B",
magic 0xBEE1, version 0), then LevelDB-log records in 32 KiB blocks (crc32 of type+data, uint16
length, uint8 type FULL/FIRST/MIDDLE/LAST), each record a serialized wandb_internal_pb2.Record."""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path


# --------------------------------------------------------------------------
# Reading a .wandb file back.  wandb 0.31 has no Python reader any more (the
# old DataStore is gone, `wandb sync --view` too), so this follows the format:
# a 7-byte header (":W&B", magic 0xBEE1, version 0), then LevelDB-log records
# in 32 KiB blocks (crc32 of type+data, uint16 length, uint8 type
# FULL/FIRST/MIDDLE/LAST), each record a serialized wandb_internal_pb2.Record.
# --------------------------------------------------------------------------
def read_wandb_records(path: Path) -> list:
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:7] == b":W&B" + struct.pack("<HB", 0xBEE1, 0), data[:7]
    records, pending, pos, block = [], b"", 7, 32768
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # block trailer too short for a header: zero padding
            pos += block - pos % block
            continue
        crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and length == 0:
            break
        chunk = data[pos + 7 : pos + 7 + length]
        assert zlib.crc32(bytes([kind]) + chunk) == crc, f"bad checksum at byte {pos}"
        pos += 7 + length
        pending += chunk
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def wandb_history(records) -> dict[int, dict]:
    """step -> {metric: value} from the history records."""
    out = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {(i.key or ".".join(i.nested_key)): json.loads(i.value_json) for i in r.history.item}
            out[row["_step"]] = row
    return out


def wandb_config(records) -> dict:
    run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
    return {i.key: json.loads(i.value_json) for i in run.config.update}
