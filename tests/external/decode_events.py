#!/usr/bin/env python3
"""Decodes payerx events the way a consumer outside payerx does: Confluent framing plus the
published .avsc files, nothing else. Reads hex-encoded record values (one per line) on stdin,
prints one JSON object per line.

    python3 decode_events.py schemas/avro < values.hex
"""
import io
import json
import pathlib
import sys

import fastavro

root = pathlib.Path(sys.argv[1])
registry = json.loads((root / "registry.json").read_text())
schemas = {e["id"]: fastavro.parse_schema(json.loads((root / e["file"]).read_text())) for e in registry}

for line in sys.stdin:
    value = bytes.fromhex(line.strip())
    if value[0] != 0:
        raise SystemExit(f"not Confluent-framed: magic byte {value[0]}")
    schema_id = int.from_bytes(value[1:5], "big")
    record = fastavro.schemaless_reader(io.BytesIO(value[5:]), schemas[schema_id])
    print(json.dumps({"schema_id": schema_id, "value": record}, default=str))
