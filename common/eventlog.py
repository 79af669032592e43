"""Event records: a `.jsonl` file, one JSON object per line, appended to and never rewritten.

The coordinator's `events.jsonl` (uploads accepted and refused with the reason, key rotations and
revocations, runs started and ended) and a site's `reports/rounds.jsonl` (its metrics in each
federated round). The dashboards show them; nothing else reads them, so a lost line costs a row on
a page, never a decision. Each line is one `write` on a file opened with O_APPEND, so lines from
concurrent writers (the exchange's threads, a `plan-server sites` command) never interleave.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

# the events a page shows; older lines stay in the file
READ_LIMIT = 500


def append_event(path: Path, kind: str, **fields) -> None:
    """Append {"time": unix seconds, "kind": kind, **fields} as one line to `path`."""
    append_json_line(path, {"time": round(time.time(), 3), "kind": kind, **fields})


def append_json_line(path: Path, record: dict) -> None:
    """Append `record` as one JSON line to `path` in one write; after a line cut short by a crash,
    on a line of its own (never glued onto the torn one, which readers skip)."""
    line = json.dumps(record, default=str, sort_keys=True) + "\n"
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            line = "\n" + line
        os.write(fd, line.encode())
    finally:
        os.close(fd)


def read_events(path: Path, *, limit: int = READ_LIMIT) -> list[dict]:
    """The last `limit` events of `path`, newest first; a line that does not parse (a write cut
    short by a crash) is skipped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(errors="replace").splitlines()[-limit:]:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(event, dict) and "kind" in event:
            out.append(event)
    return out[::-1]
