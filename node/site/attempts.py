"""Audit attempts, counted per training data (issue 13).

A gate that may be retried until it passes is no gate: with enough synthesis seeds one set
passes by chance. So every audit on the same training data (the digest of data/dataset.npz and
data/splits.json) is a line in the site's ledger, {"stage": "audit_attempt", ...}, and the audit
signs its attempt number and how many earlier attempts failed. After `policy.max_attempts`
failed attempts, another one needs a synthesis seed no earlier attempt used and a note saying why
(`plan-node audit --note`); both go into the signed audit.
"""

from __future__ import annotations

import time

from common import errors
from common.eventlog import append_json_line
from common.fileio import sha256_file
from node.site.workspace import Workspace, ledger_lines

STAGE = "audit_attempt"


class AttemptRefused(Exception):
    """Raised before an audit that the attempt limit refuses; the message says what to do."""

    exit_code = errors.GATE


def data_digest(ws: Workspace) -> str:
    """sha256 over the ingested data and its split: what "the same training data" means."""
    return sha256_file(ws.data / "dataset.npz") + sha256_file(ws.data / "splits.json")


def earlier_attempts(ws: Workspace, digest: str) -> list[dict]:
    """The ledger's attempt lines for this training data, oldest first."""
    return [e for e in ledger_lines(ws) if e.get("stage") == STAGE and e.get("data") == digest]


def next_attempt(ws: Workspace, *, seed: int, max_attempts: int, note: str | None) -> dict:
    """The attempt about to run: {"number", "failed_before", "seed", "note"}. Raises AttemptRefused
    when `max_attempts` attempts on this data already failed and this one lacks a new seed or a note."""
    digest = data_digest(ws)
    prior = earlier_attempts(ws, digest)
    failed = sum(1 for e in prior if not e.get("passed"))
    if failed >= max_attempts:
        used = sorted({e.get("seed") for e in prior if isinstance(e.get("seed"), int)})
        missing = []
        if seed in used:
            missing.append(f"a synthesis seed not used before (synth.seed is {seed}; used: {used})")
        if not (note and note.strip()):
            missing.append("a note saying why (plan-node audit --note TEXT)")
        if missing:
            raise AttemptRefused(
                f"{failed} audit attempts on this training data failed (policy.max_attempts {max_attempts}); "
                f"another attempt needs {' and '.join(missing)}"
            )
    return {
        "number": len(prior) + 1,
        "failed_before": failed,
        "seed": seed,
        "note": (note or "").strip() or None,
        "max_attempts": max_attempts,
    }


def record_attempt(ws: Workspace, attempt: dict, *, run_id: str, passed: bool) -> None:
    """Append the finished attempt to the ledger (one line, one write call)."""
    entry = {
        "stage": STAGE,
        "data": data_digest(ws),
        "run_id": run_id,
        "passed": bool(passed),
        "time": time.time(),
        **attempt,
    }
    ws.ledger.parent.mkdir(parents=True, exist_ok=True)
    append_json_line(ws.ledger, entry)
